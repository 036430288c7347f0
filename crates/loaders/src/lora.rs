//! LoRA files: low-rank weight updates `W' = W + scale · (alpha / rank) · up · down`.
//!
//! Formats read:
//! - **diffusers / PEFT**: `unet.<module>.lora_A.weight` (down) and `.lora_B.weight` (up),
//!   `text_encoder.…`, `text_encoder_2.…`, `transformer.…`; alpha and rank from the
//!   safetensors header's `lora_adapter_metadata` (`<component>.lora_alpha`, `.r`,
//!   `.alpha_pattern`, `.rank_pattern`) when present, else alpha = rank. The older diffusers
//!   names `….lora.down.weight` / `….lora.up.weight` are read too.
//! - **Kohya / A1111**: `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`,
//!   `.alpha`; `lora_te_`/`lora_te1_` (first text encoder), `lora_te2_` (second); LoCon
//!   convolution updates (4-D down/up). Module names are matched against the model's own names
//!   with `.` read as `_`, in the diffusers layout or, through a name map, the original one.
//!
//! Updates are fused into the weights when a model is built ([`crate::CheckedBackend::add_patches`]),
//! so a LoRA costs nothing per denoising step.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffuse_core::{Error, Result};

use crate::WeightDelta;

/// A LoRA file and the strength to apply it with.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

/// The file an A1111 `<lora:name>` tag means in the LoRA folder `dir`: `name` itself, else
/// `name.safetensors`. A name is a file name, never a path (a request cannot reach outside
/// the folder).
pub fn find_lora(dir: &Path, name: &str) -> Result<PathBuf> {
    if name.contains(['/', '\\']) || name.starts_with("..") {
        return Err(Error::invalid(format!("<lora:{name}>: a name, not a path")));
    }
    [dir.join(name), dir.join(format!("{name}.safetensors"))]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::invalid(format!(
                "<lora:{name}>: no {name}.safetensors in {}",
                dir.display()
            ))
        })
}

/// The LoRA files of the folder `dir` (`*.safetensors`), by name (the file stem), sorted.
pub fn list_loras(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::invalid(format!("reading the LoRA folder {}: {e}", dir.display())))?;
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|p| Some((p.file_stem()?.to_str()?.to_string(), p)))
        .collect();
    out.sort();
    Ok(out)
}

/// How the file names its modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    Peft,
    Kohya,
}

/// One adapted module.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// The key prefix in the file (for error messages).
    pub key: String,
    /// `unet`, `text_encoder`, `text_encoder_2` or `transformer`.
    pub component: String,
    /// The module path: dotted (PEFT) or underscored (Kohya).
    pub module: String,
    pub up: Tensor,
    pub down: Tensor,
    pub alpha: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dim(0).unwrap_or(1)
    }
}

/// A parsed LoRA file.
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: LoraFormat,
    pub modules: Vec<LoraModule>,
}

/// A module's (down, up, alpha) as the keys are read.
type Parts = (Option<Tensor>, Option<Tensor>, Option<f64>);

const KOHYA_PREFIXES: &[(&str, &str)] = &[
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
];
const PEFT_COMPONENTS: &[&str] = &["unet", "text_encoder_2", "text_encoder", "transformer"];

