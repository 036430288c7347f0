//! The DDPM training loop: draw a batch, noise it to random timesteps, predict the noise (or
//! v, or the clean image), MSE, accumulate gradients, clip, AdamW, EMA — plus the run around
//! it: metrics, checkpoints, sample grids and the final diffusers folder.

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use diffuse_core::{Error, Generator, Result};
use diffuse_dist::{Comm, SingleProcess};
use diffuse_models::{profile, UNet2DConfig, UNet2DModel};
use diffuse_schedulers::common::PredictionType;
use diffuse_schedulers::config::ConfigReader;
use diffuse_schedulers::{Scheduler, SchedulerConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::dataset::{BatchSampler, Dataset};
use crate::ema::{Ema, EmaConfig};
use crate::loss::{check_snr_gamma, min_snr_weights, per_image_mse, prediction_target};
use crate::optimizer::{
    accumulate_gradients, check_and_clip, check_clip_grad, AdamW, AdamWConfig, LrSchedule,
    LrScheduleKind,
};
use crate::sample::{grid_labels, sample, save_grid, SampleSettings};

/// The diffusers version written into saved configs (the format they follow).
pub const DIFFUSERS_VERSION: &str = "0.31.0";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LOSS_PLOT_FILE: &str = "loss.png";
pub const SAMPLES_DIR: &str = "samples";
pub const TRAIN_CONFIG_FILE: &str = "train_config.json";

/// Everything a run is configured with; saved as `train_config.json` and in checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub unet: UNet2DConfig,
    /// A diffusers scheduler config: the noise schedule and `prediction_type`.
    pub scheduler: Map<String, Value>,
    pub batch_size: usize,
    /// Optimizer steps to train for (in total, counting resumed steps).
    pub steps: u64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub optimizer: AdamWConfig,
    pub lr_schedule: LrScheduleKind,
    pub warmup_steps: usize,
    /// Maximum gradient L2 norm; none: no clipping.
    pub clip_grad: Option<f64>,
    /// The precision of the forward and backward passes (absent in older configs: f32).
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
    /// Min-SNR-γ loss weighting (diffusers' `--snr_gamma`); none: every timestep weighs the
    /// same (absent in older configs).
    #[serde(default)]
    pub snr_gamma: Option<f64>,
    /// EMA of the weights; none: no EMA (the final model is the raw weights).
    pub ema: Option<EmaConfig>,
    /// Probability of replacing a class label by the null class (classifier-free guidance).
    pub class_dropout: f64,
    pub random_flip: bool,
    pub seed: u64,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Keep at most this many checkpoints (oldest deleted first).
    pub checkpoints_total_limit: Option<usize>,
    /// Write a sample grid every this many steps (0: only at the end).
    pub sample_every: u64,
    /// Images per sample grid (0: none).
    pub num_samples: usize,
    pub sample: SampleSettings,
    /// Append a metrics line every this many steps.
    pub log_every: u64,
}

impl TrainConfig {
    /// Defaults for everything but the model: diffusers' `train_unconditional.py` settings and
    /// a linear-beta DDPM schedule of 1000 steps.
    pub fn new(unet: UNet2DConfig) -> Self {
        let mut scheduler = Map::new();
        scheduler.insert("_class_name".into(), json!("DDPMScheduler"));
        scheduler.insert("num_train_timesteps".into(), json!(1000));
        scheduler.insert("beta_schedule".into(), json!("linear"));
        scheduler.insert("prediction_type".into(), json!("epsilon"));
        Self {
            unet,
            scheduler,
            batch_size: 16,
            steps: 1000,
            grad_accum: 1,
            optimizer: AdamWConfig::default(),
            lr_schedule: LrScheduleKind::Cosine,
            warmup_steps: 500,
            clip_grad: Some(1.0),
            mixed_precision: MixedPrecision::No,
            snr_gamma: None,
            ema: Some(EmaConfig::default()),
            class_dropout: 0.1,
            random_flip: true,
            seed: 0,
            checkpoint_every: 500,
            checkpoints_total_limit: Some(3),
            sample_every: 500,
            num_samples: 16,
            sample: SampleSettings::default(),
            log_every: 10,
        }
    }

    fn scheduler_config(&self) -> SchedulerConfig {
        SchedulerConfig {
            map: self.scheduler.clone(),
        }
    }

    /// The parts that must not change between a checkpoint and its resumption.
    fn model_identity(&self) -> Value {
        json!({ "unet": self.unet, "scheduler": self.scheduler })
    }
}

