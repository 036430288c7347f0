//! The SD3, Flux and DiT pipelines: bad requests give clear errors (never panics), and the
//! options that the reference cases do not exercise behave (loading on demand, several images
//! per prompt, T5 truncation, SD3 without T5).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use candle_core::Tensor;
use diffuse_core::testing::fixtures_dir;
use diffuse_pipelines::{
    load_pipeline, ClassToImageRequest, DiTPipeline, FlowText2ImageRequest, FluxPipeline,
    LoadOptions, Pipeline, StableDiffusion3Pipeline,
};

fn model(name: &str) -> PathBuf {
    fixtures_dir().join("cases/_models").join(name)
}

fn load(dir: &Path, opts: &LoadOptions) -> Pipeline {
    load_pipeline(dir, opts).unwrap_or_else(|e| panic!("{} loads: {e}", dir.display()))
}

fn sd3(opts: &LoadOptions) -> StableDiffusion3Pipeline {
    match load(&model("tiny_sd3"), opts) {
        Pipeline::StableDiffusion3(p) => *p,
        _ => panic!("tiny_sd3 is an SD3 pipeline"),
    }
}

fn flux(opts: &LoadOptions) -> FluxPipeline {
    match load(&model("tiny_flux"), opts) {
        Pipeline::Flux(p) => *p,
        _ => panic!("tiny_flux is a Flux pipeline"),
    }
}

fn dit() -> DiTPipeline {
    match load(&model("tiny_dit"), &LoadOptions::default()) {
        Pipeline::DiT(p) => *p,
        _ => panic!("tiny_dit is a DiT pipeline"),
    }
}

fn request(size: usize) -> FlowText2ImageRequest {
    FlowText2ImageRequest {
        prompts: vec!["a lighthouse".into()],
        steps: 2,
        height: Some(size),
        width: Some(size),
        max_sequence_length: Some(16),
        ..Default::default()
    }
}

fn error_of<T>(r: diffuse_core::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sd3_refuses_bad_requests() {
    let p = sd3(&LoadOptions::default());
    let cases: Vec<(FlowText2ImageRequest, &str)> = vec![
        (request(34), "multiples of 4"),
        (
            FlowText2ImageRequest {
                steps: 0,
                ..request(32)
            },
            "at least 1",
        ),
        (
            FlowText2ImageRequest {
                max_sequence_length: Some(513),
                ..request(32)
            },
            "max_sequence_length",
        ),
        (
            FlowText2ImageRequest {
                negative_prompts: vec!["a".into(), "b".into()],
                ..request(32)
            },
            "2 negative prompts for 1 prompts",
        ),
        (
            FlowText2ImageRequest {
                prompts: vec![],
                ..request(32)
            },
            "no prompt",
        ),
        (
            FlowText2ImageRequest {
                num_images_per_prompt: 0,
                ..request(32)
            },
            "num_images_per_prompt",
        ),
        (
            FlowText2ImageRequest {
                latents: Some(
                    Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &p.device).unwrap(),
                ),
                ..request(32)
            },
            "latents have shape",
        ),
    ];
    for (req, want) in cases {
        let e = error_of(p.text_to_image(&req, None));
        assert!(e.contains(want), "{e:?} should mention {want:?}");
    }
}

#[test]
fn flux_refuses_bad_requests() {
    let p = flux(&LoadOptions::default());
    let neg = FlowText2ImageRequest {
        negative_prompts: vec!["blurry".into()],
        ..request(32)
    };
    assert!(error_of(p.text_to_image(&neg, None)).contains("no negative prompt"));
    let long = FlowText2ImageRequest {
        max_sequence_length: Some(0),
        ..request(32)
    };
    assert!(error_of(p.text_to_image(&long, None)).contains("max_sequence_length"));
    let tiny = request(2);
    assert!(error_of(p.text_to_image(&tiny, None)).contains("at least 4"));
}

#[test]
fn dit_refuses_bad_requests_and_names_labels() {
    let p = dit();
    let req = |labels: Vec<usize>| ClassToImageRequest {
        class_labels: labels,
        steps: 2,
        ..Default::default()
    };
    assert!(error_of(p.generate(&req(vec![1000]), None)).contains("out of range"));
    assert!(error_of(p.generate(&req(vec![]), None)).contains("at least one"));
    // The tiny model has no id2label: names are refused with the valid ids.
    let e = error_of(p.label_ids(&["tench".into()]));
    assert!(e.contains("tench") && e.contains("class ids"), "{e}");
}

