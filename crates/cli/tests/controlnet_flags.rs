//! The ControlNet and VAE-tiling flags of the `diffuse` command beyond the reference cases
//! (which `cases_cli.rs` runs): a bad control image, `--control canny:PHOTO`, `--vae-tiling`.

mod common;

use anyhow::{ensure, Result};
use common::diffuse;
use diffuse_core::testing::fixtures_dir;

/// `--model` the tiny SD pipeline with `--controlnet` the tiny ControlNet, then `flag VALUE`
/// (the control image).
fn tiny_sd_controlnet(flag: &str, value: String) -> Vec<String> {
    let root = fixtures_dir();
    vec![
        "--model".into(),
        root.join("pipelines/tiny_sd").display().to_string(),
        "--controlnet".into(),
        root.join("cases/_models/tiny_controlnet")
            .display()
            .to_string(),
        flag.into(),
        value,
    ]
}

#[test]
fn an_unreadable_control_image_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let not_png = tmp.path().join("notes.png");
    std::fs::write(&not_png, "not a picture").unwrap();
    for (image, says) in [
        (
            "no/such/control.png".to_string(),
            "No such file".to_string(),
        ),
        (
            not_png.display().to_string(),
            // Once: the decoder's text had been printed twice, as message and as source.
            "signature.".to_string(),
        ),
    ] {
        let mut args = vec!["generate".to_string()];
        args.extend(tiny_sd_controlnet("--control-image", image.clone()));
        args.extend([
            "--steps".into(),
            "1".into(),
            "--output".into(),
            tmp.path().join("o.png").display().to_string(),
        ]);
        let (ok, _, err) = diffuse(&args);
        assert!(!ok, "{image} ran");
        assert!(
            err.contains(&format!("reading control image {image}: ")),
            "{err}"
        );
        assert_eq!(err.matches(&says).count(), 1, "{err}");
        assert!(!tmp.path().join("o.png").exists());
    }
}

/// `--control canny:PHOTO` feeds the photo's edges to the ControlNet (the image differs from
/// the run on the photo itself), and `--vae-tiling` decodes a larger-than-tile SDXL image.
#[test]
fn canny_control_and_vae_tiling() -> Result<()> {
    let root = fixtures_dir();
    let tmp = tempfile::tempdir()?;
    let photo = root.join("cases/sdxl_img2img_euler_a/init_image.png");
    let run = |extra: &[String], out: &str| -> Result<image::RgbImage> {
        let mut args: Vec<String> = [
            "generate", "--steps", "2", "--seed", "1", "--prompt", "a boat",
        ]
        .map(String::from)
        .to_vec();
        args.extend_from_slice(extra);
        let path = tmp.path().join(out);
        args.extend(["--output".into(), path.display().to_string()]);
        let (ok, _, err) = diffuse(&args);
        ensure!(ok, "diffuse {} failed:\n{err}", args.join(" "));
        Ok(image::open(&path)?.to_rgb8())
    };
    let sd = |control: String| tiny_sd_controlnet("--control", control);
    let edges = run(&sd(format!("canny:{}", photo.display())), "canny.png")?;
    let raw = run(&sd(photo.display().to_string()), "raw.png")?;
    ensure!(
        edges.dimensions() == (64, 64) && edges != raw,
        "canny changed nothing"
    );

    let xl = vec![
        "--model".to_string(),
        root.join("cases/_models/tiny_sdxl").display().to_string(),
        "--width".into(),
        "160".into(),
        "--height".into(),
        "128".into(),
    ];
    let whole = run(&xl, "whole.png")?;
    let mut tiled_args = xl.clone();
    tiled_args.push("--vae-tiling".into());
    let tiled = run(&tiled_args, "tiled.png")?;
    ensure!(tiled.dimensions() == (160, 128), "{:?}", tiled.dimensions());
    // Tiles blend differently from one decode: the seams show in the values.
    ensure!(tiled != whole, "--vae-tiling changed nothing");
    Ok(())
}