impl LoraFile {
    /// Reads a `.safetensors` LoRA. Keys it cannot place are an error listing them.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |what: String| Error::Weights(format!("{}: {what}", path.display()));
        if !path.is_file() {
            return Err(bad("no such LoRA file".into()));
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            bad(format!(
                "not a valid safetensors file (truncated or corrupt?): {e}"
            ))
        })?;
        let metadata = read_metadata(path)?;
        let kohya = tensors.keys().any(|k| k.starts_with("lora_"));
        let format = if kohya {
            LoraFormat::Kohya
        } else {
            LoraFormat::Peft
        };
        // Group the keys by module: prefix -> (down, up, alpha).
        let mut groups: BTreeMap<String, Parts> = BTreeMap::new();
        let mut unknown = Vec::new();
        for (key, t) in &tensors {
            let role = [
                (".lora_down.weight", 0),
                (".lora_A.weight", 0),
                (".lora.down.weight", 0),
                (".lora_up.weight", 1),
                (".lora_B.weight", 1),
                (".lora.up.weight", 1),
                (".alpha", 2),
                // Old diffusers attention processors: `attn1.processor.to_q_lora.down.weight`.
                ("_lora.down.weight", 3),
                ("_lora.up.weight", 4),
            ]
            .iter()
            .find_map(|(suffix, r)| key.strip_suffix(suffix).map(|p| (p.to_string(), *r)))
            .map(|(p, r)| match r {
                3 => (format!("{p}_lora"), 0),
                4 => (format!("{p}_lora"), 1),
                _ => (p, r),
            });
            let Some((prefix, role)) = role else {
                unknown.push(key.clone());
                continue;
            };
            let g = groups.entry(prefix).or_default();
            match role {
                0 => g.0 = Some(t.clone()),
                1 => g.1 = Some(t.clone()),
                _ => g.2 = Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0]),
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(bad(format!(
                "keys that are not LoRA down/up/alpha weights (LoHa, LoKr, DoRA and other \
                 adapter types are not supported): {}",
                unknown.join(", ")
            )));
        }
        let mut modules = Vec::new();
        let mut misplaced = Vec::new();
        for (prefix, (down, up, alpha)) in groups {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(bad(format!(
                    "module `{prefix}` lacks its down or up weight"
                )));
            };
            let placed = match format {
                LoraFormat::Kohya => KOHYA_PREFIXES
                    .iter()
                    .find_map(|(p, c)| prefix.strip_prefix(p).map(|m| (c.to_string(), m))),
                LoraFormat::Peft => PEFT_COMPONENTS.iter().find_map(|c| {
                    prefix
                        .strip_prefix(&format!("{c}."))
                        .map(|m| (c.to_string(), m))
                }),
            };
            let Some((component, module)) = placed else {
                misplaced.push(prefix);
                continue;
            };
            let module = peft_processor_name(module);
            let rank = down.dim(0)?;
            if up.dims().len() < 2 || up.dim(1)? != rank {
                return Err(bad(format!(
                    "module `{prefix}`: up {:?} and down {:?} do not share a rank",
                    up.dims(),
                    down.dims()
                )));
            }
            let alpha = match alpha {
                Some(a) => a,
                None => peft_alpha(&metadata, &component, &module).unwrap_or(rank as f64),
            };
            modules.push(LoraModule {
                key: prefix.clone(),
                component,
                module,
                up,
                down,
                alpha,
            });
        }
        if !misplaced.is_empty() {
            return Err(bad(format!(
                "modules for no known component (expected unet/text_encoder/text_encoder_2/\
                 transformer or lora_unet_/lora_te_ prefixes): {}",
                misplaced.join(", ")
            )));
        }
        if modules.is_empty() {
            return Err(bad("holds no LoRA weights".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            format,
            modules,
        })
    }

    /// The components this file adapts.
    pub fn components(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.modules.iter().map(|m| m.component.as_str()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The weight updates for one component, matched against the model-side weight `names`
    /// of that component; `ldm_names` maps original-layout module names (with `_` for `.`)
    /// to model weight names, for Kohya files written against the original layout. Returns
    /// the updates and the file keys that match no weight.
    pub fn patches(
        &self,
        component: &str,
        scale: f64,
        names: &[String],
        ldm_names: &HashMap<String, String>,
    ) -> (Vec<(String, WeightDelta)>, Vec<String>) {
        let weights: Vec<&String> = names.iter().filter(|n| n.ends_with(".weight")).collect();
        let mut underscored: HashMap<String, &String> = HashMap::new();
        for n in &weights {
            let module = n.trim_end_matches(".weight").replace('.', "_");
            if let Some(rest) = module.strip_prefix("text_model_") {
                underscored.insert(rest.to_string(), n);
            }
            underscored.insert(module, n);
        }
        let mut out = Vec::new();
        let mut unmatched = Vec::new();
        for m in self.modules.iter().filter(|m| m.component == component) {
            let target = match self.format {
                LoraFormat::Peft => {
                    let direct = format!("{}.weight", m.module);
                    let prefixed = format!("text_model.{}.weight", m.module);
                    weights
                        .iter()
                        .find(|n| ***n == direct || ***n == prefixed)
                        .map(|n| n.to_string())
                }
                LoraFormat::Kohya => underscored
                    .get(&m.module)
                    .map(|n| n.to_string())
                    .or_else(|| ldm_names.get(&m.module).cloned()),
            };
            match target {
                Some(name) => out.push((
                    name,
                    WeightDelta {
                        up: m.up.clone(),
                        down: m.down.clone(),
                        factor: scale * m.alpha / m.rank() as f64,
                    },
                )),
                None => unmatched.push(m.key.clone()),
            }
        }
        (out, unmatched)
    }
}

/// Old diffusers attention-processor names (`attn1.processor.to_q_lora`) as module paths.
fn peft_processor_name(module: &str) -> String {
    for (old, new) in [
        ("to_q_lora", "to_q"),
        ("to_k_lora", "to_k"),
        ("to_v_lora", "to_v"),
        ("to_out_lora", "to_out.0"),
    ] {
        if let Some(base) = module.strip_suffix(old) {
            return format!("{}{new}", base.trim_end_matches("processor."));
        }
    }
    module.to_string()
}

/// The safetensors header's `__metadata__` (string values).
fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len) as usize;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::Weights(format!("{}: bad safetensors header: {e}", path.display())))?;
    Ok(json
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// alpha of a PEFT module from `lora_adapter_metadata`: `alpha_pattern` entries (a module
/// name suffix) win over `lora_alpha`. None without metadata.
fn peft_alpha(meta: &HashMap<String, String>, component: &str, module: &str) -> Option<f64> {
    let cfg: serde_json::Value = serde_json::from_str(meta.get("lora_adapter_metadata")?).ok()?;
    let get = |k: &str| cfg.get(format!("{component}.{k}"));
    if let Some(patterns) = get("alpha_pattern").and_then(|p| p.as_object()) {
        for (pat, a) in patterns {
            if module == pat || module.ends_with(&format!(".{pat}")) {
                return a.as_f64();
            }
        }
    }
    get("lora_alpha").and_then(|a| a.as_f64())
}
