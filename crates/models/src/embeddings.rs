//! Timestep and class embeddings (diffusers `embeddings.py`).

use crate::ops::linear::Linear;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use crate::activations::Activation;

/// Sinusoidal embedding of (possibly fractional) timesteps, `(N,)` → `(N, dim)` in f32.
///
/// Same maths as diffusers `get_timestep_embedding`, evaluated in f32 in the same order as torch
/// (frequencies `exp(-ln(max_period) * i / (half - shift))`), because a one-ulp difference in a
/// frequency becomes ~1e-4 in `sin(999 * f)`.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    scale: f64,
    max_period: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let log_period = -(max_period.ln() as f32);
    let denom = (half as f64 - downscale_freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_period * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let mut args = t.broadcast_mul(&freqs)?;
    if scale != 1.0 {
        args = (args * scale)?;
    }
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers' `get_guidance_scale_embedding` (the pipelines' LCM timestep condition): a
/// sinusoidal embedding of `1000 * w` per row, `(rows, dim)` in f32 (`[sin, cos]`, frequencies `exp(-i * ln(10000) / (dim/2 - 1))`).
pub fn guidance_scale_embedding(
    w: f64,
    rows: usize,
    dim: usize,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let w = (w as f32) * 1000.0;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut row: Vec<f32> = args.iter().map(|a| a.sin()).collect();
    row.extend(args.iter().map(|a| a.cos()));
    row.resize(dim, 0.0);
    let data: Vec<f32> = std::iter::repeat_n(row, rows).flatten().collect();
    Tensor::from_vec(data, (rows, dim), device)
}

/// diffusers `Timesteps`: the parameter-free sinusoidal projection.
#[derive(Clone, Debug)]
pub struct Timesteps {
    pub num_channels: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
            1.0,
            10000.0,
        )
    }
}

/// diffusers `GaussianFourierProjection`: `[sin(2π·t·w), cos(2π·t·w)]` with fixed random `w`.
#[derive(Clone, Debug)]
pub struct GaussianFourierProjection {
    weight: Tensor,
    /// UNet2DModel feeds `log(sigma)`; UNet2DConditionModel the raw timestep.
    log: bool,
    flip_sin_to_cos: bool,
}

impl GaussianFourierProjection {
    pub fn new(
        vb: VarBuilder,
        embedding_size: usize,
        log: bool,
        flip_sin_to_cos: bool,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            embedding_size,
            "weight",
            candle_nn::Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )?;
        Ok(Self {
            weight,
            log,
            flip_sin_to_cos,
        })
    }

    /// `(N,)` → `(N, 2 * embedding_size)` in f32.
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        let mut t = timesteps.to_dtype(DType::F32)?;
        if self.log {
            t = t.log()?;
        }
        let w = self.weight.to_dtype(DType::F32)?.unsqueeze(0)?;
        let proj = (t.unsqueeze(1)?.broadcast_mul(&w)? * (2.0 * std::f64::consts::PI))?;
        let (sin, cos) = (proj.sin()?, proj.cos()?);
        if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], D::Minus1)
        } else {
            Tensor::cat(&[sin, cos], D::Minus1)
        }
    }
}

/// How a UNet turns its timestep into features before the MLP.
#[derive(Clone, Debug)]
pub enum TimeProjection {
    Positional(Timesteps),
    Fourier(GaussianFourierProjection),
}

impl TimeProjection {
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        match self {
            Self::Positional(p) => p.forward(timesteps),
            Self::Fourier(p) => p.forward(timesteps),
        }
    }
}

/// diffusers `TimestepEmbedding`: `linear_1 → act → linear_2 (→ post_act)`, with an optional
/// condition projected (`cond_proj`, no bias) and added to the input first (LCM's guidance
/// embedding, `time_cond_proj_dim`).
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    cond_proj: Option<Linear>,
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        time_embed_dim: usize,
        act: Activation,
        post_act: Option<Activation>,
    ) -> Result<Self> {
        Ok(Self {
            cond_proj: None,
            linear_1: crate::ops::linear::linear(in_channels, time_embed_dim, vb.pp("linear_1"))?,
            act,
            linear_2: crate::ops::linear::linear(
                time_embed_dim,
                time_embed_dim,
                vb.pp("linear_2"),
            )?,
            post_act,
        })
    }
}

