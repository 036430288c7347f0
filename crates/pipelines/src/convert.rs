//! Converting Stable Diffusion checkpoints between a diffusers folder and a single file in the
//! original layout (`diffuse convert`). Tensors are copied as stored (no dtype change unless
//! asked), so a file → folder → file round trip is bit-exact.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use diffuse_core::{Error, Result};
use diffuse_loaders::single_file::{to_original_layout, Family, OriginalLayout, TextEncoderLayout};
use diffuse_loaders::CheckedBackend;
use diffuse_models::clip_text::ClipTextConfig;
use diffuse_models::clip_tokenizer::ClipTokenizer;
use diffuse_models::{AutoencoderKLConfig, UNet2DConditionConfig};

use crate::sources::Source;

/// Number of blocks and layers per block.
type Blocks = (usize, usize);

/// The UNet and VAE block layouts and the text encoder's config.
fn layouts(src: &Source) -> Result<(Blocks, Blocks, ClipTextConfig)> {
    let unet: UNet2DConditionConfig = src.config("unet")?;
    let vae: AutoencoderKLConfig = src.config("vae")?;
    let te: ClipTextConfig = src.config("text_encoder")?;
    Ok((
        (unet.block_out_channels.len(), unet.layers_per_block.get(0)),
        (vae.block_out_channels.len(), vae.layers_per_block),
        te,
    ))
}

/// Fails unless the stored tensors are exactly what the configs' models need.
fn check_fits(src: &Source, name: &str, backend: &CheckedBackend) -> Result<()> {
    let rec = diffuse_loaders::RecordingBackend::shapes_only();
    let vb = rec.var_builder(DType::F32, &candle_core::Device::Cpu);
    let built = match name {
        "unet" => {
            let cfg: UNet2DConditionConfig = src.config(name)?;
            diffuse_models::UNet2DConditionModel::new(vb, &cfg).map(drop)
        }
        "vae" => {
            let cfg: AutoencoderKLConfig = src.config(name)?;
            diffuse_models::AutoencoderKL::new(vb, &cfg).map(drop)
        }
        _ => {
            let cfg: ClipTextConfig = src.config(name)?;
            diffuse_models::clip_text::ClipTextModel::new(vb, &cfg).map(drop)
        }
    };
    built.map_err(|e| Error::invalid(format!("{name} config: {e}")))?;
    backend
        .check_shapes(&rec.parameters())
        .map_err(|e| Error::Weights(format!("{name}: {e}")))
}

fn cast(
    tensors: BTreeMap<String, Tensor>,
    dtype: Option<DType>,
) -> Result<HashMap<String, Tensor>> {
    tensors
        .into_iter()
        .map(|(k, t)| {
            let t = match dtype {
                Some(d) if t.dtype().is_float() => t.to_dtype(d)?,
                _ => t,
            };
            Ok((k, t))
        })
        .collect()
}

