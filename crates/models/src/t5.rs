//! The T5 text encoder (`transformers.T5EncoderModel`): the third text encoder of SD3 and the
//! second of Flux (T5 v1.1 XXL in the published checkpoints).
//!
//! ```text
//! x = shared[ids]
//! for block in encoder.block:                   # bias: block 0's relative position table
//!     x = x + o(attention(q, k, v, bias))(rms_norm(x))     # no 1/√d scaling, no mask
//!     x = x + wo(act(wi_0(h)) * wi_1(h)), h = rms_norm(x)  # gated (v1.1) or act(wi(h))
//! last_hidden_state = rms_norm(x)
//! ```
//!
//! The pipelines pad the prompt to `max_sequence_length` and encode it without an attention
//! mask, as diffusers does, so there is none here either.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use diffuse_core::{Error, Result};
use serde::Deserialize;

use crate::normalization::RmsNorm;
use crate::ops::linear::{linear_b, Linear};

/// `config.json` of a transformers T5 model (unknown keys ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    /// Width of one attention head.
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu` (T5 v1.0), `gated-gelu` (v1.1, SD3 and Flux), `gated-silu`, ...; see
    /// [`T5Config::feed_forward`].
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".to_string()
}

/// The activation of the feed-forward's inner layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Activation {
    Relu,
    /// Exact (erf) GELU, transformers' `gelu`.
    Gelu,
    /// Tanh-approximate GELU, transformers' `gelu_new` (what `gated-gelu` means).
    GeluNew,
    Silu,
}

impl T5Activation {
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Gelu => crate::ops::activation::gelu(x),
            Self::GeluNew => crate::ops::activation::gelu_tanh(x),
            Self::Silu => x.silu(),
        }
    }
}

impl T5Config {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = diffuse_loaders::read_config(path)?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self, context: &str) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
        ] {
            if v == 0 {
                return Err(Error::config(context, field, "must be positive"));
            }
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            return Err(Error::config(
                context,
                "layer_norm_epsilon",
                "must be positive",
            ));
        }
        self.feed_forward(context)?;
        Ok(())
    }

    /// `(activation, gated)` as transformers reads `feed_forward_proj`: `[gated-]ACT`, where
    /// `gated-gelu` means the tanh-approximate GELU.
    pub fn feed_forward(&self, context: &str) -> Result<(T5Activation, bool)> {
        let name = self.feed_forward_proj.as_str();
        let (gated, act) = match name.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, name),
            // transformers refuses any other prefix as well.
            Some(_) => (false, ""),
        };
        let act = match (act, gated) {
            ("gelu", true) => T5Activation::GeluNew,
            ("gelu", false) => T5Activation::Gelu,
            ("gelu_new", _) => T5Activation::GeluNew,
            ("relu", _) => T5Activation::Relu,
            ("silu", _) | ("swish", _) => T5Activation::Silu,
            _ => {
                return Err(Error::config(
                    context,
                    "feed_forward_proj",
                    format!(
                        "unsupported `{name}` (supported: relu, gelu, gelu_new, silu, each \
                         optionally as `gated-ACT`)"
                    ),
                ))
            }
        };
        Ok((act, gated))
    }
}

/// T5's bidirectional relative position bucket of `key − query` (transformers'
/// `_relative_position_bucket` with `bidirectional=True`): exact buckets for small distances,
/// logarithmic ones up to `max_distance`, one bucket beyond; keys after the query use the
/// upper half. The logarithm runs in f32, as torch computes it.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let base = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        return (base + n) as usize;
    }
    let log_ratio = (n as f32 / max_exact as f32).ln()
        / ((max_distance as f64 / max_exact as f64).ln() as f32)
        * (half - max_exact) as f32;
    let large = (max_exact + log_ratio as i64).min(half - 1);
    (base + large) as usize
}

#[derive(Debug, Clone)]
struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    d_kv: usize,
}

impl T5Attention {
    fn new(vb: VarBuilder, cfg: &T5Config) -> candle_core::Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: linear_b(cfg.d_model, inner, false, vb.pp("q"))?,
            k: linear_b(cfg.d_model, inner, false, vb.pp("k"))?,
            v: linear_b(cfg.d_model, inner, false, vb.pp("v"))?,
            o: linear_b(inner, cfg.d_model, false, vb.pp("o"))?,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    /// `x` (B, N, d_model); `bias` (1, heads, N, N) added to the unscaled scores.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q.forward(x)?)?;
        let k = heads(self.k.forward(x)?)?;
        let v = heads(self.v.forward(x)?)?;
        // Scores in f32 whatever the activations' dtype, as the softmax is.
        let scores = q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?.contiguous()?)?
            .broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((
            b,
            n,
            self.heads * self.d_kv,
        ))?;
        self.o.forward(&out)
    }
}

/// The feed-forward: `wo(act(wi_0(x)) * wi_1(x))` when gated, else `wo(act(wi(x)))`.
#[derive(Debug, Clone)]
struct T5FeedForward {
    wi: Linear,
    /// The linear half of a gated layer (`wi_1`; `wi` is then `wi_0`).
    wi_1: Option<Linear>,
    wo: Linear,
    act: T5Activation,
}

impl T5FeedForward {
    fn new(
        vb: VarBuilder,
        cfg: &T5Config,
        act: T5Activation,
        gated: bool,
    ) -> candle_core::Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let (wi, wi_1) = if gated {
            (
                linear_b(d, f, false, vb.pp("wi_0"))?,
                Some(linear_b(d, f, false, vb.pp("wi_1"))?),
            )
        } else {
            (linear_b(d, f, false, vb.pp("wi"))?, None)
        };
        Ok(Self {
            wi,
            wi_1,
            wo: linear_b(f, d, false, vb.pp("wo"))?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.act.apply(&self.wi.forward(x)?)?;
        if let Some(wi_1) = &self.wi_1 {
            h = (h * wi_1.forward(x)?)?;
        }
        self.wo.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct T5Block {
    attn_norm: RmsNorm,
    attn: T5Attention,
    ff_norm: RmsNorm,
    ff: T5FeedForward,
}

impl T5Block {
    fn new(
        vb: VarBuilder,
        cfg: &T5Config,
        act: T5Activation,
        gated: bool,
    ) -> candle_core::Result<Self> {
        let (d, eps) = (cfg.d_model, cfg.layer_norm_epsilon);
        let attn = vb.pp("layer.0");
        let ff = vb.pp("layer.1");
        Ok(Self {
            attn_norm: RmsNorm::new(attn.pp("layer_norm"), d, eps, true)?,
            attn: T5Attention::new(attn.pp("SelfAttention"), cfg)?,
            ff_norm: RmsNorm::new(ff.pp("layer_norm"), d, eps, true)?,
            ff: T5FeedForward::new(ff.pp("DenseReluDense"), cfg, act, gated)?,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.attn_norm.forward(x)?, bias)?)?;
        &x + self.ff.forward(&self.ff_norm.forward(&x)?)?
    }
}

/// `transformers.T5EncoderModel`.
#[derive(Debug, Clone)]
pub struct T5EncoderModel {
    shared: Embedding,
    /// `(buckets, heads)`: block 0's relative position table, shared by every block.
    relative_attention_bias: Tensor,
    blocks: Vec<T5Block>,
    final_layer_norm: RmsNorm,
    config: T5Config,
}

crate::model_mixin!(T5EncoderModel, T5Config, |config: &T5Config| config
    .validate("config.json"));

impl T5EncoderModel {
    /// Builds the encoder; the token embedding is `shared.weight` (the loader also accepts the
    /// tied copy `encoder.embed_tokens.weight`).
    pub fn new(vb: VarBuilder, cfg: &T5Config) -> candle_core::Result<Self> {
        cfg.validate("T5 config")
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (act, gated) = cfg
            .feed_forward("T5 config")
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let shared = candle_nn::embedding(cfg.vocab_size, cfg.d_model, vb.pp("shared"))?;
        let enc = vb.pp("encoder");
        let relative_attention_bias = enc.pp("block.0.layer.0.SelfAttention").get(
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            "relative_attention_bias.weight",
        )?;
        let blocks = (0..cfg.num_layers)
            .map(|i| T5Block::new(enc.pp(format!("block.{i}")), cfg, act, gated))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = RmsNorm::new(
            enc.pp("final_layer_norm"),
            cfg.d_model,
            cfg.layer_norm_epsilon,
            true,
        )?;
        Ok(Self {
            shared,
            relative_attention_bias,
            blocks,
            final_layer_norm,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        self.relative_attention_bias.device()
    }

    /// `(1, heads, n, n)` f32: the relative position bias of every (query, key) pair.
    fn position_bias(&self, n: usize) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let buckets: Vec<u32> = (0..n as i64)
            .flat_map(|q| {
                (0..n as i64).map(move |k| {
                    relative_position_bucket(
                        k - q,
                        cfg.relative_attention_num_buckets,
                        cfg.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        let ids = Tensor::from_vec(buckets, n * n, self.device())?;
        self.relative_attention_bias
            .to_dtype(DType::F32)?
            .index_select(&ids, 0)?
            .reshape((n, n, cfg.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()
    }

    /// `last_hidden_state` `(B, T, d_model)` of token ids `(B, T)` (any integer dtype), in
    /// f32 whatever the weights' dtype.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, t) = input_ids.dims2().map_err(|_| {
            Error::invalid(format!(
                "T5 input ids must be (batch, tokens), got shape {:?}",
                input_ids.dims()
            ))
        })?;
        if t == 0 {
            return Err(Error::invalid("T5 input has no tokens"));
        }
        let ids = input_ids
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = ids.iter().find(|&&id| id < 0 || id >= vocab) {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the T5 vocabulary (size {vocab})"
            )));
        }
        let ids = input_ids.to_dtype(DType::U32)?.to_device(self.device())?;
        let mut x = self.shared.forward(&ids)?.to_dtype(DType::F32)?;
        let bias = self.position_bias(t)?;
        for block in &self.blocks {
            x = block.forward(&x, &bias)?;
        }
        Ok(self.final_layer_norm.forward(&x)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    /// Where the bucket changes, as transformers' `_relative_position_bucket` gives it for
    /// key − query in −600..=600, for T5 v1.1 (32 buckets, 128) and the tiny test models (8, 32).
    #[test]
    fn buckets_match_transformers() {
        // (buckets, max distance, [(first key − query of a run, its bucket)])
        type Case = (usize, usize, &'static [(i64, usize)]);
        let cases: [Case; 2] = [
            (
                32,
                128,
                &[
                    (-600, 15),
                    (-90, 14),
                    (-63, 13),
                    (-45, 12),
                    (-31, 11),
                    (-22, 10),
                    (-15, 9),
                    (-11, 8),
                    (-7, 7),
                    (-6, 6),
                    (-5, 5),
                    (-4, 4),
                    (-3, 3),
                    (-2, 2),
                    (-1, 1),
                    (0, 0),
                    (1, 17),
                    (2, 18),
                    (3, 19),
                    (4, 20),
                    (5, 21),
                    (6, 22),
                    (7, 23),
                    (8, 24),
                    (12, 25),
                    (16, 26),
                    (23, 27),
                    (32, 28),
                    (46, 29),
                    (64, 30),
                    (91, 31),
                ],
            ),
            (
                8,
                32,
                &[(-600, 3), (-7, 2), (-1, 1), (0, 0), (1, 5), (2, 6), (8, 7)],
            ),
        ];
        for (buckets, max_distance, changes) in cases {
            let mut expected = Vec::new();
            for r in -600i64..=600 {
                let idx = changes.partition_point(|&(start, _)| start <= r) - 1;
                expected.push(changes[idx].1);
            }
            let got: Vec<usize> = (-600i64..=600)
                .map(|r| relative_position_bucket(r, buckets, max_distance))
                .collect();
            assert_eq!(
                got, expected,
                "{buckets} buckets, max distance {max_distance}"
            );
        }
    }
}