impl TimestepEmbedding {
    /// Adds the `cond_proj` of a `cond_dim`-wide condition (under `vb`, the embedding's own
    /// prefix) to an embedding whose input is `in_channels` wide.
    pub fn with_condition(
        mut self,
        vb: VarBuilder,
        cond_dim: usize,
        in_channels: usize,
    ) -> Result<Self> {
        self.cond_proj = Some(crate::ops::linear::linear_b(
            cond_dim,
            in_channels,
            false,
            vb.pp("cond_proj"),
        )?);
        Ok(self)
    }

    /// The embedding of `xs`, conditioned on `condition` when the model has a `cond_proj`
    /// (an error when exactly one of them is there).
    pub fn forward_cond(&self, xs: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let xs = match (&self.cond_proj, condition) {
            (Some(p), Some(c)) => xs.broadcast_add(&p.forward(&c.to_dtype(xs.dtype())?)?)?,
            (None, None) => xs.clone(),
            (Some(_), None) => candle_core::bail!(
                "this model has a time_cond_proj_dim: a timestep condition (e.g. the LCM \
                 guidance embedding) is required"
            ),
            (None, Some(_)) => {
                candle_core::bail!("a timestep condition was given but the model has no cond_proj")
            }
        };
        self.forward(&xs)
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.linear_1.forward(xs)?)?;
        let h = self.linear_2.forward(&h)?;
        match self.post_act {
            Some(a) => a.forward(&h),
            None => Ok(h),
        }
    }
}

/// The optional class conditioning added to the time embedding (`class_embed_type`).
#[derive(Clone, Debug)]
pub enum ClassEmbedding {
    /// `num_class_embeds` set, no type: a learned table indexed by integer labels.
    Table(Embedding),
    /// `"timestep"`: labels are projected like timesteps, then through their own MLP.
    Timestep(TimestepEmbedding),
    /// `"identity"`: labels already are `(B, time_embed_dim)` embeddings.
    Identity,
    /// `"projection"`: an MLP over `(B, projection_class_embeddings_input_dim)` inputs.
    Projection(TimestepEmbedding),
    /// `"simple_projection"`: one linear layer over such inputs.
    SimpleProjection(Linear),
}

impl ClassEmbedding {
    /// Embeds `labels` to `(B, time_embed_dim)` in `dtype`; `time_proj` serves the
    /// `"timestep"` kind.
    pub fn forward(
        &self,
        labels: &Tensor,
        time_proj: &TimeProjection,
        dtype: DType,
    ) -> Result<Tensor> {
        match self {
            Self::Table(e) => {
                let ids = match labels.dtype() {
                    DType::U8 | DType::U32 | DType::I64 => labels.clone(),
                    _ => labels.to_dtype(DType::U32)?,
                };
                e.forward(&ids)?.to_dtype(dtype)
            }
            Self::Timestep(mlp) => mlp.forward(&time_proj.forward(labels)?.to_dtype(dtype)?),
            Self::Identity => labels.to_dtype(dtype),
            Self::Projection(mlp) => mlp.forward(&labels.to_dtype(dtype)?),
            Self::SimpleProjection(l) => l.forward(&labels.to_dtype(dtype)?),
        }
    }
}

/// A timestep argument as `(batch,)` f32: a scalar or one-element tensor is repeated, as
/// diffusers broadcasts it.
pub fn batch_timesteps(timestep: &Tensor, batch: usize, device: &Device) -> Result<Tensor> {
    let t = timestep.to_device(device)?.to_dtype(DType::F32)?;
    match t.elem_count() {
        n if n == batch && t.rank() == 1 => Ok(t),
        1 => t.flatten_all()?.broadcast_as(batch)?.contiguous(),
        _ => candle_core::bail!(
            "timestep must be a scalar or have shape ({batch},), got {:?}",
            t.dims()
        ),
    }
}

