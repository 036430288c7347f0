//! `diffuse`: diffusion models from the command line.

// The argument structs' doc comments are the `--help` text, written for a terminal
// (`<output>`, `[word]`), not rustdoc markup.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

mod bench;
mod classifier;
mod convert;
mod device;
mod dist;
mod eval;
mod generate;
mod info;
mod label_grid;
mod schedulers_cmd;
mod serve;
mod train;
mod train_lora;

use clap::{Parser, Subcommand};

/// Diffusion models in Rust: schedulers, models and pipelines compatible with Hugging Face
/// diffusers checkpoints.
#[derive(Parser, Debug)]
#[command(
    name = "diffuse",
    version,
    about = "Diffusion models in Rust: run diffusers checkpoints and single files (Stable Diffusion 1.x/2.x/XL/3, Flux, DiT, DDPM) at parity with Python diffusers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Convert a single-file checkpoint to a diffusers folder, or a folder to a single file.
    Convert(convert::ConvertArgs),
    /// Show what a model folder or single file holds: components, classes, parameter counts,
    /// dtypes.
    Info(info::InfoArgs),
    /// List the schedulers, or show the schedule one of them runs.
    Schedulers(schedulers_cmd::SchedulersArgs),
    /// Text-to-image with Stable Diffusion (1.x, 2.x, XL, 3), Flux or DiT; class-conditional or
    /// unconditional DDPM sampling.
    Generate(generate::GenerateArgs),
    /// Image-to-image: redraw an init image following a prompt.
    Img2img(generate::Img2ImgArgs),
    /// Inpainting: repaint the white part of a mask.
    Inpaint(generate::InpaintArgs),
    /// Train a UNet2DModel (DDPM) on an image dataset and save a diffusers DDPMPipeline folder.
    Train(train::TrainArgs),
    /// Train a LoRA on a Stable Diffusion model's UNet from captioned images (or DreamBooth
    /// style) and save it for diffuse, diffusers or A1111.
    TrainLora(train_lora::TrainLoraArgs),
    /// Train the small CNN classifier that `eval` scores class-conditional models with.
    Classifier(classifier::ClassifierArgs),
    /// Score a class-conditional model: class accuracy of its samples, Fréchet distance.
    Eval(eval::EvalArgs),
    /// Time the real SD 1.5 / DDPM architectures and hot ops (random weights), optionally
    /// against PyTorch on the same machine.
    Bench(bench::BenchArgs),
    /// Serve the models over HTTP: AUTOMATIC1111 and OpenAI image APIs, jobs with live
    /// progress (Server-Sent Events) and a web page at `/`.
    Serve(serve::ServeArgs),
}

/// glibc serves every block over its mmap threshold (128 KiB at first) with a fresh `mmap`
/// and returns it with `munmap` on free, so each tensor the size of an activation costs a
/// page fault per 4 KiB when it is first written: measured here, half of a small CNN's
/// training time went to the kernel. Blocks up to 32 MiB (glibc's maximum threshold) are
/// reused from the heap instead, and the heap is trimmed only past 512 MiB of free top.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// The value parser of every number flag: Rust's float parsing takes `nan`, `inf` and
/// `1e999`, which would run (or silently switch a setting off, as `--clip-grad nan` did)
/// instead of being refused here with the flag's name.
fn finite_number(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        Ok(_) => Err("not a finite number".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn main() {
    tune_malloc();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Schedulers(a) => schedulers_cmd::run(a),
        Command::Generate(a) => generate::run_generate(a),
        Command::Img2img(a) => generate::run_img2img(a),
        Command::Inpaint(a) => generate::run_inpaint(a),
        Command::Train(a) => train::run(a),
        Command::TrainLora(a) => train_lora::run(a),
        Command::Classifier(a) => classifier::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