/// The precision a training step computes in (accelerate's `--mixed_precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Everything in f32.
    #[default]
    No,
    /// bf16 products, f32 master weights. On the CPU, autocast after PyTorch's CPU autocast
    /// (`diffuse_models::ops::autocast_bf16`): the model and its activations stay f32, and the
    /// convolutions' weight gradients (and the products of the non-Winograd ones) multiply
    /// bf16-rounded operands on the AVX512-BF16 tiles with f32 accumulation; on CPUs without
    /// them the step is the f32 one. On a GPU, the forward and backward passes in bf16
    /// through a bf16 copy of the weights cast from the f32 master weights at every
    /// micro-batch. Either way the loss, the gradients of the master weights, the optimizer
    /// and the EMA stay in f32.
    Bf16,
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepStats {
    /// Steps done after this one.
    pub step: u64,
    /// Mean loss over the step's micro-batches (over every rank's images).
    pub loss: f64,
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    pub ema_decay: Option<f64>,
    /// Images in the step, on all ranks together.
    pub images: usize,
    pub epoch: u64,
}

/// What [`Trainer::fit`] reports as it goes.
#[derive(Clone, Debug)]
pub enum Event {
    Step {
        stats: StepStats,
        images_per_s: f64,
    },
    Checkpoint(PathBuf),
    Samples(PathBuf),
    /// The diffusers folder was written.
    Saved(PathBuf),
}

/// A model under training with its optimizer, EMA, data order and random state.
///
/// Data-parallel over the ranks of `comm`: `batch_size` is the global micro-batch, every rank
/// draws all of it (data order, noise, timesteps, flips, label dropout) and computes the loss
/// on its own contiguous share, and the gradients are summed over the ranks before the step.
/// So N ranks train on exactly the inputs one rank would, every rank holds the same weights,
/// optimizer and generator state, and a checkpoint resumes under any rank count. Only rank 0
/// writes files.
pub struct Trainer {
    config: TrainConfig,
    device: Device,
    dataset: Dataset,
    names: Vec<String>,
    vars: Vec<Var>,
    model: UNet2DModel,
    scheduler: Box<dyn Scheduler>,
    prediction: PredictionType,
    optimizer: AdamW,
    ema: Option<Ema>,
    lr: LrSchedule,
    rng: Generator,
    sampler: BatchSampler,
    step: u64,
    lr_step: u64,
    images_seen: u64,
    comm: Arc<dyn Comm>,
    /// This rank's share of each global micro-batch.
    shard: Range<usize>,
}

/// A trainable `UNet2DModel`: the model and its parameters `(name, var)` sorted by name,
/// initialised from `rng` as PyTorch initialises the layers (uniform ±1/sqrt(fan_in) for
/// convolution and linear weights and biases, N(0, 1) for embedding tables, 1 and 0 for norm
/// weights and biases).
pub fn build_trainable_unet(
    cfg: &UNet2DConfig,
    device: &Device,
    rng: &mut Generator,
) -> Result<(UNet2DModel, Vec<(String, Var)>)> {
    cfg.validate()?;
    let varmap = VarMap::new();
    let model = UNet2DModel::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    let params = init_like_torch(&varmap, device, rng, |name| {
        name.starts_with("class_embedding.")
    })?;
    Ok((model, params))
}

