//! `StableDiffusionPipeline` cases: diffusers folders or single files, with LoRAs and
//! textual-inversion embeddings, text-to-image.

use anyhow::{bail, Context, Result};
use candle_core::{Device, IndexOp, Tensor};
use diffuse_pipelines::{
    load_pipeline, EmbeddingSpec, GenerationParams, LoadOptions, LoraSpec, Pipeline,
    StableDiffusionPipeline, Text2ImageRequest,
};

use crate::harness::{trace_tensors, Case, Produced};

const ARGS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "seed",
    "scheduler",
    "textual_inversions",
    "loras",
];

fn options(case: &Case) -> Result<LoadOptions> {
    let mut textual_inversions = Vec::new();
    if let Some(list) = case.args["textual_inversions"].as_array() {
        for e in list {
            textual_inversions.push(EmbeddingSpec {
                path: case.path(e["file"].as_str().context("textual_inversions[].file")?),
                token: e["token"].as_str().map(str::to_string),
            });
        }
    }
    let mut loras = Vec::new();
    if let Some(list) = case.args["loras"].as_array() {
        for l in list {
            // The format (`diffusers` / `kohya`) is recognised from the file's keys.
            loras.push(LoraSpec {
                path: case.path(l["file"].as_str().context("loras[].file")?),
                scale: l["scale"].as_f64().context("loras[].scale")?,
            });
        }
    }
    Ok(LoadOptions {
        textual_inversions,
        loras,
        config: case.opt_path("config"),
        ..case.load_options()?
    })
}

pub fn load(case: &Case) -> Result<StableDiffusionPipeline> {
    match load_pipeline(&case.pipeline_path()?, &options(case)?)? {
        Pipeline::StableDiffusion(p) => Ok(*p),
        other => bail!(
            "expected a Stable Diffusion pipeline, got {}",
            other.class_name()
        ),
    }
}

pub fn params(case: &Case) -> Result<GenerationParams> {
    Ok(GenerationParams {
        prompts: vec![case.arg_str("prompt")?],
        negative_prompts: case.opt_str("negative_prompt").into_iter().collect(),
        guidance_scale: case.arg_f64("guidance_scale")?,
        steps: case.arg_usize("num_inference_steps")?,
        seed: case.seed()?,
        record_trace: true,
        ..Default::default()
    })
}

pub fn run(case: &Case) -> Result<Produced> {
    case.check_args_known(ARGS)?;
    if case.task != "text2img" {
        bail!(
            "task {} is not handled by the Stable Diffusion runner",
            case.task
        );
    }
    let pipe = load(case)?;
    let params = params(case)?;
    let req = Text2ImageRequest {
        params: params.clone(),
        height: case.opt_usize("height"),
        width: case.opt_usize("width"),
        latents: None,
    };
    let out = pipe.text_to_image(&req, None)?;
    let mut got = trace_tensors(out.trace.as_ref().context("no trace recorded")?)?;
    got.insert("image".into(), out.images);

    let prompt = case.arg_str("prompt")?;
    // The reference generator recorded `input_ids` for the prompt as given, and the prompt
    // embeddings of `encode_prompt` called on the prompt it had already expanded with
    // `maybe_convert_prompt` (so diffusers expanded multi-vector tokens twice there); the image
    // comes from the plain pipeline call. Each is reproduced as it was recorded.
    let (ids, _) = pipe
        .tokenizer
        .encode_padded(&prompt, pipe.tokenizer.max_length())?;
    let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
    got.insert(
        "input_ids".into(),
        Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu)?,
    );
    let embed_params = GenerationParams {
        prompts: vec![pipe.expand_embedding_tokens(&prompt)],
        ..params
    };
    let enc = pipe.encode_prompt(&embed_params, &mut Vec::new())?;
    if enc.guided {
        let b = enc.batch;
        got.insert("negative_prompt_embeds".into(), enc.embeds.i(..b)?);
        got.insert("prompt_embeds".into(), enc.embeds.i(b..)?);
    } else {
        got.insert("prompt_embeds".into(), enc.embeds);
    }
    Ok(got)
}
