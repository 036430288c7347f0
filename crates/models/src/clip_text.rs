//! The CLIP text encoder (`transformers.CLIPTextModel`), the text encoder of Stable Diffusion.
//!
//! Its layers run on the crate's fused CPU kernels (layer norm, causal flash attention, linear
//! layers, quick-GELU); each has a backward pass or falls back to candle's ops when gradients are
//! tracked, so that gradients flow through every part of it.

use std::path::Path;

use crate::normalization::LayerNorm;
use crate::ops::linear::Linear;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use diffuse_core::{Error, Result};
use serde::Deserialize;

/// The activation of the CLIP MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP ViT-H, SD 2.x).
    Gelu,
}

impl ClipActivation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => crate::ops::activation::quick_gelu(x),
            Self::Gelu => crate::ops::activation::gelu(x),
        }
    }
}

/// `config.json` of a transformers `CLIPTextModel` (unknown keys ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    /// `quick_gelu` or `gelu`; see [`ClipTextConfig::activation`].
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// `torch_dtype` in transformers 4 configs, `dtype` in transformers 5 ones.
    #[serde(default, alias = "torch_dtype")]
    pub dtype: Option<String>,
}

fn default_act() -> String {
    "quick_gelu".to_string()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}

impl ClipTextConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = diffuse_loaders::read_config(path)?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Checks values that serde cannot (activation name, divisibility, non-zero sizes).
    pub fn validate(&self, context: &str) -> Result<()> {
        self.activation(context)?;
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(Error::config(context, field, "must be positive"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::config(
                context,
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(Error::config(context, "layer_norm_eps", "must be positive"));
        }
        Ok(())
    }

    /// The MLP activation; any other name than `quick_gelu`/`gelu` is an error naming it.
    pub fn activation(&self, context: &str) -> Result<ClipActivation> {
        ClipActivation::parse(&self.hidden_act).ok_or_else(|| {
            Error::config(
                context,
                "hidden_act",
                format!(
                    "unsupported activation `{}` (supported: quick_gelu, gelu)",
                    self.hidden_act
                ),
            )
        })
    }
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: crate::ops::linear::linear(h, h, vb.pp("q_proj"))?,
            k_proj: crate::ops::linear::linear(h, h, vb.pp("k_proj"))?,
            v_proj: crate::ops::linear::linear(h, h, vb.pp("v_proj"))?,
            out_proj: crate::ops::linear::linear(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// `x`: (B, T, H); causal self-attention.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let out = crate::attention::multi_head_attention(&q, &k, &v, self.heads, scale, true)?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, act: ClipActivation) -> candle_core::Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), h, eps, true)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), h, eps, true)?,
            fc1: crate::ops::linear::linear(h, i, vb.pp("mlp.fc1"))?,
            fc2: crate::ops::linear::linear(i, h, vb.pp("mlp.fc2"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.self_attn.forward(&self.layer_norm1.forward(x)?)?;
        let x = (x + y)?;
        let y = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let y = self.fc2.forward(&self.act.apply(&y)?)?;
        x + y
    }
}

/// Outputs of [`ClipTextModel::forward`], as transformers returns them.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// (B, T, H), after the final layer norm.
    pub last_hidden_state: Tensor,
    /// (B, H): `last_hidden_state` at the EOS position of each sequence.
    pub pooler_output: Tensor,
    /// The embeddings output followed by each layer's output (L + 1 tensors of (B, T, H)),
    /// all before the final layer norm ("clip skip" uses `hidden_states[L - k]`).
    pub hidden_states: Vec<Tensor>,
}

/// `transformers.CLIPTextModel`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

crate::model_mixin!(ClipTextModel, ClipTextConfig, |config: &ClipTextConfig| {
    config.validate("config.json")
});

crate::model_mixin!(
    ClipTextModelWithProjection,
    ClipTextConfig,
    |config: &ClipTextConfig| config.validate("config.json")
);

impl ClipTextModel {
    /// Builds the model; weights are read under `text_model.` (the loader also accepts files
    /// written without that prefix).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        cfg.validate("CLIP text config")
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let act = cfg
            .activation("CLIP text config")
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (cfg.max_position_embeddings, cfg.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), cfg, act))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            vb.pp("final_layer_norm"),
            cfg.hidden_size,
            cfg.layer_norm_eps,
            true,
        )?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// Appends rows to the token embedding table (textual inversion): `rows` is (n, hidden);
    /// they get ids `vocab_size .. vocab_size + n` and `vocab_size` grows by n.
    pub fn add_token_embeddings(&mut self, rows: &Tensor) -> Result<()> {
        let hidden = self.config.hidden_size;
        let n = match rows.dims() {
            [n, h] if *h == hidden && *n > 0 => *n,
            other => {
                return Err(Error::invalid(format!(
                    "embedding vectors of shape {other:?} do not fit this text encoder                      (hidden size {hidden}): expected (n, {hidden})"
                )))
            }
        };
        let table = self.token_embedding.embeddings();
        let rows = rows.to_dtype(table.dtype())?.to_device(table.device())?;
        let table = Tensor::cat(&[table, &rows], 0)?;
        self.token_embedding = Embedding::new(table, hidden);
        self.config.vocab_size += n;
        Ok(())
    }

    /// The final layer norm alone (for "clip skip": apply it to an earlier hidden state).
    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.final_layer_norm.forward(x)?)
    }

    /// Runs the model on token ids `(B, T)` (any integer dtype), with a causal mask and no
    /// padding mask, as Stable Diffusion does.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            Error::invalid(format!(
                "CLIP input ids must be (batch, tokens), got shape {:?}",
                input_ids.dims()
            ))
        })?;
        let max_pos = self.config.max_position_embeddings;
        if t == 0 || t > max_pos {
            return Err(Error::invalid(format!(
                "CLIP input has {t} tokens; the model takes 1 to {max_pos}"
            )));
        }
        let ids: Vec<Vec<i64>> = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = ids.iter().flatten().find(|&&id| id < 0 || id >= vocab) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let device = self.device();
        let ids_u32 = input_ids.to_dtype(DType::U32)?.to_device(device)?;

        let tokens = self.token_embedding.forward(&ids_u32)?;
        let positions = self.position_embedding.narrow(0, 0, t)?;
        let mut x = tokens.broadcast_add(&positions)?;

        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;

        let eos_positions: Vec<u32> = ids
            .iter()
            .map(|row| self.pool_position(row) as u32)
            .collect();
        let index = Tensor::from_vec(eos_positions, b, device)?;
        // Row i of the pooled output is last_hidden_state[i, index[i]].
        let flat = last_hidden_state.reshape((b * t, self.config.hidden_size))?;
        let offsets = Tensor::arange(0u32, b as u32, device)?.affine(t as f64, 0.0)?;
        let rows = (index + offsets)?;
        let pooler_output = flat.index_select(&rows, 0)?;

        Ok(ClipTextOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
        })
    }

    /// Where the sequence is pooled: transformers takes `argmax(input_ids)` for legacy configs
    /// with `eos_token_id == 2` (the EOS has the highest id), else the first `eos_token_id`
    /// (position 0 when there is none, as `argmax` of an all-false mask gives).
    fn pool_position(&self, row: &[i64]) -> usize {
        if self.config.eos_token_id == 2 {
            let mut best = 0;
            for (i, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = i;
                }
            }
            best
        } else {
            row.iter()
                .position(|v| *v == self.config.eos_token_id)
                .unwrap_or(0)
        }
    }
}

