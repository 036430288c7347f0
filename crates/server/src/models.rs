//! The models a server may use: fixed at start-up, looked up by name only (a request never
//! names a path, so it cannot reach outside the configured folders).

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use diffuse_core::{Error, Result};
use diffuse_pipelines::task::{describe, model_display_name, PipelineInfo, PipelineKind};
use serde_json::{json, Value};

/// The bundled class-conditional Fashion-MNIST model of the repository (`models/`), served
/// when no model is configured.
pub fn bundled_model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-mnist-ddpm");
    p.canonicalize().unwrap_or(p)
}

/// One configured model.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    /// What requests call it (also its A1111 title and OpenAI id).
    pub name: String,
    /// As given on the command line (a folder or a hub id).
    pub spec: String,
    pub dir: PathBuf,
    pub info: PipelineInfo,
}

impl ModelEntry {
    /// The `/sdapi/v1/sd-models` entry, with what the web page needs to know in `diffuse`.
    pub fn to_json(&self) -> Value {
        let i = &self.info;
        json!({
            "title": self.name,
            "model_name": self.name,
            "hash": null,
            "sha256": null,
            "filename": self.spec,
            "config": null,
            "diffuse": {
                "pipeline": i.class_name,
                "kind": match i.kind {
                    PipelineKind::Unconditional => "unconditional",
                    PipelineKind::StableDiffusion => "stable_diffusion",
                    PipelineKind::StableDiffusion3 => "stable_diffusion_3",
                    PipelineKind::Flux => "flux",
                    PipelineKind::DiT => "dit",
                },
                "classes": i.class_names,
                "width": i.size.1,
                "height": i.size.0,
                "size_multiple": i.size_multiple,
                "default_steps": i.default_steps(),
                "default_guidance": i.default_guidance(),
            }
        })
    }
}

/// The configured models and the current default (A1111's `sd_model_checkpoint`).
pub struct Models {
    entries: Vec<ModelEntry>,
    default: RwLock<String>,
}

impl Models {
    /// Resolves every spec (local folder or hub id in the local cache) and reads its configs;
    /// the first is the default. No specs: the bundled model.
    pub fn from_specs(specs: &[String]) -> Result<Self> {
        let specs: Vec<String> = if specs.is_empty() {
            vec![bundled_model().display().to_string()]
        } else {
            specs.to_vec()
        };
        let mut entries: Vec<ModelEntry> = Vec::new();
        for spec in &specs {
            let dir = diffuse_loaders::resolve_model(spec, None)?;
            let info = describe(&dir).map_err(|e| Error::invalid(format!("model {spec}: {e}")))?;
            let name = model_display_name(spec, &dir);
            if let Some(other) = entries.iter().find(|e| e.name == name) {
                return Err(Error::invalid(format!(
                    "models {} and {spec} would both be called `{name}`; give folders with different names",
                    other.spec
                )));
            }
            entries.push(ModelEntry {
                name,
                spec: spec.clone(),
                dir,
                info,
            });
        }
        let default = entries[0].name.clone();
        Ok(Self {
            entries,
            default: RwLock::new(default),
        })
    }

    pub fn entries(&self) -> &[ModelEntry] {
        &self.entries
    }

    /// The model called `name` (A1111 clients may append ` [hash]` to a title).
    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        let name = name.trim();
        self.entries.iter().find(|e| e.name == name).or_else(|| {
            let base = name.rsplit_once(" [").map(|(b, _)| b)?;
            self.entries.iter().find(|e| e.name == base)
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    pub fn default_name(&self) -> String {
        self.default
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_default(&self, name: &str) {
        *self.default.write().unwrap_or_else(|e| e.into_inner()) = name.to_string();
    }
}
