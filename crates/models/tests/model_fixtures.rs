//! Parity with Python diffusers on every `<fixtures>/models/<name>_io.safetensors`.
//!
//! The model folder `<name>/` holds `config.json` and the weights; its `_class_name` picks the
//! harness; the model is loaded with `from_pretrained` (checked loading: a missing or
//! unexpected tensor fails). Every case prefix in the io file (`a_sample`, `odd_sample`, ... → `a`, `odd`) is
//! run. `CLIPTextModel` and `T5EncoderModel` folders belong to the CLIP and T5 tests; any other
//! class this harness cannot run fails. The diffusion transformers' cases hold their other
//! inputs under the same prefix (`a_encoder_hidden_states`, `a_pooled_projections`, Flux's
//! `a_img_ids`, `a_txt_ids` and, for a guidance-distilled model, `a_guidance`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffuse_core::testing::*;
use diffuse_models::embeddings::{guidance_scale_embedding, TimeConditioning};
use diffuse_models::transformer_flux::{FluxConditioning, FluxTransformer2DModel};
use diffuse_models::transformer_sd3::SD3Transformer2DModel;
use diffuse_models::{
    AutoencoderKL, ControlInput, ControlNetModel, UNet2DConditionModel, UNet2DModel,
    UNetConditioning,
};

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;

/// The model class of a folder: diffusers `_class_name`, or transformers `architectures[0]`.
fn class_of(dir: &Path) -> Result<String> {
    let cfg = read_json(&dir.join("config.json"))?;
    cfg.get("_class_name")
        .or_else(|| cfg.get("architectures").and_then(|a| a.get(0)))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .with_context(|| format!("{}: config.json names no class", dir.display()))
}

