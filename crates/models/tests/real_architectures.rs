//! The real architectures of published checkpoints, built from
//! `fixtures_configs/<checkpoint>/<component>/config.json` on a shapes-only backend (no weight
//! memory, so even the 12-billion-parameter Flux-dev transformer costs nothing): every tensor
//! name and shape must equal `param_shapes.json` (what diffusers' or transformers'
//! `save_pretrained` writes) and the parameter counts the published ones.
//!
//! One `#[ignore]`d test runs the full SD 1.5 UNet once with random weights (3.4 GB of f32
//! weights, some seconds of CPU):
//!
//! ```text
//! cargo test -p diffuse-models --test real_architectures -- --ignored sd15_unet_forward_runs
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffuse_core::testing::{read_json, run_all};
use diffuse_loaders::{read_config, RecordingBackend};
use diffuse_models::clip_text::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use diffuse_models::t5::{T5Config, T5EncoderModel};
use diffuse_models::transformer_dit::{DiTTransformer2DConfig, DiTTransformer2DModel};
use diffuse_models::transformer_flux::{FluxTransformer2DConfig, FluxTransformer2DModel};
use diffuse_models::transformer_sd3::{SD3Transformer2DConfig, SD3Transformer2DModel};
use diffuse_models::{
    AutoencoderKL, AutoencoderKLConfig, ControlNetConfig, ControlNetModel, UNet2DConditionConfig,
    UNet2DConditionModel, UNet2DConfig, UNet2DModel,
};

/// (checkpoint folder, component, published parameter count)
const CASES: &[(&str, &str, usize)] = &[
    ("runwayml_stable_diffusion_v1_5", "unet", 859_520_964),
    ("runwayml_stable_diffusion_v1_5", "vae", 83_653_863),
    ("stabilityai_stable_diffusion_2_1", "unet", 865_910_724),
    ("stabilityai_stable_diffusion_2_1", "vae", 83_653_863),
    ("runwayml_stable_diffusion_inpainting", "unet", 859_535_364),
    ("runwayml_stable_diffusion_inpainting", "vae", 83_653_863),
    ("google_ddpm_cat_256", "unet", 113_673_219),
    ("google_ddpm_cifar10_32", "unet", 35_746_307),
    (
        "stabilityai_stable_diffusion_xl_base_1_0",
        "unet",
        2_567_463_684,
    ),
    (
        "stabilityai_stable_diffusion_xl_base_1_0",
        "vae",
        83_653_863,
    ),
    (
        "stabilityai_stable_diffusion_xl_base_1_0",
        "text_encoder",
        123_060_480,
    ),
    (
        "stabilityai_stable_diffusion_xl_base_1_0",
        "text_encoder_2",
        694_659_840,
    ),
    ("lllyasviel_sd_controlnet_canny", "controlnet", 361_279_120),
    // diffusers builds these from the configs; no count is published for SD3-medium and
    // DiT-XL-2-256, so theirs is param_shapes.json's.
    (SD3, "transformer", 2_028_328_000),
    (SD3, "text_encoder_3", 4_762_310_656),
    (
        "black_forest_labs_flux_1_dev",
        "transformer",
        11_901_408_320,
    ),
    ("facebook_dit_xl_2_256", "transformer", 749_826_464),
];

const SD3: &str = "stabilityai_stable_diffusion_3_medium_diffusers";

/// Stored buffers that param_shapes.json lists but does not count as parameters (SD3's
/// position-embedding grid).
const BUFFERS: &[&str] = &["pos_embed.pos_embed"];

/// `(copy, parameter)`: tensors `param_shapes.json` lists twice because the module holds one
/// parameter under two names (T5's token embedding is `shared` and `encoder.embed_tokens`); the
/// model asks for the parameter, and the copy must have its shape.
const TIED: &[(&str, &str)] = &[("encoder.embed_tokens.weight", "shared.weight")];

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures_configs")
}

/// Builds the model of `dir` on `rec` (dispatching on diffusers' `_class_name` or
/// transformers' `architectures`).
fn build(dir: &Path, rec: &RecordingBackend) -> Result<()> {
    let path = dir.join("config.json");
    let json = read_json(&path)?;
    let class = json["_class_name"]
        .as_str()
        .or_else(|| json["architectures"][0].as_str())
        .context("_class_name or architectures")?
        .to_string();
    let vb = rec.var_builder(DType::F32, &Device::Cpu);
    match class.as_str() {
        "UNet2DModel" => {
            let cfg: UNet2DConfig = read_config(&path)?;
            cfg.validate()?;
            UNet2DModel::new(vb, &cfg)?;
        }
        "UNet2DConditionModel" => {
            let cfg: UNet2DConditionConfig = read_config(&path)?;
            cfg.validate()?;
            UNet2DConditionModel::new(vb, &cfg)?;
        }
        "AutoencoderKL" => {
            let cfg: AutoencoderKLConfig = read_config(&path)?;
            cfg.validate()?;
            AutoencoderKL::new(vb, &cfg)?;
        }
        "SD3Transformer2DModel" => {
            let cfg: SD3Transformer2DConfig = read_config(&path)?;
            cfg.validate()?;
            SD3Transformer2DModel::new(vb, &cfg)?;
        }
        "FluxTransformer2DModel" => {
            let cfg: FluxTransformer2DConfig = read_config(&path)?;
            cfg.validate()?;
            FluxTransformer2DModel::new(vb, &cfg)?;
        }
        "DiTTransformer2DModel" => {
            let cfg: DiTTransformer2DConfig = read_config(&path)?;
            cfg.validate()?;
            DiTTransformer2DModel::new(vb, &cfg)?;
        }
        "T5EncoderModel" => {
            let cfg = T5Config::from_file(&path)?;
            T5EncoderModel::new(vb, &cfg)?;
        }
        "ControlNetModel" => {
            let cfg: ControlNetConfig = read_config(&path)?;
            cfg.validate()?;
            ControlNetModel::new(vb, &cfg)?;
        }
        "CLIPTextModel" => {
            ClipTextModel::new(vb, &ClipTextConfig::from_file(&path)?)?;
        }
        "CLIPTextModelWithProjection" => {
            ClipTextModelWithProjection::new(vb, &ClipTextConfig::from_file(&path)?)?;
        }
        other => bail!("no model for class `{other}`"),
    }
    Ok(())
}

