//! `diffuse classifier` and `diffuse eval` as a user runs them, on tiny IDX files written here.

mod common;
use common::diffuse;

use std::path::Path;

/// `{prefix}-images-idx3-ubyte` and `{prefix}-labels-idx1-ubyte`: 8×8 stripes, rows (label 0)
/// and columns (label 1), `n` of each.
fn write_idx(dir: &Path, prefix: &str, n: usize) {
    let mut images = vec![0, 0, 8, 3];
    images.extend((2 * n as u32).to_be_bytes());
    images.extend(8u32.to_be_bytes());
    images.extend(8u32.to_be_bytes());
    let mut labels = vec![0, 0, 8, 1];
    labels.extend((2 * n as u32).to_be_bytes());
    for class in 0..2u8 {
        for i in 0..n {
            for y in 0..8 {
                for x in 0..8 {
                    let k = if class == 1 { x } else { y };
                    images.push(if (k + i) % 4 < 2 { 240 } else { 10 });
                }
            }
            labels.push(class);
        }
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
}

#[test]
fn classifier_then_eval() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_idx(&data, "train", 12);
    write_idx(&data, "t10k", 4);
    let (d, r) = (data.to_str().unwrap(), root.path());
    let cls = r.join("classifier");
    let cls_args = [
        "classifier",
        "--data",
        d,
        "--dataset",
        "mnist-idx",
        "--resolution",
        "8",
        "--channels",
        "4,8",
        "--feature-dim",
        "16",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--output",
        cls.to_str().unwrap(),
    ];
    let (ok, out, err) = diffuse(&cls_args);
    assert!(ok, "{err}");
    assert!(out.contains("test accuracy"), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cls.join("training.json")).unwrap()).unwrap();
    assert_eq!(report["test_images"], 8);
    assert_eq!(
        report["test_accuracy_per_epoch"].as_array().unwrap().len(),
        2
    );
    let (ok, _, err) = diffuse(&cls_args);
    assert!(!ok && err.contains("--force"), "{err}");

    let model = r.join("model");
    let (ok, _, err) = diffuse(&[
        "train",
        "--data",
        d,
        "--dataset",
        "mnist-idx",
        "--resolution",
        "8",
        "--channels",
        "8,16",
        "--layers-per-block",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--sample-steps",
        "2",
        "--classes",
        "10",
        "--output",
        model.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");

    let json = r.join("eval.json");
    let grid = r.join("grid.png");
    let eval = |classifier: &Path, model: &Path| {
        diffuse(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--classifier",
            classifier.to_str().unwrap(),
            "--data",
            d,
            "--dataset",
            "mnist-idx",
            "--samples-per-class",
            "2",
            "--steps",
            "2",
            "--batch-size",
            "7",
            "--json",
            json.to_str().unwrap(),
            "--grid",
            grid.to_str().unwrap(),
        ])
    };
    let (ok, out, err) = eval(&cls, &model);
    assert!(ok, "{err}");
    assert!(out.contains("class accuracy:"), "{out}");
    assert!(out.contains("Fréchet distance"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["generated"], 20, "{v}");
    assert_eq!(v["per_class"].as_array().unwrap().len(), 10);
    // The per-class test scores add up to the overall one, over every test image.
    let (right, all) = v["per_class"]
        .as_array()
        .unwrap()
        .iter()
        .fold((0, 0), |(r, a), s| {
            (
                r + s["test_correct"].as_u64().unwrap(),
                a + s["test_total"].as_u64().unwrap(),
            )
        });
    assert_eq!(all, v["test_images"].as_u64().unwrap(), "{v}");
    let overall = v["classifier_test_accuracy"].as_f64().unwrap();
    assert!((right as f64 / all as f64 - overall).abs() < 1e-12, "{v}");
    let acc = v["class_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    for k in ["frechet_generated_test", "frechet_train_test"] {
        let fd = v[k].as_f64().unwrap();
        assert!(fd.is_finite() && fd > -1e-6, "{k} = {fd}");
    }
    let g = image::open(&grid).unwrap();
    assert!(
        g.height() >= 10 * 8 && g.width() >= 2 * 8,
        "{}x{}",
        g.width(),
        g.height()
    );

    // A classifier for other images, an unconditional model, a missing classifier.
    let (ok, _, err) = eval(&r.join("nowhere"), &model);
    assert!(!ok && err.contains("not a classifier folder"), "{err}");
    let uncond = r.join("uncond");
    let (ok, _, err) = diffuse(&[
        "train",
        "--data",
        d,
        "--dataset",
        "mnist-idx",
        "--resolution",
        "16",
        "--channels",
        "8,16",
        "--layers-per-block",
        "1",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--sample-steps",
        "1",
        "--output",
        uncond.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = eval(&cls, &uncond);
    assert!(!ok && err.contains("not a class-conditional"), "{err}");
}
