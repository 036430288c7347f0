//! SDXL base → refiner hand-off against diffusers (`fixtures/sdxl_handoff/`, made by
//! `fixtures/generate/sdxl_handoff.py`): the base stops at `denoising_end` and returns latents,
//! the refiner (no first text encoder, aesthetic-score time ids) starts there from them.

use anyhow::{bail, Context, Result};
use diffuse_core::testing::{
    assert_close, fixture_subdir, fixtures_dir, get, load_tensors, read_json,
};
use diffuse_pipelines::{
    load_pipeline, GenerationParams, InitImage, LoadOptions, Pipeline, SdxlOptions,
    StableDiffusionXLPipeline, Text2ImageRequest,
};

fn load(rel: &str) -> Result<StableDiffusionXLPipeline> {
    match load_pipeline(&fixtures_dir().join(rel), &LoadOptions::default())? {
        Pipeline::StableDiffusionXL(p) => Ok(*p),
        other => bail!("{rel}: expected SDXL, got {}", other.class_name()),
    }
}

#[test]
fn base_to_refiner_matches_diffusers() -> Result<()> {
    let dir = fixture_subdir("sdxl_handoff");
    let info = read_json(&dir.join("info.json"))?;
    let want = load_tensors(&dir.join("expected.safetensors"))?;
    let num = |k: &str| info[k].as_f64().with_context(|| k.to_string());
    let params = GenerationParams {
        prompts: vec![info["prompt"].as_str().context("prompt")?.into()],
        negative_prompts: vec![info["negative_prompt"].as_str().context("negative")?.into()],
        guidance_scale: num("guidance_scale")?,
        steps: num("num_inference_steps")? as usize,
        seed: num("seed")? as u64,
        record_trace: true,
        ..Default::default()
    };
    let base = load("cases/_models/tiny_sdxl")?;
    let req = Text2ImageRequest {
        params: params.clone(),
        height: Some(num("height")? as usize),
        width: Some(num("width")? as usize),
        latents: None,
    };
    let base_opts = SdxlOptions {
        denoising_end: Some(num("denoising_end")?),
        ..Default::default()
    };
    let latents = base.text_to_latents(&req, &base_opts, None)?.latents;
    assert_close(
        "base_latents",
        &latents,
        get(&want, "base_latents")?,
        1e-3,
        1e-3,
    )?;

    let refiner = load("cases/_models/tiny_sdxl_refiner")?;
    assert!(refiner.text_encoder.is_none() && refiner.requires_aesthetics_score);
    let opts = SdxlOptions {
        denoising_start: Some(num("denoising_start")?),
        aesthetic_score: num("aesthetic_score")?,
        negative_aesthetic_score: num("negative_aesthetic_score")?,
        ..Default::default()
    };
    let out = refiner.img2img_latents(&params, InitImage::Latents(&latents), 0.3, &opts, None)?;
    let timesteps = out.trace.as_ref().context("trace")?.unet_timesteps.clone();
    let want_t: Vec<f64> = serde_json::from_value(info["refiner_timesteps"].clone())?;
    if timesteps != want_t {
        bail!("refiner timesteps {timesteps:?}, diffusers {want_t:?}");
    }
    let image = refiner.decode(out)?.images;
    assert_close("image", &image, get(&want, "image")?, 2e-3, 0.0)
}
