//! A small CNN classifier, trained by the project, that scores class-conditional generators
//! (`diffuse eval`): its predicted class says what a generated sample shows, and its last
//! hidden layer is the feature space of the Fréchet distance ([`crate::frechet`]).
//!
//! Layout on disk: `config.json` ([`ClassifierConfig`]) and `model.safetensors`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{Conv2dConfig, Linear, Module, VarBuilder, VarMap};
use diffuse_core::{Error, Generator, Result};
use diffuse_models::ops::conv::Conv2d;
use serde::{Deserialize, Serialize};

use crate::dataset::{BatchSampler, Dataset};
use crate::optimizer::{AdamW, AdamWConfig};

pub const CONFIG_NAME: &str = "config.json";
pub const WEIGHTS_NAME: &str = "model.safetensors";

/// The network: stages of 3×3 convolution → ReLU → 2×2 max-pool, then a hidden linear layer
/// (the features) → ReLU → a linear layer to the class logits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierConfig {
    pub in_channels: usize,
    /// Images are `resolution × resolution`; each stage halves it.
    pub resolution: usize,
    /// The output channels of each convolution stage.
    pub channels: Vec<usize>,
    /// The width of the hidden layer whose activations are the features.
    pub feature_dim: usize,
    pub class_names: Vec<String>,
}

impl ClassifierConfig {
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::invalid(format!("classifier config: {m}")));
        if self.in_channels == 0 || self.feature_dim == 0 {
            return fail("in_channels and feature_dim must be positive".into());
        }
        if self.channels.is_empty() || self.channels.contains(&0) {
            return fail(format!(
                "channels must be one or more positive widths, got {:?}",
                self.channels
            ));
        }
        let factor = 1usize << self.channels.len();
        if self.resolution == 0 || !self.resolution.is_multiple_of(factor) {
            return fail(format!(
                "resolution {} must be a positive multiple of {factor} ({} stages halve it)",
                self.resolution,
                self.channels.len()
            ));
        }
        if self.num_classes() < 2 {
            return fail("at least two classes are needed".into());
        }
        Ok(())
    }

    fn flat_dim(&self) -> usize {
        let side = self.resolution >> self.channels.len();
        self.channels[self.channels.len() - 1] * side * side
    }
}

#[derive(Clone, Debug)]
pub struct Classifier {
    config: ClassifierConfig,
    convs: Vec<Conv2d>,
    fc: Linear,
    head: Linear,
}

