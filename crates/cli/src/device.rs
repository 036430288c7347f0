//! `--device` and `--dtype`, shared by every subcommand that runs a model.

use anyhow::{bail, Context, Result};
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

/// `cpu`, `cuda` or `cuda:N`; a CUDA device in a build without CUDA is an error saying so.
pub fn parse_device(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("bad device `{spec}`; use cpu or cuda:N"))?,
        None => bail!("unknown device `{spec}`; use cpu or cuda:N"),
    };
    if !candle_core::utils::cuda_is_available() {
        bail!(
            "device `{spec}`: this diffuse binary was built without CUDA support; use --device cpu"
        );
    }
    let device = Device::new_cuda(ordinal).with_context(|| format!("opening {spec}"))?;
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
