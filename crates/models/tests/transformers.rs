//! The diffusion transformers against diffusers, call by call: each whole-pipeline reference
//! case records every input the pipeline gave its transformer and the output it got back
//! (`fixtures/cases/<case>/expected.safetensors`), so each call is replayed here on the case's
//! tiny model, with f32 weights at the case's tolerances and with bf16 weights (activations
//! still f32) at bf16's precision.

use diffuse_models::ModelMixin;
use std::collections::HashMap;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use diffuse_core::testing::{
    assert_close, fixture_subdir, fixtures_dir, get, load_tensors, read_json,
};
use diffuse_models::transformer_dit::DiTTransformer2DModel;
use diffuse_models::transformer_flux::{FluxConditioning, FluxTransformer2DModel};
use diffuse_models::transformer_sd3::SD3Transformer2DModel;

/// bf16 keeps 8 mantissa bits: outputs agree to about 1e-2.
const BF16_TOLERANCE: (f64, f64) = (5e-2, 5e-2);

/// A reference case: its expected tensors and `case.json`.
struct Case {
    expected: HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Case {
    fn load(name: &str) -> Result<Self> {
        let dir = fixtures_dir().join("cases").join(name);
        Ok(Self {
            expected: load_tensors(&dir.join("expected.safetensors"))?,
            json: read_json(&dir.join("case.json"))?,
        })
    }

    fn get(&self, key: &str) -> Result<&Tensor> {
        get(&self.expected, key)
    }

    /// `tensor_atol`, `tensor_rtol`.
    fn tolerance(&self) -> Result<(f64, f64)> {
        let t = &self.json["tolerance"];
        Ok((
            t["tensor_atol"].as_f64().context("tensor_atol")?,
            t["tensor_rtol"].as_f64().context("tensor_rtol")?,
        ))
    }

    /// Runs `call(input, timestep)` on the first `calls` recorded denoiser calls (all when
    /// `None`) and compares each output with the recorded one.
    fn replay(
        &self,
        calls: Option<usize>,
        (atol, rtol): (f64, f64),
        call: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let inputs = self.get("denoiser_input")?;
        let timesteps = self.get("denoiser_timestep")?;
        let outputs = self.get("denoiser_output")?;
        let n = calls.unwrap_or(inputs.dim(0)?);
        for i in 0..n {
            let out = call(&inputs.i(i)?, &timesteps.i(i)?)?;
            ensure!(
                out.dtype() == DType::F32,
                "call {i} returned {:?}",
                out.dtype()
            );
            assert_close(&format!("call {i}"), &out, &outputs.i(i)?, atol, rtol)?;
        }
        Ok(())
    }
}

fn tiny_transformer(pipeline: &str) -> std::path::PathBuf {
    fixtures_dir()
        .join("cases/_models")
        .join(pipeline)
        .join("transformer")
}

/// The DiT calls of `dit_class2img`: the guided batch `[labels, null × n]`.
fn dit_calls(dtype: DType, calls: Option<usize>, tolerance: Option<(f64, f64)>) -> Result<()> {
    let case = Case::load("dit_class2img")?;
    let model =
        DiTTransformer2DModel::from_pretrained(&tiny_transformer("tiny_dit"), dtype, &Device::Cpu)?;
    let labels: Vec<u32> = serde_json::from_value(case.json["args"]["class_labels"].clone())?;
    let null = model.config().num_classes() as u32;
    let mut all = labels.clone();
    all.extend(std::iter::repeat_n(null, labels.len()));
    let labels = Tensor::new(all.as_slice(), &Device::Cpu)?;
    case.replay(
        calls,
        tolerance.map_or_else(|| case.tolerance(), Ok)?,
        |input, t| Ok(model.forward(input, t, &labels)?),
    )
}

/// The SD3 calls of `sd3_text2img_flowmatch`: the guided batch `[negative, prompt]`.
fn sd3_calls(dtype: DType, calls: Option<usize>, tolerance: Option<(f64, f64)>) -> Result<()> {
    let case = Case::load("sd3_text2img_flowmatch")?;
    let model =
        SD3Transformer2DModel::from_pretrained(&tiny_transformer("tiny_sd3"), dtype, &Device::Cpu)?;
    let cat =
        |a: &str, b: &str| -> Result<Tensor> { Ok(Tensor::cat(&[case.get(a)?, case.get(b)?], 0)?) };
    let embeds = cat("negative_prompt_embeds", "prompt_embeds")?;
    let pooled = cat("negative_pooled_prompt_embeds", "pooled_prompt_embeds")?;
    case.replay(
        calls,
        tolerance.map_or_else(|| case.tolerance(), Ok)?,
        |input, t| Ok(model.forward(input, &embeds, &pooled, t)?),
    )
}

/// `(H/2 · W/2, 3)` image position ids `(0, row, col)` of Flux's packed latents, as the
/// pipeline's `_prepare_latent_image_ids` makes them.
fn flux_image_ids(rows: usize, cols: usize) -> Result<Tensor> {
    let ids: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).flat_map(move |c| [0.0, r as f32, c as f32]))
        .collect();
    Ok(Tensor::from_vec(ids, (rows * cols, 3), &Device::Cpu)?)
}