impl ClassEmbedding {
    /// The class embedding a UNet config asks for (diffusers `_set_class_embedding`), under
    /// `vb` (`class_embedding`). `projection_input_dim` serves the projection kinds.
    pub fn from_config(
        vb: VarBuilder,
        class_embed_type: Option<&str>,
        num_class_embeds: Option<usize>,
        time_input_dim: usize,
        time_embed_dim: usize,
        act: Activation,
        projection_input_dim: Option<usize>,
    ) -> Result<Option<Self>> {
        let needs_dim = |kind: &str| {
            projection_input_dim.ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "class_embed_type `{kind}` needs projection_class_embeddings_input_dim"
                ))
            })
        };
        Ok(match (class_embed_type, num_class_embeds) {
            (None, Some(k)) => Some(Self::Table(candle_nn::embedding(k, time_embed_dim, vb)?)),
            (None, None) => None,
            (Some("timestep"), _) => Some(Self::Timestep(TimestepEmbedding::new(
                vb,
                time_input_dim,
                time_embed_dim,
                act,
                None,
            )?)),
            (Some("identity"), _) => Some(Self::Identity),
            (Some("projection"), _) => Some(Self::Projection(TimestepEmbedding::new(
                vb,
                needs_dim("projection")?,
                time_embed_dim,
                Activation::Silu,
                None,
            )?)),
            (Some("simple_projection"), _) => Some(Self::SimpleProjection(
                crate::ops::linear::linear(needs_dim("simple_projection")?, time_embed_dim, vb)?,
            )),
            (Some(other), _) => candle_core::bail!("unsupported class_embed_type `{other}`"),
        })
    }
}

/// SDXL's `addition_embed_type: "text_time"`: the micro-conditioning `time_ids` (original
/// size, crop offset, target size) are projected sinusoidally one number at a time
/// (`add_time_proj`), concatenated after the pooled text embedding and sent through their own
/// MLP (`add_embedding`).
#[derive(Clone, Debug)]
pub struct TextTimeEmbedding {
    pub add_time_proj: Timesteps,
    pub add_embedding: TimestepEmbedding,
}

impl TextTimeEmbedding {
    /// `text_embeds` `(B, P)`, `time_ids` `(B, K)` → `(B, time_embed_dim)` in `dtype`.
    pub fn forward(&self, text_embeds: &Tensor, time_ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let b = text_embeds.dim(0)?;
        if time_ids.rank() != 2 || time_ids.dim(0)? != b {
            candle_core::bail!("time_ids must be (batch {b}, n), got {:?}", time_ids.dims())
        }
        let time_embeds = self
            .add_time_proj
            .forward(&time_ids.flatten_all()?)?
            .reshape((b, ()))?;
        let add = Tensor::cat(
            &[&text_embeds.to_dtype(DType::F32)?, &time_embeds],
            D::Minus1,
        )?;
        self.add_embedding.forward(&add.to_dtype(dtype)?)
    }
}

/// The optional conditioning inputs of a UNet's time embedding.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeConditioning<'a> {
    /// Required exactly when the model has a class embedding.
    pub class_labels: Option<&'a Tensor>,
    /// `(B, time_cond_proj_dim)`: required exactly when the model has a `time_cond_proj_dim`.
    pub timestep_cond: Option<&'a Tensor>,
    /// SDXL `added_cond_kwargs`: `text_embeds` `(B, P)` and `time_ids` `(B, K)`; required
    /// exactly when the model has a `text_time` addition embedding.
    pub text_time: Option<(&'a Tensor, &'a Tensor)>,
}

/// The conditioning vector of a UNet: timestep projection → MLP (optionally conditioned),
/// plus the optional class embedding (added, or concatenated with `class_embeddings_concat`),
/// plus the optional `text_time` embedding, then the optional `time_embedding_act_fn`.
#[derive(Clone, Debug)]
pub struct UNetTimeEmbedding {
    pub time_proj: TimeProjection,
    pub time_embedding: TimestepEmbedding,
    pub class_embedding: Option<ClassEmbedding>,
    pub class_embeddings_concat: bool,
    pub add_embedding: Option<TextTimeEmbedding>,
    pub time_embed_act: Option<Activation>,
}

