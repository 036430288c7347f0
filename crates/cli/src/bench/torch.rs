//! The PyTorch side of `--compare-torch`: runs `bench/torch_baseline.py` with the same lines,
//! threads and sizes, and reads its timings.

use super::*;

/// Hands the heap memory our lines freed back to the OS before PyTorch runs: glibc keeps freed
/// blocks (up to the 32 MiB mmap threshold main sets) in the heap, and with the large lines
/// the 10+ GiB they held plus PyTorch's own ran the machine out of memory.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(super) fn release_freed_memory() {
    // SAFETY: malloc_trim only returns free pages to the OS; no block in use is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(super) fn release_freed_memory() {}

pub(super) fn torch_baseline(args: &BenchArgs) -> Result<BTreeMap<String, f64>> {
    let python = args
        .python
        .clone()
        .or_else(|| std::env::var("DIFFUSE_TORCH_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let script = super::repo_path("bench/torch_baseline.py");
    let fixtures = super::repo_path("fixtures").to_string_lossy().into_owned();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "\nPyTorch baseline: {python} {} ({threads} threads)",
        script.display()
    );
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args(["--configs", &args.configs.to_string_lossy()])
        .args([
            "--threads",
            &threads.to_string(),
            "--runs",
            &args.runs.to_string(),
        ])
        .args(["--warmup", &args.warmup.to_string(), "--only", &args.only])
        .args([
            "--device",
            if args.device.starts_with("cuda") {
                "cuda"
            } else {
                "cpu"
            },
        ])
        .args([
            "--dtype",
            match args.dtype {
                crate::device::DtypeArg::F32 => "float32",
                crate::device::DtypeArg::F16 => "float16",
                crate::device::DtypeArg::Bf16 => "bfloat16",
            },
        ])
        .args(if args.transformers {
            vec![
                "--transformers".to_string(),
                "--transformer-size".to_string(),
                args.transformer_size.to_string(),
            ]
        } else {
            vec![]
        })
        .args(if args.large { vec!["--large"] } else { vec![] })
        .args(if args.lora_train {
            vec!["--lora-train"]
        } else {
            vec![]
        })
        .args(if args.pipeline {
            vec![
                "--pipeline".to_string(),
                "--fixtures".to_string(),
                fixtures.clone(),
                "--pipeline-steps".to_string(),
                args.pipeline_steps.to_string(),
            ]
        } else {
            vec![]
        })
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {python}"))?;
    if !out.status.success() {
        bail!("the PyTorch baseline failed (pip install torch diffusers transformers, or set --python)");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("{}");
    serde_json::from_str(last).context("parsing the baseline's JSON")
}
