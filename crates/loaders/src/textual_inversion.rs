//! Textual-inversion embeddings: learned token vectors for the text encoder's input table.
//!
//! Formats read (as diffusers' `load_textual_inversion` does):
//! - AUTOMATIC1111 `.safetensors`: `emb_params` (n, dim);
//! - AUTOMATIC1111 `.pt`: a pickle with `string_to_param` → `{"*": (n, dim)}`;
//! - diffusers `learned_embeds.safetensors` / `.bin`: one entry `{token: (dim) or (n, dim)}`;
//! - SDXL embeddings: `clip_l` and `clip_g`, one table per text encoder.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use diffuse_core::{Error, Result};

/// The vectors of one embedding file.
#[derive(Clone, Debug)]
pub struct TextualInversion {
    /// The token the file names (diffusers format), if any.
    pub stored_token: Option<String>,
    /// One (n, dim) table per text encoder: `[first]`, or `[clip_l, clip_g]` for SDXL files.
    pub vectors: Vec<Tensor>,
}

impl TextualInversion {
    /// Reads an embedding file (`.safetensors`, `.pt`, `.bin`).
    pub fn load(path: &Path) -> Result<Self> {
        let entries = read_any(path)?;
        let bad = |what: String| Error::Weights(format!("{}: {what}", path.display()));
        let find = |k: &str| entries.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone());
        let as_table = |t: Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F32)?;
            match t.rank() {
                1 => Ok(t.unsqueeze(0)?),
                2 if t.dim(0)? > 0 => Ok(t),
                _ => Err(bad(format!(
                    "embedding vectors have shape {:?}; expected (dim) or (n, dim)",
                    t.dims()
                ))),
            }
        };
        if let (Some(l), Some(g)) = (find("clip_l"), find("clip_g")) {
            return Ok(Self {
                stored_token: None,
                vectors: vec![as_table(l)?, as_table(g)?],
            });
        }
        if let Some(t) = find("emb_params") {
            return Ok(Self {
                stored_token: None,
                vectors: vec![as_table(t)?],
            });
        }
        let params: Vec<&(String, Tensor)> = entries
            .iter()
            .filter(|(n, _)| n.starts_with("string_to_param."))
            .collect();
        if let [(_, t)] = params.as_slice() {
            return Ok(Self {
                stored_token: None,
                vectors: vec![as_table(t.clone())?],
            });
        }
        match entries.as_slice() {
            [(token, t)] => Ok(Self {
                stored_token: Some(token.clone()),
                vectors: vec![as_table(t.clone())?],
            }),
            _ => Err(bad(format!(
                "not a textual-inversion embedding: expected `emb_params`, `string_to_param`, \
                 `clip_l`+`clip_g` or a single token entry; found {:?}",
                entries.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
            ))),
        }
    }
}

/// Every tensor of a `.safetensors` file or a PyTorch pickle, by name.
fn read_any(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(Error::Weights(format!(
            "{}: no such embedding file",
            path.display()
        )));
    }
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_safetensors {
        let map = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::Weights(format!(
                "{}: not a valid safetensors file (truncated or corrupt?): {e}",
                path.display()
            ))
        })?;
        let mut v: Vec<(String, Tensor)> = map.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    } else {
        crate::pickle::PickleTensors::open(path)?.read_all()
    }
}
