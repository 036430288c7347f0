//! The diffusion transformers against diffusers, call by call: each whole-pipeline reference
//! case records every input the pipeline gave its transformer and the output it got back
//! (`fixtures/cases/<case>/expected.safetensors`), so each call is replayed here on the case's
//! tiny model.

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use diffuse_core::testing::{assert_close, fixtures_dir, get, load_tensors, read_json};
use diffuse_models::transformer_dit::DiTTransformer2DModel;

/// `(expected tensors, case.json)` of a reference case.
fn case(name: &str) -> Result<(std::collections::HashMap<String, Tensor>, serde_json::Value)> {
    let dir = fixtures_dir().join("cases").join(name);
    let tensors = load_tensors(&dir.join("expected.safetensors"))?;
    let json = read_json(&dir.join("case.json"))?;
    Ok((tensors, json))
}

fn tolerances(json: &serde_json::Value) -> Result<(f64, f64)> {
    let t = &json["tolerance"];
    Ok((
        t["tensor_atol"].as_f64().context("tensor_atol")?,
        t["tensor_rtol"].as_f64().context("tensor_rtol")?,
    ))
}

/// Every DiT call of `dit_class2img`: the guided batch `[labels, null × n]`.
#[test]
fn dit_matches_diffusers_calls() -> Result<()> {
    let (expected, json) = case("dit_class2img")?;
    let (atol, rtol) = tolerances(&json)?;
    let dir = fixtures_dir().join("cases/_models/tiny_dit/transformer");
    let model = DiTTransformer2DModel::from_pretrained(&dir, None, DType::F32, &Device::Cpu)?;
    let labels: Vec<u32> = serde_json::from_value(json["args"]["class_labels"].clone())?;
    let null = model.config().num_classes() as u32;
    let mut all = labels.clone();
    all.extend(std::iter::repeat_n(null, labels.len()));
    let labels = Tensor::new(all.as_slice(), &Device::Cpu)?;
    let inputs = get(&expected, "denoiser_input")?;
    let timesteps = get(&expected, "denoiser_timestep")?;
    let outputs = get(&expected, "denoiser_output")?;
    for i in 0..inputs.dim(0)? {
        let out = model.forward(&inputs.i(i)?, &timesteps.i(i)?, &labels)?;
        assert_close(&format!("call {i}"), &out, &outputs.i(i)?, atol, rtol)?;
    }
    Ok(())
}

/// Every SD3 call of `sd3_text2img_flowmatch`: the guided batch `[negative, prompt]`.
#[test]
fn sd3_matches_diffusers_calls() -> Result<()> {
    use diffuse_models::transformer_sd3::SD3Transformer2DModel;
    let (expected, json) = case("sd3_text2img_flowmatch")?;
    let (atol, rtol) = tolerances(&json)?;
    let dir = fixtures_dir().join("cases/_models/tiny_sd3/transformer");
    let model = SD3Transformer2DModel::from_pretrained(&dir, None, DType::F32, &Device::Cpu)?;
    let cat = |a: &str, b: &str| -> Result<Tensor> {
        Ok(Tensor::cat(&[get(&expected, a)?, get(&expected, b)?], 0)?)
    };
    let embeds = cat("negative_prompt_embeds", "prompt_embeds")?;
    let pooled = cat("negative_pooled_prompt_embeds", "pooled_prompt_embeds")?;
    let inputs = get(&expected, "denoiser_input")?;
    let timesteps = get(&expected, "denoiser_timestep")?;
    let outputs = get(&expected, "denoiser_output")?;
    for i in 0..inputs.dim(0)? {
        let out = model.forward(&inputs.i(i)?, &embeds, &pooled, &timesteps.i(i)?)?;
        assert_close(&format!("call {i}"), &out, &outputs.i(i)?, atol, rtol)?;
    }
    Ok(())
}

/// `(H/2 · W/2, 3)` image position ids `(0, row, col)` of Flux's packed latents, as the
/// pipeline's `_prepare_latent_image_ids` makes them.
fn flux_image_ids(rows: usize, cols: usize) -> Result<Tensor> {
    let ids: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).flat_map(move |c| [0.0, r as f32, c as f32]))
        .collect();
    Ok(Tensor::from_vec(ids, (rows * cols, 3), &Device::Cpu)?)
}

/// Every Flux call of `flux_text2img_flowmatch` (Flux-dev style, guidance embedded).
#[test]
fn flux_matches_diffusers_calls() -> Result<()> {
    use diffuse_models::transformer_flux::{FluxConditioning, FluxTransformer2DModel};
    let (expected, json) = case("flux_text2img_flowmatch")?;
    let (atol, rtol) = tolerances(&json)?;
    let dir = fixtures_dir().join("cases/_models/tiny_flux/transformer");
    let model = FluxTransformer2DModel::from_pretrained(&dir, None, DType::F32, &Device::Cpu)?;
    let args = &json["args"];
    let (h, w) = (
        args["height"].as_u64().context("height")? as usize,
        args["width"].as_u64().context("width")? as usize,
    );
    // The tiny VAE downsamples by 2; tokens are 2x2 patches of the latents.
    let img_ids = flux_image_ids(h / 4, w / 4)?;
    let embeds = get(&expected, "prompt_embeds")?;
    let txt_ids = Tensor::zeros((embeds.dim(1)?, 3), DType::F32, &Device::Cpu)?;
    let guidance = Tensor::new(
        &[args["guidance_scale"].as_f64().context("guidance")? as f32],
        &Device::Cpu,
    )?;
    let cond = FluxConditioning {
        encoder_hidden_states: embeds,
        pooled_projections: get(&expected, "pooled_prompt_embeds")?,
        txt_ids: &txt_ids,
        img_ids: &img_ids,
        guidance: Some(&guidance),
    };
    let inputs = get(&expected, "denoiser_input")?;
    let timesteps = get(&expected, "denoiser_timestep")?;
    let outputs = get(&expected, "denoiser_output")?;
    for i in 0..inputs.dim(0)? {
        let out = model.forward(&inputs.i(i)?, &timesteps.i(i)?, &cond)?;
        assert_close(&format!("call {i}"), &out, &outputs.i(i)?, atol, rtol)?;
    }
    Ok(())
}

