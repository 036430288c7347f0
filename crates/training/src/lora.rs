//! LoRA fine-tuning of a Stable Diffusion UNet, as diffusers' `train_text_to_image_lora.py` and
//! `train_dreambooth_lora.py` do it: rank-r updates `W + (alpha / r) · B · A` on the attention
//! projections (PEFT's Gaussian init: `A ~ N(0, 1/r)`, `B = 0`), trained on the noise-prediction
//! MSE with everything else frozen, and saved in the diffusers/PEFT layout
//! (`unet.<module>.lora_A.weight` / `.lora_B.weight`) that `load_lora_weights` reads, or in
//! Kohya's.
//!
//! The VAE is frozen, so each image's latent distribution (and its mirror's, with random flips)
//! is computed once up front, and so are the captions' embeddings unless the text encoder is
//! adapted too ([`LoraTrainer::with_text_encoder`], `train_dreambooth_lora.py
//! --train_text_encoder`: its attention projections, saved under `text_encoder.`). Every step
//! samples latents from the stored distributions (as `latent_dist.sample()` does), noises them
//! at uniform timesteps and rebuilds the adapted models from their frozen weights with the
//! current updates added to the targeted ones; A and B are the only variables.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use diffuse_core::{Error, Generator, Result};
use diffuse_models::clip_text::{ClipTextConfig, ClipTextModel};
use diffuse_models::{DiagonalGaussian, UNet2DConditionConfig, UNet2DConditionModel};
use diffuse_pipelines::image_processor::preprocess_image;
use diffuse_pipelines::StableDiffusionPipeline;
use diffuse_schedulers::common::PredictionType;
use diffuse_schedulers::config::ConfigReader;
use diffuse_schedulers::{Scheduler, SchedulerConfig};
use serde_json::json;

use crate::dataset::{fit_image, BatchSampler, Fit};
use crate::loss::{check_snr_gamma, min_snr_weights, per_image_mse, prediction_target};
use crate::optimizer::{
    accumulate_gradients, check_and_clip, check_clip_grad, AdamW, AdamWConfig, LrSchedule,
    LrScheduleKind,
};
use crate::trainer::MixedPrecision;

/// The layers diffusers' LoRA scripts adapt: the attention projections.
pub const DEFAULT_TARGETS: &[&str] = &["to_q", "to_k", "to_v", "to_out.0"];

/// The text encoder's layers `train_dreambooth_lora.py --train_text_encoder` adapts: its
/// attention projections.
pub const TEXT_ENCODER_TARGETS: &[&str] = &["q_proj", "k_proj", "v_proj", "out_proj"];

/// The image files a training folder may hold.
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// How a LoRA run is configured.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTrainConfig {
    pub rank: usize,
    /// The update is scaled by `alpha / rank`; none: alpha = rank (scale 1), diffusers' default.
    pub alpha: Option<f64>,
    /// Layer names (the last parts of module paths: `to_q`, `to_out.0`, `proj_in`, ...).
    pub target_modules: Vec<String>,
    /// Images are resized so that their short side is this, then center-cropped to a square.
    pub resolution: usize,
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps.
    pub steps: u64,
    pub optimizer: AdamWConfig,
    pub lr_schedule: LrScheduleKind,
    pub warmup_steps: usize,
    /// Maximum gradient L2 norm; none: no clipping.
    pub clip_grad: Option<f64>,
    pub seed: u64,
    /// Mirror each image with probability 1/2.
    pub random_flip: bool,
    /// DreamBooth: one prompt for every instance image (caption files are then not read).
    pub instance_prompt: Option<String>,
    pub prior: Option<PriorPreservation>,
    /// Min-SNR-γ loss weighting (diffusers' `--snr_gamma`); none: unweighted.
    pub snr_gamma: Option<f64>,
    /// bf16: each step's passes under CPU autocast ([`MixedPrecision::Bf16`]); the adapters,
    /// their gradients and the optimizer stay f32. CPU only.
    pub mixed_precision: MixedPrecision,
}

/// DreamBooth's prior preservation: images of the class (made by the model itself, as
/// diffusers makes them) trained with the class prompt next to the instance images, so that the
/// model keeps what it knew of the class.
#[derive(Clone, Debug, PartialEq)]
pub struct PriorPreservation {
    pub class_data: PathBuf,
    pub class_prompt: String,
    /// Weight of the class images' loss.
    pub weight: f64,
}

