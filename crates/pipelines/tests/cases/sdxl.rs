//! `StableDiffusionXLPipeline` / `StableDiffusionXLImg2ImgPipeline` cases.

use anyhow::{bail, Context, Result};
use diffuse_pipelines::{
    load_pipeline, GenerationParams, Img2ImgRequest, InpaintRequest, Pipeline, SdxlOptions,
    StableDiffusionXLPipeline, Text2ImageRequest,
};

use crate::harness::{trace_tensors, Case, Produced};

pub fn load(case: &Case) -> Result<StableDiffusionXLPipeline> {
    let dir = case.pipeline_path()?;
    let opts = case.load_options()?;
    match load_pipeline(&dir, &opts)? {
        Pipeline::StableDiffusionXL(p) => Ok(*p),
        other => bail!("expected an SDXL pipeline, got {}", other.class_name()),
    }
}

/// The call's common settings.
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
    let pipe = load(case)?;
    let params = params(case)?;
    let opts = SdxlOptions::default();
    let mut produced = Produced::new();
    let out = match case.task.as_str() {
        "text2img" => {
            let mut warnings = Vec::new();
            let embeds = pipe.encode_prompt(&params, &opts, &mut warnings)?;
            produced.insert("prompt_embeds".into(), embeds.prompt_embeds.clone());
            produced.insert(
                "pooled_prompt_embeds".into(),
                embeds.pooled_prompt_embeds.clone(),
            );
            if let (Some(n), Some(np)) = (
                &embeds.negative_prompt_embeds,
                &embeds.negative_pooled_prompt_embeds,
            ) {
                produced.insert("negative_prompt_embeds".into(), n.clone());
                produced.insert("negative_pooled_prompt_embeds".into(), np.clone());
            }
            let req = Text2ImageRequest {
                params,
                height: case.opt_usize("height"),
                width: case.opt_usize("width"),
                latents: None,
            };
            pipe.text_to_image(&req, &opts, None)?
        }
        "img2img" => {
            let path = case.case_file(&case.arg_str("init_image")?);
            let image = image::open(&path)
                .with_context(|| path.display().to_string())?
                .to_rgb8();
            let req = Img2ImgRequest {
                params,
                image,
                strength: case.arg_f64("strength")?,
            };
            pipe.img2img(&req, &opts, None)?
        }
        "inpaint" => {
            let open = |k: &str| -> Result<image::DynamicImage> {
                let path = case.case_file(&case.arg_str(k)?);
                image::open(&path).with_context(|| path.display().to_string())
            };
            let req = InpaintRequest {
                params,
                image: open("init_image")?.to_rgb8(),
                mask: open("mask_image")?.to_luma8(),
                strength: case.arg_f64("strength")?,
                height: case.opt_usize("height"),
                width: case.opt_usize("width"),
                latents: None,
            };
            pipe.inpaint(&req, &opts, None)?
        }
        other => bail!("task `{other}` is not an SDXL task here"),
    };
    produced.extend(trace_tensors(out.trace.as_ref().context("no trace")?)?);
    produced.insert("image".into(), out.images);
    Ok(produced)
}
