//! Whole-pipeline reference runs made by Python diffusers: every `cases/<name>/` folder under the
//! fixtures root (`DIFFUSE_FIXTURES`, default the repository's `fixtures/`; folders starting with
//! `_` hold shared models and adapters). Each case is run by the runner its `pipeline_class`
//! names, through the library API as a user would call it, and every tensor in its
//! `expected.safetensors` is compared. A case no runner claims, or that fails to run, fails the
//! test with its name.

mod controlnet;
mod dit;
mod flux;
mod harness;
mod sd;
mod sd3;
mod sdxl;

use anyhow::{bail, Result};
use diffuse_core::testing::{case_dirs, fixture_subdir, fixtures_dir, run_all};
use harness::{Case, Produced};

type Runner = fn(&Case) -> Result<Produced>;

/// diffusers pipeline class -> runner.
const RUNNERS: &[(&str, Runner)] = &[
    ("StableDiffusionPipeline", sd::run),
    ("StableDiffusion3Pipeline", sd3::run),
    ("FluxPipeline", flux::run),
    ("DiTPipeline", dit::run),
    ("StableDiffusionXLPipeline", sdxl::run),
    ("StableDiffusionXLImg2ImgPipeline", sdxl::run),
    ("StableDiffusionXLInpaintPipeline", sdxl::run),
    ("StableDiffusionControlNetPipeline", controlnet::run),
    ("StableDiffusionXLControlNetPipeline", controlnet::run),
];

#[test]
fn every_case_matches_diffusers() {
    let root = fixtures_dir();
    let dirs: Vec<_> = case_dirs(&fixture_subdir("cases"))
        .into_iter()
        .filter(|d| {
            !d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('_'))
        })
        .collect();
    run_all(
        "pipeline cases",
        &dirs,
        |d| {
            d.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        },
        |d| {
            let case = Case::load(d, &root)?;
            let Some((_, runner)) = RUNNERS.iter().find(|(c, _)| *c == case.class) else {
                bail!(
                    "no runner for pipeline class {} (runners: {:?})",
                    case.class,
                    RUNNERS.iter().map(|r| r.0).collect::<Vec<_>>()
                );
            };
            let got = runner(&case)?;
            let summary = case.compare(&got)?;
            eprintln!("{}: ok (max |diff|: {summary})", case.name);
            Ok(())
        },
    );
}
