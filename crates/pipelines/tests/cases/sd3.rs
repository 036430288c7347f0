//! `StableDiffusion3Pipeline` cases: text-to-image with two CLIP encoders and T5.

use anyhow::{bail, Context, Result};
use diffuse_pipelines::{load_pipeline, FlowText2ImageRequest, Pipeline};

use crate::harness::{trace_tensors, Case, Produced};

const ARGS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "seed",
    "max_sequence_length",
    "scheduler",
];

/// The request of a flow-matching text-to-image case (SD3 and Flux take the same arguments).
pub fn request(case: &Case) -> Result<FlowText2ImageRequest> {
    Ok(FlowText2ImageRequest {
        prompts: vec![case.arg_str("prompt")?],
        negative_prompts: case.opt_str("negative_prompt").into_iter().collect(),
        guidance_scale: case.arg_f64("guidance_scale")?,
        steps: case.arg_usize("num_inference_steps")?,
        seed: case.seed()?,
        height: case.opt_usize("height"),
        width: case.opt_usize("width"),
        max_sequence_length: case.opt_usize("max_sequence_length"),
        record_trace: true,
        ..Default::default()
    })
}

/// The case's pipeline folder, with its `scheduler` swapped in when the case names one.
pub fn load(case: &Case) -> Result<Pipeline> {
    if case.task != "text2img" {
        bail!(
            "task {} is not handled by the {} runner",
            case.task,
            case.class
        );
    }
    Ok(load_pipeline(
        &case.pipeline_path()?,
        &case.load_options()?,
    )?)
}

pub fn run(case: &Case) -> Result<Produced> {
    case.check_args_known(ARGS)?;
    let Pipeline::StableDiffusion3(pipe) = load(case)? else {
        bail!("expected a Stable Diffusion 3 pipeline");
    };
    let mut req = request(case)?;
    // The embeddings are encoded once, recorded, and given to the run (as diffusers'
    // `prompt_embeds=` arguments), so that the run uses exactly what is compared.
    let text = pipe.encode_prompt(
        &req.prompts,
        &req.negative_prompts,
        req.guidance_scale > 1.0,
        req.max_sequence_length.unwrap_or(256),
        None,
        &mut Vec::new(),
    )?;
    let mut got = Produced::new();
    got.insert("prompt_embeds".into(), text.embeds.clone());
    got.insert("pooled_prompt_embeds".into(), text.pooled.clone());
    if let Some((neg, neg_pooled)) = &text.negative {
        got.insert("negative_prompt_embeds".into(), neg.clone());
        got.insert("negative_pooled_prompt_embeds".into(), neg_pooled.clone());
    }
    req.prompt_embeds = Some(text);
    let out = pipe.text_to_image(&req, None)?;
    got.extend(trace_tensors(
        out.trace.as_ref().context("no trace recorded")?,
    )?);
    got.insert("image".into(), out.images);
    Ok(got)
}
