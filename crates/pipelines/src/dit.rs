//! `DiTPipeline`: class-conditional image generation with a `DiTTransformer2DModel`.
//!
//! ```text
//! x = randn(B, C, S, S);  x = [x; x] when guided          # one generator for the batch
//! labels = [labels; null × B]                             # null = the table's last row
//! for t in timesteps:
//!     x = [x[:B]; x[:B]]
//!     out = transformer(scale_model_input(x, t), t, labels)          # (2B, 2C, S, S)
//!     eps = out[:, :C];  eps = uncond + g · (cond − uncond) on both halves
//!     x = scheduler.step([eps, out[:, C:]][:, :C], t, x)             # the learned sigma dropped
//! image = clamp(vae.decode(x[:B] / scaling_factor) / 2 + 0.5, 0, 1)
//! ```
//!
//! As diffusers does, the scheduler steps the whole guided batch (both halves are equal).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use diffuse_core::{BatchShard, Error, Generator, Result};
use diffuse_models::transformer_dit::DiTTransformer2DModel;
use diffuse_models::ModelMixin;
use diffuse_schedulers::Scheduler;

use crate::components::Vae;
use crate::stable_diffusion::ImageOutput;
use crate::{check_sampling, component_dir, fresh_scheduler, load_scheduler, LoadOptions};
use crate::{StepCallback, Timings, Trace};

/// The DiT components.
pub struct DiTPipeline {
    pub class_name: String,
    pub transformer: DiTTransformer2DModel,
    pub vae: Vae,
    pub scheduler: Box<dyn Scheduler>,
    pub device: Device,
    /// Every label name of `model_index.json`'s `id2label` (each comma-separated synonym) and
    /// its class id, as diffusers' `pipe.labels`.
    pub labels: BTreeMap<String, usize>,
}

/// A class-to-image request.
#[derive(Clone, Debug)]
pub struct ClassToImageRequest {
    /// One image per label.
    pub class_labels: Vec<usize>,
    /// Classifier-free guidance against the null class when > 1.
    pub guidance_scale: f64,
    pub steps: usize,
    pub seed: u64,
    /// Record every loop tensor in [`ImageOutput::trace`].
    pub record_trace: bool,
    /// Make only images `start..start + len` of a batch of `batch` labels drawn from `seed`,
    /// where `class_labels` are this request's own (one of several processes sharing the
    /// batch): the same images, bit for bit, as in the whole batch. `None`: the whole batch.
    pub shard: Option<BatchShard>,
}

impl Default for ClassToImageRequest {
    fn default() -> Self {
        Self {
            class_labels: vec![0],
            guidance_scale: 4.0,
            steps: 50,
            seed: 0,
            record_trace: false,
            shard: None,
        }
    }
}

/// `model_index.json`'s `id2label` (class id → comma-separated names), empty when absent.
fn id2label(index: &serde_json::Value) -> Result<BTreeMap<usize, String>> {
    let bad = |m: String| Error::config("model_index.json", "id2label", m);
    match index.get("id2label") {
        None | Some(serde_json::Value::Null) => Ok(BTreeMap::new()),
        Some(v) => {
            let map: BTreeMap<String, String> = serde_json::from_value(v.clone())
                .map_err(|e| bad(format!("not a map of class ids to names: {e}")))?;
            map.into_iter()
                .map(|(id, names)| match id.parse::<usize>() {
                    Ok(id) => Ok((id, names)),
                    Err(_) => Err(bad(format!("key `{id}` is not a class id"))),
                })
                .collect()
        }
    }
}

/// The name of each of `n` classes: its `id2label` entry, else its id.
pub(crate) fn class_names(index: &serde_json::Value, n: usize) -> Result<Vec<String>> {
    let names = id2label(index)?;
    Ok((0..n)
        .map(|i| names.get(&i).cloned().unwrap_or_else(|| i.to_string()))
        .collect())
}

impl DiTPipeline {
    /// Loads `transformer/`, `vae/` and `scheduler/`; `index` is `model_index.json`.
    pub fn load(
        dir: &Path,
        class_name: String,
        index: &serde_json::Value,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let scheduler = load_scheduler(dir, opts)?;
        let transformer = DiTTransformer2DModel::from_pretrained_variant(
            &component_dir(dir, "transformer")?,
            opts.variant.as_deref(),
            opts.dtype,
            &opts.device,
        )?;
        let vae = Vae::load(dir, opts)?;
        let mut labels = BTreeMap::new();
        for (id, names) in id2label(index).map_err(|e| {
            Error::invalid(format!("{}: {e}", dir.join("model_index.json").display()))
        })? {
            for name in names.split(',') {
                labels.insert(name.trim().to_string(), id);
            }
        }
        Ok(Self {
            class_name,
            transformer,
            vae,
            scheduler,
            device: opts.device.clone(),
            labels,
        })
    }

