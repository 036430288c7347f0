//! Single-file Stable Diffusion checkpoints in the original (CompVis / LDM / SGM) key layout:
//! `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.*` or
//! `conditioner.embedders.N.*` (text encoders).
//!
//! Names are mapped to diffusers' by tables of block prefixes built from the architecture
//! (number of blocks, layers per block), as diffusers' single-file loader does, plus the
//! renames inside resnets and VAE attention; OpenCLIP text encoders (SD 2.x, SDXL's second) store
//! q/k/v as one `in_proj` tensor, read here as three row blocks. The same tables run backwards
//! to write a single file from a diffusers folder ([`to_original_layout`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use diffuse_core::{Error, Result};

use crate::weights::{CheckedBackend, MappedTensor, TensorFile};

/// The model families a single file is recognised as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x (CLIP ViT-L text encoder).
    Sd1,
    /// SD 1.x inpainting (9 input channels).
    Sd1Inpaint,
    /// SD 2.x (OpenCLIP ViT-H text encoder).
    Sd2,
    /// SD 2.x inpainting.
    Sd2Inpaint,
    /// SDXL base (CLIP ViT-L + OpenCLIP bigG).
    Sdxl,
    /// SDXL refiner (OpenCLIP bigG only).
    SdxlRefiner,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "Stable Diffusion 1.x",
            Family::Sd1Inpaint => "Stable Diffusion 1.x inpainting",
            Family::Sd2 => "Stable Diffusion 2.x",
            Family::Sd2Inpaint => "Stable Diffusion 2.x inpainting",
            Family::Sdxl => "Stable Diffusion XL base",
            Family::SdxlRefiner => "Stable Diffusion XL refiner",
        }
    }
}

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";

/// How a text encoder is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TextEncoderLayout {
    /// transformers' CLIPTextModel names under a prefix (`cond_stage_model.transformer.`);
    /// `text_model.` may or may not follow it.
    Clip { prefix: String },
    /// OpenCLIP names under a prefix (`cond_stage_model.model.`); `layers` of the stored
    /// resblocks are used (SD 2.x uses 23 of 24); `projection`: keep `text_projection` as
    /// `text_projection.weight` (CLIPTextModelWithProjection).
    OpenClip {
        prefix: String,
        layers: usize,
        projection: bool,
    },
}

/// Keys in real checkpoints that belong to no component (training state, buffers).
const TOP_LEVEL_IGNORED: &[&str] = &[
    "model_ema.",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "betas",
    "log_one_minus_alphas_cumprod",
    "posterior_",
    "sqrt_",
    "lvlb_weights",
    "logvar",
    "model.diffusion_model.time_embed_",
];

/// An opened single-file checkpoint.
pub struct SingleFile {
    pub file: Arc<TensorFile>,
    shapes: HashMap<String, Vec<usize>>,
    /// `state_dict.` for Lightning `.ckpt` files, else empty.
    root: String,
}