/// A DiT folder whose model_index.json names its classes resolves names and synonyms.
#[test]
fn dit_label_names_from_id2label() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("diffuse-dit-labels-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for sub in ["transformer", "vae", "scheduler"] {
        let (from, to) = (model("tiny_dit").join(sub), dir.join(sub));
        std::fs::create_dir_all(&to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        model("tiny_dit").join("model_index.json"),
    )?)?;
    index["id2label"] = serde_json::json!({"0": "tench, Tinca tinca", "7": "cock"});
    std::fs::write(dir.join("model_index.json"), index.to_string())?;
    let p = match load_pipeline(&dir, &LoadOptions::default())? {
        Pipeline::DiT(p) => p,
        _ => anyhow::bail!("not DiT"),
    };
    ensure!(
        p.label_ids(&["Tinca tinca".into(), "cock".into(), " tench ".into()])? == vec![0, 7, 0]
    );
    let e = error_of(p.label_ids(&["tinca".into()]));
    ensure!(e.contains("similar: Tinca tinca"), "{e}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Loading the text encoders and transformer only while they run gives the same images.
#[test]
fn load_on_demand_gives_the_same_images() -> Result<()> {
    let on_demand = LoadOptions {
        load_on_demand: true,
        ..Default::default()
    };
    let req = FlowText2ImageRequest {
        guidance_scale: 3.5,
        ..request(32)
    };
    let a = flux(&LoadOptions::default()).text_to_image(&req, None)?;
    let b = flux(&on_demand).text_to_image(&req, None)?;
    let diff = (a.images - b.images)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(diff == 0.0, "Flux images differ by {diff}");
    let req = FlowText2ImageRequest {
        guidance_scale: 5.0,
        ..request(32)
    };
    let a = sd3(&LoadOptions::default()).text_to_image(&req, None)?;
    let b = sd3(&on_demand).text_to_image(&req, None)?;
    let diff = (a.images - b.images)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(diff == 0.0, "SD3 images differ by {diff}");
    Ok(())
}

/// Two images per prompt are two different images from one generator; a long prompt is cut to
/// `max_sequence_length` T5 tokens with a warning naming what was dropped.
#[test]
fn several_images_and_t5_truncation() -> Result<()> {
    let p = sd3(&LoadOptions::default());
    let req = FlowText2ImageRequest {
        num_images_per_prompt: 2,
        prompts: vec!["a lighthouse on a rock in a storm at night, oil painting, dramatic".into()],
        max_sequence_length: Some(8),
        ..request(32)
    };
    let out = p.text_to_image(&req, None)?;
    ensure!(
        out.images.dims() == [2, 32, 32, 3],
        "{:?}",
        out.images.dims()
    );
    let diff = (out.images.get(0)? - out.images.get(1)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(diff > 0.0, "both images are the same");
    ensure!(
        out.warnings
            .iter()
            .any(|w| w.contains("max_sequence_length") && w.contains("8 tokens")),
        "{:?}",
        out.warnings
    );
    Ok(())
}

/// An SD3 folder without `text_encoder_3` (model_index `[null, null]`) uses zero T5 embeddings,
/// as diffusers does.
#[test]
fn sd3_without_t5_uses_zeros() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("diffuse-sd3-no-t5-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    for e in std::fs::read_dir(model("tiny_sd3"))? {
        let e = e?;
        let name = e.file_name();
        if name == "text_encoder_3" || name == "tokenizer_3" || !e.path().is_dir() {
            continue;
        }
        std::fs::create_dir_all(dir.join(&name))?;
        for f in std::fs::read_dir(e.path())? {
            let f = f?;
            std::fs::copy(f.path(), dir.join(&name).join(f.file_name()))?;
        }
    }
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        model("tiny_sd3").join("model_index.json"),
    )?)?;
    index["text_encoder_3"] = serde_json::json!([null, null]);
    index["tokenizer_3"] = serde_json::json!([null, null]);
    std::fs::write(dir.join("model_index.json"), index.to_string())?;
    let p = match load_pipeline(&dir, &LoadOptions::default())? {
        Pipeline::StableDiffusion3(p) => p,
        _ => anyhow::bail!("not SD3"),
    };
    let text = p.encode_prompt(&["a lighthouse".into()], &[], false, 16, None, &mut vec![])?;
    ensure!(
        text.embeds.dims() == [1, 77 + 16, 64],
        "{:?}",
        text.embeds.dims()
    );
    let t5_part = text
        .embeds
        .narrow(1, 77, 16)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(t5_part == 0.0, "T5 part is not zero");
    let out = p.text_to_image(&request(32), None)?;
    ensure!(out.images.dims() == [1, 32, 32, 3]);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `dtype: bf16` keeps the transformers' and text encoders' weights in bf16 (the VAE in f32)
