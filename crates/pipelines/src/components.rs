//! Pieces the transformer pipelines (SD3, Flux, DiT) share: the VAE and its decoding, the text
//! encoders' embeddings, and models held only while they run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use diffuse_core::Result;
use diffuse_models::clip_text::{ClipTextModel, ClipTextModelWithProjection};
use diffuse_models::clip_tokenizer::ClipTokenizer;
use diffuse_models::t5::T5EncoderModel;
use diffuse_models::t5_tokenizer::T5Tokenizer;
use diffuse_models::ModelMixin;
use diffuse_models::{AutoencoderKL, AutoencoderKLConfig};

use crate::stable_diffusion::{token_ids, ImageOutput};
use crate::{component_dir, LoadOptions, StepCallback, StepInfo, Timings, Trace};

/// A model kept in memory, or loaded each time it is used and dropped right after
/// ([`LoadOptions::load_on_demand`]): the text encoders then never share memory with the
/// transformer, which is what lets a 12-billion-parameter Flux run next to its 4.7-billion T5.
pub enum Component<T> {
    Loaded(T),
    OnDemand(Box<dyn Fn() -> Result<T> + Send + Sync>),
}

impl<T> Component<T> {
    /// Loads now, or defers loading to each use when `on_demand`.
    pub fn new(
        on_demand: bool,
        load: impl Fn() -> Result<T> + Send + Sync + 'static,
    ) -> Result<Self> {
        Ok(if on_demand {
            Self::OnDemand(Box::new(load))
        } else {
            Self::Loaded(load()?)
        })
    }

    /// Runs `f` on the model (loaded for the call and dropped after it when on demand).
    pub fn with<R>(&self, f: impl FnOnce(&T) -> Result<R>) -> Result<R> {
        match self {
            Self::Loaded(m) => f(m),
            Self::OnDemand(load) => {
                let m = load()?;
                f(&m)
            }
        }
    }
}

/// A model component of `dir` loaded by `load` (a `from_pretrained(dir, variant, dtype,
/// device)`), now or on demand as `opts` says.
pub(crate) fn component<T: 'static>(
    dir: PathBuf,
    opts: &LoadOptions,
    load: fn(&Path, Option<&str>, DType, &Device) -> Result<T>,
) -> Result<Component<T>> {
    let o = opts.clone();
    Component::new(opts.load_on_demand, move || {
        load(&dir, o.variant.as_deref(), o.dtype, &o.device)
    })
}

/// After one step of a denoising loop: records the denoiser call (`input`, the timestep the
/// model got, its raw `output`) and the latents after the step when tracing, then tells the
/// callback.
pub(crate) fn report_step(
    trace: Option<&mut Trace>,
    callback: Option<&mut StepCallback<'_>>,
    (input, model_timestep, output): (Tensor, f64, Tensor),
    (step, num_steps, timestep): (usize, usize, f64),
    latents: &Tensor,
) -> Result<()> {
    if let Some(tr) = trace {
        tr.unet_inputs.push(input);
        tr.unet_timesteps.push(model_timestep);
        tr.unet_outputs.push(output);
        tr.step_latents.push(latents.clone());
    }
    if let Some(cb) = callback {
        cb(StepInfo {
            step,
            num_steps,
            timestep,
            latents,
        })?;
    }
    Ok(())
}

/// A pipeline's VAE and the dtype it runs in.
pub struct Vae {
    pub model: AutoencoderKL,
    /// f32 unless the weights are f16 and the config does not ask for an upcast (convolutions
    /// need their input and weight in one dtype, and the transformers keep half-precision
    /// weights under f32 activations).
    pub dtype: DType,
}

impl Vae {
    /// Loads the `vae/` folder of a pipeline.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let vae_dir = component_dir(dir, "vae")?;
        let cfg: AutoencoderKLConfig = diffuse_loaders::read_config(&vae_dir.join("config.json"))?;
        let dtype = match opts.dtype {
            DType::F16 if !cfg.force_upcast => DType::F16,
            _ => DType::F32,
        };
        let model = AutoencoderKL::from_pretrained_variant(
            &vae_dir,
            opts.variant.as_deref(),
            dtype,
            &opts.device,
        )?;
        Ok(Self { model, dtype })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        self.model.config()
    }

    /// `2 ** (len(vae.block_out_channels) - 1)`.
    pub fn scale_factor(&self) -> usize {
        1 << self.config().block_out_channels.len().saturating_sub(1)
    }

    /// Flow-matching latents for the VAE: `latents / scaling_factor + shift_factor`.
    pub fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        let cfg = self.config();
        let z = (latents / cfg.scaling_factor)?;
        Ok(match cfg.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        })
    }

    /// Decodes latents already unscaled (`z`) and builds the output (`output_type="np"` and
    /// `"pil"` at once).
    pub(crate) fn decode(
        &self,
        z: &Tensor,
        mut timings: Timings,
        warnings: Vec<String>,
        trace: Option<Trace>,
    ) -> Result<ImageOutput> {
        let t = Instant::now();
        let decoded = self
            .model
            .decode(&z.to_dtype(self.dtype)?)?
            .to_dtype(DType::F32)?;
        let (images, rgb) = crate::image_processor::postprocess(&decoded)?;
        timings.decode = t.elapsed();
        Ok(ImageOutput {
            images,
            rgb,
            timings,
            warnings,
            trace,
        })
    }
}