impl SingleFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = Arc::new(TensorFile::open(path)?);
        let all = file.shapes();
        let root = if all.iter().any(|(k, _)| k.starts_with("state_dict.")) {
            "state_dict.".to_string()
        } else {
            String::new()
        };
        let shapes = all
            .into_iter()
            .filter_map(|(k, s)| k.strip_prefix(&root).map(|k| (k.to_string(), s)))
            .collect();
        Ok(Self { file, shapes, root })
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Every tensor's (name, shape), names without the `state_dict.` root of Lightning files.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.shapes.iter().map(|(k, s)| (k.as_str(), s.as_slice()))
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.shapes.get(key).map(Vec::as_slice)
    }

    fn has(&self, key: &str) -> bool {
        self.shapes.contains_key(key)
    }

    /// Recognises the model family from sentinel keys and shapes; an unknown layout is an
    /// error naming what was looked for.
    pub fn family(&self) -> Result<Family> {
        let in_ch = self
            .shape("model.diffusion_model.input_blocks.0.0.weight")
            .and_then(|s| s.get(1).copied());
        let Some(in_ch) = in_ch else {
            return Err(Error::Weights(format!(
                "{}: not a Stable Diffusion checkpoint in the original layout (no \
                 `model.diffusion_model.input_blocks.0.0.weight`; {} tensors, e.g. {:?}); a \
                 diffusers folder or another model family needs --config or its own loader",
                self.path().display(),
                self.shapes.len(),
                self.shapes.keys().take(3).collect::<Vec<_>>()
            )));
        };
        let inpaint = in_ch == 9;
        if self.has("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight") {
            return Ok(Family::Sdxl);
        }
        if self.has("conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight") {
            return Ok(Family::SdxlRefiner);
        }
        if self.has("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight") {
            return Ok(if inpaint {
                Family::Sd2Inpaint
            } else {
                Family::Sd2
            });
        }
        if self
            .shapes
            .keys()
            .any(|k| k.starts_with("cond_stage_model.transformer."))
        {
            return Ok(if inpaint {
                Family::Sd1Inpaint
            } else {
                Family::Sd1
            });
        }
        Err(Error::Weights(format!(
            "{}: a UNet in the original layout but no text encoder this loader knows \
             (looked for cond_stage_model.transformer.*, cond_stage_model.model.*, \
             conditioner.embedders.*)",
            self.path().display()
        )))
    }

    /// The text encoders of a family, in pipeline order.
    pub fn text_encoders(&self, family: Family) -> Vec<TextEncoderLayout> {
        let count_blocks = |prefix: &str| {
            (0..)
                .take_while(|i| {
                    self.has(&format!(
                        "{prefix}transformer.resblocks.{i}.attn.in_proj_weight"
                    ))
                })
                .count()
        };
        match family {
            Family::Sd1 | Family::Sd1Inpaint => vec![TextEncoderLayout::Clip {
                prefix: "cond_stage_model.transformer.".into(),
            }],
            Family::Sd2 | Family::Sd2Inpaint => {
                let p = "cond_stage_model.model.";
                // SD 2.x runs the penultimate layer: the diffusers encoder has one fewer.
                vec![TextEncoderLayout::OpenClip {
                    prefix: p.into(),
                    layers: count_blocks(p).saturating_sub(1),
                    projection: false,
                }]
            }
            Family::Sdxl => {
                let p = "conditioner.embedders.1.model.";
                vec![
                    TextEncoderLayout::Clip {
                        prefix: "conditioner.embedders.0.transformer.".into(),
                    },
                    TextEncoderLayout::OpenClip {
                        prefix: p.into(),
                        layers: count_blocks(p),
                        projection: true,
                    },
                ]
            }
            Family::SdxlRefiner => {
                let p = "conditioner.embedders.0.model.";
                vec![TextEncoderLayout::OpenClip {
                    prefix: p.into(),
                    layers: count_blocks(p),
                    projection: true,
                }]
            }
        }
    }

    /// Keys in the file that no component claims and that are not known training state.
    pub fn unclaimed(&self, claimed_prefixes: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = self
            .shapes
            .keys()
            .filter(|k| !claimed_prefixes.iter().any(|p| k.starts_with(p)))
            .filter(|k| !TOP_LEVEL_IGNORED.iter().any(|p| k.starts_with(p)))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// A backend giving the UNet its diffusers names (`blocks` = `len(block_out_channels)`).
    pub fn unet(&self, blocks: usize, layers_per_block: usize) -> Result<CheckedBackend> {
        let table = unet_prefixes(blocks, layers_per_block);
        self.component(UNET_PREFIX, |k| map_key(k, &table, RESNET_RENAMES), &[])
    }

    /// A backend giving the VAE its diffusers names.
    pub fn vae(&self, blocks: usize, layers_per_block: usize) -> Result<CheckedBackend> {
        let table = vae_prefixes(blocks, layers_per_block);
        self.component(VAE_PREFIX, |k| map_vae_key(k, &table), &[])
    }

    /// A backend giving a text encoder its transformers names.
    pub fn text_encoder(&self, layout: &TextEncoderLayout) -> Result<CheckedBackend> {
        match layout {
            TextEncoderLayout::Clip { prefix } => self.component(
                prefix,
                |k| {
                    Some(vec![Entry::direct(if k.starts_with("text_model.") {
                        k.to_string()
                    } else {
                        format!("text_model.{k}")
                    })])
                },
                &[
                    "text_model.embeddings.position_ids",
                    "embeddings.position_ids",
                ],
            ),
            TextEncoderLayout::OpenClip {
                prefix,
                layers,
                projection,
            } => {
                let width = self
                    .shape(&format!("{prefix}token_embedding.weight"))
                    .and_then(|s| s.get(1).copied())
                    .ok_or_else(|| {
                        Error::Weights(format!(
                            "{}: `{prefix}token_embedding.weight` is missing",
                            self.path().display()
                        ))
                    })?;
                let mut ignored: Vec<String> = vec!["logit_scale".into(), "attn_mask".into()];
                if !projection {
                    ignored.push("text_projection".into());
                }
                // Resblocks past the ones the diffusers encoder has (SD 2.x's last layer).
                let extra: Vec<String> = self
                    .shapes
                    .keys()
                    .filter_map(|k| k.strip_prefix(prefix.as_str()))
                    .filter_map(|k| {
                        let rest = k.strip_prefix("transformer.resblocks.")?;
                        let i: usize = rest.split('.').next()?.parse().ok()?;
                        (i >= *layers).then(|| k.to_string())
                    })
                    .collect();
                ignored.extend(extra);
                let ignored: Vec<&str> = ignored.iter().map(String::as_str).collect();
                self.component(prefix, |k| open_clip_key(k, width, *projection), &ignored)
            }
        }
    }

    /// Maps every key under `prefix` with `map` (None: no known name) into a backend; keys in
    /// `ignored` (relative to the prefix) are skipped, unknown ones reported as unexpected.
    fn component(
        &self,
        prefix: &str,
        map: impl Fn(&str) -> Option<Vec<Entry>>,
        ignored: &[&str],
    ) -> Result<CheckedBackend> {
        let mut entries = Vec::new();
        let mut unknown = Vec::new();
        let mut keys: Vec<&String> = self
            .shapes
            .keys()
            .filter(|k| k.starts_with(prefix))
            .collect();
        keys.sort();
        if keys.is_empty() {
            return Err(Error::Weights(format!(
                "{}: no tensors under `{prefix}`",
                self.path().display()
            )));
        }
        for key in keys {
            let rel = &key[prefix.len()..];
            if ignored.contains(&rel) {
                continue;
            }
            match map(rel) {
                Some(list) => entries.extend(list.into_iter().map(|e| MappedTensor {
                    name: e.name,
                    key: format!("{}{key}", self.root),
                    rows: e.rows,
                    transpose: e.transpose,
                })),
                None => unknown.push(format!("{}{key}", self.root)),
            }
        }
        CheckedBackend::mapped(self.file.clone(), entries, unknown)
    }
}