/// Writes a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
/// scheduler/) from a single-file checkpoint. The folder is built next to `out` and renamed into
/// place, so a failure leaves nothing behind.
pub fn single_file_to_folder(
    file: &Path,
    config: Option<&Path>,
    out: &Path,
    dtype: Option<DType>,
) -> Result<()> {
    let src = Source::open(file, config)?;
    let Source::SingleFile { family, .. } = &src else {
        return Err(Error::invalid(format!(
            "{}: not a single-file checkpoint",
            file.display()
        )));
    };
    if matches!(family, Family::Sdxl | Family::SdxlRefiner) {
        return Err(Error::invalid(format!(
            "{}: converting {} checkpoints is not supported yet",
            file.display(),
            family.name()
        )));
    }
    if out.exists() {
        return Err(Error::invalid(format!(
            "{} exists; remove it or pick another --output",
            out.display()
        )));
    }
    let class = src.pipeline_class()?;
    let (unet_l, vae_l, te) = layouts(&src)?;
    let tmp = sibling_tmp(out)?;
    let write = || -> Result<()> {
        let components: [(&str, &str, CheckedBackend); 3] = [
            (
                "unet",
                "diffusion_pytorch_model.safetensors",
                src.backend("unet", None, unet_l.0, unet_l.1)?,
            ),
            (
                "vae",
                "diffusion_pytorch_model.safetensors",
                src.backend("vae", None, vae_l.0, vae_l.1)?,
            ),
            (
                "text_encoder",
                "model.safetensors",
                src.backend("text_encoder", None, te.num_hidden_layers, 0)?,
            ),
        ];
        for (name, _, backend) in &components {
            check_fits(&src, name, backend)?;
        }
        for (name, weights, backend) in components {
            let dir = tmp.join(name);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let mut tensors = backend.read_all()?;
            if name == "vae" {
                // diffusers stores the VAE attention projections as linear weights.
                for (k, t) in tensors.iter_mut() {
                    if k.contains("attentions.") && k.ends_with(".weight") && t.rank() == 4 {
                        let (o, i, _, _) = t.dims4()?;
                        *t = t.reshape((o, i))?;
                    }
                }
            }
            diffuse_loaders::save_safetensors(&cast(tensors, dtype)?, &dir.join(weights))?;
            let cfg: serde_json::Value = src.config(name)?;
            write_json(&dir.join("config.json"), &cfg)?;
        }
        let sched = tmp.join("scheduler");
        std::fs::create_dir_all(&sched).map_err(|e| Error::io(&sched, e))?;
        let cfg: serde_json::Value = src.config("scheduler")?;
        write_json(&sched.join("scheduler_config.json"), &cfg)?;
        write_tokenizer(config, family, &tmp.join("tokenizer"))?;
        let index = serde_json::json!({
            "_class_name": class,
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", cfg.get("_class_name").and_then(|c| c.as_str()).unwrap_or("PNDMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [null, null],
            "feature_extractor": [null, null],
            "requires_safety_checker": false
        });
        write_json(&tmp.join("model_index.json"), &index)?;
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes a single `.safetensors` file in the original layout from a diffusers folder
/// (SD 1.x/2.x: OpenAI CLIP or OpenCLIP text encoder, recognised from the text encoder's config).
pub fn folder_to_single_file(dir: &Path, out: &Path, dtype: Option<DType>) -> Result<()> {
    let src = Source::open(dir, None)?;
    if !matches!(src, Source::Folder(_)) {
        return Err(Error::invalid(format!(
            "{}: not a diffusers folder",
            dir.display()
        )));
    }
    let class = src.pipeline_class()?;
    if !class.starts_with("StableDiffusion") || class.contains("XL") {
        return Err(Error::invalid(format!(
            "{}: converting a {class} to a single file is not supported",
            dir.display()
        )));
    }
    let (unet_l, vae_l, te) = layouts(&src)?;
    let read =
        |c: &str| -> Result<BTreeMap<String, Tensor>> { src.backend(c, None, 0, 0)?.read_all() };
    let (unet, vae, text) = (read("unet")?, read("vae")?, read("text_encoder")?);
    // OpenCLIP (SD 2.x) text encoders use GELU and pad with `!`; OpenAI CLIP uses quick-GELU.
    let layout = if te.hidden_act == "gelu" {
        TextEncoderLayout::OpenClip {
            prefix: "cond_stage_model.model.".into(),
            layers: te.num_hidden_layers,
            projection: false,
        }
    } else {
        TextEncoderLayout::Clip {
            prefix: "cond_stage_model.transformer.".into(),
        }
    };
    let tensors = to_original_layout(&OriginalLayout {
        unet: &unet,
        unet_blocks: unet_l.0,
        unet_layers_per_block: unet_l.1,
        vae: &vae,
        vae_blocks: vae_l.0,
        vae_layers_per_block: vae_l.1,
        text_encoders: vec![(&text, layout)],
    })?;
    diffuse_loaders::save_safetensors(&cast(tensors, dtype)?, out)
}

/// The tokenizer folder: the config folder's, else the built-in vocabulary.
fn write_tokenizer(config: Option<&Path>, family: &Family, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if let Some(c) = config.map(|c| c.join("tokenizer")).filter(|d| d.is_dir()) {
        for entry in std::fs::read_dir(&c).map_err(|e| Error::io(&c, e))? {
            let p = entry.map_err(|e| Error::io(&c, e))?.path();
            if p.is_file() {
                let dst = dir.join(p.file_name().unwrap_or_default());
                std::fs::copy(&p, &dst).map_err(|e| Error::io(&dst, e))?;
            }
        }
        return Ok(());
    }
    let (vocab, merges) = ClipTokenizer::builtin_files()?;
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write("vocab.json", &vocab)?;
    write("merges.txt", &merges)?;
    let pad = if matches!(family, Family::Sd2 | Family::Sd2Inpaint) {
        "!"
    } else {
        "<|endoftext|>"
    };
    let special = serde_json::json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad,
        "unk_token": "<|endoftext|>"
    });
    write_json(&dir.join("special_tokens_map.json"), &special)?;
    let cfg = serde_json::json!({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": true,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad,
        "unk_token": "<|endoftext|>"
    });
    write_json(&dir.join("tokenizer_config.json"), &cfg)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// A fresh temporary folder next to `out` (same filesystem, so it can be renamed into place).
fn sibling_tmp(out: &Path) -> Result<PathBuf> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::invalid(format!(
            "output folder {} does not exist",
            parent.display()
        )));
    }
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{name}.converting-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(tmp)
}
