//! `diffuse info`: what a model folder holds, read from its JSON files and safetensors headers
//! (no weights are loaded).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// A diffusers folder (with model_index.json), one component folder (with config.json), a
    /// single-file checkpoint (.safetensors or .ckpt), or a Hugging Face hub id found in the
    /// local cache.
    pub model: String,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let dir = diffuse_loaders::hub::resolve_model(&args.model, None)?;
    print!("{}", describe(&dir)?);
    Ok(())
}

/// A text report of the folder.
pub fn describe(dir: &Path) -> Result<String> {
    let mut out = String::new();
    let index = dir.join("model_index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let class = v["_class_name"].as_str().unwrap_or("?");
        out += &format!("{}: {class}\n", dir.display());
        let obj = v
            .as_object()
            .context("model_index.json is not a JSON object")?;
        let mut total = 0u64;
        for (name, entry) in obj.iter().filter(|(k, _)| !k.starts_with('_')) {
            let Some(pair) = entry.as_array().filter(|a| a.len() == 2 && !a[1].is_null()) else {
                continue;
            };
            let comp_class = pair[1].as_str().unwrap_or("?");
            let comp_dir = dir.join(name);
            if !comp_dir.is_dir() {
                out += &format!(
                    "  {name:<14} {comp_class:<32} MISSING folder {}\n",
                    comp_dir.display()
                );
                continue;
            }
            let (line, n) = component_line(&comp_dir)?;
            total += n;
            out += &format!("  {name:<14} {comp_class:<32} {line}\n");
        }
        out += &format!("  total parameters: {}\n", thousands(total));
        out += &classes_line(&v);
    } else if dir.join("config.json").is_file() {
        let (line, _) = component_line(dir)?;
        out += &format!("{}: {line}\n", dir.display());
    } else if dir.is_file() {
        out += &single_file_report(dir)?;
    } else if dir.join("scheduler_config.json").is_file() {
        let cfg = read_scheduler_config(dir)?;
        out += &format!(
            "{}: scheduler {}\n",
            dir.display(),
            cfg.class_name().unwrap_or("?")
        );
    } else {
        bail!(
            "{} holds neither model_index.json nor config.json: not a diffusers model folder \
             (nor a single-file checkpoint)",
            dir.display()
        );
    }
    Ok(out)
}

/// The classes a class-conditional folder names: `_class_names` (diffuse's DDPM models) or
/// `id2label` (DiT), as `--prompt` takes them; empty for other folders.
fn classes_line(index: &serde_json::Value) -> String {
    let names: Vec<String> = match (&index["_class_names"], &index["id2label"]) {
        (serde_json::Value::Array(names), _) => names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{i} {}", n.as_str().unwrap_or("?")))
            .collect(),
        (_, serde_json::Value::Object(labels)) => {
            let mut ids: Vec<(u64, &str)> = labels
                .iter()
                .map(|(k, n)| (k.parse().unwrap_or(u64::MAX), n.as_str().unwrap_or("?")))
                .collect();
            ids.sort();
            ids.iter().map(|(i, n)| format!("{i} {n}")).collect()
        }
        _ => return String::new(),
    };
    let shown = names.len().min(20);
    let more = match names.len() - shown {
        0 => String::new(),
        n => format!(", ... ({n} more)"),
    };
    format!(
        "  classes ({}): {}{more}\n",
        names.len(),
        names[..shown].join(", ")
    )
}

/// Key names of textual-inversion files: A1111's `.pt` (`string_to_param`), its safetensors
/// (`emb_params`), SDXL's (`clip_l`, `clip_g`) and diffusers' `learned_embeds` (`<token>`).
const EMBEDDING_KEYS: &[&str] = &["string_to_param", "emb_params", "clip_l", "clip_g", "<"];

