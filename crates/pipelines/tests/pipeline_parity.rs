//! Parity with the diffusers reference runs in `fixtures/pipelines/outputs/`.
//!
//! Every run file is claimed by a runner chosen by its name's prefix; a run file no runner
//! claims fails the test, so new fixtures cannot be silently ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use diffuse_core::testing::{
    assert_close, fixtures_dir, get, load_tensors, max_abs_diff, read_json, run_all, to_vec_f64,
};
use diffuse_pipelines::{
    load_pipeline, GenerationParams, Img2ImgRequest, InpaintRequest, LoadOptions, Pipeline,
    StableDiffusionPipeline, Text2ImageRequest, Trace,
};

/// Tensors inside the loop (UNet in/out, latents) drift a little over the steps.
const LOOP_ATOL: f64 = 1e-3;
const LOOP_RTOL: f64 = 1e-3;
/// The final image in [0, 1].
const IMAGE_ATOL: f64 = 2e-3;

/// Files of `outputs/` that are inputs or auxiliary data, not runs.
const AUXILIARY: &[&str] = &["prompt_embeds", "text2img_latents"];

/// A runner returns the loop trace and the final (N, H, W, 3) images.
type Runner = fn(&str, &HashMap<String, Tensor>, &serde_json::Value) -> Result<(Trace, Tensor)>;

/// Run-file prefix → runner.
const RUNNERS: &[(&str, Runner)] = &[
    ("text2img_", run_text2img),
    ("img2img_", run_img2img),
    ("inpaint9_", run_inpaint),
    ("inpaint_legacy4_", run_inpaint),
];

fn outputs_dir() -> PathBuf {
    fixtures_dir().join("pipelines/outputs")
}

fn pipelines_dir() -> PathBuf {
    fixtures_dir().join("pipelines")
}

fn load_sd(folder: &str, scheduler: Option<&str>) -> Result<StableDiffusionPipeline> {
    let opts = LoadOptions {
        scheduler: scheduler.map(str::to_string),
        ..Default::default()
    };
    match load_pipeline(&pipelines_dir().join(folder), &opts)? {
        Pipeline::StableDiffusion(p) => Ok(*p),
        other => bail!(
            "{folder}: expected a Stable Diffusion pipeline, got {}",
            other.class_name()
        ),
    }
}

/// The common settings of every run, from `outputs.json`'s `common`.
fn params(common: &serde_json::Value, seed: u64) -> Result<GenerationParams> {
    let s = |k: &str| -> Result<String> {
        Ok(common[k]
            .as_str()
            .with_context(|| format!("common.{k}"))?
            .to_string())
    };
    Ok(GenerationParams {
        prompts: vec![s("prompt")?],
        negative_prompts: vec![s("negative_prompt")?],
        guidance_scale: common["guidance_scale"]
            .as_f64()
            .context("guidance_scale")?,
        steps: common["num_inference_steps"].as_u64().context("steps")? as usize,
        seed,
        record_trace: true,
        ..Default::default()
    })
}

fn run_text2img(
    name: &str,
    data: &HashMap<String, Tensor>,
    info: &serde_json::Value,
) -> Result<(Trace, Tensor)> {
    let class = info[name]["scheduler"]
        .as_str()
        .context("scheduler class")?;
    let pipe = load_sd("tiny_sd", Some(class))?;
    // Every setting our scheduler reads must be what diffusers resolved (the saved file also
    // carries keys of the folder's class that this class ignores).
    let want = read_json(&outputs_dir().join(format!("{name}_scheduler/scheduler_config.json")))?;
    let ours: serde_json::Value = serde_json::from_str(&pipe.scheduler.config().to_json_string())?;
    for (k, v) in want.as_object().context("scheduler config")? {
        if k.starts_with('_') || ours.get(k).is_none() {
            continue;
        }
        if ours.get(k) != Some(v) && !(v.is_number() && ours[k].as_f64() == v.as_f64()) {
            bail!(
                "scheduler config `{k}`: ours {:?}, diffusers {v}",
                ours.get(k)
            );
        }
    }
    let common = &info["common"];
    let req = Text2ImageRequest {
        params: params(common, 0)?,
        height: common["height"].as_u64().map(|v| v as usize),
        width: common["width"].as_u64().map(|v| v as usize),
        latents: Some(get(data, "latents")?.clone()),
    };
    let out = pipe.text_to_image(&req, None)?;
    assert_close("image", &out.images, get(data, "image")?, IMAGE_ATOL, 0.0)?;
    Ok((out.trace.context("no trace recorded")?, out.images))
}

fn init_image() -> Result<image::RgbImage> {
    let p = outputs_dir().join("init_image.png");
    Ok(image::open(&p)
        .with_context(|| p.display().to_string())?
        .to_rgb8())
}

