//! Peak device memory of a bench line on a GPU: a thread samples the device's used memory
//! (`cuMemGetInfo`) every millisecond, and a line's peak is the most it saw since the line's
//! reset, less what was in use when sampling started (the CUDA context, other processes).
//! PyTorch's baseline measures its lines the same way, so the two are comparable; a spike
//! shorter than the sampling period can be missed by both.

use anyhow::Result;
use candle_core::Device;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone)]
pub(super) struct Sampler {
    device: Device,
    /// Bytes in use at start, and the highest sample since the last reset.
    idle: u64,
    peak: Arc<AtomicU64>,
    /// Set to restart the peak from the next sample.
    reset: Arc<AtomicBool>,
}

impl Sampler {
    /// A sampler on `device`'s GPU; `None` on the CPU.
    pub(super) fn start(device: &Device) -> Result<Option<Self>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
            let ctx = dev.cuda_stream().context().clone();
            let used = move || -> Option<u64> {
                ctx.bind_to_thread().ok()?;
                let (free, total) = mem_get_info().ok()?;
                Some((total - free) as u64)
            };
            let idle = used().ok_or_else(|| anyhow::anyhow!("cuMemGetInfo failed"))?;
            let s = Self {
                device: device.clone(),
                idle,
                peak: Arc::new(AtomicU64::new(idle)),
                reset: Arc::new(AtomicBool::new(false)),
            };
            let (peak, reset) = (s.peak.clone(), s.reset.clone());
            std::thread::spawn(move || {
                while let Some(now) = used() {
                    if reset.swap(false, Ordering::Relaxed) {
                        peak.store(now, Ordering::Relaxed);
                    }
                    peak.fetch_max(now, Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            });
            return Ok(Some(s));
        }
        let _ = device;
        Ok(None)
    }

    /// Starts a new line's peak (from the next sample on), with the memory earlier lines left
    /// in the allocator's pool handed back first (PyTorch's baseline empties its cache too).
    pub(super) fn reset(&self) {
        if let Err(e) = diffuse_models::ops::release_freed_memory(&self.device) {
            eprintln!("warning: could not release the GPU memory pool: {e}");
        }
        self.reset.store(true, Ordering::Relaxed);
        // The sampler takes the flag within a period; wait for it (a while at most, in case
        // the device stopped answering) so the old peak is gone.
        for _ in 0..250 {
            if !self.reset.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// The line's peak above idle, in MiB.
    pub(super) fn peak_mib(&self) -> f64 {
        let peak = self.peak.load(Ordering::Relaxed).saturating_sub(self.idle);
        peak as f64 / (1024.0 * 1024.0)
    }
}
