//! `DDPMPipeline` / `DDIMPipeline`: unconditional image generation with a `UNet2DModel`.
//!
//! ```text
//! image = randn(B, C, H, W)
//! for t in timesteps:
//!     image = scheduler.step(unet(image, t), t, image)
//! image = clamp(image / 2 + 0.5, 0, 1)
//! ```
//!
//! Class-conditional `UNet2DModel`s (`num_class_embeds`, as `diffuse train` makes them, whose
//! last class embedding is the null class) take one class label per image, with
//! classifier-free guidance `uncond + g·(cond − uncond)` when `g > 1`.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use diffuse_core::{BatchShard, Error, Generator, Result};
use diffuse_models::ModelMixin;
use diffuse_models::UNet2DModel;
use diffuse_schedulers::Scheduler;
use image::{GrayImage, RgbImage};

use crate::{check_sampling, component_dir, fresh_scheduler, load_scheduler, LoadOptions};
use crate::{StepCallback, StepInfo};

/// An unconditional pipeline (a DDPM- or DDIM-sampled `UNet2DModel`).
pub struct UnconditionalPipeline {
    pub class_name: String,
    pub unet: UNet2DModel,
    pub scheduler: Box<dyn Scheduler>,
    pub device: Device,
    /// Names of the classes of a class-conditional model (`_class_names` in
    /// `model_index.json`, else the class indices); empty for an unconditional one.
    pub class_names: Vec<String>,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct UnconditionalRequest {
    pub batch_size: usize,
    pub steps: usize,
    /// DDIM's eta (0 = deterministic, 1 = DDPM-like); ignored by other schedulers.
    pub eta: f64,
    pub seed: u64,
    /// One class index per image; required by class-conditional models, refused by others.
    pub class_labels: Option<Vec<usize>>,
    /// Classifier-free guidance scale for class-conditional models; 1 or less disables it.
    pub guidance_scale: f64,
    /// Guide only at the timesteps `t` with `lo ≤ t ≤ hi`; the other steps take the
    /// conditional prediction alone (one forward pass instead of two). Guidance at the
    /// noisiest steps narrows the variety of the samples and at the last ones adds little
    /// (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and
    /// distribution quality in diffusion models"). `None`: every step.
    pub guidance_interval: Option<(f64, f64)>,
    /// Make only images `start..start + len` (`len` = `batch_size`) of a batch of `batch`
    /// drawn from `seed` (one of several processes sharing it): the same images, bit for bit,
    /// as in the whole batch. `None`: the whole batch.
    pub shard: Option<BatchShard>,
}

impl Default for UnconditionalRequest {
    fn default() -> Self {
        Self {
            batch_size: 1,
            steps: 50,
            eta: 0.0,
            seed: 0,
            class_labels: None,
            guidance_scale: 1.0,
            guidance_interval: None,
            shard: None,
        }
    }
}

/// Generated images and the time the loop took.
pub struct UnconditionalOutput {
    /// (B, H, W, C) f32 in [0, 1].
    pub images: Tensor,
    /// 8-bit RGB images (for 3-channel models).
    pub rgb: Vec<RgbImage>,
    /// 8-bit grayscale images (for 1-channel models).
    pub gray: Vec<GrayImage>,
    pub denoise: Duration,
}

/// The number of real classes of a class-conditional `UNet2DModel` (its last class
/// embedding is the null class of guidance); `None` when it has no class embedding.
pub fn num_classes(unet: &UNet2DModel) -> Option<usize> {
    unet.config().num_class_embeds.map(|k| k.saturating_sub(1))
}

/// The class labels of one batch, checked against the model, with the null class appended
/// when guidance is on. Shared with the training crate's sampler.
pub struct ClassGuidance {
    /// `(n)` labels, or `(2n)` labels then null classes when guided.
    labels: Tensor,
    n: usize,
    scale: Option<f64>,
}

impl ClassGuidance {
    /// `None` for a model without class embedding (then `labels` must be `None` too).
    pub fn new(
        unet: &UNet2DModel,
        labels: Option<&[usize]>,
        n: usize,
        guidance_scale: f64,
        device: &Device,
    ) -> Result<Option<Self>> {
        let k = match (labels, num_classes(unet)) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(Error::invalid(
                    "class labels given but the model is not class-conditional",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "the model is class-conditional: give one class label per image",
                ))
            }
            (Some(l), Some(k)) => {
                if l.len() != n {
                    return Err(Error::invalid(format!(
                        "{} class labels for {n} images; give one per image",
                        l.len()
                    )));
                }
                if k == 0 {
                    return Err(Error::invalid(
                        "the model's class embedding holds only the null class",
                    ));
                }
                if let Some(&bad) = l.iter().find(|&&c| c >= k) {
                    return Err(Error::invalid(format!(
                        "class {bad} out of range: valid classes are 0..={}",
                        k - 1
                    )));
                }
                k
            }
        };
        let mut ids: Vec<u32> = labels
            .unwrap_or_default()
            .iter()
            .map(|&c| c as u32)
            .collect();
        let scale = (guidance_scale > 1.0).then_some(guidance_scale);
        if scale.is_some() {
            ids.extend(std::iter::repeat_n(k as u32, n));
        }
        let len = ids.len();
        Ok(Some(Self {
            labels: Tensor::from_vec(ids, len, device)?,
            n,
            scale,
        }))
    }

    /// The UNet's (guided) prediction for `x` at `t`; a plain forward without conditioning.
    /// `guided: false` takes the conditional prediction alone at this step (outside a
    /// guidance interval).
    pub fn predict(
        guidance: Option<&Self>,
        unet: &UNet2DModel,
        x: &Tensor,
        t: &Tensor,
        guided: bool,
    ) -> Result<Tensor> {
        Ok(match guidance {
            None => unet.forward(x, t)?,
            Some(g) => match g.scale {
                None => unet.forward_with_class(x, t, Some(&g.labels))?,
                Some(_) if !guided => {
                    unet.forward_with_class(x, t, Some(&g.labels.narrow(0, 0, g.n)?))?
                }
                Some(scale) => {
                    let out =
                        unet.forward_with_class(&Tensor::cat(&[x, x], 0)?, t, Some(&g.labels))?;
                    let cond = out.narrow(0, 0, g.n)?;
                    let uncond = out.narrow(0, g.n, g.n)?;
                    (&uncond + ((cond - &uncond)? * scale)?)?
                }
            },
        })
    }
}