impl Default for LoraTrainConfig {
    /// diffusers' `train_text_to_image_lora.py` defaults (rank 4, lr 1e-4, AdamW β 0.9/0.999,
    /// weight decay 1e-2, constant schedule, gradient clipping at 1), at 512 pixels.
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: None,
            target_modules: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            resolution: 512,
            batch_size: 1,
            grad_accum: 1,
            steps: 100,
            optimizer: AdamWConfig {
                lr: 1e-4,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 1e-2,
            },
            lr_schedule: LrScheduleKind::Constant,
            warmup_steps: 0,
            clip_grad: Some(1.0),
            seed: 0,
            random_flip: false,
            instance_prompt: None,
            prior: None,
            snr_gamma: None,
            mixed_precision: MixedPrecision::No,
        }
    }
}

impl LoraTrainConfig {
    fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::invalid("the LoRA rank must be at least 1"));
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.steps == 0 {
            return Err(Error::invalid(
                "the batch size, gradient accumulation and step count must be at least 1",
            ));
        }
        if self.target_modules.is_empty() {
            return Err(Error::invalid("no target modules given"));
        }
        check_snr_gamma(self.snr_gamma)?;
        check_clip_grad(self.clip_grad)?;
        if !(self.alpha().is_finite() && self.alpha() > 0.0) {
            return Err(Error::invalid(format!(
                "the LoRA alpha must be a positive number, not {}",
                self.alpha()
            )));
        }
        if let Some(p) = &self.prior {
            if !(p.weight.is_finite() && p.weight >= 0.0) {
                return Err(Error::invalid(format!(
                    "the prior loss weight must be a number >= 0, not {}",
                    p.weight
                )));
            }
        }
        self.optimizer.validate()
    }
}

/// The file layout a LoRA is saved in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraSaveFormat {
    /// diffusers / PEFT: `unet.<module>.lora_A.weight`, `.lora_B.weight`, and the rank, alpha
    /// and target modules in the header's `lora_adapter_metadata`.
    Peft,
    /// Kohya / A1111: `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`
    /// and `.alpha`.
    Kohya,
}

/// One optimizer step's figures.
#[derive(Clone, Copy, Debug)]
pub struct LoraStepStats {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// A training image, encoded: the VAE's latent distribution of it (and, for random flips, of
/// its mirror image, as the second entry), its caption's text embeddings `(1, L, D)` and
/// token ids `(1, L)` (what an adapted text encoder encodes instead).
#[derive(Clone, Debug)]
pub struct TrainingExample {
    pub latents: Vec<DiagonalGaussian>,
    pub text: Tensor,
    pub ids: Option<Tensor>,
}

/// A set of examples and the order they are drawn in.
struct Examples {
    items: Vec<TrainingExample>,
    sampler: BatchSampler,
}

/// One adapted layer.
struct Adapter {
    /// Its weight's name, `....to_q.weight`.
    weight: String,
    /// `A` (rank × in) and `B` (out × rank).
    a: Var,
    b: Var,
}

impl Adapter {
    fn module(&self) -> &str {
        self.weight.trim_end_matches(".weight")
    }
}

/// A model with adapters: its frozen weights and the adapters on its targeted layers.
struct Adapted {
    /// `unet` or `text_encoder`: the key prefix of its modules in a PEFT file.
    component: &'static str,
    /// Kohya's key prefix of its modules.
    kohya_prefix: &'static str,
    targets: Vec<String>,
    frozen: HashMap<String, Tensor>,
    adapters: Vec<Adapter>,
}

impl Adapted {
    /// Adapters of rank `config.rank` on every 2-D weight of `frozen` whose module path ends
    /// in one of `targets`.
    fn new(
        (component, kohya_prefix): (&'static str, &'static str),
        frozen: HashMap<String, Tensor>,
        targets: Vec<String>,
        config: &LoraTrainConfig,
        rng: &mut Generator,
    ) -> Result<Self> {
        let (device, dtype) = match frozen.values().next() {
            Some(t) => (t.device().clone(), t.dtype()),
            None => return Err(Error::invalid(format!("the {component} has no weights"))),
        };
        let adapters = create_adapters(
            component,
            &frozen,
            &targets,
            config.rank,
            rng,
            dtype,
            &device,
        )?;
        Ok(Self {
            component,
            kohya_prefix,
            targets,
            frozen,
            adapters,
        })
    }

