//! The evaluation tools: Fréchet distance against numpy/scipy, the classifier's training,
//! saving and loading, and the scores of `evaluate`.

use candle_core::Device;
use diffuse_training::classifier::{
    accuracy, train_classifier, Classifier, ClassifierConfig, ClassifierTrainConfig,
};
use diffuse_training::eval::evaluate;
use diffuse_training::frechet::{frechet_distance, symmetric_eigen, Gaussian};
use diffuse_training::{Dataset, Fit};
use image::{DynamicImage, GrayImage, Luma};

fn fixture() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/frechet.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn frechet_distance_matches_scipy() {
    let fx = fixture();
    let dim = fx["dim"].as_u64().unwrap() as usize;
    let a = Gaussian::fit(&f32s(&fx["features_a"]), dim).unwrap();
    let b = Gaussian::fit(&f32s(&fx["features_b"]), dim).unwrap();
    for (got, want) in a.mean.iter().zip(f64s(&fx["mean_a"])) {
        assert!((got - want).abs() < 1e-12, "mean {got} vs {want}");
    }
    for (got, want) in a.cov.iter().zip(f64s(&fx["cov_a"])) {
        assert!(
            (got - want).abs() < 1e-10 * (1.0 + want.abs()),
            "cov {got} vs {want}"
        );
    }
    let fd = frechet_distance(&a, &b).unwrap();
    let want = fx["frechet_distance"].as_f64().unwrap();
    assert!((fd - want).abs() < 1e-8 * want, "FD {fd} vs scipy {want}");
    // Symmetric, and zero from a set to itself.
    let back = frechet_distance(&b, &a).unwrap();
    assert!((back - fd).abs() < 1e-8 * fd, "{back} vs {fd}");
    assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-9);
    // Dimension mismatch and too few vectors are errors.
    assert!(Gaussian::fit(&[1.0, 2.0, 3.0], 2).is_err());
    assert!(Gaussian::fit(&[1.0, 2.0], 2).is_err());
    let small = Gaussian::fit(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 3).unwrap();
    assert!(frechet_distance(&a, &small).is_err());
}

#[test]
fn jacobi_eigen_reconstructs_the_matrix() {
    let n = 7;
    // A symmetric matrix with a repeated eigenvalue structure mixed in.
    let m: Vec<f64> = (0..n * n)
        .map(|k| {
            let (i, j) = (k / n, k % n);
            ((i * j + i + j) % 5) as f64 - 1.5 + if i == j { 3.0 } else { 0.0 }
        })
        .collect();
    let (eig, v) = symmetric_eigen(&m, n);
    for i in 0..n {
        for j in 0..n {
            let r: f64 = (0..n).map(|k| v[i * n + k] * eig[k] * v[j * n + k]).sum();
            assert!(
                (r - m[i * n + j]).abs() < 1e-10,
                "({i},{j}) {r} vs {}",
                m[i * n + j]
            );
            let o: f64 = (0..n).map(|k| v[k * n + i] * v[k * n + j]).sum();
            let id = if i == j { 1.0 } else { 0.0 };
            assert!((o - id).abs() < 1e-10, "VᵀV ({i},{j}) = {o}");
        }
    }
}

/// Two classes of 8×8 images, rows vs columns of stripes, with shifted phases.
fn stripes(n_per_class: usize, offset: u32) -> Dataset {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for class in 0..2u32 {
        for i in 0..n_per_class as u32 {
            let img = GrayImage::from_fn(8, 8, |x, y| {
                let k = if class == 1 { x } else { y };
                Luma([if (k + i + offset) % 4 < 2 { 230 } else { 20 }])
            });
            images.push(DynamicImage::ImageLuma8(img));
            labels.push(class);
        }
    }
    Dataset::from_images(images, Some(labels), 8, 1, Fit::Crop).unwrap()
}

fn tiny_config() -> ClassifierConfig {
    ClassifierConfig {
        in_channels: 1,
        resolution: 8,
        channels: vec![4, 8],
        feature_dim: 16,
        class_names: vec!["rows".into(), "columns".into()],
    }
}

#[test]
fn classifier_learns_saves_loads_and_scores() {
    let dev = Device::Cpu;
    let train = stripes(8, 0);
    let test = stripes(4, 1);
    let cfg = ClassifierTrainConfig {
        epochs: 12,
        batch_size: 8,
        lr: 3e-3,
        random_flip: false,
        ..Default::default()
    };
    let mut events = 0;
    let trained =
        train_classifier(&tiny_config(), &train, &test, &cfg, &dev, |_| events += 1).unwrap();
    assert_eq!(
        events,
        12 * 2 + 12,
        "two steps and one epoch report per epoch"
    );
    let last = *trained.test_accuracy.last().unwrap();
    assert_eq!(last, 1.0, "accuracy per epoch {:?}", trained.test_accuracy);

    let dir = tempfile::tempdir().unwrap();
    trained.save(dir.path()).unwrap();
    let loaded = Classifier::load(dir.path(), &dev).unwrap();
    assert_eq!(loaded.config(), &tiny_config());
    assert_eq!(accuracy(&loaded, &test, &dev).unwrap(), last);

    // Scored against itself: the test set as "generated" images with their true labels.
    let report = evaluate(&loaded, &test, &test, &train, &dev).unwrap();
    assert_eq!(report.class_accuracy, 1.0);
    assert_eq!(report.per_class.len(), 2);
    assert!(report.per_class.iter().all(|s| s.total == 4));
    assert!(report
        .per_class
        .iter()
        .all(|s| (s.test_correct, s.test_total) == (4, 4)));
    assert!(report.frechet_generated_test.abs() < 1e-6);
    assert!(report.frechet_train_test >= 0.0);
    // Samples all of the wrong class: accuracy 0 and a larger distance.
    let swapped = test.subset(&[4, 5, 6, 7, 0, 1, 2, 3]).unwrap();
    let wrong = Dataset::from_images(
        (0..8)
            .map(|i| {
                let (x, _) = swapped.batch(&[i], &[], &dev).unwrap();
                let px: Vec<u8> = x
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| ((v + 1.0) * 127.5).round() as u8)
                    .collect();
                DynamicImage::ImageLuma8(GrayImage::from_raw(8, 8, px).unwrap())
            })
            .collect(),
        Some(vec![0, 0, 0, 0, 1, 1, 1, 1]),
        8,
        1,
        Fit::Crop,
    )
    .unwrap();
    let report = evaluate(&loaded, &wrong, &test, &train, &dev).unwrap();
    assert_eq!(report.class_accuracy, 0.0);

    // Bad folders are refused with the reason.
    let empty = tempfile::tempdir().unwrap();
    let err = Classifier::load(empty.path(), &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a classifier folder"), "{err}");
    std::fs::write(dir.path().join("config.json"), "{ nope").unwrap();
    let err = Classifier::load(dir.path(), &dev).unwrap_err().to_string();
    assert!(err.contains("invalid JSON"), "{err}");
}

#[test]
fn classifier_rejects_mismatched_data() {
    let dev = Device::Cpu;
    let train = stripes(2, 0);
    let mut cfg = tiny_config();
    cfg.class_names.push("third".into());
    let err = train_classifier(&cfg, &train, &train, &Default::default(), &dev, |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("2 classes"), "{err}");
    let mut cfg = tiny_config();
    cfg.resolution = 6;
    assert!(cfg.validate().is_err());
    let err = train_classifier(
        &tiny_config(),
        &train,
        &train,
        &ClassifierTrainConfig {
            batch_size: 0,
            ..Default::default()
        },
        &dev,
        |_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("batch size"), "{err}");
}
