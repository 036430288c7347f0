//! Config value shapes shared by the model configs.

use serde::{Deserialize, Serialize};

/// `sample_size`: one side, or `[height, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    Rect([usize; 2]),
}

impl SampleSize {
    /// `(height, width)`.
    pub fn hw(&self) -> (usize, usize) {
        match *self {
            Self::Square(s) => (s, s),
            Self::Rect([h, w]) => (h, w),
        }
    }
}

/// A setting given once for all blocks or once per block (`attention_head_dim: 8` or
/// `attention_head_dim: [5, 10, 20, 20]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for block `i` (callers check [`PerBlock::fits`] first).
    pub fn get(&self, i: usize) -> T {
        match self {
            Self::All(v) => v.clone(),
            Self::Each(v) => v[i.min(v.len().saturating_sub(1))].clone(),
        }
    }

    /// Whether a per-block list has exactly `n` entries.
    pub fn fits(&self, n: usize) -> bool {
        match self {
            Self::All(_) => true,
            Self::Each(v) => v.len() == n,
        }
    }

    pub fn values(&self) -> Vec<T> {
        match self {
            Self::All(v) => vec![v.clone()],
            Self::Each(v) => v.clone(),
        }
    }
}

/// Converts a config error into the error type of `new(vb, &config)`.
pub(crate) fn to_candle(e: diffuse_core::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}