fn check(checkpoint: &str, component: &str, published: usize) -> Result<()> {
    let dir = configs_dir().join(checkpoint).join(component);
    let rec = RecordingBackend::shapes_only();
    build(&dir, &rec)?;
    let reference = read_json(&dir.join("param_shapes.json"))?;
    let mut expected: BTreeMap<String, Vec<usize>> =
        serde_json::from_value(reference["tensors"].clone()).context("tensors")?;
    for (copy, param) in TIED {
        if let Some(shape) = expected.remove(*copy) {
            ensure!(
                expected.get(*param) == Some(&shape),
                "tied `{copy}` {shape:?} differs from `{param}` {:?}",
                expected.get(*param)
            );
        }
    }
    // transformers 5 saves a bare `CLIPTextModel` without the `text_model.` prefix (the
    // loader reads both layouts); compare in the layout of the reference.
    let bare = !expected.keys().any(|k| k.starts_with("text_model."));
    let ours: BTreeMap<String, Vec<usize>> = rec
        .parameters()
        .into_iter()
        .map(|(k, v)| match k.strip_prefix("text_model.") {
            Some(rest) if bare => (rest.to_string(), v),
            _ => (k, v),
        })
        .collect();
    let missing: Vec<&String> = expected.keys().filter(|k| !ours.contains_key(*k)).collect();
    let unexpected: Vec<&String> = ours.keys().filter(|k| !expected.contains_key(*k)).collect();
    ensure!(
        missing.is_empty() && unexpected.is_empty(),
        "missing {missing:?}, unexpected {unexpected:?}"
    );
    for (name, shape) in &ours {
        ensure!(
            &expected[name] == shape,
            "`{name}`: {shape:?}, expected {:?}",
            expected[name]
        );
    }
    // Buffers are stored tensors but not parameters.
    let buffers: usize = ours
        .iter()
        .filter(|(name, _)| BUFFERS.contains(&name.as_str()))
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum();
    let count = rec.parameter_count() - buffers;
    ensure!(
        reference["total_params"].as_u64() == Some(count as u64),
        "{count} parameters, param_shapes.json says {}",
        reference["total_params"]
    );
    ensure!(
        count == published,
        "{count} parameters, published {published}"
    );
    eprintln!(
        "{checkpoint}/{component}: {} tensors, {count} parameters",
        ours.len()
    );
    Ok(())
}

#[test]
fn real_unet_and_vae_architectures() {
    run_all(
        "real architectures",
        CASES,
        |(c, m, _)| format!("{c}/{m}"),
        |(c, m, n)| check(c, m, *n),
    );
}

#[test]
#[ignore = "builds the full SD 1.5 UNet with random f32 weights (3.4 GB)"]
fn sd15_unet_forward_runs() -> Result<()> {
    let dir = configs_dir().join("runwayml_stable_diffusion_v1_5/unet");
    let cfg: UNet2DConditionConfig = read_config(&dir.join("config.json"))?;
    let dev = Device::Cpu;
    // Random weights with the layers' default initialisation (Kaiming for convs/linears,
    // identity norms), so that activations stay finite through the 16 blocks.
    let varmap = candle_nn::VarMap::new();
    let unet = UNet2DConditionModel::new(
        candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        &cfg,
    )?;
    let sample = Tensor::randn(0f32, 1., (1, 4, 16, 16), &dev)?;
    let ehs = Tensor::randn(0f32, 1., (1, 77, 768), &dev)?;
    let t = Tensor::new(&[500f32], &dev)?;
    let start = std::time::Instant::now();
    let out = unet.forward(&sample, &t, &ehs)?;
    eprintln!("SD 1.5 UNet forward at 1x4x16x16: {:?}", start.elapsed());
    ensure!(
        out.dims() == [1, 4, 16, 16],
        "output shape {:?}",
        out.dims()
    );
    let values = out.flatten_all()?.to_vec1::<f32>()?;
    ensure!(values.iter().all(|v| v.is_finite()), "non-finite output");
    let std = out.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()?;
    ensure!(std > 0.0, "constant output");
    Ok(())
}
