//! The `info` and `schedulers` subcommands, run as a user would.

mod common;
use common::diffuse;

use std::path::Path;

fn tiny_sd() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/pipelines/tiny_sd")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn help_lists_the_subcommands() {
    let (ok, out, _) = diffuse(&["--help"]);
    assert!(ok);
    for cmd in ["info", "schedulers"] {
        assert!(out.contains(cmd), "{out}");
    }
}

#[test]
fn info_reports_components_and_parameter_counts() {
    let (ok, out, err) = diffuse(&["info", &tiny_sd()]);
    assert!(ok, "{err}");
    assert!(out.contains("StableDiffusionPipeline"), "{out}");
    // Counts from the safetensors headers of the tiny pipeline (see fixtures/README.md).
    assert!(
        out.contains("UNet2DConditionModel") && out.contains("361,892 params"),
        "{out}"
    );
    assert!(
        out.contains("CLIPTextModel") && out.contains("1,597,162 params"),
        "{out}"
    );
    assert!(out.contains("49408 tokens"), "{out}");
}

/// The bundled model's scheduler config is diffusers' DPM-Solver++ one, with the
/// `"lambda_min_clipped": -Infinity` Python's json writes (not strict JSON).
#[test]
fn info_reads_diffusers_scheduler_configs() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-mnist-ddpm");
    let text = std::fs::read_to_string(model.join("scheduler/scheduler_config.json")).unwrap();
    assert!(text.contains("-Infinity"), "{text}");
    let (ok, out, err) = diffuse(&["info", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("DPMSolverMultistepScheduler") && out.contains("1000 training timesteps"),
        "{out}"
    );
    // Its classes, numbered as `--prompt` takes them.
    assert!(
        out.contains("classes (10): 0 T-shirt/top, 1 Trouser,") && out.contains("9 Ankle boot\n"),
        "{out}"
    );
    let (ok, out, err) = diffuse(&["info", model.join("scheduler").to_str().unwrap()]);
    assert!(
        ok && out.contains("scheduler DPMSolverMultistepScheduler"),
        "{out}{err}"
    );
}

#[test]
fn info_on_a_missing_folder_fails_with_a_message() {
    let (ok, _, err) = diffuse(&["info", "/no/such/folder"]);
    assert!(!ok);
    assert!(err.contains("/no/such/folder"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn schedulers_show_prints_the_schedule() {
    let (ok, out, err) = diffuse(&["schedulers", "--show", "Euler a", "--steps", "10"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("EulerAncestralDiscreteScheduler (10 model evaluations"),
        "{out}"
    );
    // SD 1.5's largest sigma.
    assert!(out.contains("14.6146"), "{out}");
    let (ok, _, err) = diffuse(&["schedulers", "--show", "Euler b"]);
    assert!(!ok && err.contains("unknown scheduler"), "{err}");
}

#[test]
fn schedulers_lists_every_class_with_its_a1111_names() {
    let (ok, out, err) = diffuse(&["schedulers"]);
    assert!(ok, "{err}");
    for class in diffuse_schedulers::CLASS_NAMES {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(class))
            .unwrap_or_else(|| panic!("{class} missing from:\n{out}"));
        for a in diffuse_schedulers::registry::a1111_names_of(class) {
            assert!(line.contains(a), "{class}: {a} missing from {line}");
        }
    }
    assert_eq!(
        diffuse_schedulers::a1111_names()
            .iter()
            .filter(|a| !out.contains(*a))
            .count(),
        0,
        "{out}"
    );
}

/// Single files: a checkpoint in the original layout (safetensors and Lightning .ckpt) by
/// family and component, with the parameter counts of its key prefixes; adapters by kind.
#[test]
fn info_on_single_files() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    for (file, dtype) in [
        ("cases/_adapters/tiny_sd_single_file.safetensors", ", F32"),
        ("adapters/tiny_sd_single_file_f16.ckpt", ""),
    ] {
        let (ok, out, err) = diffuse(&["info", fixtures.join(file).to_str().unwrap()]);
        assert!(ok, "{err}");
        for want in [
            "single-file checkpoint, Stable Diffusion 1.x\n",
            "  unet           2,446,788 params\n",
            "  vae            354,391 params\n",
            "  text encoders  1,597,162 params\n",
        ] {
            assert!(out.contains(want), "{want:?} missing from {out}");
        }
        let total = format!("total parameters: 4,398,341 in 964 tensors{dtype}\n");
        assert!(out.ends_with(&total), "{out}");
    }
    for (file, kind) in [
        ("cases/_adapters/lora_kohya.safetensors", "a LoRA adapter"),
        (
            "adapters/embedding_a1111.pt",
            "a textual-inversion embedding",
        ),
    ] {
        let (ok, out, err) = diffuse(&["info", fixtures.join(file).to_str().unwrap()]);
        assert!(ok && out.contains(kind), "{out}{err}");
    }
    // A pickle that would run code is refused, as everywhere.
    let (ok, _, err) = diffuse(&[
        "info",
        fixtures.join("adapters/runs_code.ckpt").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("would run code"), "{err}");
}
