//! Training `UNet2DModel`s (DDPM) from scratch on image datasets: data loading, AdamW with
//! warm-up + cosine schedule, EMA, atomic checkpoints with exact resumption, sample grids,
//! metrics and a loss curve, and export as a diffusers `DDPMPipeline` folder; and the
//! evaluation of class-conditional models with a small CNN classifier trained here; and LoRA
//! fine-tuning of Stable Diffusion UNets (`lora`).

pub mod checkpoint;
pub mod classifier;
pub mod dataset;
pub mod ema;
pub mod eval;
pub mod frechet;
pub mod lora;
pub mod loss;
pub mod optimizer;
pub mod plot;
pub mod sample;
pub mod trainer;

pub use dataset::{Dataset, DatasetKind, DatasetOptions, Fit, Split};
pub use ema::EmaConfig;
pub use lora::{LoraSaveFormat, LoraTrainConfig, LoraTrainer, PriorPreservation, TrainingExample};
pub use optimizer::{AdamWConfig, LrScheduleKind};
pub use sample::SampleSettings;
pub use trainer::{Event, MixedPrecision, StepStats, TrainConfig, Trainer};
