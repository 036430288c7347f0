//! Sets `cfg(x86_simd)` on x86-64 unless the `portable` feature is on: the AVX2 code is
//! compiled only then, and with the feature the crate builds as it does on other
//! architectures (cross targets cannot be installed here, so this keeps that build tested).
fn main() {
    println!("cargo::rustc-check-cfg=cfg(x86_simd)");
    println!("cargo::rerun-if-changed=build.rs");
    let x86_64 = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64");
    if x86_64 && std::env::var_os("CARGO_FEATURE_PORTABLE").is_none() {
        println!("cargo::rustc-cfg=x86_simd");
    }
}