/// One model tensor made from a stored one.
struct Entry {
    name: String,
    rows: Option<(usize, usize)>,
    transpose: bool,
}

impl Entry {
    fn direct(name: String) -> Self {
        Self {
            name,
            rows: None,
            transpose: false,
        }
    }
}

/// Renames inside a UNet resnet (original -> diffusers).
const RESNET_RENAMES: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];

/// Renames inside a VAE resnet and its mid attention (original -> diffusers).
const VAE_RENAMES: &[(&str, &str)] = &[
    ("nin_shortcut.", "conv_shortcut."),
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
];

/// A prefix pair: original -> diffusers; `inner` renames apply after it.
type Prefixes = Vec<(String, String)>;

/// The UNet's block prefixes for `blocks` resolutions with `lpb` layers each.
pub fn unet_prefixes(blocks: usize, lpb: usize) -> Prefixes {
    let mut t: Prefixes = [
        ("input_blocks.0.0.", "conv_in."),
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for b in 0..blocks {
        for l in 0..lpb {
            let i = 1 + b * (lpb + 1) + l;
            t.push((
                format!("input_blocks.{i}.0."),
                format!("down_blocks.{b}.resnets.{l}."),
            ));
            t.push((
                format!("input_blocks.{i}.1."),
                format!("down_blocks.{b}.attentions.{l}."),
            ));
        }
        if b + 1 < blocks {
            let i = 1 + b * (lpb + 1) + lpb;
            t.push((
                format!("input_blocks.{i}.0.op."),
                format!("down_blocks.{b}.downsamplers.0.conv."),
            ));
        }
        for l in 0..=lpb {
            let i = b * (lpb + 1) + l;
            t.push((
                format!("output_blocks.{i}.0."),
                format!("up_blocks.{b}.resnets.{l}."),
            ));
            t.push((
                format!("output_blocks.{i}.1."),
                format!("up_blocks.{b}.attentions.{l}."),
            ));
        }
        if b + 1 < blocks {
            let i = b * (lpb + 1) + lpb;
            // Index 2 after an attention, 1 in a block without one.
            for k in [1, 2] {
                t.push((
                    format!("output_blocks.{i}.{k}.conv."),
                    format!("up_blocks.{b}.upsamplers.0.conv."),
                ));
            }
        }
    }
    // Longest original prefix first, so `output_blocks.2.1.conv.` wins over `output_blocks.2.1.`.
    t.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    t
}

/// The VAE's block prefixes for `blocks` resolutions with `lpb` resnets per encoder block.
pub fn vae_prefixes(blocks: usize, lpb: usize) -> Prefixes {
    let mut t: Prefixes = Vec::new();
    for side in ["encoder", "decoder"] {
        for (a, b) in [
            ("conv_in.", "conv_in."),
            ("conv_out.", "conv_out."),
            ("norm_out.", "conv_norm_out."),
            ("mid.block_1.", "mid_block.resnets.0."),
            ("mid.block_2.", "mid_block.resnets.1."),
            ("mid.attn_1.", "mid_block.attentions.0."),
        ] {
            t.push((format!("{side}.{a}"), format!("{side}.{b}")));
        }
    }
    for i in 0..blocks {
        for j in 0..lpb {
            t.push((
                format!("encoder.down.{i}.block.{j}."),
                format!("encoder.down_blocks.{i}.resnets.{j}."),
            ));
        }
        if i + 1 < blocks {
            t.push((
                format!("encoder.down.{i}.downsample.conv."),
                format!("encoder.down_blocks.{i}.downsamplers.0.conv."),
            ));
        }
        // The decoder's blocks are stored from the lowest resolution up, diffusers' from the top.
        let k = blocks - 1 - i;
        for j in 0..=lpb {
            t.push((
                format!("decoder.up.{k}.block.{j}."),
                format!("decoder.up_blocks.{i}.resnets.{j}."),
            ));
        }
        if i + 1 < blocks {
            t.push((
                format!("decoder.up.{k}.upsample.conv."),
                format!("decoder.up_blocks.{i}.upsamplers.0.conv."),
            ));
        }
    }
    for (a, b) in [
        ("quant_conv.", "quant_conv."),
        ("post_quant_conv.", "post_quant_conv."),
    ] {
        t.push((a.into(), b.into()));
    }
    t.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    t
}

/// `key` through the prefix table, then the inner renames of what it lands in (resnets only
/// for `inner`; attention and transformer names are the same in both layouts).
fn map_key(key: &str, table: &Prefixes, inner: &[(&str, &str)]) -> Option<Vec<Entry>> {
    let (from, to) = table
        .iter()
        .find(|(from, _)| key.starts_with(from.as_str()))?;
    let mut rest = key[from.len()..].to_string();
    if to.contains("resnets.") {
        if let Some((a, b)) = inner.iter().find(|(a, _)| rest.starts_with(a)) {
            rest = format!("{b}{}", &rest[a.len()..]);
        }
    }
    Some(vec![Entry::direct(format!("{to}{rest}"))])
}

fn map_vae_key(key: &str, table: &Prefixes) -> Option<Vec<Entry>> {
    let (from, to) = table
        .iter()
        .find(|(from, _)| key.starts_with(from.as_str()))?;
    let mut rest = key[from.len()..].to_string();
    if to.contains("resnets.") || to.contains("attentions.") {
        if let Some((a, b)) = VAE_RENAMES.iter().find(|(a, _)| rest.starts_with(a)) {
            rest = format!("{b}{}", &rest[a.len()..]);
        }
    }
    Some(vec![Entry::direct(format!("{to}{rest}"))])
}

/// Renames inside an OpenCLIP resblock (original -> transformers).
const OPEN_CLIP_RENAMES: &[(&str, &str)] = &[
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
];

fn open_clip_key(key: &str, width: usize, projection: bool) -> Option<Vec<Entry>> {
    let e = |n: &str| Some(vec![Entry::direct(n.to_string())]);
    match key {
        "token_embedding.weight" => return e("text_model.embeddings.token_embedding.weight"),
        "positional_embedding" => return e("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight" => return e("text_model.final_layer_norm.weight"),
        "ln_final.bias" => return e("text_model.final_layer_norm.bias"),
        "text_projection" if projection => {
            return Some(vec![Entry {
                name: "text_projection.weight".into(),
                rows: None,
                transpose: true,
            }])
        }
        _ => {}
    }
    let rest = key.strip_prefix("transformer.resblocks.")?;
    let (i, inner) = rest.split_once('.')?;
    let layer = format!("text_model.encoder.layers.{i}.");
    if let Some(kind) = inner.strip_prefix("attn.in_proj_") {
        return Some(
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(n, proj)| Entry {
                    name: format!("{layer}self_attn.{proj}.{kind}"),
                    rows: Some((n * width, width)),
                    transpose: false,
                })
                .collect(),
        );
    }
    let (a, b) = OPEN_CLIP_RENAMES
        .iter()
        .find(|(a, _)| inner.starts_with(a))?;
    Some(vec![Entry::direct(format!(
        "{layer}{b}{}",
        &inner[a.len()..]
    ))])
}

/// The diffusers/transformers tensors of a pipeline, with what places them in the original
/// layout: the inverse of the maps above, for writing a single file.
pub struct OriginalLayout<'a> {
    pub unet: &'a BTreeMap<String, Tensor>,
    pub unet_blocks: usize,
    pub unet_layers_per_block: usize,
    pub vae: &'a BTreeMap<String, Tensor>,
    pub vae_blocks: usize,
    pub vae_layers_per_block: usize,
    /// Each text encoder's tensors and how the family stores it.
    pub text_encoders: Vec<(&'a BTreeMap<String, Tensor>, TextEncoderLayout)>,
}

/// Writes the maps backwards: every tensor must find its original name; VAE attention
/// projections become the 1x1 convolutions the original stores, OpenCLIP q/k/v one `in_proj`.
pub fn to_original_layout(m: &OriginalLayout) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let attn_in_up = up_blocks_with_attention(m.unet.keys());
    let unet_table = unet_prefixes(m.unet_blocks, m.unet_layers_per_block);
    for (name, t) in m.unet {
        let key = reverse(name, &unet_table, RESNET_RENAMES, |from, to| {
            upsampler_index_fits(from, to, &attn_in_up)
        })
        .ok_or_else(|| unmappable("UNet", name))?;
        out.insert(format!("{UNET_PREFIX}{key}"), t.clone());
    }
    let vae_table = vae_prefixes(m.vae_blocks, m.vae_layers_per_block);
    for (name, t) in m.vae {
        let key = reverse(name, &vae_table, VAE_RENAMES, |_, _| true)
            .ok_or_else(|| unmappable("VAE", name))?;
        let t = if name.contains("attentions.") && t.rank() == 2 && name.ends_with(".weight") {
            let (o, i) = t.dims2()?;
            t.reshape((o, i, 1, 1))?
        } else {
            t.clone()
        };
        out.insert(format!("{VAE_PREFIX}{key}"), t);
    }
    for (tensors, layout) in &m.text_encoders {
        match layout {
            TextEncoderLayout::Clip { prefix } => {
                for (name, t) in *tensors {
                    let name =
                        if name.starts_with("text_model.") || name.starts_with("text_projection") {
                            name.clone()
                        } else {
                            format!("text_model.{name}")
                        };
                    out.insert(format!("{prefix}{name}"), t.clone());
                }
            }
            TextEncoderLayout::OpenClip { prefix, .. } => {
                for (key, t) in open_clip_original(tensors)? {
                    out.insert(format!("{prefix}{key}"), t);
                }
            }
        }
    }
    Ok(out)
}

