//! LoRA training on the tiny Stable Diffusion pipeline: the loss at fixed noise goes down, the
//! saved file (PEFT and Kohya layouts) reloads through the normal LoRA loader into the same
//! UNet the trainer trained, and bad input is refused by name.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffuse_pipelines::StableDiffusionPipeline;
use diffuse_pipelines::{load_pipeline, unet_weights, LoadOptions, LoraSpec, Pipeline};
use diffuse_training::{LoraSaveFormat, LoraTrainConfig, LoraTrainer, PriorPreservation};

fn tiny_sd() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines/tiny_sd")
}

fn sd(opts: &LoadOptions) -> Box<StableDiffusionPipeline> {
    match load_pipeline(&tiny_sd(), opts).unwrap() {
        Pipeline::StableDiffusion(p) => p,
        _ => unreachable!("tiny_sd is a Stable Diffusion folder"),
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora_training")
}

/// The four 64×64 training pictures of `fixtures/lora_training/data` (a red square in a
/// different corner of each), with their captions or without.
fn copy_images(dir: &Path, captions: bool) {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(fixtures().join("data")).unwrap() {
        let p = e.unwrap().path();
        if captions || p.extension().is_some_and(|x| x == "png") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
}

fn config(steps: u64) -> LoraTrainConfig {
    LoraTrainConfig {
        rank: 4,
        resolution: 64,
        batch_size: 2,
        steps,
        seed: 3,
        optimizer: diffuse_training::AdamWConfig {
            lr: 5e-3,
            ..LoraTrainConfig::default().optimizer
        },
        ..Default::default()
    }
}

fn trainer(data: &Path, config: LoraTrainConfig) -> diffuse_core::Result<LoraTrainer> {
    let opts = LoadOptions::default();
    let p = sd(&opts);
    LoraTrainer::new(&p, unet_weights(&tiny_sd(), &opts)?, data, config)
}

/// A fixed UNet input for the tiny model: latents (1, 4, 8, 8), timestep, text (1, 77, 32).
fn unet_input() -> (Tensor, Tensor, Tensor) {
    let mut g = diffuse_core::Generator::manual_seed(11);
    let x = g.randn((1, 4, 8, 8), &Device::Cpu).unwrap();
    let text = g.randn((1, 77, 32), &Device::Cpu).unwrap();
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    (x, t, text)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn training_lowers_the_loss_and_the_saved_lora_reloads_into_the_trained_unet() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures().join("data");
    let mut t = trainer(&data, config(80)).unwrap();
    // The attention projections of the tiny UNet's two transformer blocks (down, mid, up).
    assert!(t
        .modules()
        .iter()
        .all(|m| ["to_q", "to_k", "to_v", "to_out.0"]
            .iter()
            .any(|s| m.ends_with(s))));
    assert!(!t.modules().is_empty());
    let before = t.fixed_loss(5).unwrap();
    let (x, ts, text) = unet_input();
    let base = t.unet().unwrap().forward(&x, &ts, &text).unwrap();
    for _ in 0..80 {
        let s = t.train_step().unwrap();
        assert!(s.loss.is_finite() && s.grad_norm > 0.0, "{s:?}");
    }
    let after = t.fixed_loss(5).unwrap();
    eprintln!("loss at fixed noise: {before} before, {after} after 80 steps");
    assert!(
        after < 0.9 * before,
        "the loss at fixed noise went from {before} to {after}"
    );
    let trained = t.unet().unwrap().forward(&x, &ts, &text).unwrap();
    assert!(
        max_abs_diff(&trained, &base) > 1e-3,
        "training left the UNet unchanged"
    );

    for (format, name) in [
        (LoraSaveFormat::Peft, "peft.safetensors"),
        (LoraSaveFormat::Kohya, "kohya.safetensors"),
    ] {
        let file = tmp.path().join(name);
        t.save(&file, format).unwrap();
        let opts = LoadOptions {
            loras: vec![LoraSpec {
                path: file.clone(),
                scale: 1.0,
            }],
            ..Default::default()
        };
        let patched = sd(&opts).unet.forward(&x, &ts, &text).unwrap();
        let d = max_abs_diff(&patched, &trained);
        assert!(
            d < 1e-5,
            "{name}: reloaded UNet differs from the trained one by {d}"
        );
    }
}

#[test]
fn dreambooth_with_prior_preservation_trains_on_both_sets() {
    let tmp = tempfile::tempdir().unwrap();
    let (inst, class) = (tmp.path().join("inst"), tmp.path().join("class"));
    // No captions: the instance prompt stands for all of them.
    copy_images(&inst, false);
    copy_images(&class, false);
    let cfg = LoraTrainConfig {
        instance_prompt: Some("a photo of sks square".into()),
        prior: Some(PriorPreservation {
            class_data: class,
            class_prompt: "a photo of a square".into(),
            weight: 1.0,
        }),
        ..config(3)
    };
    let mut t = trainer(&inst, cfg).unwrap();
    for _ in 0..3 {
        assert!(t.train_step().unwrap().loss.is_finite());
    }
}

#[test]
fn bad_input_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    copy_images(&data, false);
    let err = |cfg: LoraTrainConfig, dir: &Path| match trainer(dir, cfg) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    // An image without its caption file (and no instance prompt).
    let e = err(config(1), &data);
    assert!(e.contains("img0.png") && e.contains("img0.txt"), "{e}");
    // No layer of that name.
    let cfg = LoraTrainConfig {
        target_modules: vec!["to_nothing".into()],
        instance_prompt: Some("x".into()),
        ..config(1)
    };
    assert!(err(cfg, &data).contains("to_nothing"));
    // A folder without images.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let cfg = LoraTrainConfig {
        instance_prompt: Some("x".into()),
        ..config(1)
    };
    assert!(err(cfg, &empty).contains("no images"));
    // A size the VAE cannot take.
    let cfg = LoraTrainConfig {
        resolution: 63,
        instance_prompt: Some("x".into()),
        ..config(1)
    };
    assert!(err(cfg, &data).contains("multiple of"));
}

/// LoRA files written by `diffuse train-lora` (the command is in
/// fixtures/generate/lora_training.py) patch the UNet here as diffusers' `load_lora_weights`
/// patches it (outputs computed by diffusers 0.42.1 with peft 0.21.2).
#[test]
fn loras_written_by_train_lora_patch_the_unet_as_diffusers_does() {
    let want =
        candle_core::safetensors::load(fixtures().join("diffusers_unet.safetensors"), &Device::Cpu)
            .unwrap();
    let (x, ts, text) = (
        &want["sample"],
        &want["timestep"],
        &want["encoder_hidden_states"],
    );
    for name in ["base", "peft", "kohya"] {
        let loras = match name {
            "base" => vec![],
            _ => vec![LoraSpec {
                path: fixtures().join(format!("{name}.safetensors")),
                scale: 1.0,
            }],
        };
        let opts = LoadOptions {
            loras,
            ..Default::default()
        };
        let got = sd(&opts).unet.forward(x, ts, text).unwrap();
        let d = max_abs_diff(&got, &want[name]);
        eprintln!("{name}: largest difference from diffusers {d:e}");
        assert!(d < 1e-4, "{name}: differs from diffusers by {d}");
    }
    // (And the LoRA does change the output.)
    assert!(max_abs_diff(&want["peft"], &want["base"]) > 0.1);
}
