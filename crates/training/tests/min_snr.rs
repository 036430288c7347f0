//! Min-SNR-γ weights against diffusers' (`fixtures/training/min_snr.json`, made by
//! `fixtures/generate/min_snr.py`): `compute_snr` and the `--snr_gamma` weighting of its
//! training scripts, on three beta schedules, three prediction types and two values of γ.

use anyhow::{ensure, Context, Result};
use diffuse_core::testing::{fixture_subdir, read_json, run_all};
use diffuse_schedulers::common::PredictionType;
use diffuse_schedulers::config::ConfigReader;
use diffuse_schedulers::SchedulerConfig;
use diffuse_training::loss::min_snr_weights;
use serde_json::Value;

fn floats(v: &Value, key: &str) -> Result<Vec<f64>> {
    v[key]
        .as_array()
        .with_context(|| format!("`{key}` is not a list"))?
        .iter()
        .map(|x| x.as_f64().with_context(|| format!("`{key}` holds {x}")))
        .collect()
}

#[test]
fn min_snr_weights_match_diffusers() {
    let doc = read_json(&fixture_subdir("training").join("min_snr.json")).unwrap();
    let cases = doc["cases"].as_array().expect("`cases` is a list").clone();
    run_all(
        "min-SNR weights",
        &cases,
        |c| c["scheduler_config"].to_string() + &format!(" γ {}", c["snr_gamma"]),
        |c| {
            let map = c["scheduler_config"]
                .as_object()
                .context("scheduler_config")?
                .clone();
            let cfg = SchedulerConfig { map };
            let scheduler = diffuse_schedulers::from_config("DDPMScheduler", &cfg)?;
            let prediction = PredictionType::read(&mut ConfigReader::new("DDPMScheduler", &cfg))?;
            let acp = scheduler.alphas_cumprod().context("no alphas_cumprod")?;
            let timesteps: Vec<u64> = floats(c, "timesteps")?.iter().map(|&t| t as u64).collect();
            let gamma = c["snr_gamma"].as_f64().context("snr_gamma")?;
            let ours = min_snr_weights(prediction, acp, &timesteps, gamma)?;
            let want = floats(c, "weights")?;
            ensure!(
                ours.len() == want.len(),
                "{} weights, want {}",
                ours.len(),
                want.len()
            );
            for ((t, a), b) in timesteps.iter().zip(&ours).zip(&want) {
                // diffusers computes the SNR in f32: a relative tolerance of a few f32 ulps.
                ensure!(
                    a.is_finite() && (a - b).abs() <= 1e-5 * b.abs() + 1e-12,
                    "timestep {t}: weight {a}, diffusers {b}"
                );
            }
            Ok(())
        },
    );
}