/// The case prefixes of an io file: `<case>_sample` → `<case>`.
fn case_prefixes(io: &HashMap<String, Tensor>) -> Vec<String> {
    let mut v: Vec<String> = io
        .keys()
        .filter_map(|k| k.strip_suffix("_sample"))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn check(what: &str, ours: &Tensor, expected: &Tensor) -> Result<()> {
    assert_close(what, ours, expected, ATOL, RTOL)?;
    let diff = max_abs_diff(&to_vec_f64(ours)?, &to_vec_f64(expected)?);
    eprintln!("  {what}: ok, max |diff| {diff:.2e}");
    Ok(())
}

fn run_unet_cases(
    io: &HashMap<String, Tensor>,
    forward: impl Fn(&str) -> Result<Tensor>,
) -> Result<()> {
    let cases = case_prefixes(io);
    if cases.is_empty() {
        bail!("no `<case>_sample` tensors in the io file");
    }
    for c in cases {
        let out = forward(&c).with_context(|| format!("case {c}"))?;
        check(&format!("case {c}"), &out, get(io, &format!("{c}_out"))?)?;
    }
    Ok(())
}

fn run_case(models: &Path, name: &str) -> Result<()> {
    let dir = models.join(name);
    let io = load_tensors(&models.join(format!("{name}_io.safetensors")))?;
    let t = |k: String| get(&io, &k).cloned();
    match class_of(&dir)?.as_str() {
        "UNet2DModel" => {
            let model = UNet2DModel::from_pretrained(&dir, DType::F32, &Device::Cpu)?;
            run_unet_cases(&io, |c| {
                Ok(model.forward(&t(format!("{c}_sample"))?, &t(format!("{c}_timestep"))?)?)
            })
        }
        "UNet2DConditionModel" => {
            let model = UNet2DConditionModel::from_pretrained(&dir, DType::F32, &Device::Cpu)?;
            run_unet_cases(&io, |c| {
                let ehs = t(format!("{c}_encoder_hidden_states"))?;
                // SDXL's added conditioning and LCM's timestep condition, where the case has them.
                let opt = |k: &str| io.get(&format!("{c}_{k}"));
                let timestep_cond = match opt("timestep_cond") {
                    Some(want) => {
                        let (rows, dim) = want.dims2()?;
                        let ours = guidance_scale_embedding(6.5, rows, dim, &Device::Cpu)?;
                        check(&format!("case {c} guidance embedding"), &ours, want)?;
                        Some(ours)
                    }
                    None => None,
                };
                let cond = UNetConditioning {
                    time: TimeConditioning {
                        class_labels: None,
                        timestep_cond: timestep_cond.as_ref(),
                        text_time: opt("text_embeds").zip(opt("time_ids")),
                    },
                    control: None,
                };
                Ok(model.forward_with(
                    &t(format!("{c}_sample"))?,
                    &t(format!("{c}_timestep"))?,
                    &ehs,
                    &cond,
                )?)
            })
        }
        "ControlNetModel" => {
            let model =
                ControlNetModel::from_pretrained_variant(&dir, None, DType::F32, &Device::Cpu)?;
            let cases = case_prefixes(&io);
            if cases.is_empty() {
                bail!("no `<case>_sample` tensors in the io file");
            }
            for c in cases {
                let k = |name: &str| t(format!("{c}_{name}"));
                let scalar = |name: &str| -> Result<f64> {
                    Ok(k(name)?.flatten_all()?.to_vec1::<f32>()?[0] as f64)
                };
                let image = k("controlnet_cond")?;
                let control = ControlInput {
                    image: &image,
                    scale: scalar("conditioning_scale")?,
                    guess_mode: scalar("guess_mode")? != 0.0,
                };
                let (text_embeds, time_ids) = (
                    io.get(&format!("{c}_text_embeds")),
                    io.get(&format!("{c}_time_ids")),
                );
                let time = TimeConditioning {
                    text_time: text_embeds.zip(time_ids),
                    ..Default::default()
                };
                let r = model.forward(
                    &k("sample")?,
                    &k("timestep")?,
                    &k("encoder_hidden_states")?,
                    &control,
                    &time,
                )?;
                let n = io
                    .keys()
                    .filter(|n| n.starts_with(&format!("{c}_down_")))
                    .count();
                if r.down.len() != n {
                    bail!(
                        "case {c}: {} down residuals, diffusers gives {n}",
                        r.down.len()
                    );
                }
                for (i, d) in r.down.iter().enumerate() {
                    check(&format!("case {c} down {i}"), d, &k(&format!("down_{i}"))?)?;
                }
                check(&format!("case {c} mid"), &r.mid, &k("mid")?)?;
            }
            Ok(())
        }
        "AutoencoderKL" => {
            let vae = AutoencoderKL::from_pretrained(&dir, DType::F32, &Device::Cpu)?;
            let posterior = vae.encode(&t("image".into())?)?;
            check(
                "posterior_mean",
                &posterior.mean,
                &t("posterior_mean".into())?,
            )?;
            check(
                "posterior_logvar",
                &posterior.logvar,
                &t("posterior_logvar".into())?,
            )?;
            check("posterior_std", &posterior.std, &t("posterior_std".into())?)?;
            check(
                "decode_out",
                &vae.decode(&t("decode_latent".into())?)?,
                &t("decode_out".into())?,
            )?;
            let recon = vae.decode(&t("posterior_mean".into())?)?;
            check(
                "reconstruct_from_mean",
                &recon,
                &t("reconstruct_from_mean".into())?,
            )
        }
        "SD3Transformer2DModel" => {
            let model =
                SD3Transformer2DModel::from_pretrained(&dir, None, DType::F32, &Device::Cpu)?;
            run_unet_cases(&io, |c| {
                Ok(model.forward(
                    &t(format!("{c}_sample"))?,
                    &t(format!("{c}_encoder_hidden_states"))?,
                    &t(format!("{c}_pooled_projections"))?,
                    &t(format!("{c}_timestep"))?,
                )?)
            })
        }
        "FluxTransformer2DModel" => {
            let model =
                FluxTransformer2DModel::from_pretrained(&dir, None, DType::F32, &Device::Cpu)?;
            run_unet_cases(&io, |c| {
                let (ehs, pooled) = (
                    t(format!("{c}_encoder_hidden_states"))?,
                    t(format!("{c}_pooled_projections"))?,
                );
                let (txt_ids, img_ids) = (t(format!("{c}_txt_ids"))?, t(format!("{c}_img_ids"))?);
                // A guidance-distilled (dev) model's case also holds the guidance.
                let guidance = io.get(&format!("{c}_guidance"));
                let cond = FluxConditioning {
                    encoder_hidden_states: &ehs,
                    pooled_projections: &pooled,
                    txt_ids: &txt_ids,
                    img_ids: &img_ids,
                    guidance,
                };
                Ok(model.forward(
                    &t(format!("{c}_sample"))?,
                    &t(format!("{c}_timestep"))?,
                    &cond,
                )?)
            })
        }
        other => bail!("no harness for model class `{other}`"),
    }
}

#[test]
fn diffusers_models_match_python() {
    let models = fixture_subdir("models");
    let mut names: Vec<String> = std::fs::read_dir(&models)
        .expect("reading the models fixtures")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix("_io.safetensors")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    // Text encoders are the CLIP and T5 tests' cases; everything else is ours.
    let ours: Vec<String> = names
        .into_iter()
        .filter(|n| {
            class_of(&models.join(n))
                .map(|c| c != "CLIPTextModel" && c != "T5EncoderModel")
                .unwrap_or(true)
        })
        .collect();
    run_all(
        "diffusers models",
        &ours,
        |n| n.clone(),
        |n| {
            eprintln!("{n}:");
            run_case(&models, n)
        },
    );
}