/// and gives nearly the f32 images.
#[test]
fn bf16_weights_give_nearly_the_f32_images() -> Result<()> {
    let bf16 = LoadOptions {
        dtype: candle_core::DType::BF16,
        ..Default::default()
    };
    let req = FlowText2ImageRequest {
        guidance_scale: 3.5,
        ..request(32)
    };
    let a = flux(&LoadOptions::default()).text_to_image(&req, None)?;
    let b = flux(&bf16).text_to_image(&req, None)?;
    let diff = (a.images - b.images)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(diff < 5e-2, "Flux bf16 images differ by {diff}");
    let a = sd3(&LoadOptions::default()).text_to_image(&request(32), None)?;
    let b = sd3(&bf16).text_to_image(&request(32), None)?;
    let diff = (a.images - b.images)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(diff < 5e-2, "SD3 bf16 images differ by {diff}");
    let labels = ClassToImageRequest {
        class_labels: vec![3],
        steps: 3,
        ..Default::default()
    };
    let a = dit().generate(&labels, None)?;
    let b = match load(&model("tiny_dit"), &bf16) {
        Pipeline::DiT(p) => p.generate(&labels, None)?,
        _ => anyhow::bail!("not DiT"),
    };
    let diff = (a.images - b.images)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    ensure!(diff < 5e-2, "DiT bf16 images differ by {diff}");
    Ok(())
}

/// A Flux-schnell folder (no guidance embedding, static shift 1): the tiny Flux folder with the
/// schnell transformer and scheduler of `fixtures/generate/flux_schnell.py`, whose image
/// diffusers made.
#[test]
fn flux_schnell_pipeline_matches_diffusers() -> Result<()> {
    use diffuse_core::testing::{assert_close, fixture_subdir, get, load_tensors};
    let dir = std::env::temp_dir().join(format!("diffuse-flux-schnell-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let copy = |from: &Path, to: &Path| -> Result<()> {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            if e.path().is_file() {
                std::fs::copy(e.path(), to.join(e.file_name()))?;
            }
        }
        Ok(())
    };
    for sub in [
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "vae",
    ] {
        copy(&model("tiny_flux").join(sub), &dir.join(sub))?;
    }
    copy(&model("tiny_flux"), &dir)?;
    copy(
        &fixture_subdir("models").join("tiny_flux_schnell"),
        &dir.join("transformer"),
    )?;
    std::fs::create_dir_all(dir.join("scheduler"))?;
    let scheduler = serde_json::json!({
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
        "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0,
        "use_dynamic_shifting": false
    });
    std::fs::write(
        dir.join("scheduler/scheduler_config.json"),
        scheduler.to_string(),
    )?;
    let p = match load_pipeline(&dir, &LoadOptions::default())? {
        Pipeline::Flux(p) => p,
        _ => anyhow::bail!("not Flux"),
    };
    let req = FlowText2ImageRequest {
        prompts: vec!["a lighthouse at dusk, watercolor".into()],
        steps: 4,
        guidance_scale: 0.0,
        height: Some(32),
        width: Some(48),
        max_sequence_length: Some(48),
        seed: 5,
        ..Default::default()
    };
    let out = p.text_to_image(&req, None)?;
    let expected =
        load_tensors(&fixture_subdir("models").join("tiny_flux_schnell_pipeline.safetensors"))?;
    assert_close(
        "schnell image",
        &out.images,
        get(&expected, "image")?,
        2e-3,
        0.0,
    )?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The front ends' task layer (`task::describe` and `task::run_task`, which `diffuse serve`
