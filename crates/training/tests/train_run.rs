//! End-to-end training on a dozen 8×8 images: the loss goes down, checkpoints are written and
//! resume exactly, broken checkpoints are refused, and the diffusers folder reloads and samples.

mod common;

use diffuse_models::ModelMixin;
use std::path::Path;

use candle_core::{DType, Device};
use diffuse_models::UNet2DModel;
use diffuse_schedulers::SchedulerConfig;
use diffuse_training::sample::{sample, SampleSettings};
use diffuse_training::trainer::latest_checkpoint;
use diffuse_training::{Dataset, Event, MixedPrecision, TrainConfig, Trainer};

fn stripes() -> (tempfile::TempDir, Dataset) {
    let dir = tempfile::tempdir().unwrap();
    common::write_stripes(dir.path(), 6);
    let ds = common::load_folder(dir.path());
    (dir, ds)
}

/// Runs `fit` and returns the loss of every step it took.
fn fit(trainer: &mut Trainer, out: &Path) -> Vec<(u64, f64)> {
    let mut losses = Vec::new();
    trainer
        .fit(out, &mut |e| {
            if let Event::Step { stats, .. } = e {
                losses.push((stats.step, stats.loss));
            }
        })
        .unwrap();
    losses
}

#[test]
fn loss_goes_down() {
    let (_d, ds) = stripes();
    let mut cfg = common::tiny_config(20);
    cfg.lr_schedule = diffuse_training::LrScheduleKind::Constant;
    cfg.batch_size = 8;
    let mut t = Trainer::new(cfg, ds, &Device::Cpu).unwrap();
    let losses: Vec<f64> = (0..20).map(|_| t.train_step().unwrap().loss).collect();
    let first = losses[..5].iter().sum::<f64>() / 5.0;
    let last = losses[14..].iter().sum::<f64>() / 6.0;
    assert!(
        last < 0.7 * first,
        "loss did not go down: {first} → {last} ({losses:?})"
    );
}

/// bf16 mixed precision (CPU autocast) trains the f32 weights along nearly the f32 run's path
/// ([`common::assert_mixed_follows_f32`]); the weights stay f32.
#[test]
fn bf16_mixed_precision_follows_the_f32_run() {
    let (_d, ds) = stripes();
    let mut cfg = common::tiny_config(12);
    cfg.lr_schedule = diffuse_training::LrScheduleKind::Constant;
    cfg.batch_size = 8;
    let mut full = Trainer::new(cfg.clone(), ds.clone(), &Device::Cpu).unwrap();
    cfg.mixed_precision = MixedPrecision::Bf16;
    let mut mixed = Trainer::new(cfg, ds, &Device::Cpu).unwrap();
    let figures = |t: &mut Trainer| {
        let s = t.train_step().unwrap();
        (s.step, s.loss, s.grad_norm)
    };
    common::assert_mixed_follows_f32(12, || figures(&mut full), || figures(&mut mixed));
    for (name, v) in mixed.parameters() {
        assert_eq!(v.dtype(), DType::F32, "{name}");
    }
}

/// Min-SNR-γ weighting reaches the loss: with γ above every timestep's SNR (ε prediction:
/// all weights 1) the run is the unweighted one; with γ = 5 the first loss (same images,
/// noise and timesteps) is smaller, as every weight is at most 1 and the clean timesteps' fall
/// below it.
#[test]
fn min_snr_weighting_reaches_the_loss() {
    let (_d, ds) = stripes();
    let mut cfg = common::tiny_config(3);
    cfg.batch_size = 8;
    let first = |gamma: Option<f64>| {
        let mut c = cfg.clone();
        c.snr_gamma = gamma;
        let mut t = Trainer::new(c, ds.clone(), &Device::Cpu).unwrap();
        (0..3)
            .map(|_| t.train_step().unwrap().loss)
            .collect::<Vec<_>>()
    };
    let plain = first(None);
    let uncapped = first(Some(1e9));
    for (a, b) in plain.iter().zip(&uncapped) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "{plain:?} vs {uncapped:?}");
    }
    let capped = first(Some(5.0));
    assert!(
        capped[0] < 0.999 * plain[0],
        "γ = 5 did not lower the first loss: {capped:?} vs {plain:?}"
    );
}