/// The parameters of `varmap` `(name, var)` sorted by name, set as PyTorch initialises the
/// layers: uniform ±1/sqrt(fan_in) for convolution and linear weights and their biases,
/// N(0, 1) for embedding tables (the names `is_embedding` accepts), 1 and 0 for norm weights
/// and biases.
pub(crate) fn init_like_torch(
    varmap: &VarMap,
    device: &Device,
    rng: &mut Generator,
    is_embedding: impl Fn(&str) -> bool,
) -> Result<Vec<(String, Var)>> {
    let mut params: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| Error::invalid("parameter map lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let shapes: HashMap<&str, Vec<usize>> = params
        .iter()
        .map(|(n, v)| (n.as_str(), v.dims().to_vec()))
        .collect();
    for (name, var) in &params {
        let dims = var.dims();
        let fan_in_bound = |w: &[usize]| 1.0 / (w[1..].iter().product::<usize>() as f64).sqrt();
        let values: Vec<f32> = if let Some(stem) = name.strip_suffix(".bias") {
            match shapes.get(format!("{stem}.weight").as_str()) {
                Some(w) if w.len() >= 2 => uniform(rng, var.elem_count(), fan_in_bound(w)),
                _ => vec![0.0; var.elem_count()],
            }
        } else if dims.len() == 1 {
            vec![1.0; var.elem_count()]
        } else if is_embedding(name) {
            rng.randn_vec(var.elem_count())
        } else {
            uniform(rng, var.elem_count(), fan_in_bound(dims))
        };
        var.set(&Tensor::from_vec(values, dims, device)?)?;
    }
    Ok(params)
}

fn uniform(rng: &mut Generator, n: usize, bound: f64) -> Vec<f32> {
    rng.rand_vec(n)
        .into_iter()
        .map(|u| ((2.0 * u as f64 - 1.0) * bound) as f32)
        .collect()
}

impl Trainer {
    /// Checks the config against the dataset and builds a freshly initialised model.
    pub fn new(config: TrainConfig, dataset: Dataset, device: &Device) -> Result<Self> {
        Self::new_distributed(config, dataset, device, Arc::new(SingleProcess))
    }

    /// [`Trainer::new`] for one rank of a data-parallel job: every rank of `comm` must call it
    /// with the same config and dataset. The global batch must divide evenly among the ranks.
    pub fn new_distributed(
        config: TrainConfig,
        dataset: Dataset,
        device: &Device,
        comm: Arc<dyn Comm>,
    ) -> Result<Self> {
        check_config(&config, &dataset)?;
        let ranks = comm.size();
        if !config.batch_size.is_multiple_of(ranks) {
            return Err(Error::invalid(format!(
                "the batch size {} does not divide among {ranks} ranks: each rank takes an \
                 equal share of the global batch, so use a multiple of {ranks}",
                config.batch_size
            )));
        }
        let shard = diffuse_dist::shard(config.batch_size, comm.rank(), ranks);
        let scheduler_cfg = config.scheduler_config();
        let scheduler = diffuse_schedulers::from_config("DDPMScheduler", &scheduler_cfg)?;
        let prediction =
            PredictionType::read(&mut ConfigReader::new("DDPMScheduler", &scheduler_cfg))?;
        let mut rng = Generator::manual_seed(config.seed);
        let (model, params) = build_trainable_unet(&config.unet, device, &mut rng)?;
        let (names, vars): (Vec<String>, Vec<Var>) = params.into_iter().unzip();
        let optimizer = AdamW::new(config.optimizer, &vars)?;
        let ema = config.ema.map(|c| Ema::new(c, &vars)).transpose()?;
        let lr = LrSchedule {
            kind: config.lr_schedule,
            base_lr: config.optimizer.lr,
            warmup_steps: config.warmup_steps,
            total_steps: config.steps as usize,
        };
        let sampler = BatchSampler::new(dataset.len(), config.seed)?;
        Ok(Self {
            config,
            device: device.clone(),
            dataset,
            names,
            vars,
            model,
            scheduler,
            prediction,
            optimizer,
            ema,
            lr,
            rng,
            sampler,
            step: 0,
            lr_step: 0,
            images_seen: 0,
            comm,
            shard,
        })
    }

    /// This rank's share of each global micro-batch (`0..batch_size` on a single process).
    pub fn shard(&self) -> Range<usize> {
        self.shard.clone()
    }

    /// The ranks training together.
    pub fn comm(&self) -> &dyn Comm {
        self.comm.as_ref()
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn model(&self) -> &UNet2DModel {
        &self.model
    }

    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The trainable parameters, `(diffusers name, var)`, sorted by name.
    pub fn parameters(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.names.iter().map(String::as_str).zip(&self.vars)
    }

    fn tensors_by_name(&self, tensors: &[Tensor]) -> HashMap<String, Tensor> {
        self.names
            .iter()
            .cloned()
            .zip(tensors.iter().cloned())
            .collect()
    }

    fn current_weights(&self) -> Vec<Tensor> {
        self.vars.iter().map(|v| v.as_tensor().detach()).collect()
    }

    /// The weights the saved model gets: the EMA ones when EMA is on.
    pub fn final_weights(&self) -> HashMap<String, Tensor> {
        match &self.ema {
            Some(e) => self.tensors_by_name(e.shadow()),
            None => self.tensors_by_name(&self.current_weights()),
        }
    }

    /// Draws one global micro-batch and returns the (unscaled) loss tensor of this rank's
    /// share, with its graph. Every random draw covers the whole global batch, in the order a
    /// single process makes them, and the share is cut out of it.
    fn micro_batch_loss(&mut self) -> Result<Tensor> {
        // Drawing the batch, its noise, timesteps and targets: a row of its own in the profile.
        let (noisy, t, labels, target, weights) = profile::timed(
            || "training: batch, noise and targets".into(),
            0.0,
            || -> Result<_> {
                let global = self.config.batch_size;
                let mine = self.shard.clone();
                let bs = mine.len();
                let indices = self.sampler.next_batch(global);
                let flips: Vec<bool> = if self.config.random_flip {
                    self.rng
                        .rand_vec(global)
                        .into_iter()
                        .map(|u| u < 0.5)
                        .collect()
                } else {
                    vec![false; global]
                };
                let (x0, labels) = self.dataset.batch(
                    &indices[mine.clone()],
                    &flips[mine.clone()],
                    &self.device,
                )?;
                let mut noise_shape = x0.dims().to_vec();
                noise_shape[0] = global;
                let noise = self
                    .rng
                    .randn(noise_shape, &self.device)?
                    .narrow(0, mine.start, bs)?;
                let acp = self.scheduler.alphas_cumprod().ok_or_else(|| {
                    diffuse_core::Error::invalid(format!(
                        "training needs a scheduler with a discrete noise schedule, not {}",
                        self.scheduler.class_name()
                    ))
                })?;
                let n_train = acp.len() as u64;
                // Uniform integer timesteps in [0, n_train) from the top bits (no modulo bias).
                let timesteps: Vec<u64> = (0..global)
                    .map(|_| (self.rng.next_u32() as u64 * n_train) >> 32)
                    .collect::<Vec<_>>()[mine.clone()]
                .to_vec();
                let t_f64: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
                let noisy = self.scheduler.add_noise(&x0, &noise, &t_f64)?;
                let target = prediction_target(self.prediction, &x0, &noise, acp, &timesteps)?;
                let weights = self
                    .config
                    .snr_gamma
                    .map(|g| min_snr_weights(self.prediction, acp, &timesteps, g))
                    .transpose()?;
                let labels = match (labels, self.config.unet.num_class_embeds) {
                    (Some(l), Some(k)) => {
                        let null = (k - 1) as u32;
                        let drop = &self.rng.rand_vec(global)[mine.clone()];
                        let mut v: Vec<u32> = l.to_vec1()?;
                        for (label, &u) in v.iter_mut().zip(drop) {
                            if (u as f64) < self.config.class_dropout {
                                *label = null;
                            }
                        }
                        Some(Tensor::from_vec(v, bs, &self.device)?)
                    }
                    _ => None,
                };
                let t = Tensor::from_vec(
                    timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
                    bs,
                    &self.device,
                )?;
                Ok((noisy, t, labels, target, weights))
            },
        )?;
        let pred = match self.config.mixed_precision {
            MixedPrecision::Bf16 if !self.cpu_autocast() => self
                .cast_model(DType::BF16)?
                .forward_with_class(&noisy, &t, labels.as_ref())?
                .to_dtype(DType::F32)?,
            // (CPU autocast is set around the whole pass: `train_step`.)
            _ => self.model.forward_with_class(&noisy, &t, labels.as_ref())?,
        };
        Ok(per_image_mse(&pred, &target, weights.as_deref())?.mean_all()?)
    }

    /// The model with its weights cast to `dtype` from the f32 variables (the casts are part
    /// of the graph, so the gradients reach the variables, in f32).
    fn cast_model(&self, dtype: DType) -> Result<UNet2DModel> {
        let weights = self
            .names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(weights, dtype, &self.device);
        Ok(UNet2DModel::new(vb, &self.config.unet)?)
    }

    /// Whether bf16 mixed precision runs as CPU autocast (around each micro-batch's passes,
    /// in `train_step`) rather than through a bf16 copy of the weights (on a GPU).
    fn cpu_autocast(&self) -> bool {
        self.config.mixed_precision == MixedPrecision::Bf16 && self.device.is_cpu()
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let accum = self.config.grad_accum;
        let vars = self.vars.clone();
        let autocast = self.cpu_autocast();
        let (mut grads, mut loss) =
            accumulate_gradients(&vars, accum, autocast, || self.micro_batch_loss())?;
        if self.comm.size() > 1 {
            self.average_over_ranks(&mut grads, &mut loss)?;
        }
        let norm = check_and_clip(loss, self.step + 1, &mut grads, self.config.clip_grad)?;
        let lr = self.lr.lr_at(self.lr_step as usize);
        profile::timed(
            || "training: AdamW update".into(),
            0.0,
            || self.optimizer.step(&self.vars, &grads, lr),
        )?;
        self.lr_step += 1;
        let ema_decay = match &mut self.ema {
            Some(e) => Some(profile::timed(
                || "training: EMA update".into(),
                0.0,
                || e.step(&self.vars, &vec![true; self.vars.len()]),
            )?),
            None => None,
        };
        self.step += 1;
        let images = self.config.batch_size * accum;
        self.images_seen += images as u64;
        Ok(StepStats {
            step: self.step,
            loss,
            lr,
            grad_norm: norm,
            ema_decay,
            images,
            epoch: self.sampler.epoch(),
        })
    }

    /// Replaces each rank's gradients and loss by their means over the ranks (the shares are
    /// equal, so these are the gradient and loss of the global batch), in one sum of a flat
    /// buffer.
    fn average_over_ranks(&self, grads: &mut [Tensor], loss: &mut f64) -> Result<()> {
        let total: usize = grads.iter().map(Tensor::elem_count).sum();
        let mut flat = Vec::with_capacity(total + 1);
        for g in grads.iter() {
            flat.extend(g.flatten_all()?.to_vec1::<f32>()?);
        }
        flat.push(*loss as f32);
        let what = format!("the gradient sum of step {}", self.step + 1);
        self.comm.all_reduce_sum(&what, &mut flat)?;
        let ranks = self.comm.size() as f32;
        flat.iter_mut().for_each(|x| *x /= ranks);
        let mut at = 0;
        for g in grads.iter_mut() {
            let n = g.elem_count();
            *g = Tensor::from_slice(&flat[at..at + n], g.shape(), &self.device)?;
            at += n;
        }
        *loss = flat[total] as f64;
        Ok(())
    }

    /// Checks that every rank holds the same weights (they get the same summed gradients, so
    /// they should): a CRC-32 of the weights, compared with rank 0's.
    pub fn check_ranks_agree(&self) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let mut crc = crc32fast::Hasher::new();
        for v in &self.vars {
            let values = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            crc.update(&bytes);
        }
        let what = format!("the weight check of step {}", self.step);
        let all = self.comm.all_gather_u64(&what, crc.finalize() as u64)?;
        match all.iter().position(|&c| c != all[0]) {
            None => Ok(()),
            Some(r) => Err(Error::invalid(format!(
                "after step {} rank {r}'s weights differ from rank 0's (CRC-32 {:08x} vs {:08x}): \
                 the ranks no longer train the same model",
                self.step, all[r], all[0]
            ))),
        }
    }

    /// The checkpoint of the current state.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let (m, v) = self.optimizer.moments();
        let mut optimizer = HashMap::new();
        for (name, (m, v)) in self.names.iter().zip(m.iter().zip(v)) {
            optimizer.insert(format!("exp_avg.{name}"), m.clone());
            optimizer.insert(format!("exp_avg_sq.{name}"), v.clone());
        }
        Ok(Checkpoint {
            state: TrainState {
                step: self.step,
                lr_step: self.lr_step,
                optimizer_step: self.optimizer.step_count(),
                ema_step: self.ema.as_ref().map(Ema::optimization_step),
                epoch: self.sampler.epoch(),
                epoch_pos: self.sampler.position(),
                images_seen: self.images_seen,
                rng: self.rng.state(),
                config: serde_json::to_value(&self.config)
                    .map_err(|e| Error::invalid(format!("serializing the config: {e}")))?,
            },
            model: self.tensors_by_name(&self.current_weights()),
            ema: self.ema.as_ref().map(|e| self.tensors_by_name(e.shadow())),
            optimizer,
        })
    }

    /// Writes `<output>/checkpoints/checkpoint-<step>` and prunes old checkpoints.
    pub fn save_checkpoint(&self, output: &Path) -> Result<PathBuf> {
        let dir = output.join(CHECKPOINTS_DIR);
        let path = checkpoint::write_checkpoint(&dir, &self.checkpoint()?)?;
        if let Some(keep) = self.config.checkpoints_total_limit {
            checkpoint::prune_checkpoints(&dir, keep.max(1))?;
        }
        Ok(path)
    }

    /// Continues from a checkpoint folder: weights, EMA, optimizer moments, step, LR-schedule
    /// position, data order and random state. The model and noise schedule must be the ones
    /// the checkpoint was made with.
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let ckpt = checkpoint::read_checkpoint(dir)?;
        let saved: TrainConfig =
            serde_json::from_value(ckpt.state.config.clone()).map_err(|e| {
                Error::invalid(format!(
                    "checkpoint {}: unreadable training config: {e}",
                    dir.display()
                ))
            })?;
        if saved.model_identity() != self.config.model_identity() {
            return Err(Error::invalid(format!(
                "checkpoint {} was made with a different model or noise schedule config:\n  \
                 checkpoint: {}\n  now:        {}",
                dir.display(),
                saved.model_identity(),
                self.config.model_identity()
            )));
        }
        let ordered = |map: &HashMap<String, Tensor>,
                       prefix: &str,
                       what: &str|
         -> Result<Vec<Tensor>> {
            self.names
                .iter()
                .zip(&self.vars)
                .map(|(name, var)| {
                    let key = format!("{prefix}{name}");
                    let t = map.get(&key).ok_or_else(|| {
                        Error::invalid(format!(
                            "checkpoint {}: {what} has no tensor `{key}`",
                            dir.display()
                        ))
                    })?;
                    if t.dims() != var.dims() {
                        return Err(Error::invalid(format!(
                            "checkpoint {}: {what} tensor `{key}` has shape {:?}, the model needs {:?}",
                            dir.display(),
                            t.dims(),
                            var.dims()
                        )));
                    }
                    Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?)
                })
                .collect()
        };
        let weights = ordered(&ckpt.model, "", "the model")?;
        let exp_avg = ordered(&ckpt.optimizer, "exp_avg.", "the optimizer state")?;
        let exp_avg_sq = ordered(&ckpt.optimizer, "exp_avg_sq.", "the optimizer state")?;
        let ema_state = match (&self.ema, &ckpt.ema, ckpt.state.ema_step) {
            (Some(_), Some(map), Some(step)) => Some((step, ordered(map, "", "the EMA")?)),
            _ => None,
        };
        let rng = Generator::from_state(&ckpt.state.rng)
            .map_err(|e| Error::invalid(format!("checkpoint {}: {e}", dir.display())))?;
        let sampler = BatchSampler::at(
            self.dataset.len(),
            self.config.seed,
            ckpt.state.epoch,
            ckpt.state.epoch_pos,
        )
        .map_err(|e| {
            Error::invalid(format!(
                "checkpoint {}: {e} (was the dataset changed?)",
                dir.display()
            ))
        })?;

        // Everything is checked: now change state.
        for (var, w) in self.vars.iter().zip(&weights) {
            var.set(w)?;
        }
        self.optimizer
            .restore(ckpt.state.optimizer_step, exp_avg, exp_avg_sq)?;
        if let Some(ema) = &mut self.ema {
            match ema_state {
                Some((step, shadow)) => ema.restore(step, shadow)?,
                // No EMA in the checkpoint: start averaging from the resumed weights.
                None => *ema = Ema::new(*ema.config(), &self.vars)?,
            }
        }
        self.rng = rng;
        self.sampler = sampler;
        self.step = ckpt.state.step;
        self.lr_step = ckpt.state.lr_step;
        self.images_seen = ckpt.state.images_seen;
        Ok(())
    }
}