    fn vars(&self) -> impl Iterator<Item = Var> + '_ {
        self.adapters
            .iter()
            .flat_map(|a| [a.a.clone(), a.b.clone()])
    }

    /// The frozen weights with `scale · B · A` added to each targeted one (a function of the
    /// variables, so gradients reach them).
    fn weights(&self, scale: f64) -> Result<HashMap<String, Tensor>> {
        let mut weights = self.frozen.clone();
        for a in &self.adapters {
            let update = (a.b.as_tensor().matmul(a.a.as_tensor())? * scale)?;
            let w = (&self.frozen[&a.weight] + update)?;
            weights.insert(a.weight.clone(), w);
        }
        Ok(weights)
    }

    fn var_builder(&self, scale: f64) -> Result<VarBuilder<'static>> {
        let weights = self.weights(scale)?;
        let t = &self.frozen[&self.adapters[0].weight];
        Ok(VarBuilder::from_tensors(weights, t.dtype(), t.device()))
    }
}

/// A LoRA training run on a loaded Stable Diffusion pipeline.
pub struct LoraTrainer {
    config: LoraTrainConfig,
    unet_config: UNet2DConditionConfig,
    unet: Adapted,
    /// With text-encoder training: its config and adapters.
    text_encoder: Option<(ClipTextConfig, Adapted)>,
    scheduler: Box<dyn Scheduler>,
    prediction: PredictionType,
    /// The VAE's latent scale.
    scaling_factor: f64,
    instances: Examples,
    classes: Option<Examples>,
    optimizer: AdamW,
    lr: LrSchedule,
    rng: Generator,
    step: u64,
    device: Device,
}

impl LoraTrainer {
    /// Prepares a run: reads and encodes the images of `data` (captions from `<image>.txt`
    /// unless the config has an instance prompt) and of the prior-preservation folder, and
    /// creates the adapters on the layers of `unet` (its config and weights, as
    /// [`diffuse_pipelines::unet_weights`] reads them) named by the config's target modules.
    pub fn new(
        pipeline: &StableDiffusionPipeline,
        unet: (UNet2DConditionConfig, HashMap<String, Tensor>),
        data: &Path,
        config: LoraTrainConfig,
    ) -> Result<Self> {
        config.validate()?;
        let factor = pipeline.vae_scale_factor();
        if config.resolution == 0 || !config.resolution.is_multiple_of(factor) {
            return Err(Error::invalid(format!(
                "the resolution must be a positive multiple of {factor}, not {}",
                config.resolution
            )));
        }
        let instances = read_examples(pipeline, data, config.instance_prompt.as_deref(), &config)?;
        let classes = match &config.prior {
            Some(p) => Some(read_examples(
                pipeline,
                &p.class_data,
                Some(&p.class_prompt),
                &config,
            )?),
            None => None,
        };
        Self::from_examples(
            unet,
            pipeline.scheduler.config(),
            pipeline.vae.config().scaling_factor,
            (instances, classes),
            config,
        )
    }