impl UNetTimeEmbedding {
    /// `timestep`: scalar or `(batch,)`. Returns `(batch, dim)` in `dtype`.
    pub fn forward(
        &self,
        timestep: &Tensor,
        batch: usize,
        cond: &TimeConditioning<'_>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = batch_timesteps(timestep, batch, device)?;
        let mut emb = self.time_embedding.forward_cond(
            &self.time_proj.forward(&t)?.to_dtype(dtype)?,
            cond.timestep_cond,
        )?;
        match (&self.class_embedding, cond.class_labels) {
            (Some(ce), Some(labels)) => {
                let class_emb = ce.forward(&labels.to_device(device)?, &self.time_proj, dtype)?;
                emb = if self.class_embeddings_concat {
                    Tensor::cat(&[&emb, &class_emb], D::Minus1)?
                } else {
                    (emb + class_emb)?
                };
            }
            (Some(_), None) => {
                candle_core::bail!("this model is class-conditional: class labels are required")
            }
            (None, Some(_)) => {
                candle_core::bail!("class labels given but the model has no class embedding")
            }
            (None, None) => {}
        }
        match (&self.add_embedding, cond.text_time) {
            (Some(add), Some((text_embeds, time_ids))) => {
                emb = (emb + add.forward(text_embeds, time_ids, dtype)?)?;
            }
            (Some(_), None) => candle_core::bail!(
                "this model has a text_time addition embedding (SDXL): text_embeds and \
                 time_ids are required"
            ),
            (None, Some(_)) => candle_core::bail!(
                "text_embeds/time_ids given but the model has no text_time addition embedding"
            ),
            (None, None) => {}
        }
        match self.time_embed_act {
            Some(a) => a.forward(&emb),
            None => Ok(emb),
        }
    }
}

/// diffusers `get_2d_sincos_pos_embed`: `(rows·cols, dim)` f32 sinusoidal embeddings of a
/// `rows × cols` grid of patches, token `r·cols + c`. The first half of each vector encodes the
/// column `c·base_size/cols/scale`, the second the row likewise (diffusers' `meshgrid` puts the
/// width first); each half is `[sin(p·ω), cos(p·ω)]` with `ω_i = 10000^(−i/(dim/4))`, the
/// positions in f32 and the rest in f64 as diffusers computes them.
pub fn get_2d_sincos_pos_embed(
    dim: usize,
    (rows, cols): (usize, usize),
    base_size: f64,
    interpolation_scale: f64,
    device: &Device,
) -> Result<Tensor> {
    if !dim.is_multiple_of(4) {
        candle_core::bail!("2D sin-cos position embeddings need a width divisible by 4, got {dim}")
    }
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / (dim as f64 / 4.0)))
        .collect();
    let positions = |n: usize| -> Vec<f32> {
        let step = (n as f64 / base_size) as f32;
        (0..n)
            .map(|i| i as f32 / step / interpolation_scale as f32)
            .collect()
    };
    let (row_pos, col_pos) = (positions(rows), positions(cols));
    let mut out = Vec::with_capacity(rows * cols * dim);
    for &r in &row_pos {
        for &c in &col_pos {
            for p in [c, r] {
                let p = p as f64;
                out.extend(omega.iter().map(|w| (p * w).sin() as f32));
                out.extend(omega.iter().map(|w| (p * w).cos() as f32));
            }
        }
    }
    Tensor::from_vec(out, (rows * cols, dim), device)
}

/// diffusers `PatchEmbed` (DiT, SD3): a `p × p`, stride-`p` convolution `proj` turning
/// `(B, C, H, W)` latents into `(B, H/p · W/p, dim)` tokens, plus sin-cos position embeddings:
/// stored as the buffer `pos_embed` `(1, max², dim)` and centre-cropped to the input when
/// `pos_embed_max_size` is set (SD3), else computed for the grid (DiT).
///
/// The convolution runs as a linear layer over the flattened patches (the same products; the
/// weight keeps its stored `(dim, C, p, p)` shape).
#[derive(Clone, Debug)]
pub struct PatchEmbed {
    proj: Linear,
    patch_size: usize,
    in_channels: usize,
    /// `(max², dim)` stored embeddings and `max` (SD3).
    stored: Option<(Tensor, usize)>,
    /// Grid side at the training size (`base_size` of diffusers), for computed embeddings.
    base_size: usize,
    interpolation_scale: f64,
    dim: usize,
}

