//! Image to image: repaint a picture after a prompt, keeping its composition.
//!
//! ```text
//! cargo run --release --example img2img -- <model> <input.png> "<prompt>" [strength]
//! ```
//!
//! Writes `img2img.png` into the current folder; `strength` (default 0.6) is the share of
//! the schedule that runs (1 ignores the input).

use diffuse::pipelines::task::InitImage;
use diffuse::{DiffusionPipeline, LoadOptions, Params};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, input, prompt, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: img2img <model> <input.png> <prompt> [strength]");
    };
    let strength = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(0.6);
    let image = image::open(input)?.to_rgb8();

    let pipe = DiffusionPipeline::from_pretrained(model, &LoadOptions::default())?;
    let params = Params {
        prompt: prompt.clone(),
        // Generate at the input's size.
        width: Some(image.width() as usize),
        height: Some(image.height() as usize),
        init: Some(InitImage {
            image,
            mask: None,
            strength,
        }),
        ..Default::default()
    };
    let out = pipe.run(&params)?;
    std::fs::write("img2img.png", &out.pngs()?[0])?;
    println!("img2img.png: {}", out.infotext);
    Ok(())
}
