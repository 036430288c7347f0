//! `FluxPipeline` cases: text-to-image with CLIP's pooled output and T5, guidance embedded in
//! the model (dev) or absent (schnell).

use anyhow::{bail, Context, Result};
use diffuse_pipelines::Pipeline;

use crate::harness::{trace_tensors, Case, Produced};

const ARGS: &[&str] = &[
    "prompt",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "seed",
    "max_sequence_length",
    "scheduler",
];

pub fn run(case: &Case) -> Result<Produced> {
    case.check_args_known(ARGS)?;
    let Pipeline::Flux(pipe) = crate::sd3::load(case)? else {
        bail!("expected a Flux pipeline");
    };
    let mut req = crate::sd3::request(case)?;
    let text = pipe.encode_prompt(
        &req.prompts,
        req.max_sequence_length.unwrap_or(512),
        &mut Vec::new(),
    )?;
    let mut got = Produced::new();
    got.insert("prompt_embeds".into(), text.embeds.clone());
    got.insert("pooled_prompt_embeds".into(), text.pooled.clone());
    req.prompt_embeds = Some(text);
    let out = pipe.text_to_image(&req, None)?;
    got.extend(trace_tensors(
        out.trace.as_ref().context("no trace recorded")?,
    )?);
    got.insert("image".into(), out.images);
    Ok(got)
}
