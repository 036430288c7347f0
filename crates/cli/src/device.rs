//! `--device` and `--dtype`, shared by every subcommand that runs a model.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::ValueEnum;

/// Weight and compute precision.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// `cpu`, `cuda` or `cuda:N` ([`diffuse_core::device::parse_device`]); a CUDA device is set up
/// for the models ([`diffuse_models::ops::prepare_device`]).
pub fn parse_device(spec: &str) -> Result<Device> {
    let device = diffuse_core::device::parse_device(spec)?;
    diffuse_models::ops::prepare_device(&device).with_context(|| format!("setting up {spec}"))?;
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_or_explain() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(parse_device(" CPU "), Ok(Device::Cpu)));
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device `tpu`"), "{e}");
        assert!(parse_device("cuda:x").is_err());
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:0").unwrap_err().to_string();
            assert!(e.contains("without CUDA support"), "{e}");
        }
    }
}
