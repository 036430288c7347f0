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

/// Each text encoder component with its config.
type Encoders = Vec<(&'static str, ClipTextConfig)>;

/// The text encoders of a pipeline class: SD has `text_encoder`, SDXL base both, the SDXL
/// refiner only `text_encoder_2` (with the projection).
fn text_encoders(class: &str, src: &Source) -> Vec<&'static str> {
    if !class.starts_with("StableDiffusionXL") {
        return vec!["text_encoder"];
    }
    let has_first = match src {
        Source::Folder(dir) => dir.join("text_encoder").is_dir(),
        Source::SingleFile { family, .. } => *family == Family::Sdxl,
    };
    if has_first {
        vec!["text_encoder", "text_encoder_2"]
    } else {
        vec!["text_encoder_2"]
    }
}

/// The UNet and VAE block layouts and the text encoders' configs.
fn layouts(src: &Source, encoders: &[&'static str]) -> Result<(Blocks, Blocks, Encoders)> {
    let unet: UNet2DConditionConfig = src.config("unet")?;
    let vae: AutoencoderKLConfig = src.config("vae")?;
    let te = encoders
        .iter()
        .map(|&c| Ok((c, src.config::<ClipTextConfig>(c)?)))
        .collect::<Result<_>>()?;
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
        "text_encoder_2" => {
            let cfg: ClipTextConfig = src.config(name)?;
            diffuse_models::clip_text::ClipTextModelWithProjection::new(vb, &cfg).map(drop)
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
    if out.exists() {
        return Err(Error::invalid(format!(
            "{} exists; remove it or pick another --output",
            out.display()
        )));
    }
    let class = src.pipeline_class()?;
    let encoders = text_encoders(&class, &src);
    let (unet_l, vae_l, te) = layouts(&src, &encoders)?;
    let tmp = sibling_tmp(out)?;
    let write = || -> Result<()> {
        let mut components: Vec<(&str, &str, CheckedBackend)> = vec![
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
        ];
        for (name, cfg) in &te {
            let backend = src.backend(name, None, cfg.num_hidden_layers, 0)?;
            components.push((name, "model.safetensors", backend));
        }
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
        let mut index = serde_json::json!({
            "_class_name": class,
            "_diffusers_version": "0.42.1",
            "scheduler": ["diffusers", cfg.get("_class_name").and_then(|c| c.as_str()).unwrap_or("PNDMScheduler")],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "feature_extractor": [null, null],
        });
        for (name, _) in &te {
            let tokenizer = name.replace("text_encoder", "tokenizer");
            write_tokenizer(config, family, &tokenizer, &tmp.join(&tokenizer))?;
            let model = if *name == "text_encoder_2" {
                "CLIPTextModelWithProjection"
            } else {
                "CLIPTextModel"
            };
            index[*name] = serde_json::json!(["transformers", model]);
            index[tokenizer] = serde_json::json!(["transformers", "CLIPTokenizer"]);
        }
        if class.starts_with("StableDiffusionXL") {
            index["force_zeros_for_empty_prompt"] = (*family == Family::Sdxl).into();
            index["requires_aesthetics_score"] = (*family == Family::SdxlRefiner).into();
        } else {
            index["safety_checker"] = serde_json::json!([null, null]);
            index["requires_safety_checker"] = false.into();
        }
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
/// (SD 1.x/2.x and SDXL base/refiner: OpenAI CLIP or OpenCLIP text encoders, recognised from the
/// encoders' configs).
pub fn folder_to_single_file(dir: &Path, out: &Path, dtype: Option<DType>) -> Result<()> {
    let src = Source::open(dir, None)?;
    if !matches!(src, Source::Folder(_)) {
        return Err(Error::invalid(format!(
            "{}: not a diffusers folder",
            dir.display()
        )));
    }
    let class = src.pipeline_class()?;
    if !class.starts_with("StableDiffusion") || class.starts_with("StableDiffusion3") {
        return Err(Error::invalid(format!(
            "{}: converting a {class} to a single file is not supported",
            dir.display()
        )));
    }
    let xl = class.starts_with("StableDiffusionXL");
    let encoders = text_encoders(&class, &src);
    let (unet_l, vae_l, te) = layouts(&src, &encoders)?;
    let read =
        |c: &str| -> Result<BTreeMap<String, Tensor>> { src.backend(c, None, 0, 0)?.read_all() };
    let (unet, vae) = (read("unet")?, read("vae")?);
    let texts = encoders
        .iter()
        .map(|c| read(c))
        .collect::<Result<Vec<_>>>()?;
    let layouts = te
        .iter()
        .enumerate()
        .map(|(i, (name, cfg))| {
            // OpenCLIP encoders (SD 2.x, SDXL's second) use GELU; OpenAI CLIP quick-GELU.
            let prefix = if xl {
                format!("conditioner.embedders.{i}.")
            } else {
                "cond_stage_model.".to_string()
            };
            if cfg.hidden_act == "gelu" {
                TextEncoderLayout::OpenClip {
                    prefix: format!("{prefix}model."),
                    layers: cfg.num_hidden_layers,
                    projection: *name == "text_encoder_2",
                }
            } else {
                TextEncoderLayout::Clip {
                    prefix: format!("{prefix}transformer."),
                }
            }
        })
        .collect::<Vec<_>>();
    let tensors = to_original_layout(&OriginalLayout {
        unet: &unet,
        unet_blocks: unet_l.0,
        unet_layers_per_block: unet_l.1,
        vae: &vae,
        vae_blocks: vae_l.0,
        vae_layers_per_block: vae_l.1,
        text_encoders: texts.iter().zip(layouts).collect(),
    })?;
    diffuse_loaders::save_safetensors(&cast(tensors, dtype)?, out)
}

/// The tokenizer folder: the config folder's, else the built-in vocabulary.
fn write_tokenizer(
    config: Option<&Path>,
    family: &Family,
    component: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if let Some(c) = config.map(|c| c.join(component)).filter(|d| d.is_dir()) {
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
    // OpenCLIP encoders (SD 2.x, SDXL's second) pad with `!`.
    let pad = if matches!(family, Family::Sd2 | Family::Sd2Inpaint) || component == "tokenizer_2" {
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
