//! `diffuse train-lora` run as a user would, on the tiny Stable Diffusion pipeline: the LoRA it
//! writes loads with `--lora` and changes the image; bad input fails before any work.

mod common;
use common::{diffuse, file_names, repo};

use std::path::PathBuf;

fn run(args: &[&str]) -> String {
    let (ok, out, err) = diffuse(args);
    assert!(ok, "diffuse {args:?} failed:\n{err}");
    out + &err
}

/// The tiny pipeline and the four captioned pictures of `fixtures/lora_training/data`.
fn tiny_sd_and_data() -> (String, String) {
    (
        repo("fixtures/pipelines/tiny_sd"),
        repo("fixtures/lora_training/data"),
    )
}

#[test]
fn a_trained_lora_loads_and_changes_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let (sd, data) = tiny_sd_and_data();
    let lora: PathBuf = tmp.path().join("mine.safetensors");
    let l = lora.to_str().unwrap();
    let train = [
        "train-lora",
        "--model",
        &sd,
        "--data",
        &data,
        "--steps",
        "4",
        "--lr",
        "5e-3",
        "--save-every",
        "2",
        "--output",
        l,
    ];
    let out = run(&train);
    assert!(
        out.contains("4 images at 64x64, rank 4 on 32 layers"),
        "{out}"
    );
    assert!(out.contains("trained 4 steps"), "{out}");
    assert!(tmp.path().join("mine-2.safetensors").is_file(), "{out}");
    // A second run does not overwrite the file unless asked to.
    let (ok, _, err) = diffuse(&train);
    assert!(!ok && err.contains("exists; pass --force"), "{err}");

    let image = |extra: &[&str], name: &str| -> Vec<u8> {
        let png = tmp.path().join(name);
        let mut args = vec![
            "generate",
            "--model",
            &sd,
            "--prompt",
            "a red square in corner 1",
            "--steps",
            "3",
            "--seed",
            "4",
            "--output",
            png.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(&args);
        std::fs::read(png).unwrap()
    };
    assert_ne!(
        image(&[], "plain.png"),
        image(&["--lora", l], "lora.png"),
        "the LoRA did not change the image"
    );
}

#[test]
fn bad_input_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = repo("fixtures/pipelines/tiny_sd");
    let ddpm = repo("models/fashion-mnist-ddpm");
    let out = tmp.path().join("l.safetensors");
    let o = out.to_str().unwrap();
    let missing = tmp.path().join("nowhere");
    let cases: [(Vec<&str>, &str); 6] = [
        (
            vec![
                "--model",
                &sd,
                "--data",
                missing.to_str().unwrap(),
                "--output",
                o,
            ],
            "nowhere: no such folder",
        ),
        (
            vec!["--model", &sd, "--data", &sd, "--output", o],
            "no images",
        ),
        (
            vec!["--model", &ddpm, "--data", &sd, "--output", o],
            "trains Stable Diffusion",
        ),
        (
            vec![
                "--model",
                &sd,
                "--data",
                &sd,
                "--snr-gamma",
                "0",
                "--output",
                o,
            ],
            "snr_gamma must be a positive number, not 0",
        ),
        (
            vec!["--model", &sd, "--data", &sd, "--alpha", "0", "--output", o],
            "LoRA alpha must be a positive number, not 0",
        ),
        (
            vec![
                "--model",
                &sd,
                "--data",
                &sd,
                "--clip-grad",
                "nan",
                "--output",
                o,
            ],
            "'nan' for '--clip-grad",
        ),
    ];
    for (args, want) in cases {
        let (ok, _, err) = diffuse(&[&["train-lora"][..], &args].concat());
        assert!(!ok && err.contains(want), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}

/// DreamBooth with prior preservation: the class folder is topped up to --num-class-images with
/// the model's own pictures of the class prompt, then both sets train; a full folder is used
/// as it is.
#[test]
fn dreambooth_makes_the_missing_class_images_first() {
    let tmp = tempfile::tempdir().unwrap();
    let (sd, data) = tiny_sd_and_data();
    let class = tmp.path().join("class");
    std::fs::create_dir(&class).unwrap();
    // One class image already there, under a name the generated ones would take.
    std::fs::copy(
        std::path::Path::new(&data).join("img0.png"),
        class.join("class-0.png"),
    )
    .unwrap();
    let out = tmp.path().join("db.safetensors");
    let args = [
        "train-lora",
        "--model",
        &sd,
        "--data",
        &data,
        "--steps",
        "2",
        "--instance-prompt",
        "a photo of sks square",
        "--class-data",
        class.to_str().unwrap(),
        "--class-prompt",
        "a photo of a square",
        "--num-class-images",
        "3",
        "--output",
        out.to_str().unwrap(),
    ];
    let log = run(&args);
    assert!(log.contains("making 2 class images"), "{log}");
    assert_eq!(
        file_names(&class),
        ["class-0.png", "class-1.png", "class-2.png"]
    );
    // The copied image is left as it was.
    assert_eq!(
        std::fs::read(class.join("class-0.png")).unwrap(),
        std::fs::read(std::path::Path::new(&data).join("img0.png")).unwrap()
    );
    assert!(out.is_file());
    let again = run(&[&args[..], &["--force"]].concat());
    assert!(!again.contains("making"), "{again}");
}

/// `--train-text-encoder` adapts the text encoder's eight attention projections too (here with
/// `--mixed-precision bf16`); the file (Kohya layout here) loads with `--lora`, where every
/// module must find its layer.
#[test]
fn a_text_encoder_lora_trains_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (sd, data) = tiny_sd_and_data();
    let lora = tmp.path().join("te.safetensors");
    let l = lora.to_str().unwrap();
    let out = run(&[
        "train-lora",
        "--model",
        &sd,
        "--data",
        &data,
        "--steps",
        "2",
        "--train-text-encoder",
        "--format",
        "kohya",
        // (CPU autocast: bf16 products on AVX512-BF16 CPUs, the f32 step elsewhere.)
        "--mixed-precision",
        "bf16",
        "--output",
        l,
    ]);
    assert!(out.contains("rank 4 on 40 layers"), "{out}");
    let png = tmp.path().join("te.png");
    run(&[
        "generate",
        "--model",
        &sd,
        "--prompt",
        "a red square in corner 1",
        "--steps",
        "2",
        "--lora",
        l,
        "--output",
        png.to_str().unwrap(),
    ]);
    assert!(png.is_file());
}
