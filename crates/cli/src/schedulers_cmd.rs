//! `diffuse schedulers`: the schedulers available, and the schedule one would run.

use std::path::PathBuf;

use anyhow::Result;
use diffuse_schedulers::registry::a1111_names_of;
use diffuse_schedulers::{SchedulerConfig, CLASS_NAMES};

#[derive(clap::Args, Debug)]
pub struct SchedulersArgs {
    /// Show the timesteps (and sigmas) this scheduler runs: a diffusers class name or an A1111
    /// name such as "Euler a" or "DPM++ 2M Karras".
    #[arg(long)]
    pub show: Option<String>,
    /// The scheduler_config.json to build it from (default: Stable Diffusion 1.5's settings).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Number of inference steps for --show.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
}

/// Stable Diffusion 1.x's training schedule, the usual base for swapping schedulers.
const SD_BASE: &str = r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
  "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": false, "skip_prk_steps": true,
  "clip_sample": false}"#;

pub fn run(args: SchedulersArgs) -> Result<()> {
    let Some(name) = args.show else {
        println!("Schedulers (diffusers class names; A1111 names in brackets):");
        for c in CLASS_NAMES {
            println!("  {c:<36} [{}]", a1111_names_of(c).join(", "));
        }
        return Ok(());
    };
    let base = match &args.config {
        Some(p) => SchedulerConfig::from_file(p)?,
        None => SchedulerConfig::from_json_str(SD_BASE)?,
    };
    let mut s = diffuse_schedulers::from_name(&name, &base)?;
    s.set_timesteps(args.steps)?;
    println!(
        "{} ({} model evaluations, init_noise_sigma {:.4})",
        s.class_name(),
        s.timesteps().len(),
        s.init_noise_sigma()
    );
    let ts: Vec<String> = s.timesteps().iter().map(|t| format!("{t:.2}")).collect();
    println!("timesteps: {}", ts.join(" "));
    if let Some(sig) = s.sigmas() {
        let sg: Vec<String> = sig.iter().map(|t| format!("{t:.4}")).collect();
        println!("sigmas:    {}", sg.join(" "));
    }
    Ok(())
}
