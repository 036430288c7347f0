//! Device names as users and tests write them: `cpu`, `cuda` or `cuda:N`.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Opens the device `spec` names (case and surrounding spaces ignored). A CUDA device in a
/// build without CUDA is an error saying so.
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
        bail!("device `{spec}`: this build of diffuse is without CUDA support; use cpu");
    }
    Device::new_cuda(ordinal).with_context(|| format!("opening {spec}"))
}