impl PatchEmbed {
    /// `sample_size`: the latent side the model was trained at.
    pub fn new(
        vb: VarBuilder,
        sample_size: usize,
        patch_size: usize,
        in_channels: usize,
        dim: usize,
        pos_embed_max_size: Option<usize>,
    ) -> Result<Self> {
        if patch_size == 0 {
            candle_core::bail!("patch_size must be positive")
        }
        let proj = vb.pp("proj");
        let weight = proj.get((dim, in_channels, patch_size, patch_size), "weight")?;
        let bias = proj.get(dim, "bias")?;
        let proj = Linear::new(
            weight.reshape((dim, in_channels * patch_size * patch_size))?,
            Some(bias),
        );
        let stored = match pos_embed_max_size {
            Some(m) => Some((vb.get((1, m * m, dim), "pos_embed")?.squeeze(0)?, m)),
            None => None,
        };
        Ok(Self {
            proj,
            patch_size,
            in_channels,
            stored,
            base_size: sample_size / patch_size,
            interpolation_scale: 1.0,
            dim,
        })
    }

    /// `(B, C, H, W)` → `(B, H/p · W/p, dim)` in the latents' dtype.
    pub fn forward(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = latents.dims4()?;
        let p = self.patch_size;
        if c != self.in_channels || h % p != 0 || w % p != 0 {
            candle_core::bail!(
                "patch embedding: latents {:?} must have {} channels and sides divisible by {p}",
                latents.dims(),
                self.in_channels
            )
        }
        let (rows, cols) = (h / p, w / p);
        let patches = latents
            .reshape((b, c, rows, p, cols, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, rows * cols, c * p * p))?;
        let tokens = self.proj.forward(&patches)?;
        let pos = match &self.stored {
            Some((table, max)) => {
                if rows > *max || cols > *max {
                    candle_core::bail!(
                        "latents of {h}x{w} make a {rows}x{cols} patch grid, more than the \
                         {max}x{max} of the position embeddings (pos_embed_max_size)"
                    )
                }
                let (top, left) = ((max - rows) / 2, (max - cols) / 2);
                table
                    .reshape((*max, *max, self.dim))?
                    .narrow(0, top, rows)?
                    .narrow(1, left, cols)?
                    .reshape((rows * cols, self.dim))?
            }
            None => get_2d_sincos_pos_embed(
                self.dim,
                (rows, cols),
                self.base_size as f64,
                self.interpolation_scale,
                latents.device(),
            )?,
        };
        tokens.broadcast_add(&pos.to_dtype(tokens.dtype())?.unsqueeze(0)?)
    }
}

/// The inverse of the patch embedding's layout: `(B, rows·cols, p·p·C)` tokens → `(B, C,
/// rows·p, cols·p)` (diffusers' `einsum("nhwpqc->nchpwq")`).
pub fn unpatchify(tokens: &Tensor, (rows, cols): (usize, usize), p: usize) -> Result<Tensor> {
    let (b, n, f) = tokens.dims3()?;
    if n != rows * cols || f % (p * p) != 0 {
        candle_core::bail!(
            "unpatchify: tokens {:?} do not make a {rows}x{cols} grid of {p}x{p} patches",
            tokens.dims()
        )
    }
    let c = f / (p * p);
    tokens
        .reshape((b, rows, cols, p, p, c))?
        .permute((0, 5, 1, 3, 2, 4))?
        .contiguous()?
        .reshape((b, c, rows * p, cols * p))
}

/// The 256-channel sinusoidal projection all the diffusion transformers embed timesteps with
/// (`Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=shift)`), `(B,)` → `(B, 256)`.
pub fn transformer_time_proj(timesteps: &Tensor, downscale_freq_shift: f64) -> Result<Tensor> {
    timestep_embedding(timesteps, 256, true, downscale_freq_shift, 1.0, 10000.0)
}

