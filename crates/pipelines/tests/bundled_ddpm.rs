//! The bundled class-conditional model (`models/fashion-mnist-ddpm`) against Python diffusers
//! (`fixtures/bundled_ddpm/`, made by `fixtures/generate/bundled_ddpm.py` with diffusers'
//! `UNet2DModel` and schedulers in the loop our pipeline runs): every case of its `cases.json`,
//! so a retrained model is checked again by rerunning the script.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use diffuse_core::testing::{assert_close, fixture_subdir, get, load_tensors, read_json, run_all};
use diffuse_pipelines::{load_pipeline, LoadOptions, Pipeline, UnconditionalRequest};
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn bundled_model_matches_diffusers() {
    let dir = fixture_subdir("bundled_ddpm");
    let index = read_json(&dir.join("cases.json")).unwrap();
    let want = load_tensors(&dir.join("expected.safetensors")).unwrap();
    let model = repo_root().join(index["model"].as_str().expect("cases.json: model"));
    let cases = index["cases"]
        .as_array()
        .expect("cases.json: cases")
        .clone();
    run_all(
        "bundled ddpm",
        &cases,
        |c| c["name"].as_str().unwrap_or("?").to_string(),
        |c| run_case(&model, c, &want),
    );
}

fn run_case(
    model: &Path,
    case: &Value,
    want: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    let known = [
        "name",
        "scheduler",
        "class_labels",
        "steps",
        "guidance_scale",
        "guidance_interval",
        "seed",
    ];
    if let Some(k) = case
        .as_object()
        .context("a case is an object")?
        .keys()
        .find(|k| !known.contains(&k.as_str()))
    {
        bail!("unknown key `{k}`");
    }
    let name = case["name"].as_str().context("name")?;
    let opts = LoadOptions {
        scheduler: case["scheduler"].as_str().map(str::to_string),
        ..Default::default()
    };
    let Pipeline::Unconditional(p) = load_pipeline(model, &opts)? else {
        bail!("{}: not a DDPM folder", model.display());
    };
    let labels: Vec<usize> = serde_json::from_value(case["class_labels"].clone())?;
    let interval = match &case["guidance_interval"] {
        Value::Null => None,
        v => {
            let [lo, hi]: [f64; 2] = serde_json::from_value(v.clone())?;
            Some((lo, hi))
        }
    };
    let req = UnconditionalRequest {
        batch_size: labels.len(),
        steps: case["steps"].as_u64().context("steps")? as usize,
        seed: case["seed"].as_u64().context("seed")?,
        class_labels: Some(labels),
        guidance_scale: case["guidance_scale"].as_f64().context("guidance_scale")?,
        guidance_interval: interval,
        ..Default::default()
    };
    let out = p.generate(&req, None)?;
    // f32 all along: the images differed from diffusers' by at most 1.5e-5 when the fixture
    // was written, far under one 8-bit level (0.0039).
    assert_close(
        &format!("{name}.image"),
        &out.images,
        get(want, &format!("{name}.image"))?,
        1e-4,
        0.0,
    )
}
