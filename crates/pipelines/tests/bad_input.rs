//! Bad requests and broken pipeline folders give clear errors, never panics.

use std::path::{Path, PathBuf};

use diffuse_core::testing::fixtures_dir;
use diffuse_pipelines::{
    load_pipeline, GenerationParams, LoadOptions, Pipeline, StableDiffusionPipeline,
    Text2ImageRequest,
};

fn tiny_sd() -> PathBuf {
    fixtures_dir().join("pipelines/tiny_sd")
}

fn load_sd() -> StableDiffusionPipeline {
    match load_pipeline(&tiny_sd(), &LoadOptions::default()).expect("tiny_sd loads") {
        Pipeline::StableDiffusion(p) => *p,
        _ => panic!("tiny_sd is a Stable Diffusion pipeline"),
    }
}

fn request(steps: usize, width: usize) -> Text2ImageRequest {
    Text2ImageRequest {
        params: GenerationParams {
            prompts: vec!["a photo".into()],
            steps,
            ..Default::default()
        },
        height: Some(64),
        width: Some(width),
        latents: None,
    }
}

/// A copy of the tiny pipeline (without weights where not needed) in a fresh temp folder.
fn temp_copy(name: &str, skip: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("diffuse-bad-input-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&tiny_sd(), &dst, skip);
    dst
}

fn copy_dir(src: &Path, dst: &Path, skip: &str) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_name() == skip {
            continue;
        }
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &to, skip);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

#[test]
fn width_not_multiple_of_8_is_rejected() {
    let err = load_sd()
        .text_to_image(&request(3, 65), None)
        .err()
        .expect("65 wide must fail")
        .to_string();
    assert!(
        err.contains("multiples of 8") && err.contains("65x64"),
        "{err}"
    );
}

#[test]
fn zero_steps_is_rejected() {
    let err = load_sd()
        .text_to_image(&request(0, 64), None)
        .err()
        .expect("0 steps must fail")
        .to_string();
    assert!(err.contains("steps"), "{err}");
}

#[test]
fn a_nan_or_infinite_guidance_scale_or_eta_is_rejected() {
    let pipe = load_sd();
    for (guidance_scale, eta, says) in [
        (
            f64::NAN,
            0.0,
            "guidance_scale must be a finite number, got NaN",
        ),
        (7.5, f64::INFINITY, "eta must be a finite number, got inf"),
    ] {
        let mut req = request(3, 64);
        (req.params.guidance_scale, req.params.eta) = (guidance_scale, eta);
        let err = pipe
            .text_to_image(&req, None)
            .err()
            .expect("a non-finite setting must fail")
            .to_string();
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn missing_component_folder_is_named() {
    let dir = temp_copy("missing-vae", "vae");
    let err = load_pipeline(&dir, &LoadOptions::default())
        .err()
        .expect("no vae/ must fail")
        .to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err.contains("`vae`"), "{err}");
}

#[test]
fn unknown_class_name_lists_the_supported_ones() {
    let dir = temp_copy("unknown-class", "unet");
    let index = dir.join("model_index.json");
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace("\"StableDiffusionPipeline\"", "\"KandinskyPipeline\"");
    std::fs::write(&index, text).unwrap();
    let err = load_pipeline(&dir, &LoadOptions::default())
        .err()
        .expect("unknown class must fail")
        .to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        err.contains("KandinskyPipeline") && err.contains("StableDiffusionImg2ImgPipeline"),
        "{err}"
    );
}

#[test]
fn unknown_scheduler_is_an_error() {
    let opts = LoadOptions {
        scheduler: Some("NoSuchSampler".into()),
        ..Default::default()
    };
    let err = load_pipeline(&tiny_sd(), &opts)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("NoSuchSampler"), "{err}");
}

#[test]
fn seeded_generation_is_deterministic_and_batches() {
    let pipe = load_sd();
    let mut req = request(2, 64);
    req.params.num_images_per_prompt = 2;
    req.params.seed = 7;
    let mut steps_seen = 0;
    let mut cb = |info: diffuse_pipelines::StepInfo<'_>| {
        steps_seen += 1;
        assert_eq!(info.latents.dims(), [2, 4, 8, 8]);
        Ok(())
    };
    let a = pipe.text_to_image(&req, Some(&mut cb)).unwrap();
    assert!(steps_seen >= 2);
    let b = pipe.text_to_image(&req, None).unwrap();
    assert_eq!(a.images.dims(), [2, 64, 64, 3]);
    assert_eq!(a.rgb.len(), 2);
    let diff = (&a.images - &b.images)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn long_prompts_are_truncated_with_a_warning() {
    let pipe = load_sd();
    let mut req = request(1, 64);
    req.params.prompts = vec!["horse ".repeat(100)];
    let out = pipe.text_to_image(&req, None).unwrap();
    assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
    assert!(out.warnings[0].contains("truncated"));
}

/// A DDPM/DDIM pipeline folder assembled from the model and scheduler fixtures.
fn unconditional_folder(class: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("diffuse-uncond-{class}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&fixtures_dir().join("models/unet2d"), &dst.join("unet"), "");
    copy_dir(
        &fixtures_dir().join("schedulers/ddpm_linear_eps"),
        &dst.join("scheduler"),
        "",
    );
    std::fs::write(
        dst.join("model_index.json"),
        format!(r#"{{"_class_name": "{class}", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}}"#),
    )
    .unwrap();
    dst
}

#[test]
fn unconditional_pipelines_generate_images_in_range() {
    for (class, scheduler) in [
        ("DDPMPipeline", "DDPMScheduler"),
        ("DDIMPipeline", "DDIMScheduler"),
    ] {
        let dir = unconditional_folder(class);
        let pipe = match load_pipeline(&dir, &LoadOptions::default()).unwrap() {
            Pipeline::Unconditional(p) => p,
            _ => panic!("{class} is unconditional"),
        };
        assert_eq!(pipe.scheduler.class_name(), scheduler);
        let req = diffuse_pipelines::UnconditionalRequest {
            batch_size: 2,
            steps: 3,
            ..Default::default()
        };
        let out = pipe.generate(&req, None).unwrap();
        let (c, h, w) = pipe.image_shape();
        assert_eq!(out.images.dims(), [2, h, w, c]);
        let min = out.images.min_all().unwrap().to_scalar::<f32>().unwrap();
        let max = out.images.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((0.0..=1.0).contains(&min) && (0.0..=1.0).contains(&max));
        assert!(pipe
            .generate(
                &diffuse_pipelines::UnconditionalRequest { steps: 0, ..req },
                None
            )
            .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