/// diffusers `CombinedTimestepLabelEmbeddings` (DiT): `timestep_embedder(proj(t)) +
/// class_embedder.embedding_table[label]`. The table has one extra row (the null class of
/// guidance) when the model was trained with label dropout.
#[derive(Clone, Debug)]
pub struct CombinedTimestepLabelEmbeddings {
    timestep_embedder: TimestepEmbedding,
    embedding_table: Embedding,
    rows: usize,
}

impl CombinedTimestepLabelEmbeddings {
    /// `num_classes` real classes plus the null class.
    pub fn new(vb: VarBuilder, num_classes: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            timestep_embedder: TimestepEmbedding::new(
                vb.pp("timestep_embedder"),
                256,
                dim,
                Activation::Silu,
                None,
            )?,
            embedding_table: candle_nn::embedding(
                num_classes + 1,
                dim,
                vb.pp("class_embedder.embedding_table"),
            )?,
            rows: num_classes + 1,
        })
    }

    /// `timesteps` `(B,)`, `labels` `(B,)` integer ids → `(B, dim)` in `dtype`.
    pub fn forward(&self, timesteps: &Tensor, labels: &Tensor, dtype: DType) -> Result<Tensor> {
        let ids = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        if let Some(bad) = ids.iter().find(|&&l| l < 0 || l as usize >= self.rows) {
            candle_core::bail!(
                "class label {bad} is outside the model's {} labels (the last is the null class)",
                self.rows
            )
        }
        let t = self
            .timestep_embedder
            .forward(&transformer_time_proj(timesteps, 1.0)?.to_dtype(dtype)?)?;
        let labels = self
            .embedding_table
            .forward(&labels.to_dtype(DType::U32)?)?
            .to_dtype(dtype)?;
        t + labels
    }
}

/// The conditioning vector of SD3 and Flux: diffusers `CombinedTimestepTextProjEmbeddings`
/// (`timestep_embedder(proj(t)) + text_embedder(pooled)`) and, with a `guidance_embedder`
/// (Flux-dev), `CombinedTimestepGuidanceTextProjEmbeddings`, which adds
/// `guidance_embedder(proj(g))`. `text_embedder` is a `PixArtAlphaTextProjection` with SiLU:
/// the same `linear_1 → silu → linear_2` as a timestep MLP.
#[derive(Clone, Debug)]
pub struct TimeTextEmbedding {
    timestep_embedder: TimestepEmbedding,
    guidance_embedder: Option<TimestepEmbedding>,
    text_embedder: TimestepEmbedding,
}

impl TimeTextEmbedding {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        pooled_projection_dim: usize,
        guidance: bool,
    ) -> Result<Self> {
        let mlp = |name: &str, input: usize| {
            TimestepEmbedding::new(vb.pp(name), input, dim, Activation::Silu, None)
        };
        Ok(Self {
            timestep_embedder: mlp("timestep_embedder", 256)?,
            guidance_embedder: guidance
                .then(|| mlp("guidance_embedder", 256))
                .transpose()?,
            text_embedder: mlp("text_embedder", pooled_projection_dim)?,
        })
    }

    pub fn has_guidance(&self) -> bool {
        self.guidance_embedder.is_some()
    }

    /// `timesteps` and `guidance` `(B,)`, `pooled` `(B, pooled_projection_dim)` → `(B, dim)`
    /// in the dtype of `pooled`.
    pub fn forward(
        &self,
        timesteps: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let dtype = pooled.dtype();
        let embed = |mlp: &TimestepEmbedding, t: &Tensor| {
            mlp.forward(&transformer_time_proj(t, 0.0)?.to_dtype(dtype)?)
        };
        let mut emb = embed(&self.timestep_embedder, timesteps)?;
        match (&self.guidance_embedder, guidance) {
            (Some(mlp), Some(g)) => emb = (emb + embed(mlp, g)?)?,
            (Some(_), None) => {
                candle_core::bail!("this model embeds the guidance scale: give a guidance value")
            }
            (None, Some(_)) => candle_core::bail!(
                "this model has no guidance embedding (guidance_embeds is false): give no \
                 guidance value"
            ),
            (None, None) => {}
        }
        emb + self.text_embedder.forward(pooled)?
    }
}