fn run_img2img(
    name: &str,
    data: &HashMap<String, Tensor>,
    info: &serde_json::Value,
) -> Result<(Trace, Tensor)> {
    let run = &info[name];
    let pipe = load_sd("tiny_sd", None)?;
    let req = Img2ImgRequest {
        params: params(
            &info["common"],
            run["generator_seed"].as_u64().context("seed")?,
        )?,
        image: init_image()?,
        strength: run["strength"].as_f64().context("strength")?,
    };
    let out = pipe.img2img(&req, None)?;
    assert_close("image", &out.images, get(data, "image")?, IMAGE_ATOL, 0.0)?;
    Ok((out.trace.context("no trace recorded")?, out.images))
}

fn run_inpaint(
    name: &str,
    data: &HashMap<String, Tensor>,
    info: &serde_json::Value,
) -> Result<(Trace, Tensor)> {
    let run = &info[name];
    let folder = run["pipeline_folder"].as_str().context("pipeline_folder")?;
    let pipe = load_sd(folder, None)?;
    let mask_path = outputs_dir().join("mask.png");
    let mask = image::open(&mask_path)
        .with_context(|| mask_path.display().to_string())?
        .to_luma8();
    let req = InpaintRequest {
        params: params(
            &info["common"],
            run["generator_seed"].as_u64().context("seed")?,
        )?,
        image: init_image()?,
        mask,
        strength: 1.0,
        height: None,
        width: None,
        latents: Some(get(data, "latents")?.clone()),
    };
    let out = pipe.inpaint(&req, None)?;
    assert_close("image", &out.images, get(data, "image")?, IMAGE_ATOL, 0.0)?;
    Ok((out.trace.context("no trace recorded")?, out.images))
}

/// Compares the recorded loop with the fixture's `start_latents`, `unet_*` and `step_*`.
fn check_trace(trace: &Trace, data: &HashMap<String, Tensor>) -> Result<()> {
    let start = trace.start_latents.as_ref().context("no start latents")?;
    assert_close(
        "start_latents",
        start,
        get(data, "start_latents")?,
        LOOP_ATOL,
        LOOP_RTOL,
    )?;
    let want_t = get(data, "unet_timestep")?.to_vec1::<f32>()?;
    let ours_t: Vec<f32> = trace.unet_timesteps.iter().map(|&t| t as f32).collect();
    if want_t != ours_t {
        bail!("UNet timesteps {ours_t:?}, expected {want_t:?}");
    }
    for (what, ours) in [
        ("unet_input", &trace.unet_inputs),
        ("unet_output", &trace.unet_outputs),
        ("step_latents", &trace.step_latents),
    ] {
        let want = get(data, what)?;
        if ours.len() != want.dim(0)? {
            bail!("{what}: {} calls, expected {}", ours.len(), want.dim(0)?);
        }
        for (k, t) in ours.iter().enumerate() {
            assert_close(
                &format!("{what}[{k}]"),
                t,
                &want.get(k)?,
                LOOP_ATOL,
                LOOP_RTOL,
            )?;
        }
    }
    Ok(())
}

fn run_files() -> Vec<PathBuf> {
    let dir = outputs_dir();
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter(|p| !AUXILIARY.contains(&stem(p)))
        .collect();
    v.sort();
    v
}

fn stem(p: &Path) -> &str {
    p.file_stem().and_then(|s| s.to_str()).unwrap_or("")
}

#[test]
fn every_reference_run_matches_diffusers() {
    let info = read_json(&outputs_dir().join("outputs.json")).expect("outputs.json");
    let files = run_files();
    run_all(
        "pipeline runs",
        &files,
        |p| stem(p).to_string(),
        |p| {
            let name = stem(p);
            let Some((_, runner)) = RUNNERS.iter().find(|(prefix, _)| name.starts_with(prefix))
            else {
                bail!(
                    "no runner claims this run file (known prefixes: {:?})",
                    RUNNERS.iter().map(|r| r.0).collect::<Vec<_>>()
                );
            };
            let data = load_tensors(p)?;
            let (trace, images) = runner(name, &data, &info)?;
            check_trace(&trace, &data)?;
            let max_diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
                Ok(max_abs_diff(&to_vec_f64(a)?, &to_vec_f64(b)?))
            };
            let last = trace.step_latents.last().context("no steps")?;
            let want_last = get(&data, "step_latents")?.get(trace.step_latents.len() - 1)?;
            eprintln!(
                "{name}: ok ({} UNet calls; max |diff| final latents {:.1e}, image {:.1e})",
                trace.unet_inputs.len(),
                max_diff(last, &want_last)?,
                max_diff(&images, get(&data, "image")?)?
            );
            Ok(())
        },
    );
}

#[test]
fn prompt_embeddings_match_diffusers() -> Result<()> {
    let data = load_tensors(&outputs_dir().join("prompt_embeds.safetensors"))?;
    let info = read_json(&outputs_dir().join("outputs.json"))?;
    let pipe = load_sd("tiny_sd", None)?;
    let mut warnings = Vec::new();
    let enc = pipe.encode_prompt(&params(&info["common"], 0)?, &mut warnings)?;
    assert!(enc.guided && warnings.is_empty());
    let want = Tensor::cat(
        &[
            get(&data, "negative_prompt_embeds")?,
            get(&data, "prompt_embeds")?,
        ],
        0,
    )?;
    assert_close("embeds", &enc.embeds, &want, 1e-4, 1e-4)
}