impl Classifier {
    /// Weights `convs.{i}.{weight,bias}`, `fc.*`, `head.*`.
    pub fn new(vb: VarBuilder, config: &ClassifierConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self::build(vb, config)?)
    }

    fn build(vb: VarBuilder, config: &ClassifierConfig) -> candle_core::Result<Self> {
        let pad = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut convs = Vec::with_capacity(config.channels.len());
        let mut cin = config.in_channels;
        for (i, &c) in config.channels.iter().enumerate() {
            convs.push(Conv2d::new(cin, c, 3, pad, vb.pp(format!("convs.{i}")))?);
            cin = c;
        }
        Ok(Self {
            fc: candle_nn::linear(config.flat_dim(), config.feature_dim, vb.pp("fc"))?,
            head: candle_nn::linear(config.feature_dim, config.num_classes(), vb.pp("head"))?,
            convs,
            config: config.clone(),
        })
    }

    /// Reads `config.json` and `model.safetensors` from `dir` (weights checked by name and shape).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(CONFIG_NAME);
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::invalid(format!(
                    "{} is not a classifier folder (no {CONFIG_NAME}); train one with `diffuse classifier`",
                    dir.display()
                ))
            } else {
                Error::io(&config_path, e)
            }
        })?;
        let config: ClassifierConfig = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(format!("{}: invalid JSON: {e}", config_path.display())))?;
        config.validate()?;
        let files = vec![dir.join(WEIGHTS_NAME)];
        diffuse_loaders::weights::load_model(&files, DType::F32, device, |vb| {
            Self::build(vb, &config)
        })
    }

    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }

    /// `(B, feature_dim)` features of `(B, C, R, R)` images in `[-1, 1]`.
    pub fn features(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for conv in &self.convs {
            h = conv.forward(&h)?.relu()?.max_pool2d(2)?;
        }
        Ok(self.fc.forward(&h.flatten_from(1)?)?.relu()?)
    }

    /// `(B, classes)` logits from [`Self::features`].
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.head.forward(features)?)
    }

    /// Predicted classes and features (row-major `(N, feature_dim)`) of `images`, in batches.
    pub fn classify(&self, images: &Tensor, batch_size: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let n = images.dim(0)?;
        let mut classes = Vec::with_capacity(n);
        let mut features = Vec::with_capacity(n * self.config.feature_dim);
        for start in (0..n).step_by(batch_size.max(1)) {
            let len = batch_size.max(1).min(n - start);
            let f = self.features(&images.narrow(0, start, len)?)?;
            classes.extend(self.logits(&f)?.argmax(D::Minus1)?.to_vec1::<u32>()?);
            features.extend(f.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((classes, features))
    }
}

/// How [`train_classifier`] trains.
#[derive(Clone, Debug)]
pub struct ClassifierTrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Mirror each training image left to right with probability ½.
    pub random_flip: bool,
    pub seed: u64,
}

impl Default for ClassifierTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 64,
            lr: 1e-3,
            weight_decay: 1e-4,
            random_flip: true,
            seed: 0,
        }
    }
}

/// Progress reported by [`train_classifier`].
#[derive(Clone, Debug)]
pub enum ClassifierEvent {
    /// One optimizer step: `(epoch, step in epoch, steps per epoch, loss)`.
    Step {
        epoch: usize,
        step: usize,
        steps_per_epoch: usize,
        loss: f64,
    },
    /// The end of an epoch: mean training loss and accuracy on the evaluation set.
    Epoch {
        epoch: usize,
        train_loss: f64,
        test_accuracy: f64,
    },
}

/// A trained classifier with its parameters, ready to save.
pub struct TrainedClassifier {
    pub model: Classifier,
    params: Vec<(String, Var)>,
    /// Accuracy on the evaluation set after each epoch.
    pub test_accuracy: Vec<f64>,
}

impl TrainedClassifier {
    /// Writes `config.json` and `model.safetensors` into `dir` (created if missing), each file
    /// through a temporary name so a reader never sees half of one.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let weights: HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        diffuse_loaders::weights::save_safetensors(&weights, &dir.join(WEIGHTS_NAME))?;
        let json = serde_json::to_string_pretty(&self.model.config)
            .map_err(|e| Error::invalid(format!("serializing the config: {e}")))?;
        crate::trainer::write_text(&dir.join(CONFIG_NAME), &json)
    }
}