    /// A run on examples already encoded (the latent distributions of the images, scaled by
    /// `scaling_factor` when sampled, and their text embeddings); `classes`, the
    /// prior-preservation examples, go with a config that has `prior`. The noise schedule and
    /// prediction type come from `scheduler` (trained as a DDPMScheduler on it, as diffusers
    /// does); the device and dtype are the UNet weights'.
    pub fn from_examples(
        unet: (UNet2DConditionConfig, HashMap<String, Tensor>),
        scheduler: &SchedulerConfig,
        scaling_factor: f64,
        (instances, classes): (Vec<TrainingExample>, Option<Vec<TrainingExample>>),
        config: LoraTrainConfig,
    ) -> Result<Self> {
        config.validate()?;
        if classes.is_some() != config.prior.is_some() {
            return Err(Error::invalid(
                "prior-preservation examples go with a config that has `prior`",
            ));
        }
        let (unet_config, frozen) = unet;
        let device = match frozen.values().next() {
            Some(t) => t.device().clone(),
            None => return Err(Error::invalid("the UNet has no weights")),
        };
        if config.mixed_precision == MixedPrecision::Bf16 && !device.is_cpu() {
            return Err(Error::invalid(
                "bf16 mixed precision of LoRA training is CPU autocast: on a GPU, train in f32 \
                 (--mixed-precision no)",
            ));
        }
        let mut rng = Generator::manual_seed(config.seed);
        let targets = config.target_modules.clone();
        let unet = Adapted::new(("unet", "lora_unet_"), frozen, targets, &config, &mut rng)?;
        let examples = |items: Vec<TrainingExample>, seed: u64| -> Result<Examples> {
            let sampler = BatchSampler::new(items.len(), seed)?;
            Ok(Examples { items, sampler })
        };
        let instances = examples(instances, config.seed)?;
        let classes = classes
            .map(|c| examples(c, config.seed.wrapping_add(1)))
            .transpose()?;
        let prediction = PredictionType::read(&mut ConfigReader::new("DDPMScheduler", scheduler))?;
        let scheduler = diffuse_schedulers::from_config("DDPMScheduler", scheduler)?;
        let vars: Vec<Var> = unet.vars().collect();
        let optimizer = AdamW::new(config.optimizer, &vars)?;
        let lr = LrSchedule {
            kind: config.lr_schedule,
            base_lr: config.optimizer.lr,
            warmup_steps: config.warmup_steps,
            total_steps: config.steps as usize,
        };
        Ok(Self {
            config,
            unet_config,
            unet,
            text_encoder: None,
            scheduler,
            prediction,
            scaling_factor,
            instances,
            classes,
            optimizer,
            lr,
            rng,
            step: 0,
            device,
        })
    }

    /// Adapts the text encoder too (`--train_text_encoder` of diffusers' DreamBooth LoRA
    /// script): LoRA on its [`TEXT_ENCODER_TARGETS`] with the run's rank, alpha and learning
    /// rate, from its config and weights (as [`diffuse_pipelines::text_encoder_weights`] reads
    /// them). Captions are then encoded at every step, from the examples' token ids. Call it
    /// before the first step.
    pub fn with_text_encoder(
        mut self,
        config: ClipTextConfig,
        weights: HashMap<String, Tensor>,
    ) -> Result<Self> {
        if self.step > 0 || self.text_encoder.is_some() {
            return Err(Error::invalid(
                "the text encoder is adapted once, before the first step",
            ));
        }
        let classes = self.classes.iter().flat_map(|c| c.items.iter());
        if self
            .instances
            .items
            .iter()
            .chain(classes)
            .any(|e| e.ids.is_none())
        {
            return Err(Error::invalid(
                "text-encoder training needs the token ids of every caption",
            ));
        }
        let targets = TEXT_ENCODER_TARGETS.iter().map(|s| s.to_string()).collect();
        let adapted = Adapted::new(
            ("text_encoder", "lora_te_"),
            weights,
            targets,
            &self.config,
            &mut self.rng,
        )?;
        self.text_encoder = Some((config, adapted));
        self.optimizer = AdamW::new(self.config.optimizer, &self.vars())?;
        Ok(self)
    }

    pub fn config(&self) -> &LoraTrainConfig {
        &self.config
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Training images (instance images; not counting prior-preservation ones).
    pub fn num_images(&self) -> usize {
        self.instances.items.len()
    }

    /// The adapted models: the UNet, then the text encoder when it is trained.
    fn adapted(&self) -> impl Iterator<Item = &Adapted> + '_ {
        std::iter::once(&self.unet).chain(self.text_encoder.as_ref().map(|(_, a)| a))
    }

    /// The adapted layers' module paths (the UNet's, then the text encoder's).
    pub fn modules(&self) -> Vec<&str> {
        self.adapted()
            .flat_map(|m| m.adapters.iter().map(Adapter::module))
            .collect()
    }

