//! `StableDiffusionControlNetPipeline` / `StableDiffusionXLControlNetPipeline` cases: a pipeline
//! folder plus one ControlNet folder or a list of them, with a control image, scale and
//! guidance window each (a single value or one per ControlNet), and guess mode.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use diffuse_pipelines::{
    load_controlnet, load_pipeline, ControlNetRequest, ControlNetUnit, Pipeline, SdxlOptions,
    Text2ImageRequest,
};

use crate::harness::{trace_tensors, Case, Produced};

/// `v` as a list: a string or number is one element, a list its elements.
fn list(v: &serde_json::Value) -> Vec<serde_json::Value> {
    match v {
        serde_json::Value::Array(a) => a.clone(),
        serde_json::Value::Null => vec![],
        other => vec![other.clone()],
    }
}

/// Element `i` of a per-ControlNet setting, or `default` when absent.
fn nth_f64(v: &serde_json::Value, i: usize, default: f64) -> Result<f64> {
    match list(v).as_slice() {
        [] => Ok(default),
        [one] => one.as_f64().context("a number"),
        many => many
            .get(i)
            .and_then(|x| x.as_f64())
            .context("one number per ControlNet"),
    }
}

pub fn run(case: &Case) -> Result<Produced> {
    let opts = case.load_options()?;
    let folders = list(&case.json["controlnet"]);
    let images = list(&case.args["control_image"]);
    if folders.is_empty() || folders.len() != images.len() {
        bail!(
            "{} ControlNets for {} control images",
            folders.len(),
            images.len()
        );
    }
    let mut units = Vec::new();
    for (i, (folder, image)) in folders.iter().zip(&images).enumerate() {
        let rel = folder.as_str().context("controlnet folder")?;
        let path = case.case_file(image.as_str().context("control image")?);
        let image = image::open(&path)
            .with_context(|| path.display().to_string())?
            .to_rgb8();
        let mut unit = ControlNetUnit::new(load_controlnet(&case.path(rel), &opts)?, rel, image);
        unit.scale = nth_f64(&case.args["controlnet_conditioning_scale"], i, 1.0)?;
        unit.guidance_start = nth_f64(&case.args["control_guidance_start"], i, 0.0)?;
        unit.guidance_end = nth_f64(&case.args["control_guidance_end"], i, 1.0)?;
        units.push(unit);
    }
    let mut params = crate::sdxl::params(case)?;
    params.controlnet = Some(ControlNetRequest {
        units,
        guess_mode: case.args["guess_mode"].as_bool().unwrap_or(false),
    });
    let req = Text2ImageRequest {
        params,
        height: case.opt_usize("height"),
        width: case.opt_usize("width"),
        latents: None,
    };
    let dir = case.pipeline_path()?;
    let out = match load_pipeline(&dir, &opts)? {
        Pipeline::StableDiffusion(p) => p.text_to_image(&req, None)?,
        Pipeline::StableDiffusionXL(p) => p.text_to_image(&req, &SdxlOptions::default(), None)?,
        other => bail!("no ControlNet support for {}", other.class_name()),
    };
    let trace = out.trace.as_ref().context("no trace")?;
    let mut produced = trace_tensors(trace)?;
    produced.insert(
        "controlnet_input".into(),
        Tensor::stack(&trace.controlnet_inputs, 0)?,
    );
    produced.insert("image".into(), out.images);
    Ok(produced)
}