/// A transformers CLIP text model's tensors under OpenCLIP names.
fn open_clip_original(tensors: &BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let get = |n: &str| {
        tensors
            .get(n)
            .or_else(|| tensors.get(n.trim_start_matches("text_model.")))
            .cloned()
            .ok_or_else(|| unmappable("text encoder", n))
    };
    out.insert(
        "token_embedding.weight".into(),
        get("text_model.embeddings.token_embedding.weight")?,
    );
    out.insert(
        "positional_embedding".into(),
        get("text_model.embeddings.position_embedding.weight")?,
    );
    out.insert(
        "ln_final.weight".into(),
        get("text_model.final_layer_norm.weight")?,
    );
    out.insert(
        "ln_final.bias".into(),
        get("text_model.final_layer_norm.bias")?,
    );
    if let Ok(p) = get("text_projection.weight") {
        out.insert("text_projection".into(), p.t()?.contiguous()?);
    }
    let layers = (0..)
        .take_while(|i| get(&format!("text_model.encoder.layers.{i}.layer_norm1.weight")).is_ok())
        .count();
    for i in 0..layers {
        let l = format!("text_model.encoder.layers.{i}.");
        for kind in ["weight", "bias"] {
            let qkv = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|p| get(&format!("{l}self_attn.{p}.{kind}")))
                .collect::<Result<Vec<_>>>()?;
            out.insert(
                format!("transformer.resblocks.{i}.attn.in_proj_{kind}"),
                Tensor::cat(&qkv, 0)?,
            );
        }
        for (orig, ours) in OPEN_CLIP_RENAMES {
            for kind in ["weight", "bias"] {
                out.insert(
                    format!("transformer.resblocks.{i}.{orig}{kind}"),
                    get(&format!("{l}{ours}{kind}"))?,
                );
            }
        }
    }
    // Per layer: q, k, v and the 5 renamed modules, weight and bias each.
    let used = 4 + usize::from(out.contains_key("text_projection")) + layers * 16;
    let expected = tensors
        .keys()
        .filter(|k| !k.ends_with("position_ids"))
        .count();
    if used != expected {
        return Err(Error::Weights(format!(
            "text encoder: {expected} tensors, of which {used} have an OpenCLIP name"
        )));
    }
    Ok(out)
}

