//! Sets `cfg(x86_simd)` on x86-64 unless the `portable` feature is on: the AVX2 code is
//! compiled only then, and with the feature the crate builds as it does on other
//! architectures (cross targets cannot be installed here, so this keeps that build tested).
//!
//! With the `cuda` feature it also compiles `src/ops/cuda/kernels.cu` to PTX with `nvcc`
//! (`$NVCC`, else on `PATH`) for `CUDA_COMPUTE_CAP` (default 80), as candle's own kernels are.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(x86_simd)");
    println!("cargo::rerun-if-changed=build.rs");
    let x86_64 = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64");
    if x86_64 && std::env::var_os("CARGO_FEATURE_PORTABLE").is_none() {
        println!("cargo::rustc-cfg=x86_simd");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_ptx();
    }
}

fn compile_ptx() {
    let src = "src/ops/cuda/kernels.cu";
    println!("cargo::rerun-if-changed={src}");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(out.join("kernels.ptx"))
        .arg(src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on {src} ({s})"),
        Err(e) => {
            panic!("the `cuda` feature needs nvcc ({nvcc}: {e}); scripts/build-cuda.sh installs it")
        }
    }
}