impl Trainer {
    /// A model running on the given weights (the EMA ones for sampling and saving).
    fn model_with(&self, weights: HashMap<String, Tensor>) -> Result<UNet2DModel> {
        let vb = VarBuilder::from_tensors(weights, DType::F32, &self.device);
        Ok(UNet2DModel::new(vb, &self.config.unet)?)
    }

    /// Samples `num_samples` images with the final (EMA) weights and writes them as a grid:
    /// for a class-conditional model each column is one class, with guidance.
    pub fn write_samples(&self, path: &Path) -> Result<()> {
        let n = self.config.num_samples;
        let model = self.model_with(self.final_weights())?;
        let scheduler_cfg = self.config.scheduler_config();
        let settings = &self.config.sample;
        let (images, columns) = match (
            self.config.unet.num_class_embeds,
            self.dataset.num_classes(),
        ) {
            (Some(_), Some(k)) => {
                let labels = grid_labels(k, n);
                let x = sample(
                    &model,
                    &scheduler_cfg,
                    settings,
                    n,
                    Some(&labels),
                    &self.device,
                )?;
                (x, k.min(n))
            }
            _ => {
                let x = sample(&model, &scheduler_cfg, settings, n, None, &self.device)?;
                (x, (n as f64).sqrt().ceil() as usize)
            }
        };
        save_grid(&images, columns, path)
    }