/// The components of a single-file checkpoint (`.safetensors` or `.ckpt` in the original
/// Stable Diffusion layout), by the key prefixes they are stored under, with parameter counts,
/// and the family `generate` recognises it as.
fn single_file_report(path: &Path) -> Result<String> {
    use diffuse_loaders::single_file::{SingleFile, UNET_PREFIX, VAE_PREFIX};
    let file = SingleFile::open(path)?;
    let shapes: Vec<(&str, &[usize])> = file.tensors().collect();
    let any_key = |f: &dyn Fn(&str) -> bool| shapes.iter().any(|(k, _)| f(k));
    let kind = match file.family() {
        Ok(f) => format!("single-file checkpoint, {}", f.name()),
        Err(_) if any_key(&|k| k.contains("lora")) => {
            "a LoRA adapter, not a whole model (use it with --lora)".into()
        }
        Err(_)
            if shapes.len() <= 4 && any_key(&|k| EMBEDDING_KEYS.iter().any(|e| k.contains(e))) =>
        {
            "a textual-inversion embedding (use it with --embedding)".into()
        }
        Err(_) => "a tensor file, not a Stable Diffusion layout diffuse recognises".into(),
    };
    let parts: [(&str, &[&str]); 3] = [
        ("unet", &[UNET_PREFIX]),
        ("vae", &[VAE_PREFIX]),
        (
            "text encoders",
            &["cond_stage_model.", "conditioner.embedders."],
        ),
    ];
    let mut counts = [0u64; 4];
    for (name, shape) in &shapes {
        let part = parts
            .iter()
            .position(|(_, prefixes)| prefixes.iter().any(|p| name.starts_with(p)))
            .unwrap_or(3);
        counts[part] += shape.iter().map(|&d| d as u64).product::<u64>();
    }
    let mut out = format!("{}: {kind}\n", path.display());
    let labels = parts.iter().map(|(l, _)| *l).chain(["other"]);
    for (label, n) in labels.zip(counts).filter(|(_, n)| *n > 0) {
        out += &format!("  {label:<14} {} params\n", thousands(n));
    }
    let dtypes = match path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        true => {
            let mut d: Vec<String> = safetensors_header(path)?.into_iter().map(|t| t.1).collect();
            d.sort();
            d.dedup();
            format!(", {}", d.join("/"))
        }
        false => String::new(),
    };
    out += &format!(
        "  total parameters: {} in {} tensors{dtypes}\n",
        thousands(counts.iter().sum()),
        shapes.len()
    );
    Ok(out)
}

/// "<params> params, <dtypes>, <files>" for one component, and its parameter count.
fn component_line(dir: &Path) -> Result<(String, u64)> {
    if dir.join("scheduler_config.json").is_file() {
        let cfg = read_scheduler_config(dir)?;
        let n = cfg
            .map
            .get("num_train_timesteps")
            .and_then(|v| v.as_u64())
            .unwrap_or(1000);
        return Ok((format!("{n} training timesteps"), 0));
    }
    if dir.join("vocab.json").is_file() {
        let vocab = read_json(&dir.join("vocab.json"))?;
        return Ok((
            format!("{} tokens", vocab.as_object().map_or(0, |m| m.len())),
            0,
        ));
    }
    let files: Vec<PathBuf> = match diffuse_loaders::weights::component_weight_files(dir, None) {
        Ok(f) => f,
        Err(e) => return Ok((format!("no weights ({e})"), 0)),
    };
    let mut params = 0u64;
    let mut dtypes: BTreeMap<String, u64> = BTreeMap::new();
    for f in &files {
        for (name, dtype, numel) in safetensors_header(f)? {
            // Non-parameter buffers stored by transformers.
            if name.ends_with("position_ids") {
                continue;
            }
            params += numel;
            *dtypes.entry(dtype).or_default() += numel;
        }
    }
    let dt: Vec<String> = dtypes.keys().cloned().collect();
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    Ok((
        format!(
            "{} params, {}, {}",
            thousands(params),
            dt.join("+"),
            names.join(", ")
        ),
        params,
    ))
}

/// (name, dtype, element count) of every tensor in a safetensors file, from its header only.
pub fn safetensors_header(path: &Path) -> Result<Vec<(String, String, u64)>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let file_len = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > file_len.saturating_sub(8) || n > 100 << 20 {
        bail!(
            "{}: corrupt safetensors file (header of {n} bytes in a {file_len}-byte file)",
            path.display()
        );
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&buf)
        .with_context(|| format!("{}: corrupt safetensors header", path.display()))?;
    let mut out = vec![];
    for (name, v) in header.iter().filter(|(k, _)| *k != "__metadata__") {
        let dtype = v["dtype"].as_str().unwrap_or("?").to_string();
        let numel = v["shape"]
            .as_array()
            .map_or(0, |s| s.iter().map(|d| d.as_u64().unwrap_or(0)).product());
        out.push((name.clone(), dtype, numel));
    }
    Ok(out)
}

/// A scheduler config as diffusers writes it (Python's json may write `-Infinity`, which plain
/// JSON readers refuse).
fn read_scheduler_config(dir: &Path) -> Result<diffuse_schedulers::SchedulerConfig> {
    Ok(diffuse_schedulers::SchedulerConfig::from_file(
        &dir.join("scheduler_config.json"),
    )?)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("{}: invalid JSON", path.display()))
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::classes_line;
    use serde_json::json;

    #[test]
    fn classes_from_dit_id2label_sorted_by_id_and_capped() {
        let labels: serde_json::Map<String, serde_json::Value> = (0..25)
            .rev()
            .map(|i| (i.to_string(), json!(format!("c{i}"))))
            .collect();
        let line = classes_line(&json!({ "id2label": labels }));
        assert!(
            line.starts_with("  classes (25): 0 c0, 1 c1, 2 c2,"),
            "{line}"
        );
        assert!(line.ends_with("19 c19, ... (5 more)\n"), "{line}");
        assert_eq!(
            classes_line(&json!({"_class_name": "StableDiffusionPipeline"})),
            ""
        );
    }
}