#[test]
fn checkpoint_resume_continues_exactly_and_output_reloads() {
    let (_d, ds) = stripes();
    let dev = Device::Cpu;
    let cfg = common::tiny_config(6);
    let run_a = tempfile::tempdir().unwrap();
    let mut a = Trainer::new(cfg.clone(), ds.clone(), &dev).unwrap();
    let full = fit(&mut a, run_a.path());
    assert_eq!(full.len(), 6);
    let ckpt3 = run_a.path().join("checkpoints/checkpoint-3");
    assert!(ckpt3.join("state.json").is_file());
    assert_eq!(
        latest_checkpoint(run_a.path()).unwrap().unwrap(),
        run_a.path().join("checkpoints/checkpoint-6")
    );

    // Resume from step 3 in a new run folder: same steps, bit-identical losses.
    let run_b = tempfile::tempdir().unwrap();
    let mut b = Trainer::new(cfg.clone(), ds.clone(), &dev).unwrap();
    b.resume_from(&ckpt3).unwrap();
    assert_eq!(b.step(), 3);
    let resumed = fit(&mut b, run_b.path());
    assert_eq!(resumed, full[3..].to_vec());
    assert_eq!(b.step(), 6);

    // Resuming into the same folder rewrites the metrics from step 3 on.
    let mut c = Trainer::new(cfg.clone(), ds.clone(), &dev).unwrap();
    c.resume_from(&ckpt3).unwrap();
    fit(&mut c, run_a.path());
    let metrics = std::fs::read_to_string(run_a.path().join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    for f in ["loss.png", "samples/step-0000006.png", "train_config.json"] {
        assert!(run_a.path().join(f).is_file(), "{f} missing");
    }

    // The diffusers folder: DDPMPipeline index, exact names (checked loading), samples.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_a.path().join("model_index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["_class_name"], "DDPMPipeline");
    assert_eq!(
        index["_class_names"],
        serde_json::json!(["horizontal", "vertical"])
    );
    let unet = UNet2DModel::from_pretrained(&run_a.path().join("unet"), DType::F32, &dev).unwrap();
    assert_eq!(unet.config(), &cfg.unet);
    let sched =
        SchedulerConfig::from_file(&run_a.path().join("scheduler/scheduler_config.json")).unwrap();
    assert_eq!(sched.class_name(), Some("DDPMScheduler"));
    let settings = SampleSettings {
        steps: 4,
        ..SampleSettings::default()
    };
    let images = sample(&unet, &sched, &settings, 2, Some(&[0, 1]), &dev).unwrap();
    assert_eq!(images.dims(), &[2, 1, 8, 8]);
    let max = images
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max.is_finite() && max <= 1.0);
    let ddpm = SampleSettings {
        scheduler: "DDPMScheduler".into(),
        ..settings
    };
    sample(&unet, &sched, &ddpm, 1, Some(&[1]), &dev).unwrap();
}

#[test]
fn broken_checkpoints_are_refused() {
    let (_d, ds) = stripes();
    let dev = Device::Cpu;
    let mut cfg = common::tiny_config(3);
    cfg.num_samples = 0;
    let run = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(cfg.clone(), ds.clone(), &dev).unwrap();
    fit(&mut t, run.path());
    let good = run.path().join("checkpoints/checkpoint-3");

    let copy = |name: &str| {
        let dst = run.path().join(name);
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
        dst
    };
    let resume = |dir: &Path| {
        let mut t = Trainer::new(cfg.clone(), ds.clone(), &dev).unwrap();
        t.resume_from(dir).unwrap_err().to_string()
    };

    let truncated = copy("truncated");
    let model = truncated.join("model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = resume(&truncated);
    assert!(
        err.contains("corrupt or incomplete") && err.contains("model.safetensors"),
        "{err}"
    );

    let flipped = copy("flipped");
    let opt = flipped.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&opt).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&opt, bytes).unwrap();
    let err = resume(&flipped);
    assert!(err.contains("checksum"), "{err}");

    let partial = copy("partial");
    std::fs::remove_file(partial.join("state.json")).unwrap();
    let err = resume(&partial);
    assert!(
        err.contains("corrupt or incomplete") && err.contains("state.json"),
        "{err}"
    );

    // A different model config is refused rather than silently mixed.
    let mut other = cfg.clone();
    other.unet.layers_per_block = 2;
    let mut t = Trainer::new(other, ds.clone(), &dev).unwrap();
    let err = t.resume_from(&good).unwrap_err().to_string();
    assert!(err.contains("different model"), "{err}");

    // An interrupted write (temporary folder) is never taken as the latest checkpoint.
    std::fs::create_dir_all(run.path().join("checkpoints/.checkpoint-9.tmp-1")).unwrap();
    assert_eq!(latest_checkpoint(run.path()).unwrap().unwrap(), good);
}

#[test]
fn bad_settings_give_clear_errors() {
    let (_d, ds) = stripes();
    let dev = Device::Cpu;
    let err = |cfg: TrainConfig| {
        Trainer::new(cfg, ds.clone(), &dev)
            .err()
            .unwrap()
            .to_string()
    };

    let mut c = common::tiny_config(2);
    c.batch_size = 0;
    assert!(err(c).contains("batch size must be at least 1"));

    let mut c = common::tiny_config(2);
    c.unet.num_class_embeds = Some(5);
    let e = err(c);
    assert!(
        e.contains("num_class_embeds = 5") && e.contains("2 classes"),
        "{e}"
    );

    let mut c = common::tiny_config(2);
    c.unet.sample_size = Some(serde_json::from_value(serde_json::json!(16)).unwrap());
    assert!(err(c).contains("sample_size"));

    let mut c = common::tiny_config(2);
    c.snr_gamma = Some(0.0);
    let e = err(c);
    assert!(e.contains("snr_gamma must be a positive number"), "{e}");

    let mut c = common::tiny_config(2);
    c.unet.in_channels = 3;
    c.unet.out_channels = 3;
    assert!(err(c).contains("channels"));

    // Unconditional models train on labelled data (labels unused).
    let mut c = common::tiny_config(1);
    c.unet.num_class_embeds = None;
    let mut t = Trainer::new(c, ds.clone(), &dev).unwrap();
    t.train_step().unwrap();
}