/// The Flux calls of `flux_text2img_flowmatch` (Flux-dev style, guidance embedded).
fn flux_calls(dtype: DType, calls: Option<usize>, tolerance: Option<(f64, f64)>) -> Result<()> {
    let case = Case::load("flux_text2img_flowmatch")?;
    let model = FluxTransformer2DModel::from_pretrained(
        &tiny_transformer("tiny_flux"),
        dtype,
        &Device::Cpu,
    )?;
    let args = &case.json["args"];
    let side = |k: &str| -> Result<usize> { Ok(args[k].as_u64().context("size")? as usize) };
    // The tiny VAE downsamples by 2; tokens are 2x2 patches of the latents.
    let img_ids = flux_image_ids(side("height")? / 4, side("width")? / 4)?;
    let embeds = case.get("prompt_embeds")?;
    let txt_ids = Tensor::zeros((embeds.dim(1)?, 3), DType::F32, &Device::Cpu)?;
    let guidance = args["guidance_scale"].as_f64().context("guidance")? as f32;
    let guidance = Tensor::new(&[guidance], &Device::Cpu)?;
    let cond = FluxConditioning {
        encoder_hidden_states: embeds,
        pooled_projections: case.get("pooled_prompt_embeds")?,
        txt_ids: &txt_ids,
        img_ids: &img_ids,
        guidance: Some(&guidance),
    };
    case.replay(
        calls,
        tolerance.map_or_else(|| case.tolerance(), Ok)?,
        |input, t| Ok(model.forward(input, t, &cond)?),
    )
}

#[test]
fn dit_matches_diffusers_calls() -> Result<()> {
    dit_calls(DType::F32, None, None)
}

#[test]
fn sd3_matches_diffusers_calls() -> Result<()> {
    sd3_calls(DType::F32, None, None)
}

#[test]
fn flux_matches_diffusers_calls() -> Result<()> {
    flux_calls(DType::F32, None, None)
}

/// With bf16 weights (activations stay f32) each transformer stays close to diffusers' f32
/// outputs on the first call of each case.
#[test]
fn transformers_run_with_bf16_weights() -> Result<()> {
    dit_calls(DType::BF16, Some(1), Some(BF16_TOLERANCE))?;
    sd3_calls(DType::BF16, Some(1), Some(BF16_TOLERANCE))?;
    flux_calls(DType::BF16, Some(1), Some(BF16_TOLERANCE))
}

/// A transformer without guidance embedding (Flux-schnell style; its parity with diffusers is
/// `fixtures/models/tiny_flux_schnell`'s case in model_fixtures.rs) refuses a guidance value.
#[test]
fn flux_schnell_refuses_guidance() -> Result<()> {
    let models = fixture_subdir("models");
    let model = FluxTransformer2DModel::from_pretrained(
        &models.join("tiny_flux_schnell"),
        DType::F32,
        &Device::Cpu,
    )?;
    let io = load_tensors(&models.join("tiny_flux_schnell_io.safetensors"))?;
    let g = Tensor::new(&[3.5f32], &Device::Cpu)?;
    let cond = FluxConditioning {
        encoder_hidden_states: get(&io, "a_encoder_hidden_states")?,
        pooled_projections: get(&io, "a_pooled_projections")?,
        txt_ids: get(&io, "a_txt_ids")?,
        img_ids: get(&io, "a_img_ids")?,
        guidance: Some(&g),
    };
    let err = model
        .forward(get(&io, "a_sample")?, get(&io, "a_timestep")?, &cond)
        .expect_err("guidance given to a model without guidance embedding");
    ensure!(err.to_string().contains("guidance_embeds"), "{err}");
    Ok(())
}
