//! Text to image with any supported model:
//!
//! ```text
//! cargo run --release --example txt2img -- <model folder, file or hub id> "<prompt>" [steps] [seed]
//! ```
//!
//! Writes `txt2img-<seed>.png` (with the A1111 infotext) into the current folder.

use diffuse::{DiffusionPipeline, LoadOptions, Params};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, prompt, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: txt2img <model> <prompt> [steps] [seed]");
    };
    let steps = rest.first().map(|s| s.parse()).transpose()?;
    let seed = rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(0);

    let pipe = DiffusionPipeline::from_pretrained(model, &LoadOptions::default())?;
    let params = Params {
        prompt: prompt.clone(),
        steps,
        seed,
        ..Default::default()
    };
    let out = pipe.run(&params)?;
    for warning in &out.warnings {
        eprintln!("warning: {warning}");
    }
    let path = format!("txt2img-{seed}.png");
    std::fs::write(&path, &out.pngs()?[0])?;
    println!("{path}: {}", out.infotext);
    Ok(())
}