    /// Trained parameters (A and B of every adapter).
    pub fn num_parameters(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    fn vars(&self) -> Vec<Var> {
        self.adapted().flat_map(Adapted::vars).collect()
    }

    /// `alpha / r`, the scale of `B · A`.
    fn scale(&self) -> f64 {
        self.config.alpha() / self.config.rank as f64
    }

    /// The UNet with the current updates: built from the frozen weights, each targeted weight
    /// replaced by `W + (alpha / r) · B · A` (a function of the variables, so gradients reach
    /// them).
    pub fn unet(&self) -> Result<UNet2DConditionModel> {
        let vb = self.unet.var_builder(self.scale())?;
        Ok(UNet2DConditionModel::new(vb, &self.unet_config)?)
    }

    /// The text encoder with the current updates, when it is trained.
    pub fn text_encoder(&self) -> Result<Option<ClipTextModel>> {
        let Some((config, adapted)) = &self.text_encoder else {
            return Ok(None);
        };
        let vb = adapted.var_builder(self.scale())?;
        Ok(Some(ClipTextModel::new(vb, config)?))
    }

    /// The UNet's text conditioning `(B, L, D)` for `examples`: their stored embeddings, or
    /// with text-encoder training their captions encoded by the adapted encoder.
    fn conditioning(&self, examples: &[&TrainingExample]) -> Result<Tensor> {
        let Some(encoder) = self.text_encoder()? else {
            let texts: Vec<&Tensor> = examples.iter().map(|e| &e.text).collect();
            return Ok(Tensor::cat(&texts, 0)?);
        };
        let ids = examples
            .iter()
            .map(|e| {
                e.ids
                    .as_ref()
                    .ok_or_else(|| Error::invalid("an example has no token ids"))
            })
            .collect::<Result<Vec<_>>>()?;
        let text = encoder.forward(&Tensor::cat(&ids, 0)?)?.last_hidden_state;
        Ok(text.to_dtype(self.unet_dtype())?)
    }

    fn unet_dtype(&self) -> DType {
        self.unet.frozen[&self.unet.adapters[0].weight].dtype()
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn train_step(&mut self) -> Result<LoraStepStats> {
        let vars = self.vars();
        let autocast = self.config.mixed_precision == MixedPrecision::Bf16;
        let (mut grads, loss) =
            accumulate_gradients(&vars, self.config.grad_accum, autocast, || {
                self.micro_batch_loss()
            })?;
        let norm = check_and_clip(loss, self.step + 1, &mut grads, self.config.clip_grad)?;
        let lr = self.lr.lr_at(self.step as usize);
        self.optimizer.step(&vars, &grads, lr)?;
        self.step += 1;
        Ok(LoraStepStats {
            step: self.step,
            loss,
            lr,
            grad_norm: norm,
        })
    }

    /// The loss of one micro-batch: instance images (and as many class images, weighted, with
    /// prior preservation).
    fn micro_batch_loss(&mut self) -> Result<Tensor> {
        let bs = self.config.batch_size;
        let (flip, scale) = (self.config.random_flip, self.scaling_factor);
        let (x0, picked) = draw(&mut self.instances, bs, flip, scale, &mut self.rng)?;
        let (x0, class_picked) = match &mut self.classes {
            Some(c) => {
                let (cx, picked) = draw(c, bs, flip, scale, &mut self.rng)?;
                (Tensor::cat(&[x0, cx], 0)?, picked)
            }
            None => (x0, Vec::new()),
        };
        let mut examples: Vec<&TrainingExample> =
            picked.iter().map(|&i| &self.instances.items[i]).collect();
        if let Some(c) = &self.classes {
            examples.extend(class_picked.iter().map(|&i| &c.items[i]));
        }
        let text = self.conditioning(&examples)?;
        let n = x0.dim(0)?;
        let noise = self.rng.randn(x0.shape().clone(), &self.device)?;
        let train_steps = self.num_train_timesteps()?;
        let timesteps: Vec<u64> = (0..n)
            .map(|_| (self.rng.next_u32() as u64 * train_steps) >> 32)
            .collect();
        let per_image = self.prediction_loss(
            &self.unet()?,
            &x0,
            &noise,
            &timesteps,
            &text,
            self.config.snr_gamma,
        )?;
        let instance = per_image.narrow(0, 0, bs)?.mean_all()?;
        match &self.config.prior {
            Some(p) => Ok((instance + (per_image.narrow(0, bs, bs)?.mean_all()? * p.weight)?)?),
            None => Ok(instance),
        }
    }

    fn num_train_timesteps(&self) -> Result<u64> {
        let acp = self.scheduler.alphas_cumprod().ok_or_else(|| {
            Error::invalid("LoRA training needs a scheduler with a discrete noise schedule")
        })?;
        Ok(acp.len() as u64)
    }

    /// Per-image MSE `(B,)` of the UNet's prediction for `x0` noised with `noise` at
    /// `timesteps`, Min-SNR-weighted when `snr_gamma` is given.
    fn prediction_loss(
        &self,
        unet: &UNet2DConditionModel,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &[u64],
        text: &Tensor,
        snr_gamma: Option<f64>,
    ) -> Result<Tensor> {
        let acp = self.scheduler.alphas_cumprod().unwrap_or_default();
        let t_f64: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        let noisy = self.scheduler.add_noise(x0, noise, &t_f64)?;
        let target = prediction_target(self.prediction, x0, noise, acp, timesteps)?;
        let weights = snr_gamma
            .map(|g| min_snr_weights(self.prediction, acp, timesteps, g))
            .transpose()?;
        let t = Tensor::from_vec(
            timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            timesteps.len(),
            &self.device,
        )?;
        let pred = unet.forward(&noisy, &t, text)?;
        per_image_mse(&pred, &target, weights.as_deref())
    }

    /// The loss over every instance image at noise and timesteps drawn from `seed` (latents
    /// at their means, no flips): a measure that, unlike the step losses, does not move with
    /// the noise draws, for comparing the weights before and after training.
    pub fn fixed_loss(&self, seed: u64) -> Result<f64> {
        let mut rng = Generator::manual_seed(seed);
        let train_steps = self.num_train_timesteps()?;
        let unet = self.unet()?;
        let items: Vec<&TrainingExample> = self.instances.items.iter().collect();
        let texts = self.conditioning(&items)?;
        let mut total = 0.0;
        for (i, e) in items.iter().enumerate() {
            let x0 = (e.latents[0].mode() * self.scaling_factor)?;
            let noise = rng.randn(x0.shape().clone(), &self.device)?;
            let t = (rng.next_u32() as u64 * train_steps) >> 32;
            let text = texts.narrow(0, i, 1)?;
            let loss = self.prediction_loss(&unet, &x0, &noise, &[t], &text, None)?;
            total += loss.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        }
        Ok(total / self.instances.items.len() as f64)
    }

    /// The adapters as the tensors of a LoRA file in `format`, with the header metadata.
    pub fn lora_tensors(
        &self,
        format: LoraSaveFormat,
    ) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
        let alpha = self.config.alpha();
        let mut tensors = HashMap::new();
        let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut peft = serde_json::Map::new();
        for m in self.adapted() {
            for a in &m.adapters {
                let (down, up) = (
                    a.a.as_tensor().to_dtype(DType::F32)?,
                    a.b.as_tensor().to_dtype(DType::F32)?,
                );
                let module = a.module();
                match format {
                    LoraSaveFormat::Peft => {
                        let key = format!("{}.{module}", m.component);
                        tensors.insert(format!("{key}.lora_A.weight"), down);
                        tensors.insert(format!("{key}.lora_B.weight"), up);
                    }
                    LoraSaveFormat::Kohya => {
                        let key = format!("{}{}", m.kohya_prefix, module.replace('.', "_"));
                        tensors.insert(format!("{key}.lora_down.weight"), down);
                        tensors.insert(format!("{key}.lora_up.weight"), up);
                        tensors.insert(
                            format!("{key}.alpha"),
                            Tensor::new(alpha as f32, &Device::Cpu)?,
                        );
                    }
                }
            }
            // What diffusers' `save_lora_weights(unet_lora_adapter_metadata=...,
            // text_encoder_lora_adapter_metadata=...)` writes: each component's PEFT config
            // under its prefix; `load_lora_weights` builds its `LoraConfig`s from it.
            let c = m.component;
            peft.insert(format!("{c}.r"), json!(self.config.rank));
            peft.insert(format!("{c}.lora_alpha"), json!(alpha));
            peft.insert(format!("{c}.target_modules"), json!(m.targets));
            peft.insert(format!("{c}.init_lora_weights"), json!("gaussian"));
        }
        if format == LoraSaveFormat::Peft {
            let peft = serde_json::Value::Object(peft).to_string();
            metadata.insert("lora_adapter_metadata".into(), peft);
        }
        Ok((tensors, metadata))
    }

    /// Writes the adapters as a LoRA file (atomically).
    pub fn save(&self, path: &Path, format: LoraSaveFormat) -> Result<()> {
        let (tensors, metadata) = self.lora_tensors(format)?;
        diffuse_loaders::save_safetensors_with_metadata(&tensors, Some(metadata), path)
    }
}

/// Adapters on every 2-D weight whose module path ends in a target name.
fn create_adapters(
    component: &str,
    frozen: &HashMap<String, Tensor>,
    targets: &[String],
    r: usize,
    rng: &mut Generator,
    dtype: DType,
    device: &Device,
) -> Result<Vec<Adapter>> {
    let mut names: Vec<&String> = frozen
        .keys()
        .filter(|name| {
            let module = name.strip_suffix(".weight").unwrap_or("");
            targets
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}")))
        })
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(Error::invalid(format!(
            "no layer of the {component} is named {}",
            targets.join(", ")
        )));
    }
    names
        .into_iter()
        .map(|name| {
            let w = &frozen[name];
            let &[out, inp] = w.dims() else {
                return Err(Error::invalid(format!(
                    "{name} has shape {:?}: only linear layers take a LoRA here",
                    w.dims()
                )));
            };
            if r > out.min(inp) {
                return Err(Error::invalid(format!(
                    "rank {r} exceeds {name}'s size {out}x{inp}"
                )));
            }
            // PEFT's "gaussian" init: A ~ N(0, 1/r), B = 0 (the model starts unchanged).
            let a = (rng.randn((r, inp), device)? * (1.0 / r as f64))?.to_dtype(dtype)?;
            let b = Tensor::zeros((out, r), dtype, device)?;
            Ok(Adapter {
                weight: name.clone(),
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
            })
        })
        .collect()
}