/// `transformers.CLIPTextModelWithProjection`: the CLIP text encoder plus `text_projection`
/// (no bias) of the pooled output, SDXL's second text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextModelWithProjection {
    text_model: ClipTextModel,
    text_projection: Linear,
}

/// Outputs of [`ClipTextModelWithProjection::forward`].
#[derive(Debug, Clone)]
pub struct ClipTextProjectionOutput {
    /// `(B, projection_dim)`: the projected pooled output.
    pub text_embeds: Tensor,
    pub text: ClipTextOutput,
}

impl ClipTextModelWithProjection {
    /// Builds the model; `projection_dim` (default 512, as transformers) sets the width of
    /// `text_embeds`.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let text_model = ClipTextModel::new(vb.clone(), cfg)?;
        let text_projection = crate::ops::linear::linear_b(
            cfg.hidden_size,
            cfg.projection_dim.unwrap_or(512),
            false,
            vb.pp("text_projection"),
        )?;
        Ok(Self {
            text_model,
            text_projection,
        })
    }

    /// The text model without the projection.
    pub fn text_model(&self) -> &ClipTextModel {
        &self.text_model
    }

    /// [`ClipTextModel::add_token_embeddings`] (textual inversion).
    pub fn add_token_embeddings(&mut self, rows: &Tensor) -> Result<()> {
        self.text_model.add_token_embeddings(rows)
    }

    pub fn config(&self) -> &ClipTextConfig {
        self.text_model.config()
    }

    /// Runs the text model on `input_ids` `(B, T)` and projects its pooled output.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextProjectionOutput> {
        let text = self.text_model.forward(input_ids)?;
        let text_embeds = self.text_projection.forward(&text.pooler_output)?;
        Ok(ClipTextProjectionOutput { text_embeds, text })
    }
}