/// With bf16 weights (activations stay f32) each transformer stays close to diffusers' f32
/// outputs: the first call of each case, at bf16's precision (8 mantissa bits).
#[test]
fn transformers_run_with_bf16_weights() -> Result<()> {
    use diffuse_models::transformer_flux::{FluxConditioning, FluxTransformer2DModel};
    use diffuse_models::transformer_sd3::SD3Transformer2DModel;
    let dev = Device::Cpu;
    let models = fixtures_dir().join("cases/_models");
    let (tol_a, tol_r) = (5e-2, 5e-2);

    let (expected, json) = case("dit_class2img")?;
    let dit = DiTTransformer2DModel::from_pretrained(
        &models.join("tiny_dit/transformer"),
        None,
        DType::BF16,
        &dev,
    )?;
    let labels: Vec<u32> = serde_json::from_value(json["args"]["class_labels"].clone())?;
    let null = dit.config().num_classes() as u32;
    let labels = Tensor::new(&[labels[0], labels[1], null, null], &dev)?;
    let out = dit.forward(
        &get(&expected, "denoiser_input")?.i(0)?,
        &get(&expected, "denoiser_timestep")?.i(0)?,
        &labels,
    )?;
    assert_eq!(out.dtype(), DType::F32);
    assert_close(
        "dit bf16",
        &out,
        &get(&expected, "denoiser_output")?.i(0)?,
        tol_a,
        tol_r,
    )?;

    let (expected, _) = case("sd3_text2img_flowmatch")?;
    let sd3 = SD3Transformer2DModel::from_pretrained(
        &models.join("tiny_sd3/transformer"),
        None,
        DType::BF16,
        &dev,
    )?;
    let cat = |a: &str, b: &str| -> Result<Tensor> {
        Ok(Tensor::cat(&[get(&expected, a)?, get(&expected, b)?], 0)?)
    };
    let out = sd3.forward(
        &get(&expected, "denoiser_input")?.i(0)?,
        &cat("negative_prompt_embeds", "prompt_embeds")?,
        &cat("negative_pooled_prompt_embeds", "pooled_prompt_embeds")?,
        &get(&expected, "denoiser_timestep")?.i(0)?,
    )?;
    assert_close(
        "sd3 bf16",
        &out,
        &get(&expected, "denoiser_output")?.i(0)?,
        tol_a,
        tol_r,
    )?;

    let (expected, json) = case("flux_text2img_flowmatch")?;
    let flux = FluxTransformer2DModel::from_pretrained(
        &models.join("tiny_flux/transformer"),
        None,
        DType::BF16,
        &dev,
    )?;
    let args = &json["args"];
    let img_ids = flux_image_ids(
        args["height"].as_u64().context("height")? as usize / 4,
        args["width"].as_u64().context("width")? as usize / 4,
    )?;
    let embeds = get(&expected, "prompt_embeds")?;
    let txt_ids = Tensor::zeros((embeds.dim(1)?, 3), DType::F32, &dev)?;
    let guidance = Tensor::new(&[3.5f32], &dev)?;
    let cond = FluxConditioning {
        encoder_hidden_states: embeds,
        pooled_projections: get(&expected, "pooled_prompt_embeds")?,
        txt_ids: &txt_ids,
        img_ids: &img_ids,
        guidance: Some(&guidance),
    };
    let out = flux.forward(
        &get(&expected, "denoiser_input")?.i(0)?,
        &get(&expected, "denoiser_timestep")?.i(0)?,
        &cond,
    )?;
    assert_close(
        "flux bf16",
        &out,
        &get(&expected, "denoiser_output")?.i(0)?,
        tol_a,
        tol_r,
    )?;
    Ok(())
}

/// A Flux-schnell-style transformer (no guidance embedding) against diffusers
/// (`fixtures/generate/flux_schnell.py`); giving it a guidance value is an error.
#[test]
fn flux_schnell_matches_diffusers() -> Result<()> {
    use diffuse_core::testing::fixture_subdir;
    use diffuse_models::transformer_flux::{FluxConditioning, FluxTransformer2DModel};
    let models = fixture_subdir("models");
    let model = FluxTransformer2DModel::from_pretrained(
        &models.join("tiny_flux_schnell"),
        None,
        DType::F32,
        &Device::Cpu,
    )?;
    let io = load_tensors(&models.join("tiny_flux_schnell_io.safetensors"))?;
    let mut cond = FluxConditioning {
        encoder_hidden_states: get(&io, "encoder_hidden_states")?,
        pooled_projections: get(&io, "pooled_projections")?,
        txt_ids: get(&io, "txt_ids")?,
        img_ids: get(&io, "img_ids")?,
        guidance: None,
    };
    let out = model.forward(get(&io, "hidden_states")?, get(&io, "timestep")?, &cond)?;
    assert_close("schnell sample", &out, get(&io, "sample")?, 1e-4, 1e-4)?;
    let g = Tensor::new(&[3.5f32], &Device::Cpu)?;
    cond.guidance = Some(&g);
    let err = model
        .forward(get(&io, "hidden_states")?, get(&io, "timestep")?, &cond)
        .expect_err("guidance given to a model without guidance embedding");
    anyhow::ensure!(err.to_string().contains("guidance_embeds"), "{err}");
    Ok(())
}