/// For Kohya LoRAs written against the original layout: each UNet weight's original module
/// name with `_` for `.` (`input_blocks_1_1_proj_in`) -> its diffusers weight name.
pub fn unet_original_modules(
    names: &[String],
    blocks: usize,
    layers_per_block: usize,
) -> HashMap<String, String> {
    let table = unet_prefixes(blocks, layers_per_block);
    let attn_in_up = up_blocks_with_attention(names.iter());
    names
        .iter()
        .filter(|n| n.ends_with(".weight"))
        .filter_map(|n| {
            let key = reverse(n, &table, RESNET_RENAMES, |from, to| {
                upsampler_index_fits(from, to, &attn_in_up)
            })?;
            Some((key.trim_end_matches(".weight").replace('.', "_"), n.clone()))
        })
        .collect()
}

/// The up blocks that have attentions (their upsampler is stored at index 2, else at 1).
fn up_blocks_with_attention<'a>(names: impl Iterator<Item = &'a String>) -> HashSet<usize> {
    names
        .filter_map(|k| k.strip_prefix("up_blocks."))
        .filter(|k| k.contains(".attentions."))
        .filter_map(|k| k.split('.').next()?.parse().ok())
        .collect()
}

fn upsampler_index_fits(from: &str, to: &str, attn_in_up: &HashSet<usize>) -> bool {
    match to.strip_prefix("up_blocks.") {
        Some(rest) if to.contains("upsamplers") => {
            let b: usize = rest
                .split('.')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            from.ends_with(if attn_in_up.contains(&b) {
                ".2.conv."
            } else {
                ".1.conv."
            })
        }
        _ => true,
    }
}

