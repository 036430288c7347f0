//! `StableDiffusionControlNetPipeline` cases: a Stable Diffusion folder plus a ControlNet
//! folder, one control image.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use diffuse_pipelines::{
    load_controlnet, load_pipeline, ControlNetRequest, ControlNetUnit, GenerationParams,
    LoadOptions, Pipeline, Text2ImageRequest,
};

use crate::harness::{trace_tensors, Case, Produced};

pub fn run(case: &Case) -> Result<Produced> {
    let opts = LoadOptions {
        scheduler: case.opt_str("scheduler"),
        ..Default::default()
    };
    let dir = case.pipeline_path()?;
    let Pipeline::StableDiffusion(pipe) = load_pipeline(&dir, &opts)? else {
        bail!("expected a Stable Diffusion pipeline");
    };
    let cn_rel = case.json["controlnet"].as_str().context("controlnet")?;
    let model = load_controlnet(&case.path(cn_rel), &opts)?;
    let path = case.case_file(&case.arg_str("control_image")?);
    let image = image::open(&path)
        .with_context(|| path.display().to_string())?
        .to_rgb8();
    let mut unit = ControlNetUnit::new(model, cn_rel, image);
    if let Some(s) = case.args["controlnet_conditioning_scale"].as_f64() {
        unit.scale = s;
    }
    let req = Text2ImageRequest {
        params: GenerationParams {
            prompts: vec![case.arg_str("prompt")?],
            negative_prompts: case.opt_str("negative_prompt").into_iter().collect(),
            guidance_scale: case.arg_f64("guidance_scale")?,
            steps: case.arg_usize("num_inference_steps")?,
            seed: case.seed()?,
            record_trace: true,
            controlnet: Some(ControlNetRequest {
                units: vec![unit],
                guess_mode: false,
            }),
            ..Default::default()
        },
        height: case.opt_usize("height"),
        width: case.opt_usize("width"),
        latents: None,
    };
    let out = pipe.text_to_image(&req, None)?;
    let trace = out.trace.as_ref().context("no trace")?;
    let mut produced = trace_tensors(trace)?;
    produced.insert(
        "controlnet_input".into(),
        Tensor::stack(&trace.controlnet_inputs, 0)?,
    );
    produced.insert("image".into(), out.images);
    Ok(produced)
}