    /// Real classes of the model (ids `0..n`).
    pub fn num_classes(&self) -> usize {
        self.transformer.config().num_classes()
    }

    /// Class ids of label names (diffusers' `get_label_ids`); an unknown name is an error
    /// naming it.
    pub fn label_ids(&self, names: &[String]) -> Result<Vec<usize>> {
        names
            .iter()
            .map(|n| {
                self.labels.get(n.trim()).copied().ok_or_else(|| {
                    if self.labels.is_empty() {
                        Error::invalid(format!(
                            "unknown class label {n:?}: this model has no id2label names; give \
                             class ids 0..{}",
                            self.num_classes()
                        ))
                    } else {
                        let close: Vec<&str> = self
                            .labels
                            .keys()
                            .filter(|k| k.to_lowercase().contains(&n.trim().to_lowercase()))
                            .take(5)
                            .map(String::as_str)
                            .collect();
                        Error::invalid(format!(
                            "unknown class label {n:?}{}",
                            if close.is_empty() {
                                String::new()
                            } else {
                                format!(" (similar: {})", close.join(", "))
                            }
                        ))
                    }
                })
            })
            .collect()
    }

    /// Class-conditional generation, one image per label.
    pub fn generate(
        &self,
        req: &ClassToImageRequest,
        mut callback: Option<&mut StepCallback<'_>>,
    ) -> Result<ImageOutput> {
        check_sampling(req.steps, &[("guidance_scale", req.guidance_scale)])?;
        let n = req.class_labels.len();
        let classes = self.num_classes();
        if n == 0 {
            return Err(Error::invalid("give at least one class label"));
        }
        if let Some(bad) = req.class_labels.iter().find(|&&c| c >= classes) {
            return Err(Error::invalid(format!(
                "class {bad} out of range: the model has classes 0..={}",
                classes - 1
            )));
        }
        let cfg = self.transformer.config();
        let (c, s) = (cfg.in_channels, cfg.sample_size);
        let guided = req.guidance_scale > 1.0;
        let mut timings = Timings::default();
        let start = Instant::now();
        let mut scheduler = fresh_scheduler(self.scheduler.as_ref())?;
        let mut generator = Generator::manual_seed(req.seed).with_shard(req.shard);
        let latents = generator.randn_batch((n, c, s, s), &self.device)?;
        let mut x = if guided {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents
        };
        // diffusers hard-codes 1000, the null row of ImageNet DiT's 1001-row table.
        let mut ids: Vec<u32> = req.class_labels.iter().map(|&l| l as u32).collect();
        if guided {
            ids.extend(std::iter::repeat_n(classes as u32, n));
        }
        let labels = Tensor::from_vec(ids, x.dim(0)?, &self.device)?;
        scheduler.set_timesteps(req.steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        let mut trace = req.record_trace.then(Trace::default);
        for (i, &t) in timesteps.iter().enumerate() {
            if guided {
                let half = x.narrow(0, 0, n)?;
                x = Tensor::cat(&[&half, &half], 0)?;
            }
            let input = scheduler.scale_model_input(&x, t)?;
            let t_tensor = Tensor::new(t as f32, &self.device)?;
            let out = self
                .transformer
                .forward(&input, &t_tensor, &labels)?
                .to_dtype(DType::F32)?;
            let mut pred = out.clone();
            if guided {
                let eps = pred.narrow(1, 0, c)?;
                let rest = pred.narrow(1, c, pred.dim(1)? - c)?;
                let (cond, uncond) = (eps.narrow(0, 0, n)?, eps.narrow(0, n, n)?);
                let half = (&uncond + ((cond - &uncond)? * req.guidance_scale)?)?;
                pred = Tensor::cat(&[&Tensor::cat(&[&half, &half], 0)?, &rest], 1)?;
            }
            // A learned variance: the model predicts 2C channels, the scheduler takes C.
            if cfg.out_channels() / 2 == c {
                pred = pred.narrow(1, 0, c)?;
            }
            x = scheduler.step(&pred, t, &x, &mut generator)?.prev_sample;
            let latents = x.narrow(0, 0, n)?;
            crate::components::report_step(
                trace.as_mut(),
                callback.as_deref_mut(),
                (input, t, out),
                (i, timesteps.len(), t),
                &latents,
            )?;
        }
        timings.denoise = start.elapsed();
        let latents = x.narrow(0, 0, n)?;
        // diffusers multiplies by the reciprocal here (not a division, as other pipelines).
        let z = (latents * (1.0 / self.vae.config().scaling_factor))?;
        self.vae.decode(&z, timings, Vec::new(), trace)
    }
}
