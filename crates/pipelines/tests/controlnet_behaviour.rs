//! ControlNet properties that do not need a reference run: a ControlNet that does not fit the
//! UNet is an error naming both, control images of another size are resized, and the
//! residuals scale linearly (scale 0 or a guidance window outside the run change nothing; two
//! halves of a scale make the whole).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use candle_core::Tensor;
use diffuse_core::testing::{fixtures_dir, max_abs_diff, to_vec_f64};
use diffuse_models::ControlNetModel;
use diffuse_pipelines::{
    load_controlnet, load_pipeline, ControlNetRequest, ControlNetUnit, GenerationParams,
    LoadOptions, Pipeline, StableDiffusionPipeline, Text2ImageRequest,
};

fn sd() -> Result<StableDiffusionPipeline> {
    let opts = LoadOptions {
        scheduler: Some("DDIMScheduler".into()),
        ..Default::default()
    };
    match load_pipeline(&fixtures_dir().join("pipelines/tiny_sd"), &opts)? {
        Pipeline::StableDiffusion(p) => Ok(*p),
        _ => bail!("tiny_sd is a Stable Diffusion pipeline"),
    }
}

fn controlnet(rel: &str) -> Result<Arc<ControlNetModel>> {
    Ok(load_controlnet(
        &fixtures_dir().join(rel),
        &LoadOptions::default(),
    )?)
}

fn control_image() -> Result<image::RgbImage> {
    let p: PathBuf = fixtures_dir().join("cases/controlnet_sd_ddim/control.png");
    Ok(image::open(p)?.to_rgb8())
}

/// The image of a 4-step 64x64 run with these ControlNets (none: plain text-to-image).
fn run(pipe: &StableDiffusionPipeline, units: Vec<ControlNetUnit>) -> Result<Tensor> {
    let req = Text2ImageRequest {
        params: GenerationParams {
            prompts: vec!["a lighthouse".into()],
            guidance_scale: 6.0,
            steps: 4,
            seed: 3,
            controlnet: (!units.is_empty()).then_some(ControlNetRequest {
                units,
                guess_mode: false,
            }),
            ..Default::default()
        },
        height: Some(64),
        width: Some(64),
        latents: None,
    };
    Ok(pipe.text_to_image(&req, None)?.images)
}

fn diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(max_abs_diff(&to_vec_f64(a)?, &to_vec_f64(b)?))
}

#[test]
fn an_sdxl_controlnet_on_an_sd_unet_is_an_error_naming_both() -> Result<()> {
    let pipe = sd()?;
    let net = controlnet("cases/_models/tiny_controlnet_sdxl")?;
    let unit = ControlNetUnit::new(net, "tiny_controlnet_sdxl", control_image()?);
    let e = match run(&pipe, vec![unit]) {
        Ok(_) => bail!("an SDXL ControlNet ran on an SD UNet"),
        Err(e) => e.to_string(),
    };
    ensure!(
        e.contains("tiny_controlnet_sdxl") && e.contains("SDXL") && e.contains("SD 1.x/2.x"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_non_finite_scale_or_a_bad_window_is_an_error_naming_the_controlnet() -> Result<()> {
    let pipe = sd()?;
    let net = controlnet("cases/_models/tiny_controlnet")?;
    let unit = || -> Result<ControlNetUnit> {
        Ok(ControlNetUnit::new(
            net.clone(),
            "canny-net",
            control_image()?,
        ))
    };
    let (mut nan, mut window) = (unit()?, unit()?);
    nan.scale = f64::NAN;
    (window.guidance_start, window.guidance_end) = (0.6, 0.4);
    for (u, says) in [
        (nan, "conditioning scale must be a finite number"),
        (window, "0 <= start < end <= 1"),
    ] {
        let e = match run(&pipe, vec![u]) {
            Ok(_) => bail!("ran with a bad ControlNet setting ({says})"),
            Err(e) => e.to_string(),
        };
        ensure!(e.contains("canny-net") && e.contains(says), "{e}");
    }
    Ok(())
}

#[test]
fn residuals_scale_linearly_and_windows_switch_them_off() -> Result<()> {
    let pipe = sd()?;
    let net = controlnet("cases/_models/tiny_controlnet")?;
    let image = control_image()?;
    let unit = |scale: f64| {
        let mut u = ControlNetUnit::new(net.clone(), "tiny_controlnet", image.clone());
        u.scale = scale;
        u
    };
    let plain = run(&pipe, vec![])?;
    let full = run(&pipe, vec![unit(0.9)])?;
    ensure!(
        diff(&full, &plain)? > 1e-3,
        "the ControlNet changes nothing"
    );
    ensure!(
        diff(&run(&pipe, vec![unit(0.0)])?, &plain)? == 0.0,
        "scale 0 changed the image"
    );
    let halves = run(&pipe, vec![unit(0.45), unit(0.45)])?;
    let d = diff(&halves, &full)?;
    ensure!(
        d < 1e-4,
        "two ControlNets at 0.45 differ from one at 0.9 by {d}"
    );
    let mut late = unit(0.9);
    late.guidance_start = 0.95;
    ensure!(
        diff(&run(&pipe, vec![late])?, &plain)? == 0.0,
        "a window after the last step changed the image"
    );
    Ok(())
}

#[test]
fn control_images_of_another_size_are_resized() -> Result<()> {
    let pipe = sd()?;
    let net = controlnet("cases/_models/tiny_controlnet")?;
    let big = image::imageops::resize(
        &control_image()?,
        96,
        80,
        image::imageops::FilterType::Nearest,
    );
    let out = run(
        &pipe,
        vec![ControlNetUnit::new(net, "tiny_controlnet", big)],
    )?;
    ensure!(out.dims() == [1, 64, 64, 3], "{:?}", out.dims());
    Ok(())
}