/// Trains a classifier with AdamW and cross-entropy on `train`, measuring the accuracy on
/// `test` after each epoch. The initialisation, batch order and flips follow `cfg.seed`.
pub fn train_classifier(
    config: &ClassifierConfig,
    train: &Dataset,
    test: &Dataset,
    cfg: &ClassifierTrainConfig,
    device: &Device,
    mut on_event: impl FnMut(&ClassifierEvent),
) -> Result<TrainedClassifier> {
    config.validate()?;
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::invalid("batch size and epochs must be at least 1"));
    }
    for (what, ds) in [("training", train), ("test", test)] {
        check_dataset(config, ds, what)?;
    }
    let varmap = VarMap::new();
    let model = Classifier::new(VarBuilder::from_varmap(&varmap, DType::F32, device), config)?;
    let mut rng = Generator::manual_seed(cfg.seed);
    let params = crate::trainer::init_like_torch(&varmap, device, &mut rng, |_| false)?;
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(
        AdamWConfig {
            lr: cfg.lr,
            beta1: 0.9,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
        &vars,
    )?;
    let mut sampler = BatchSampler::new(train.len(), cfg.seed)?;
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let mut test_accuracy = Vec::with_capacity(cfg.epochs);
    for epoch in 0..cfg.epochs {
        let mut loss_sum = 0.0;
        for step in 0..steps_per_epoch {
            let indices = sampler.next_batch(cfg.batch_size);
            let flips: Vec<bool> = rng
                .rand_vec(indices.len())
                .into_iter()
                .map(|u| cfg.random_flip && u < 0.5)
                .collect();
            let (x, labels) = train.batch(&indices, &flips, device)?;
            let labels = labels.ok_or_else(|| Error::invalid("training images need labels"))?;
            let logits = model.logits(&model.features(&x)?)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                return Err(Error::invalid(format!(
                    "the loss became {loss_value} in epoch {}; try a lower learning rate",
                    epoch + 1
                )));
            }
            let store = loss.backward()?;
            let grads = vars
                .iter()
                .map(|v| match store.get(v.as_tensor()) {
                    Some(g) => Ok(g.detach()),
                    None => v.as_tensor().zeros_like(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            opt.step(&vars, &grads, cfg.lr)?;
            loss_sum += loss_value;
            on_event(&ClassifierEvent::Step {
                epoch,
                step,
                steps_per_epoch,
                loss: loss_value,
            });
        }
        let acc = accuracy(&model, test, device)?;
        test_accuracy.push(acc);
        on_event(&ClassifierEvent::Epoch {
            epoch,
            train_loss: loss_sum / steps_per_epoch as f64,
            test_accuracy: acc,
        });
    }
    Ok(TrainedClassifier {
        model,
        params,
        test_accuracy,
    })
}

fn check_dataset(config: &ClassifierConfig, ds: &Dataset, what: &str) -> Result<()> {
    if ds.is_empty() {
        return Err(Error::invalid(format!("the {what} set holds no images")));
    }
    if ds.resolution() != config.resolution || ds.channels() != config.in_channels {
        return Err(Error::invalid(format!(
            "the {what} images are {}×{}×{}, the classifier takes {}×{}×{}",
            ds.channels(),
            ds.resolution(),
            ds.resolution(),
            config.in_channels,
            config.resolution,
            config.resolution
        )));
    }
    match ds.num_classes() {
        Some(n) if n == config.num_classes() => Ok(()),
        Some(n) => Err(Error::invalid(format!(
            "the {what} set has {n} classes, the classifier {}",
            config.num_classes()
        ))),
        None => Err(Error::invalid(format!(
            "the {what} set has no labels; a classifier needs labelled images"
        ))),
    }
}

/// The share of `ds`'s images the classifier labels correctly.
pub fn accuracy(model: &Classifier, ds: &Dataset, device: &Device) -> Result<f64> {
    let labels = ds
        .labels()
        .ok_or_else(|| Error::invalid("accuracy needs labelled images"))?;
    let (pred, _) = classify_dataset(model, ds, device)?;
    let correct = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    Ok(correct as f64 / ds.len() as f64)
}

/// Predicted classes and features (row-major `(N, feature_dim)`) of every image of `ds`.
pub fn classify_dataset(
    model: &Classifier,
    ds: &Dataset,
    device: &Device,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let chunk = 500;
    let mut classes = Vec::with_capacity(ds.len());
    let mut features = Vec::with_capacity(ds.len() * model.config.feature_dim);
    for start in (0..ds.len()).step_by(chunk) {
        let idx: Vec<usize> = (start..(start + chunk).min(ds.len())).collect();
        let (x, _) = ds.batch(&idx, &[], device)?;
        let (c, f) = model.classify(&x, chunk)?;
        classes.extend(c);
        features.extend(f);
    }
    Ok((classes, features))
}
