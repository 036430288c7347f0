//! `diffuse convert`: a single-file checkpoint to a diffusers folder, or back.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use diffuse_pipelines::convert::{folder_to_single_file, single_file_to_folder};

use crate::device::DtypeArg;

#[derive(Args, Debug, Clone)]
pub struct ConvertArgs {
    /// A single-file checkpoint (.safetensors / .ckpt in the original Stable Diffusion layout)
    /// to turn into a diffusers folder, or a diffusers folder to turn into a single
    /// .safetensors file.
    pub input: PathBuf,
    /// The folder (or file) to write; it must not exist yet.
    #[arg(long, short)]
    pub output: PathBuf,
    /// For a single file: a diffusers folder whose configs describe it (default: the
    /// architecture is recognised from the file).
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// Store the weights in this precision (default: as they are stored now).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let dtype = args.dtype.map(Into::into);
    if args.output.exists() {
        bail!(
            "{} exists; remove it or pick another --output",
            args.output.display()
        );
    }
    if args.input.is_dir() {
        if args.config.is_some() {
            bail!("--config is for single-file inputs; a folder carries its own configs");
        }
        folder_to_single_file(&args.input, &args.output, dtype)?;
    } else {
        single_file_to_folder(&args.input, args.config.as_deref(), &args.output, dtype)?;
    }
    println!("wrote {}", args.output.display());
    Ok(())
}