/// The images of `dir` (sorted by name) with their captions, encoded.
fn read_examples(
    pipeline: &StableDiffusionPipeline,
    dir: &Path,
    prompt: Option<&str>,
    config: &LoraTrainConfig,
) -> Result<Vec<TrainingExample>> {
    let images = image_files(dir)?;
    if images.is_empty() {
        return Err(Error::invalid(format!(
            "{}: no images ({}) in the folder",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        )));
    }
    let res = config.resolution;
    let vae_dtype = pipeline.vae_dtype;
    images
        .iter()
        .map(|path| {
            let caption = match prompt {
                Some(p) => p.to_string(),
                None => read_caption(path)?,
            };
            let img = image::open(path)
                .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
            let img = fit_image(img, res as u32, Fit::Resize).to_rgb8();
            let mut views = vec![img.clone()];
            if config.random_flip {
                views.push(image::imageops::flip_horizontal(&img));
            }
            let latents = views
                .iter()
                .map(|v| {
                    let x = preprocess_image(v, res, res, &pipeline.device)?.to_dtype(vae_dtype)?;
                    let d = pipeline.vae.encode(&x)?;
                    Ok(DiagonalGaussian {
                        mean: d.mean.to_dtype(DType::F32)?,
                        logvar: d.logvar.to_dtype(DType::F32)?,
                        std: d.std.to_dtype(DType::F32)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let captions = [caption];
            let text = pipeline.text_embeddings(&captions)?;
            let ids = Some(pipeline.prompt_token_ids(&captions)?);
            Ok(TrainingExample { latents, text, ids })
        })
        .collect()
}

/// The training images of a folder (PNG and JPEG, by extension), sorted by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut images: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    images.sort();
    Ok(images)
}

/// The caption of `image.png`: the text of `image.txt` next to it.
fn read_caption(image: &Path) -> Result<String> {
    let path = image.with_extension("txt");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::invalid(format!(
            "{}: no caption ({}: {e}); write one, or train with one instance prompt",
            image.display(),
            path.display()
        ))
    })?;
    Ok(text.trim().to_string())
}

/// The next `n` examples: latents sampled from their distributions (scaled), and the
/// examples' indices.
fn draw(
    set: &mut Examples,
    n: usize,
    flip: bool,
    scaling_factor: f64,
    rng: &mut Generator,
) -> Result<(Tensor, Vec<usize>)> {
    let indices = set.sampler.next_batch(n);
    let mut latents = Vec::with_capacity(n);
    for &i in &indices {
        let e = &set.items[i];
        let view = if flip && rng.rand_vec(1)[0] < 0.5 {
            1
        } else {
            0
        };
        let d = &e.latents[view];
        latents.push((d.sample_with(rng)? * scaling_factor)?);
    }
    Ok((Tensor::cat(&latents, 0)?, indices))
}
