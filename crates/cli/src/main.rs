//! `diffuse`: diffusion models from the command line.

mod info;
mod schedulers_cmd;

use clap::{Parser, Subcommand};

/// Diffusion models in Rust: schedulers, models and pipelines compatible with Hugging Face
/// diffusers checkpoints.
#[derive(Parser, Debug)]
#[command(
    name = "diffuse",
    version,
    about = "Diffusion models in Rust: run diffusers checkpoints (Stable Diffusion, DDPM) with schedulers at parity with Python diffusers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what a model folder holds: components, classes, parameter counts, dtypes.
    Info(info::InfoArgs),
    /// List the schedulers, or show the schedule one of them runs.
    Schedulers(schedulers_cmd::SchedulersArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Schedulers(a) => schedulers_cmd::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