/// goes through) on the three transformer pipelines: what describe reads from the configs is
/// what loading gives, the DiT case's classes come out of the prompt as diffusers drew them,
/// and settings that do not apply are refused.
#[test]
fn task_layer_runs_the_transformer_pipelines() -> Result<()> {
    use diffuse_core::testing::{get, load_tensors};
    use diffuse_pipelines::task::{describe, run_task, InitImage, PipelineKind, TaskSettings};
    let opts = LoadOptions::default();
    let sd3_info = describe(&model("tiny_sd3"))?;
    ensure!(sd3_info.kind == PipelineKind::StableDiffusion3);
    ensure!(sd3_info.size == sd3(&opts).default_size());
    ensure!(sd3_info.size_multiple == Some(4));
    let flux_info = describe(&model("tiny_flux"))?;
    ensure!(flux_info.kind == PipelineKind::Flux && flux_info.size == flux(&opts).default_size());
    let dit_info = describe(&model("tiny_dit"))?;
    ensure!(dit_info.kind == PipelineKind::DiT && dit_info.size == (16, 16));
    ensure!(dit_info.class_names.len() == 1000 && dit_info.class_names[7] == "7");
    ensure!((dit_info.default_steps(), dit_info.default_guidance()) == (50, 4.0));

    // The dit_class2img case through the task layer: classes in the prompt.
    let case = fixtures_dir().join("cases/dit_class2img");
    let expected = load_tensors(&case.join("expected.safetensors"))?;
    let p = load(&model("tiny_dit"), &opts);
    let s = TaskSettings {
        prompt: "1, 7".into(),
        steps: Some(8),
        guidance_scale: Some(4.0),
        seed: 810,
        ..Default::default()
    };
    let out = run_task(&p, "tiny_dit", &s, None)?;
    ensure!(out.images.len() == 2, "{} images", out.images.len());
    ensure!(out.infotext.contains("Class: 1,7"), "{}", out.infotext);
    for (i, img) in out.images.iter().enumerate() {
        let want: Vec<f32> = get(&expected, "image")?.get(i)?.flatten_all()?.to_vec1()?;
        let worst = img
            .to_rgb8()
            .as_raw()
            .iter()
            .zip(&want)
            .map(|(&p, &w)| (p as f32 / 255.0 - w).abs())
            .fold(0.0, f32::max);
        ensure!(worst <= 0.002 + 0.5 / 255.0, "image {i} off by {worst}");
    }

    let sd3 = load(&model("tiny_sd3"), &opts);
    let s = TaskSettings {
        prompt: "a lighthouse".into(),
        steps: Some(2),
        max_sequence_length: Some(16),
        width: Some(32),
        height: Some(32),
        num_images: 2,
        ..Default::default()
    };
    let out = run_task(&sd3, "tiny_sd3", &s, None)?;
    ensure!(out.images.len() == 2 && out.images[0].width() == 32);
    ensure!(out.infotext.contains("CFG scale: 7"), "{}", out.infotext);
    let flux_p = load(&model("tiny_flux"), &opts);
    let out = run_task(
        &flux_p,
        "tiny_flux",
        &TaskSettings {
            num_images: 1,
            ..s.clone()
        },
        None,
    )?;
    ensure!(out.infotext.contains("CFG scale: 3.5"), "{}", out.infotext);

    let refused = [
        (
            &sd3,
            TaskSettings {
                class_labels: vec!["3".into()],
                ..s.clone()
            },
            "class labels",
        ),
        (
            &p,
            TaskSettings {
                prompt: "1".into(),
                max_sequence_length: Some(8),
                ..Default::default()
            },
            "max_sequence_length",
        ),
        (
            &p,
            TaskSettings {
                prompt: "".into(),
                ..Default::default()
            },
            "class ids or names",
        ),
        (
            &p,
            TaskSettings {
                prompt: "1".into(),
                width: Some(32),
                ..Default::default()
            },
            "16x16",
        ),
        (
            &sd3,
            TaskSettings {
                init: Some(InitImage {
                    image: image::RgbImage::new(32, 32),
                    mask: None,
                    strength: 0.5,
                }),
                ..s.clone()
            },
            "img2img",
        ),
    ];
    for (pipeline, settings, want) in refused {
        let e = match run_task(pipeline, "m", &settings, None) {
            Ok(_) => anyhow::bail!("{settings:?} ran"),
            Err(e) => e.to_string(),
        };
        ensure!(e.contains(want), "{e:?} should mention {want:?}");
    }
    Ok(())
}