/// SD3's CLIP embeddings of `texts`: the penultimate layer's hidden states `(B, 77, hidden)`
/// (before the final norm; `clip_skip` layers earlier still) and the projected pooled output
/// `(B, projection_dim)`.
pub(crate) fn clip_projected_embeds(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextModelWithProjection,
    texts: &[String],
    clip_skip: Option<usize>,
    warnings: &mut Vec<String>,
) -> Result<(Tensor, Tensor)> {
    let device = encoder.text_model().device().clone();
    let ids = token_ids(tokenizer, texts, &device, warnings)?;
    let out = encoder.forward(&ids)?;
    let states = &out.text.hidden_states;
    let back = clip_skip.unwrap_or(0) + 2;
    if back > states.len() {
        return Err(diffuse_core::Error::invalid(format!(
            "clip_skip {} is more than the text encoder's {} layers allow",
            clip_skip.unwrap_or(0),
            states.len() - 1
        )));
    }
    Ok((
        states[states.len() - back].to_dtype(DType::F32)?,
        out.text_embeds.to_dtype(DType::F32)?,
    ))
}

/// Flux's CLIP embedding of `texts`: the pooled output `(B, hidden)` of a `CLIPTextModel`.
pub(crate) fn clip_pooled_embeds(
    tokenizer: &ClipTokenizer,
    encoder: &ClipTextModel,
    texts: &[String],
    warnings: &mut Vec<String>,
) -> Result<Tensor> {
    let ids = token_ids(tokenizer, texts, encoder.device(), warnings)?;
    Ok(encoder.forward(&ids)?.pooler_output.to_dtype(DType::F32)?)
}

/// T5 embeddings `(B, max_len, d_model)` of `texts` padded/truncated to `max_len` tokens.
pub(crate) fn t5_embeds(
    tokenizer: &T5Tokenizer,
    encoder: &T5EncoderModel,
    texts: &[String],
    max_len: usize,
    warnings: &mut Vec<String>,
) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(texts.len() * max_len);
    for text in texts {
        let (ids, truncated) = tokenizer.encode_padded(text, max_len)?;
        if truncated {
            let all = tokenizer.encode(text)?;
            let removed = tokenizer.decode(&all[max_len - 1..all.len() - 1])?;
            warnings.push(format!(
                "The following part of your input was truncated because `max_sequence_length` \
                 is set to {max_len} tokens: {removed}"
            ));
        }
        rows.extend(ids.into_iter().map(i64::from));
    }
    let ids = Tensor::from_vec(rows, (texts.len(), max_len), encoder.device())?;
    encoder.forward(&ids)
}

/// `max_sequence_length` must be 1..=512, as the SD3 and Flux pipelines require.
pub(crate) fn check_max_sequence_length(n: usize) -> Result<()> {
    if n == 0 || n > 512 {
        return Err(diffuse_core::Error::invalid(format!(
            "max_sequence_length must be between 1 and 512, got {n}"
        )));
    }
    Ok(())
}

/// The prompts of a request, checked, with the negative prompts matched to them: empty (= ""),
/// one for all, or one per prompt.
pub(crate) fn prompts_and_negatives(
    prompts: &[String],
    negatives: &[String],
) -> Result<(Vec<String>, Vec<String>)> {
    if prompts.is_empty() {
        return Err(diffuse_core::Error::invalid("no prompt given"));
    }
    let n = prompts.len();
    let negs = match negatives.len() {
        0 => vec![String::new(); n],
        1 => vec![negatives[0].clone(); n],
        k if k == n => negatives.to_vec(),
        k => {
            return Err(diffuse_core::Error::invalid(format!(
                "{k} negative prompts for {n} prompts; give one or one per prompt"
            )))
        }
    };
    Ok((prompts.to_vec(), negs))
}
