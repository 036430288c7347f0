//! torch CPU generator parity: every case of `<fixtures>/rng/torch_randn.json`, bit for bit.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use diffuse_core::testing::*;
use diffuse_core::Generator;

fn numel(v: &serde_json::Value) -> Result<usize> {
    v.as_array()
        .context("shape is not a list")?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize).context("bad dim"))
        .product()
}

fn assert_bits(key: &str, ours: &[f32], expected: &Tensor) -> Result<()> {
    let exp = expected.flatten_all()?.to_vec1::<f32>()?;
    if ours.len() != exp.len() {
        bail!("{key}: {} values, expected {}", ours.len(), exp.len());
    }
    for (i, (a, b)) in ours.iter().zip(&exp).enumerate() {
        if a.to_bits() != b.to_bits() {
            bail!("{key}: value {i} is {a:e}, torch gives {b:e}");
        }
    }
    Ok(())
}

/// `..._rand<N>`: a `torch.rand` tensor.
fn is_rand_key(k: &str) -> bool {
    k.rsplit_once("_rand")
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
}

fn run_case(case: &serde_json::Value, t: &HashMap<String, Tensor>) -> Result<()> {
    let seed = case["seed"].as_u64().context("seed")?;
    let keys: Vec<&str> = case["keys"]
        .as_array()
        .context("keys")?
        .iter()
        .filter_map(|k| k.as_str())
        .collect();
    let mut g = Generator::manual_seed(seed);
    if case["sequential"].as_bool() == Some(true) {
        // One generator, several calls: the state (and torch's cached normal) carries over.
        let shapes = case["shapes"].as_array().context("shapes")?;
        if shapes.len() != keys.len() {
            bail!("{} shapes but {} keys", shapes.len(), keys.len());
        }
        for (s, k) in shapes.iter().zip(&keys) {
            assert_bits(k, &g.randn_vec(numel(s)?), get(t, k)?)?;
        }
        return Ok(());
    }
    let n = numel(&case["shape"])?;
    let vals = if keys.iter().all(|k| is_rand_key(k)) {
        g.rand_vec(n)
    } else {
        g.randn_vec(n)
    };
    let sum: f64 = vals.iter().map(|&v| v as f64).sum();
    for k in &keys {
        let exp = get(t, k)?;
        if k.ends_with("_first64") {
            assert_bits(k, &vals[..64], exp)?;
        } else if k.ends_with("_last64") {
            assert_bits(k, &vals[n - 64..], exp)?;
        } else if k.ends_with("_sum") {
            // The f64 sum of all values: any single differing value shows here.
            let e = scalar(exp)?;
            if (sum - e).abs() > 1e-10 * (1.0 + e.abs()) {
                bail!("{k}: sum {sum} != {e}");
            }
        } else if k.ends_with("_sumf32") {
            // torch's f32 reduction order is its own; `_sum` is the exact check.
            let e = scalar(exp)?;
            if (sum - e).abs() > 1e-3 * (1.0 + e.abs()) {
                bail!("{k}: sum {sum} != {e}");
            }
        } else {
            assert_bits(k, &vals, exp)?;
        }
    }
    Ok(())
}

/// A `seed{S}_rand{N}` tensor the index does not list (the shared set stores `torch.rand`
/// outputs without listing them): `torch.rand(N)` of a fresh generator.
fn unlisted_rand_case(key: &str) -> Option<serde_json::Value> {
    let rest = key.strip_prefix("seed")?;
    let (seed, n) = rest.split_once("_rand")?;
    let (seed, n) = (seed.parse::<u64>().ok()?, n.parse::<u64>().ok()?);
    Some(serde_json::json!({"seed": seed, "shape": [n], "keys": [key]}))
}

/// Every index (`*.json`) in `rng/` with its tensors: each listed case is checked, and every
/// stored tensor must be checked by some case (a tensor nothing reads fails the test).
#[test]
fn torch_randn_cases() -> Result<()> {
    let dir = fixture_subdir("rng");
    let mut indexes: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    indexes.sort();
    assert!(!indexes.is_empty(), "no rng index in {}", dir.display());
    for index_path in indexes {
        let index = read_json(&index_path)?;
        let tensors = load_tensors(&index_path.with_extension("safetensors"))?;
        let mut cases: Vec<serde_json::Value> = index["cases"]
            .as_array()
            .with_context(|| format!("{} has no `cases` list", index_path.display()))?
            .clone();
        let listed: std::collections::HashSet<String> = cases
            .iter()
            .flat_map(|c| c["keys"].as_array().cloned().unwrap_or_default())
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect();
        let mut unclaimed = Vec::new();
        for key in tensors.keys().filter(|k| !listed.contains(*k)) {
            match unlisted_rand_case(key) {
                Some(c) => cases.push(c),
                None => unclaimed.push(key.clone()),
            }
        }
        unclaimed.sort();
        assert!(
            unclaimed.is_empty(),
            "{}: tensors no case checks: {unclaimed:?}",
            index_path.display()
        );
        run_all(
            &format!("rng {}", index_path.display()),
            &cases,
            |c| c["keys"].to_string(),
            |c| run_case(c, &tensors),
        );
    }
    Ok(())
}