/// Refuses a guidance interval whose ends are not numbers or are out of order.
pub fn check_guidance_interval(interval: Option<(f64, f64)>) -> Result<()> {
    match interval {
        Some((lo, hi)) if !(lo.is_finite() && hi.is_finite() && lo <= hi) => Err(Error::invalid(
            format!("guidance interval {lo},{hi}: give two timesteps, the lower first"),
        )),
        _ => Ok(()),
    }
}

impl UnconditionalPipeline {
    /// Loads `unet/` and `scheduler/`. `DDIMPipeline` turns any scheduler config into a DDIM
    /// scheduler, as its diffusers constructor does.
    /// `class_names` are the `_class_names` of `model_index.json`, if any.
    pub fn load(
        dir: &Path,
        class_name: String,
        class_names: Option<Vec<String>>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let unet_dir = component_dir(dir, "unet")?;
        let mut scheduler = load_scheduler(dir, opts)?;
        if class_name == "DDIMPipeline" && opts.scheduler.is_none() {
            scheduler = diffuse_schedulers::from_config("DDIMScheduler", scheduler.config())?;
        }
        let unet = UNet2DModel::from_pretrained_variant(
            &unet_dir,
            opts.variant.as_deref(),
            opts.dtype,
            &opts.device,
        )?;
        let class_names = match (num_classes(&unet), class_names) {
            (None, _) => Vec::new(),
            (Some(k), Some(names)) if names.len() == k => names,
            (Some(k), Some(names)) => {
                return Err(Error::invalid(format!(
                    "{}: _class_names lists {} classes but the UNet has {k} (plus the null class)",
                    dir.display(),
                    names.len()
                )))
            }
            (Some(k), None) => (0..k).map(|i| i.to_string()).collect(),
        };
        Ok(Self {
            class_name,
            unet,
            scheduler,
            device: opts.device.clone(),
            class_names,
        })
    }

    /// `(channels, height, width)` of the generated images.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        let cfg = self.unet.config();
        let (h, w) = cfg.sample_size.map(|s| s.hw()).unwrap_or((32, 32));
        (cfg.in_channels, h, w)
    }

    pub fn generate(
        &self,
        req: &UnconditionalRequest,
        mut callback: Option<&mut StepCallback<'_>>,
    ) -> Result<UnconditionalOutput> {
        check_sampling(
            req.steps,
            &[("guidance_scale", req.guidance_scale), ("eta", req.eta)],
        )?;
        if req.batch_size == 0 {
            return Err(diffuse_core::Error::invalid(
                "batch size must be at least 1",
            ));
        }
        check_guidance_interval(req.guidance_interval)?;
        let start = Instant::now();
        let mut scheduler = fresh_scheduler(self.scheduler.as_ref())?;
        scheduler.set_eta(req.eta);
        let mut generator = Generator::manual_seed(req.seed).with_shard(req.shard);
        let (c, h, w) = self.image_shape();
        let guidance = ClassGuidance::new(
            &self.unet,
            req.class_labels.as_deref(),
            req.batch_size,
            req.guidance_scale,
            &self.device,
        )?;
        let mut image = generator.randn_batch((req.batch_size, c, h, w), &self.device)?;
        scheduler.set_timesteps(req.steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let t_tensor = Tensor::new(t as f32, &self.device)?;
            let guided = req
                .guidance_interval
                .is_none_or(|(lo, hi)| lo <= t && t <= hi);
            let out =
                ClassGuidance::predict(guidance.as_ref(), &self.unet, &image, &t_tensor, guided)?
                    .to_dtype(DType::F32)?;
            image = scheduler.step(&out, t, &image, &mut generator)?.prev_sample;
            if let Some(cb) = callback.as_deref_mut() {
                cb(StepInfo {
                    step: i,
                    num_steps: timesteps.len(),
                    timestep: t,
                    latents: &image,
                })?;
            }
        }
        let denoise = start.elapsed();
        // Same post-processing as the VAE pipelines' decoded images.
        let images = ((image / 2.0)? + 0.5)?
            .clamp(0f32, 1f32)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        let (rgb, gray) = match c {
            3 => (crate::image_processor::to_rgb_images(&images)?, Vec::new()),
            1 => (Vec::new(), crate::image_processor::to_gray_images(&images)?),
            _ => (Vec::new(), Vec::new()),
        };
        Ok(UnconditionalOutput {
            images,
            rgb,
            gray,
            denoise,
        })
    }
}
