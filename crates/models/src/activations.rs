//! The activation functions diffusers configs name in `act_fn`.

use candle_core::{Result, Tensor};

/// An activation named in a config (`act_fn`, `time_embedding_act_fn`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Mish,
    Gelu,
    Relu,
}

impl Activation {
    /// Parses a diffusers activation name (`get_activation`); `None` for an unknown one.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "mish" => Some(Self::Mish),
            "gelu" => Some(Self::Gelu),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    /// Like [`Activation::from_name`], with an error naming the config field and the value.
    pub fn parse(name: &str, context: &str, field: &str) -> diffuse_core::Result<Self> {
        Self::from_name(name).ok_or_else(|| {
            diffuse_core::Error::config(
                context,
                field,
                format!(
                    "unsupported activation `{name}` (supported: silu, swish, mish, gelu, relu)"
                ),
            )
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => xs.silu(),
            // mish(x) = x * tanh(softplus(x)); softplus written stably as max(x,0) + log1p(exp(-|x|)).
            Self::Mish => {
                let softplus = (xs.relu()? + (xs.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                xs * softplus.tanh()?
            }
            // torch's default GELU is the exact (erf) one.
            Self::Gelu => crate::ops::activation::gelu(xs),
            Self::Relu => xs.relu(),
        }
    }
}
