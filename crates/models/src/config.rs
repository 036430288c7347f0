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

/// The option named `value`, or an error naming `field`, the value and the supported names.
/// `what` says what the value is (`value`, `block type`).
pub(crate) fn choose<T: Copy>(
    context: &str,
    field: &str,
    what: &str,
    value: &str,
    options: &[(&str, T)],
) -> diffuse_core::Result<T> {
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            diffuse_core::Error::config(
                context,
                field,
                format!(
                    "unsupported {what} `{value}` (supported: {})",
                    names.join(", ")
                ),
            )
        })
}

/// Parses the block type names of `field` (`down_block_types`, ...) into `allowed` types,
/// erroring on `field[i]` for the first unsupported one. The `UNetRes` prefix of old configs is
/// dropped, as diffusers does.
pub(crate) fn block_types<T: Copy>(
    context: &str,
    field: &str,
    names: &[String],
    allowed: &[T],
    name_of: fn(&T) -> &'static str,
) -> diffuse_core::Result<Vec<T>> {
    let options: Vec<(&str, T)> = allowed.iter().map(|t| (name_of(t), *t)).collect();
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let bare = n.strip_prefix("UNetRes").unwrap_or(n);
            choose(
                context,
                &format!("{field}[{i}]"),
                "block type",
                bare,
                &options,
            )
        })
        .collect()
}

/// Errors unless `down_block_types`, `up_block_types` and `block_out_channels` have the same,
/// non-zero length.
pub(crate) fn check_block_counts(
    context: &str,
    block_out_channels: &[usize],
    down: &[String],
    up: &[String],
) -> diffuse_core::Result<()> {
    let n = block_out_channels.len();
    if n == 0 {
        return Err(diffuse_core::Error::config(
            context,
            "block_out_channels",
            "must not be empty",
        ));
    }
    for (field, len) in [
        ("down_block_types", down.len()),
        ("up_block_types", up.len()),
    ] {
        if len != n {
            return Err(diffuse_core::Error::config(
                context,
                field,
                format!("has {len} entries but block_out_channels has {n}"),
            ));
        }
    }
    Ok(())
}