fn unmappable(what: &str, name: &str) -> Error {
    Error::Weights(format!(
        "{what} tensor `{name}` has no name in the original layout"
    ))
}

/// The original name of a diffusers name: the (first accepted) prefix pair whose diffusers side
/// matches, with the inner renames undone.
fn reverse(
    name: &str,
    table: &Prefixes,
    inner: &[(&str, &str)],
    accept: impl Fn(&str, &str) -> bool,
) -> Option<String> {
    let mut best: Option<(&String, &String)> = None;
    for (from, to) in table {
        if name.starts_with(to.as_str())
            && accept(from, to)
            && best.is_none_or(|(_, t)| to.len() > t.len())
        {
            best = Some((from, to));
        }
    }
    let (from, to) = best?;
    let mut rest = name[to.len()..].to_string();
    if to.contains("resnets.") || (to.contains("attentions.") && inner == VAE_RENAMES) {
        if let Some((a, b)) = inner.iter().find(|(_, b)| rest.starts_with(b)) {
            rest = format!("{a}{}", &rest[b.len()..]);
        }
    }
    Some(format!("{from}{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_prefixes_follow_the_block_structure() {
        let t = unet_prefixes(4, 2);
        let find = |k: &str| map_key(k, &t, RESNET_RENAMES).map(|v| v[0].name.clone());
        assert_eq!(
            find("input_blocks.4.0.in_layers.2.weight").as_deref(),
            Some("down_blocks.1.resnets.0.conv1.weight")
        );
        assert_eq!(
            find("input_blocks.3.0.op.bias").as_deref(),
            Some("down_blocks.0.downsamplers.0.conv.bias")
        );
        assert_eq!(
            find("input_blocks.5.1.proj_in.weight").as_deref(),
            Some("down_blocks.1.attentions.1.proj_in.weight")
        );
        assert_eq!(
            find("output_blocks.2.1.conv.weight").as_deref(),
            Some("up_blocks.0.upsamplers.0.conv.weight")
        );
        assert_eq!(
            find("output_blocks.5.2.conv.weight").as_deref(),
            Some("up_blocks.1.upsamplers.0.conv.weight")
        );
        assert_eq!(
            find("output_blocks.11.0.skip_connection.weight").as_deref(),
            Some("up_blocks.3.resnets.2.conv_shortcut.weight")
        );
        assert_eq!(
            find("middle_block.1.transformer_blocks.0.attn1.to_q.weight").as_deref(),
            Some("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight")
        );
        assert!(find("no_such.weight").is_none());
    }

    #[test]
    fn open_clip_splits_qkv_rows() {
        let e = open_clip_key("transformer.resblocks.3.attn.in_proj_weight", 8, false).unwrap();
        let names: Vec<(String, Option<(usize, usize)>)> =
            e.into_iter().map(|e| (e.name, e.rows)).collect();
        assert_eq!(
            names[1],
            (
                "text_model.encoder.layers.3.self_attn.k_proj.weight".into(),
                Some((8, 8))
            )
        );
        assert_eq!(
            open_clip_key("transformer.resblocks.0.mlp.c_fc.bias", 8, false).unwrap()[0].name,
            "text_model.encoder.layers.0.mlp.fc1.bias"
        );
        assert!(open_clip_key("text_projection", 8, false).is_none());
        assert!(open_clip_key("text_projection", 8, true).unwrap()[0].transpose);
    }
}