    /// Writes the diffusers folder: `model_index.json` (DDPMPipeline), `unet/config.json`,
    /// `unet/diffusion_pytorch_model.safetensors` (the EMA weights when EMA is on) and
    /// `scheduler/scheduler_config.json`; a class-conditional model's index also lists the
    /// dataset's class names under `_class_names`.
    pub fn save_pipeline(&self, output: &Path) -> Result<()> {
        let unet_dir = output.join("unet");
        let scheduler_dir = output.join("scheduler");
        for d in [&unet_dir, &scheduler_dir] {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let mut unet = to_json(&self.config.unet)?;
        if let Value::Object(m) = &mut unet {
            m.insert("_class_name".into(), json!("UNet2DModel"));
            m.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
        }
        write_text(&unet_dir.join("config.json"), &pretty(&unet)?)?;
        diffuse_loaders::weights::save_safetensors(
            &self.final_weights(),
            &unet_dir.join("diffusion_pytorch_model.safetensors"),
        )?;
        let mut scheduler = self.scheduler.config().clone();
        scheduler.set("_class_name", json!("DDPMScheduler"));
        scheduler.set("_diffusers_version", json!(DIFFUSERS_VERSION));
        write_text(
            &scheduler_dir.join("scheduler_config.json"),
            &scheduler.to_json_string(),
        )?;
        let mut index = json!({
            "_class_name": "DDPMPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        });
        // The class of each label, for `diffuse generate --prompt <class>`; diffusers' loader
        // skips underscore keys, so the folder still loads there.
        if self.config.unet.num_class_embeds.is_some() && self.dataset.num_classes().is_some() {
            index["_class_names"] = json!(self.dataset.class_names());
        }
        write_text(&output.join("model_index.json"), &pretty(&index)?)
    }

    /// Trains up to `config.steps`, appending to `<output>/metrics.jsonl`, writing checkpoints,
    /// sample grids and the loss curve on schedule, and the diffusers folder (plus a last
    /// checkpoint, sample grid and loss curve) at the end. Of several ranks, only rank 0 writes
    /// (and reports checkpoints, samples and the saved folder); the others only train.
    pub fn fit(&mut self, output: &Path, on_event: &mut dyn FnMut(&Event)) -> Result<()> {
        let lead = self.comm.rank() == 0;
        let metrics_path = output.join(METRICS_FILE);
        let mut history = Vec::new();
        if lead {
            std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
            write_text(
                &output.join(TRAIN_CONFIG_FILE),
                &pretty(&to_json(&self.config)?)?,
            )?;
            history = restart_metrics(&metrics_path, self.step)?;
        }
        let started = Instant::now();
        let (mut window_loss, mut window_steps, mut window_images) = (0.0, 0u64, 0usize);
        let mut window_start = Instant::now();
        let samples_dir = output.join(SAMPLES_DIR);
        while self.step < self.config.steps {
            let t0 = Instant::now();
            let stats = self.train_step()?;
            let images_per_s = stats.images as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            window_loss += stats.loss;
            window_steps += 1;
            window_images += stats.images;
            on_event(&Event::Step {
                stats: stats.clone(),
                images_per_s,
            });
            let last = self.step == self.config.steps;
            if lead && (self.step.is_multiple_of(self.config.log_every) || last) {
                let mean = window_loss / window_steps as f64;
                let line = json!({
                    "step": self.step,
                    "loss": mean,
                    "lr": stats.lr,
                    "grad_norm": stats.grad_norm,
                    "ema_decay": stats.ema_decay,
                    "epoch": stats.epoch,
                    "images_per_s": window_images as f64 / window_start.elapsed().as_secs_f64().max(1e-9),
                    "elapsed_s": started.elapsed().as_secs_f64(),
                });
                append_line(&metrics_path, &line.to_string())?;
                history.push((self.step, mean));
                (window_loss, window_steps, window_images) = (0.0, 0, 0);
                window_start = Instant::now();
            }
            let due = |every: u64| every > 0 && self.step.is_multiple_of(every) && !last;
            if due(self.config.checkpoint_every) {
                self.check_ranks_agree()?;
                if lead {
                    on_event(&Event::Checkpoint(self.save_checkpoint(output)?));
                    plot_history(&history, &output.join(LOSS_PLOT_FILE))?;
                }
            }
            if lead && due(self.config.sample_every) && self.config.num_samples > 0 {
                std::fs::create_dir_all(&samples_dir).map_err(|e| Error::io(&samples_dir, e))?;
                let path = samples_dir.join(format!("step-{:07}.png", self.step));
                self.write_samples(&path)?;
                on_event(&Event::Samples(path));
            }
        }
        self.check_ranks_agree()?;
        if !lead {
            return Ok(());
        }
        on_event(&Event::Checkpoint(self.save_checkpoint(output)?));
        plot_history(&history, &output.join(LOSS_PLOT_FILE))?;
        if self.config.num_samples > 0 {
            std::fs::create_dir_all(&samples_dir).map_err(|e| Error::io(&samples_dir, e))?;
            let path = samples_dir.join(format!("step-{:07}.png", self.step));
            self.write_samples(&path)?;
            on_event(&Event::Samples(path));
        }
        self.save_pipeline(output)?;
        on_event(&Event::Saved(output.to_path_buf()));
        Ok(())
    }
}

/// The newest complete checkpoint under `<output>/checkpoints`, if any.
pub fn latest_checkpoint(output: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoint::list_checkpoints(&output.join(CHECKPOINTS_DIR))?
        .pop()
        .map(|(_, p)| p))
}

fn check_config(c: &TrainConfig, ds: &Dataset) -> Result<()> {
    let fail = |m: String| Err(Error::invalid(m));
    if c.batch_size == 0 {
        return fail("the batch size must be at least 1".into());
    }
    if c.grad_accum == 0 {
        return fail("gradient accumulation must be at least 1 micro-batch".into());
    }
    if c.steps == 0 {
        return fail("the number of training steps must be at least 1".into());
    }
    if c.log_every == 0 {
        return fail("log_every must be at least 1".into());
    }
    if ds.is_empty() {
        return fail("the dataset holds no images".into());
    }
    if !(0.0..1.0).contains(&c.class_dropout) {
        return fail(format!(
            "class dropout {} must be in [0, 1)",
            c.class_dropout
        ));
    }
    check_clip_grad(c.clip_grad)?;
    check_snr_gamma(c.snr_gamma)?;
    let u = &c.unet;
    u.validate()?;
    if u.time_embedding_type != "positional" {
        return fail(format!(
            "training supports positional time embeddings (DDPM), not time_embedding_type = {:?}",
            u.time_embedding_type
        ));
    }
    let r = ds.resolution();
    match u.sample_size.as_ref().map(|s| s.hw()) {
        Some((h, w)) if h == r && w == r => {}
        other => {
            return fail(format!(
                "the UNet config's sample_size {other:?} must be the dataset resolution {r}"
            ))
        }
    }
    let factor = 1usize << u.block_out_channels.len().saturating_sub(1);
    if !r.is_multiple_of(factor) {
        return fail(format!(
            "resolution {r} must be divisible by {factor} ({} blocks halve it {} times)",
            u.block_out_channels.len(),
            u.block_out_channels.len() - 1
        ));
    }
    if u.in_channels != ds.channels() || u.out_channels != ds.channels() {
        return fail(format!(
            "the UNet has in_channels = {} and out_channels = {}, the images have {} channels",
            u.in_channels,
            u.out_channels,
            ds.channels()
        ));
    }
    match (&u.class_embed_type, u.num_class_embeds, ds.num_classes()) {
        (Some(kind), _, _) => fail(format!(
            "training supports class labels through num_class_embeds, not class_embed_type = {kind:?}"
        )),
        (None, Some(k), Some(n)) if k != n + 1 => fail(format!(
            "the config has num_class_embeds = {k}, but the dataset has {n} classes: \
             num_class_embeds must be {} (the classes plus the null class of classifier-free guidance)",
            n + 1
        )),
        (None, Some(_), None) => {
            fail("the model is class-conditional (num_class_embeds) but the dataset has no labels".into())
        }
        _ => Ok(()),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::invalid(format!("serializing to JSON: {e}")))
}

fn pretty(v: &Value) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::invalid(format!("serializing to JSON: {e}")))
}

/// Writes `text` to a temporary file and renames it over `path`.
pub(crate) fn write_text(path: &Path, text: &str) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// Reads the metrics log for a run (re)starting at `step`: lines of later steps (from a run
/// that went on past the checkpoint being resumed) and unparsable lines (a write cut short)
/// are dropped from the file. Returns the `(step, loss)` history kept.
fn restart_metrics(path: &Path, step: u64) -> Result<Vec<(u64, f64)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::new();
    let mut history = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(s), Some(l)) = (v["step"].as_u64(), v["loss"].as_f64()) else {
            continue;
        };
        if s <= step {
            kept.push_str(line);
            kept.push('\n');
            history.push((s, l));
        }
    }
    if kept != text {
        write_text(path, &kept)?;
    }
    Ok(history)
}

fn plot_history(history: &[(u64, f64)], path: &Path) -> Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    crate::plot::write_loss_curve(history, path)
}
