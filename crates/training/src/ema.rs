//! Exponential moving average of the weights, with the decay schedule of diffusers' `EMAModel`.

use candle_core::{Tensor, Var};
use diffuse_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// `EMAModel` settings (defaults as in diffusers' `train_unconditional.py`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmaConfig {
    /// The largest decay used.
    pub decay: f64,
    pub min_decay: f64,
    /// Optimization steps before averaging starts (decay 0 until then: a plain copy).
    pub update_after_step: u64,
    /// With warm-up the decay is `1 - (1 + step / inv_gamma)^-power`; without it
    /// `(1 + step) / (10 + step)`.
    pub use_ema_warmup: bool,
    pub inv_gamma: f64,
    pub power: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            use_ema_warmup: true,
            inv_gamma: 1.0,
            power: 0.75,
        }
    }
}

impl EmaConfig {
    /// `EMAModel.get_decay` for the `optimization_step`-th update (1-based).
    pub fn decay_at(&self, optimization_step: u64) -> f64 {
        let step = optimization_step.saturating_sub(self.update_after_step + 1) as f64;
        if step <= 0.0 {
            return 0.0;
        }
        let d = if self.use_ema_warmup {
            1.0 - (1.0 + step / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + step) / (10.0 + step)
        };
        d.min(self.decay).max(self.min_decay)
    }

    pub fn validate(&self) -> Result<()> {
        let ok = (0.0..=1.0).contains(&self.decay)
            && (0.0..=1.0).contains(&self.min_decay)
            && self.inv_gamma.is_finite()
            && self.inv_gamma > 0.0
            && self.power.is_finite();
        if !ok {
            return Err(Error::invalid(format!(
                "invalid EMA settings {self:?}: decays must be in [0, 1], inv_gamma positive and \
                 power a finite number"
            )));
        }
        Ok(())
    }
}

/// Shadow copies of the weights.
#[derive(Debug)]
pub struct Ema {
    config: EmaConfig,
    optimization_step: u64,
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts from a copy of `params`.
    pub fn new(config: EmaConfig, params: &[Var]) -> Result<Self> {
        config.validate()?;
        let shadow = params
            .iter()
            .map(|p| p.as_tensor().detach().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            optimization_step: 0,
            shadow,
        })
    }

    pub fn config(&self) -> &EmaConfig {
        &self.config
    }

    pub fn optimization_step(&self) -> u64 {
        self.optimization_step
    }

    /// The averaged weights, in the order of the parameters.
    pub fn shadow(&self) -> &[Tensor] {
        &self.shadow
    }

    /// Restores a checkpointed state; shapes must match.
    pub fn restore(&mut self, optimization_step: u64, shadow: Vec<Tensor>) -> Result<()> {
        if shadow.len() != self.shadow.len()
            || shadow
                .iter()
                .zip(&self.shadow)
                .any(|(a, b)| a.dims() != b.dims())
        {
            return Err(Error::invalid(
                "EMA state does not match the model's parameters",
            ));
        }
        self.optimization_step = optimization_step;
        self.shadow = shadow;
        Ok(())
    }

    /// `EMAModel.step`: `shadow -= (1 - decay) * (shadow - param)` for trainable parameters, a
    /// copy for frozen ones. Returns the decay used.
    pub fn step(&mut self, params: &[Var], trainable: &[bool]) -> Result<f64> {
        if params.len() != self.shadow.len() {
            return Err(Error::invalid(format!(
                "EMA of {} tensors updated with {} parameters",
                self.shadow.len(),
                params.len()
            )));
        }
        self.optimization_step += 1;
        let decay = self.config.decay_at(self.optimization_step);
        for (i, p) in params.iter().enumerate() {
            let p = p.as_tensor().detach();
            self.shadow[i] = if trainable.get(i).copied().unwrap_or(true) {
                let s = &self.shadow[i];
                (s - ((s - &p)? * (1.0 - decay))?)?
            } else {
                p.copy()?
            };
        }
        Ok(decay)
    }
}
