//! LoRA training on the tiny Stable Diffusion pipeline: the loss at fixed noise goes down, the
//! saved file (PEFT and Kohya layouts) reloads through the normal LoRA loader into the same
//! UNet (and text encoder) the trainer trained, files it wrote patch the models as diffusers
//! patches them, and bad input is refused by name.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffuse_pipelines::StableDiffusionPipeline;
use diffuse_pipelines::{
    load_pipeline, text_encoder_weights, unet_weights, LoadOptions, LoraSpec, Pipeline,
};
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

/// A trainer that adapts the text encoder too.
fn text_encoder_trainer(data: &Path, config: LoraTrainConfig) -> LoraTrainer {
    let (cfg, weights) = text_encoder_weights(&tiny_sd(), &LoadOptions::default()).unwrap();
    trainer(data, config)
        .unwrap()
        .with_text_encoder(cfg, weights)
        .unwrap()
}

/// The tiny pipeline with one LoRA file fused in (none: the plain pipeline).
fn sd_with_lora(file: Option<PathBuf>) -> Box<StableDiffusionPipeline> {
    let loras = file
        .into_iter()
        .map(|path| LoraSpec { path, scale: 1.0 })
        .collect();
    sd(&LoadOptions {
        loras,
        ..Default::default()
    })
}

fn hidden_state(p: &StableDiffusionPipeline, ids: &Tensor) -> Tensor {
    p.text_encoder.forward(ids).unwrap().last_hidden_state
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

/// bf16 mixed precision (CPU autocast) trains the adapters along nearly the f32 run's path
/// ([`common::assert_mixed_follows_f32`]); the adapters stay f32.
#[test]
fn bf16_mixed_precision_follows_the_f32_lora_run() {
    use diffuse_training::MixedPrecision;
    let data = fixtures().join("data");
    let mut full = trainer(&data, config(6)).unwrap();
    let cfg = LoraTrainConfig {
        mixed_precision: MixedPrecision::Bf16,
        ..config(6)
    };
    let mut mixed = trainer(&data, cfg).unwrap();
    let figures = |t: &mut LoraTrainer| {
        let s = t.train_step().unwrap();
        (s.step, s.loss, s.grad_norm)
    };
    common::assert_mixed_follows_f32(6, || figures(&mut full), || figures(&mut mixed));
    let (tensors, _) = mixed.lora_tensors(LoraSaveFormat::Peft).unwrap();
    assert!(tensors.values().all(|t| t.dtype() == DType::F32));
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

#[test]
fn text_encoder_training_adapts_both_models_and_the_file_reloads_into_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = text_encoder_trainer(&fixtures().join("data"), config(40));
    // The tiny encoder's two layers, four projections each, after the UNet's layers.
    let te: Vec<&str> = t
        .modules()
        .into_iter()
        .filter(|m| m.starts_with("text_model.encoder.layers."))
        .collect();
    assert_eq!(te.len(), 8, "{te:?}");
    assert!(t.modules().len() > te.len());
    let plain = sd_with_lora(None);
    let ids = plain
        .prompt_token_ids(&["a red square in corner 2".into()])
        .unwrap();
    // Rebuilt from its weights with the (zero) updates, the encoder is the pipeline's.
    let encoder = |t: &LoraTrainer| t.text_encoder().unwrap().unwrap();
    let start = encoder(&t).forward(&ids).unwrap().last_hidden_state;
    let d = max_abs_diff(&start, &hidden_state(&plain, &ids));
    assert!(d < 1e-5, "the rebuilt text encoder differs by {d}");

    let before = t.fixed_loss(5).unwrap();
    for _ in 0..40 {
        let s = t.train_step().unwrap();
        assert!(s.loss.is_finite() && s.grad_norm > 0.0, "{s:?}");
    }
    let after = t.fixed_loss(5).unwrap();
    eprintln!("loss at fixed noise: {before} before, {after} after 40 steps");
    assert!(after < 0.9 * before, "{before} -> {after}");
    let text = encoder(&t).forward(&ids).unwrap().last_hidden_state;
    assert!(
        max_abs_diff(&text, &start) > 1e-3,
        "training left the text encoder unchanged"
    );
    let (x, ts, _) = unet_input();
    let trained = t.unet().unwrap().forward(&x, &ts, &text).unwrap();
    for (format, name) in [
        (LoraSaveFormat::Peft, "peft.safetensors"),
        (LoraSaveFormat::Kohya, "kohya.safetensors"),
    ] {
        let file = tmp.path().join(name);
        t.save(&file, format).unwrap();
        let p = sd_with_lora(Some(file));
        let d_text = max_abs_diff(&hidden_state(&p, &ids), &text);
        let d_unet = max_abs_diff(&p.unet.forward(&x, &ts, &text).unwrap(), &trained);
        assert!(
            d_text < 1e-5 && d_unet < 1e-5,
            "{name}: reloaded models differ from the trained ones by {d_text} (text encoder), \
             {d_unet} (UNet)"
        );
    }
    // The encoder is adapted once, before training.
    let (cfg, weights) = text_encoder_weights(&tiny_sd(), &LoadOptions::default()).unwrap();
    match t.with_text_encoder(cfg, weights) {
        Ok(_) => panic!("adapted twice"),
        Err(e) => assert!(e.to_string().contains("before the first step"), "{e}"),
    }
}

/// Text-encoder LoRAs written by `diffuse train-lora --train-text-encoder` patch both models
/// here as diffusers' `load_lora_weights` patches them (fixtures/generate/lora_training.py
/// `check_te`).
#[test]
fn text_encoder_loras_written_by_train_lora_patch_both_models_as_diffusers_does() {
    let want =
        candle_core::safetensors::load(fixtures().join("diffusers_te.safetensors"), &Device::Cpu)
            .unwrap();
    let (x, ts, ids) = (&want["sample"], &want["timestep"], &want["input_ids"]);
    let plain = sd_with_lora(None);
    assert_eq!(
        plain
            .prompt_token_ids(&["a red square in corner 2".into()])
            .unwrap()
            .to_vec2::<i64>()
            .unwrap(),
        ids.to_vec2::<i64>().unwrap()
    );
    for name in ["base", "peft_te", "kohya_te"] {
        let file = (name != "base").then(|| fixtures().join(format!("{name}.safetensors")));
        let p = sd_with_lora(file);
        let text = hidden_state(&p, ids);
        let d_text = max_abs_diff(&text, &want[&format!("text.{name}")]);
        let unet = p.unet.forward(x, ts, &text).unwrap();
        let d_unet = max_abs_diff(&unet, &want[&format!("unet.{name}")]);
        eprintln!("{name}: largest difference from diffusers {d_text:e} (text), {d_unet:e} (UNet)");
        assert!(
            d_text < 1e-4 && d_unet < 1e-4,
            "{name}: differs from diffusers by {d_text} (text encoder), {d_unet} (UNet)"
        );
    }
    // (And the LoRA does change the text encoder's output.)
    assert!(max_abs_diff(&want["text.peft_te"], &want["text.base"]) > 1e-2);
}
