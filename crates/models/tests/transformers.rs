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
