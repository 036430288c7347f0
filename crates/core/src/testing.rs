//! Helpers for the data-driven parity tests of every crate.
//!
//! Tests discover their cases in a fixtures directory: `DIFFUSE_FIXTURES` when set, else the
//! repository's `fixtures/`. A case that cannot be run is a failure, never a skip.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("DIFFUSE_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
    }
}

/// The device the device-aware parity tests run on: `DIFFUSE_DEVICE` (`cpu`, `cuda` or
/// `cuda:N`; default the CPU). A GPU device needs a build with CUDA (the crates' `cuda`
/// features) and the GPU itself; without them the tests fail saying so, never fall back.
pub fn test_device() -> Result<Device> {
    let spec = std::env::var("DIFFUSE_DEVICE").unwrap_or_default();
    let spec = if spec.trim().is_empty() {
        "cpu"
    } else {
        spec.as_str()
    };
    crate::device::parse_device(spec).context("DIFFUSE_DEVICE")
}

/// The dtype the device-aware pipeline parity tests load their models in: `DIFFUSE_DTYPE`
/// (`f32`, the default, at each case's own tolerance; `f16` or `bf16`, against the same f32
/// references at [`reduced_precision_tolerance`]).
pub fn test_dtype() -> Result<DType> {
    match std::env::var("DIFFUSE_DTYPE").unwrap_or_default().trim() {
        "" | "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => bail!("DIFFUSE_DTYPE: {other:?} is not f32, f16 or bf16"),
    }
}

/// How far a run in `dtype` may land from an f32 reference, as a fraction of the reference
/// tensor's largest magnitude: 16 unit roundoffs of the dtype (f16: 2⁻¹¹·16 ≈ 0.78%; bf16:
/// 2⁻⁸·16 = 6.25%), about three times the worst the CPU shows over the pipeline cases (5 and 6
/// unit roundoffs). `None` for f32, whose runs keep each fixture's own tolerance.
pub fn reduced_precision_tolerance(dtype: DType) -> Option<f64> {
    let unit_roundoff = match dtype {
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        _ => return None,
    };
    Some(16.0 * unit_roundoff)
}

/// A sub-folder of the fixtures directory; its absence is an error, not a skip.
pub fn fixture_subdir(name: &str) -> PathBuf {
    let d = fixtures_dir().join(name);
    assert!(
        d.is_dir(),
        "fixtures folder {} is missing (set DIFFUSE_FIXTURES?)",
        d.display()
    );
    d
}

/// The case folders directly under `dir` (sorted); none at all is a failure.
pub fn case_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no cases found in {}", dir.display());
    v
}

pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))
}

pub fn get<'a>(m: &'a HashMap<String, Tensor>, k: &str) -> Result<&'a Tensor> {
    m.get(k)
        .with_context(|| format!("tensor `{k}` missing from fixture"))
}

pub fn to_vec_f64(t: &Tensor) -> Result<Vec<f64>> {
    let t = t.to_device(&Device::Cpu)?;
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Checks `|a - b| <= atol + rtol * |b|` elementwise (NaN only matches NaN).
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) -> Result<()> {
    if a.dims() != b.dims() {
        bail!("{what}: shape {:?} != expected {:?}", a.dims(), b.dims());
    }
    let (av, bv) = (to_vec_f64(a)?, to_vec_f64(b)?);
    let mut worst: Option<(f64, usize)> = None;
    for (i, (x, y)) in av.iter().zip(&bv).enumerate() {
        if x.is_nan() || y.is_nan() {
            if x.is_nan() != y.is_nan() {
                bail!("{what}: element {i} is {x}, expected {y}");
            }
            continue;
        }
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        let fails = excess.is_nan() || excess > 0.0;
        if fails && worst.is_none_or(|(w, _)| excess > w || excess.is_nan()) {
            worst = Some((excess, i));
        }
    }
    if let Some((_, i)) = worst {
        bail!(
            "{what}: element {i} is {}, expected {} (atol {atol}, rtol {rtol}; max |diff| {:e})",
            av[i],
            bv[i],
            max_abs_diff(&av, &bv)
        );
    }
    Ok(())
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .filter(|d| !d.is_nan())
        .fold(0.0, f64::max)
}

/// Runs every case, collecting failures, and fails naming each one.
pub fn run_all<T>(
    what: &str,
    cases: &[T],
    name: impl Fn(&T) -> String,
    run: impl Fn(&T) -> Result<()>,
) {
    assert!(!cases.is_empty(), "{what}: no cases found");
    let mut failures = Vec::new();
    for c in cases {
        if let Err(e) = run(c) {
            failures.push(format!("  {}: {e:#}", name(c)));
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{what}: {} cases passed", cases.len());
}
