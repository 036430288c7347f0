//! `diffuse generate` on a class-conditional DDPM folder trained here for a few steps.

mod common;
use common::diffuse_err;

use std::path::{Path, PathBuf};

use diffuse_pipelines::{load_pipeline, LoadOptions, Pipeline, UnconditionalRequest};

/// Two classes of 8×8 stripes in class sub-folders (sub-folder names are the class names).
fn write_stripes(dir: &Path) {
    for (class, vertical) in [("Rows", false), ("Columns", true)] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..4u32 {
            let img = image::GrayImage::from_fn(8, 8, |x, y| {
                let k = if vertical { x } else { y };
                image::Luma([if (k + i) % 4 < 2 { 255 } else { 0 }])
            });
            img.save(dir.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
}

/// Trains a tiny class-conditional model for 3 steps; returns (temp root, model folder).
fn trained_model(name: &str) -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("diffuse-cc-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    write_stripes(&data);
    let model = root.join("model");
    let (ok, err) = diffuse_err(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--grayscale",
        "--resolution",
        "8",
        "--channels",
        "8,16",
        "--layers-per-block",
        "1",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--sample-steps",
        "2",
        "--classes",
        "2",
        "--output",
        model.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    (root, model)
}

fn parameters(path: &Path) -> (png::ColorType, u32, u32, String) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().expect("a valid PNG");
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone())
        .expect("a parameters chunk");
    (info.color_type, info.width, info.height, text)
}

#[test]
fn class_prompt_grid_and_errors() {
    let (root, model) = trained_model("generate");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("model_index.json")).unwrap())
            .unwrap();
    assert_eq!(
        index["_class_names"],
        serde_json::json!(["Columns", "Rows"])
    );
    let m = model.to_str().unwrap();

    // One class by name (any case): a grayscale image of the model's size.
    let one = root.join("one.png");
    let (ok, err) = diffuse_err(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "rows",
        "--steps",
        "3",
        "--seed",
        "7",
        "--output",
        one.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (color, w, h, text) = parameters(&one);
    assert_eq!((color, w, h), (png::ColorType::Grayscale, 8, 8));
    // The default guidance of class-conditional models: 5 at timesteps 100 to 550.
    let defaults = ["CFG scale: 5", "Guidance interval: 100-550"];
    for want in ["Class: Rows", "Steps: 3", "Seed: 7"]
        .into_iter()
        .chain(defaults)
    {
        assert!(text.contains(want), "{want:?} missing from {text:?}");
    }

    // A class index works too, with DDIM and another guidance.
    let idx = root.join("idx.png");
    let (ok, err) = diffuse_err(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "0",
        "--steps",
        "2",
        "--scheduler",
        "DDIMScheduler",
        "--guidance-scale",
        "3",
        "--guidance-interval",
        "100,900",
        "--output",
        idx.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let text = parameters(&idx).3;
    for want in [
        "Class: Columns",
        "DDIMScheduler",
        "Guidance interval: 100-900",
    ] {
        assert!(text.contains(want), "{want:?} missing from {text:?}");
    }
    for (bad, why) in [("9,1", "the lower first"), ("5", "LO,HI"), ("a,b", "LO,HI")] {
        let (ok, err) = diffuse_err(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "0",
            "--guidance-interval",
            bad,
            "--output",
            root.join("never.png").to_str().unwrap(),
        ]);
        assert!(!ok && err.contains(why), "{bad}: {err}");
        assert!(!root.join("never.png").exists());
    }

    // No prompt: one labelled row of `--num-images` tiles per class, in one PNG.
    let grid = root.join("grid.png");
    let (ok, err) = diffuse_err(&[
        "generate",
        "--model",
        m,
        "--steps",
        "3",
        "--num-images",
        "3",
        "--output",
        grid.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("generated 6 images (3 per class, in one grid)"),
        "{err}"
    );
    let (color, w, h, _) = parameters(&grid);
    assert_eq!(color, png::ColorType::Grayscale);
    // Rows of 8-pixel tiles with 2-pixel gaps; labels ("Columns", 7 glyphs of 6 pixels) left.
    assert_eq!(h, 2 * (8 + 2) + 2);
    assert_eq!(w, (2 * 2 + 7 * 6) + 3 * (8 + 2) + 2);

    // An unknown class: non-zero exit naming the valid classes, nothing written.
    let bad = root.join("bad.png");
    let (ok, err) = diffuse_err(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "Sandal",
        "--steps",
        "1",
        "--output",
        bad.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("Sandal") && err.contains("0 Columns, 1 Rows"),
        "{err}"
    );
    assert!(!bad.exists());

    // The library API: labels are required and checked against the classes.
    let p = match load_pipeline(&model, &LoadOptions::default()).unwrap() {
        Pipeline::Unconditional(p) => p,
        _ => panic!("a DDPM folder"),
    };
    assert_eq!(p.class_names, ["Columns", "Rows"]);
    let req = UnconditionalRequest {
        batch_size: 2,
        steps: 2,
        guidance_scale: 2.0,
        ..Default::default()
    };
    let err = p.generate(&req, None).err().expect("labels are required");
    assert!(err.to_string().contains("class-conditional"), "{err}");
    let err = p
        .generate(
            &UnconditionalRequest {
                class_labels: Some(vec![0, 2]),
                ..req.clone()
            },
            None,
        )
        .err()
        .expect("class 2 is out of range");
    assert!(err.to_string().contains("0..=1"), "{err}");
    let req = UnconditionalRequest {
        class_labels: Some(vec![1, 0]),
        ..req
    };
    let out = p.generate(&req, None).unwrap();
    assert_eq!((out.gray.len(), out.rgb.len()), (2, 0));

    // A guidance interval: guided steps inside it, the class's prediction alone outside.
    let images = |r: &UnconditionalRequest| p.generate(r, None).unwrap().images;
    let with = |interval, scale| UnconditionalRequest {
        guidance_interval: interval,
        guidance_scale: scale,
        ..req.clone()
    };
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let guided = images(&req);
    let unguided = images(&with(None, 1.0));
    let mut schedule =
        diffuse_schedulers::from_config(p.scheduler.class_name(), p.scheduler.config()).unwrap();
    schedule.set_timesteps(req.steps).unwrap();
    let timesteps = schedule.timesteps().to_vec();
    let (first, last) = (timesteps[0], timesteps[timesteps.len() - 1]);
    assert!(
        diff(&guided, &unguided) > 0.0,
        "guidance changes the images"
    );
    let all = images(&with(Some((last, first)), 2.0));
    assert_eq!(diff(&all, &guided), 0.0, "an interval holding every step");
    let none = images(&with(Some((first + 1.0, first + 2.0)), 2.0));
    assert_eq!(diff(&none, &unguided), 0.0, "an interval holding no step");
    let part = images(&with(Some((first, first)), 2.0));
    assert!(diff(&part, &guided) > 0.0 && diff(&part, &unguided) > 0.0);
    let err = p
        .generate(&with(Some((5.0, 1.0)), 2.0), None)
        .err()
        .expect("an interval out of order");
    assert!(err.to_string().contains("guidance interval 5,1"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// `diffuse generate --prompt Sandal --seed 7` (the default model, `models/fashion-mnist-ddpm`),
/// as a user types it, against the image Python diffusers made (`fixtures/bundled_ddpm`, case
/// `sandal_cli`): every 8-bit pixel within one level of diffusers' image rounded.
#[test]
fn bundled_sandal_matches_diffusers() {
    let dir = diffuse_core::testing::fixture_subdir("bundled_ddpm");
    let want = diffuse_core::testing::load_tensors(&dir.join("expected.safetensors")).unwrap();
    let want = want["sandal_cli.image"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let root = std::env::temp_dir().join(format!("diffuse-cc-sandal-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let out = root.join("sandal.png");
    let (ok, err) = diffuse_err(&[
        "generate",
        "--prompt",
        "Sandal",
        "--seed",
        "7",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // A plain run of one process: no rank lines, and the loop's rate counts the 20 default
    // steps it ran (not the unset --steps).
    assert!(!err.contains("rank 0/1"), "{err}");
    let rate: f64 = err
        .split_once(" it/s)")
        .and_then(|(before, _)| before.rsplit_once('(')?.1.parse().ok())
        .unwrap_or_else(|| panic!("no it/s figure in {err}"));
    assert!(rate > 0.0, "{err}");
    // The default model is named in the infotext by its folder.
    let text = parameters(&out).3;
    assert!(text.contains("Model: fashion-mnist-ddpm"), "{text}");
    let got = image::open(&out).unwrap().into_luma8().into_raw();
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let w = (w * 255.0).round();
        assert!((g as f32 - w).abs() <= 1.0, "pixel {i}: {g}, diffusers {w}");
    }
    let _ = std::fs::remove_dir_all(&root);
}
