//! The peak memory of loading: the weights are copied out of the memory-mapped file, and the
//! pages of the file a load touched must not stay in the process's resident set on top of the
//! copies (for the 22.7 GiB of Flux-dev in bf16 that would double the peak).
//!
//! The default run writes a 64 MiB file; point `DIFFUSE_LOAD_MEMORY_FILE` at a safetensors
//! file to measure that one instead (`-- --nocapture` prints the figures).

use candle_core::{DType, Device, Tensor};

fn status_mib(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[test]
#[cfg(target_os = "linux")]
fn loading_keeps_only_the_copies_resident() {
    let tmp = std::env::temp_dir().join(format!("diffuse-load-memory-{}", std::process::id()));
    let path = match std::env::var("DIFFUSE_LOAD_MEMORY_FILE") {
        Ok(p) => std::path::PathBuf::from(p),
        Err(_) => {
            std::fs::create_dir_all(&tmp).unwrap();
            let tensors = (0..16)
                .map(|i| {
                    let t = Tensor::randn(0f32, 1.0, (1024, 1024), &Device::Cpu)?
                        .to_dtype(DType::BF16)?;
                    Ok((format!("w{i}"), t.to_dtype(DType::F32)?))
                })
                .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()
                .unwrap();
            let p = tmp.join("weights.safetensors");
            diffuse_loaders::save_safetensors(&tensors, &p).unwrap();
            p
        }
    };
    let bytes = std::fs::metadata(&path).unwrap().len() as f64 / (1 << 20) as f64;
    // Reset the peak (VmHWM) to the current resident set, so that it measures the load alone.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_mib("VmRSS:");
    let backend = diffuse_loaders::CheckedBackend::open(std::slice::from_ref(&path)).unwrap();
    let names = backend.stored_names();
    let tensors = diffuse_loaders::load_model(
        std::slice::from_ref(&path),
        DType::F32,
        &Device::Cpu,
        |vb| {
            names
                .iter()
                .map(|n| vb.get_unchecked(n))
                .collect::<candle_core::Result<Vec<_>>>()
        },
    )
    .unwrap();
    let (rss, peak) = (status_mib("VmRSS:"), status_mib("VmHWM:"));
    eprintln!(
        "file {bytes:.0} MiB ({} tensors): RSS before {before:.0}, after {rss:.0}, peak {peak:.0} MiB",
        tensors.len()
    );
    // Above the resident set with the copies (or before them, when they reused freed heap),
    // the peak may hold a few pages of the file, not the whole file as it did before the
    // pages were released.
    let excess = peak - rss.max(before);
    assert!(
        excess < 0.25 * bytes,
        "loading {bytes:.0} MiB peaked {excess:.0} MiB above the loaded copies"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
