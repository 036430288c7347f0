//! The `--lora-train` lines: one LoRA training step of the SD 1.5 UNet (random weights, rank 4
//! on the attention projections, batch 1) at 256² and 512², through `LoraTrainer` as
//! `diffuse train-lora` runs it; `--dtype bf16` runs it with `--mixed-precision bf16`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use diffuse_models::DiagonalGaussian;
use diffuse_schedulers::SchedulerConfig;
use diffuse_training::{LoraTrainConfig, LoraTrainer, MixedPrecision, TrainingExample};

use super::*;

/// [`RandomWeights`] that keeps what it hands out, so that a model built on it leaves its
/// weights behind by name.
#[derive(Clone, Default)]
struct KeptRandomWeights(Arc<Mutex<HashMap<String, Tensor>>>);

impl SimpleBackend for KeptRandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = RandomWeights.get(s, name, h, dtype, dev)?;
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        RandomWeights.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

impl Bench<'_> {
    pub(super) fn lora_train(&mut self) -> Result<()> {
        let sd = self.args.configs.join("runwayml_stable_diffusion_v1_5");
        for px in [256, 512] {
            let name = format!("lora sd15 train step {px}");
            if !self.wanted(&name) {
                continue;
            }
            let dev = &self.device;
            let cfg: UNet2DConditionConfig = read_config(&sd.join("unet/config.json"))?;
            let kept = KeptRandomWeights::default();
            let vb = VarBuilder::from_backend(Box::new(kept.clone()), DType::F32, dev.clone());
            UNet2DConditionModel::new(vb, &cfg)?;
            let weights = std::mem::take(&mut *kept.0.lock().unwrap_or_else(|e| e.into_inner()));
            let scheduler =
                SchedulerConfig::from_file(&sd.join("scheduler/scheduler_config.json"))?;
            let side = px / 8;
            let mean = Tensor::randn(0f32, 1.0, (1, 4, side, side), dev)?;
            let logvar = Tensor::full(-4f32, (1, 4, side, side), dev)?;
            let example = TrainingExample {
                latents: vec![DiagonalGaussian {
                    std: (&logvar * 0.5)?.exp()?,
                    mean,
                    logvar,
                }],
                text: Tensor::randn(0f32, 1.0, (1, 77, 768), dev)?,
                ids: None,
            };
            let mixed_precision = match self.dtype {
                DType::F32 => MixedPrecision::No,
                DType::BF16 => MixedPrecision::Bf16,
                other => {
                    bail!("the LoRA training lines run in f32 or bf16 (autocast), not {other:?}")
                }
            };
            let config = LoraTrainConfig {
                resolution: px,
                steps: 1_000,
                mixed_precision,
                ..Default::default()
            };
            let mut trainer = LoraTrainer::from_examples(
                (cfg, weights),
                &scheduler,
                0.18215,
                (vec![example], None),
                config,
            )?;
            self.time(&name, None, || {
                let s = trainer.train_step()?;
                Ok(Tensor::new(s.loss as f32, &Device::Cpu)?)
            })?;
        }
        Ok(())
    }
}
