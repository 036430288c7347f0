//! `diffuse train` run as a user would, on eight 8×8 images: train, resume, clear errors.

mod common;
use common::{diffuse_err, write_two_classes};

use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("diffuse-train-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn trains_resumes_and_reports_errors() {
    let tmp = TempDir::new("run");
    let data = tmp.0.join("data");
    write_two_classes(&data);
    let out = tmp.0.join("out");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let common = [
        "train",
        "--data",
        d,
        "--grayscale",
        "--resolution",
        "8",
        "--channels",
        "8,16",
        "--layers-per-block",
        "1",
        "--warmup",
        "0",
        // A constant rate does not depend on --steps, so a run extended with --resume matches
        // an uninterrupted one.
        "--lr-schedule",
        "constant",
        "--sample-steps",
        "2",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
        "--output",
        o,
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        common.iter().chain(extra).map(|s| s.to_string()).collect()
    };

    let (ok, err) = diffuse_err(&with(&[
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--classes",
        "2",
    ]));
    assert!(ok, "{err}");
    assert!(err.contains("trained steps 0..2"), "{err}");
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "loss.png",
        "checkpoints/checkpoint-2/state.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let unet: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("unet/config.json")).unwrap())
            .unwrap();
    assert_eq!(unet["num_class_embeds"], 3);

    let (ok, err) = diffuse_err(&with(&[
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--classes",
        "2",
        "--resume",
        "latest",
    ]));
    assert!(ok, "{err}");
    assert!(
        err.contains("at step 2") && err.contains("trained steps 2..3"),
        "{err}"
    );
    let losses = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let resumed = losses(&out);
    assert_eq!(resumed.len(), 3);

    // The same 3 steps in one process, with the same seed: the same losses, bit for bit.
    let straight = tmp.0.join("straight");
    let mut args = with(&["--steps", "3", "--batch-size", "4", "--classes", "2"]);
    let at = args.iter().position(|a| a == "--output").unwrap();
    args[at + 1] = straight.to_string_lossy().into_owned();
    let (ok, err) = diffuse_err(&args);
    assert!(ok, "{err}");
    assert_eq!(losses(&straight), resumed);

    let (ok, err) = diffuse_err(&with(&[
        "--steps",
        "3",
        "--batch-size",
        "0",
        "--classes",
        "2",
    ]));
    assert!(
        !ok && err.contains("batch size must be at least 1"),
        "{err}"
    );
    let (ok, err) = diffuse_err(&with(&[
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--classes",
        "5",
    ]));
    assert!(
        !ok && err.contains("--classes 5 does not match") && err.contains("2 classes"),
        "{err}"
    );
    let missing = tmp.0.join("nothing");
    let (ok, err) = diffuse_err(&[
        "train",
        "--dataset",
        "fashion-mnist",
        "--data",
        missing.to_str().unwrap(),
        "--output",
        o,
    ]);
    assert!(!ok && err.contains("scripts/fetch-data.sh"), "{err}");
}

/// `kill -9` in the middle of a run, then `--resume latest`: training goes on from the last
/// complete checkpoint and the loss curve equals that of a run never interrupted.
#[test]
fn resumes_after_kill_9() {
    let tmp = TempDir::new("kill");
    let data = tmp.0.join("data");
    write_two_classes(&data);
    let args = |out: &Path, steps: u64| -> Vec<String> {
        [
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
            "--warmup",
            "0",
            "--lr-schedule",
            "constant",
            "--batch-size",
            "4",
            "--sample-steps",
            "1",
            "--checkpoint-every",
            "3",
            "--log-every",
            "1",
            "--steps",
            &steps.to_string(),
            "--output",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let out = tmp.0.join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args(&out, 1_000_000))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoints = out.join("checkpoints");
    let started = std::time::Instant::now();
    loop {
        let has_one = std::fs::read_dir(&checkpoints).is_ok_and(|d| {
            d.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        });
        if has_one {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 300,
            "no checkpoint after 5 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(child.try_wait().unwrap().is_none(), "the run ended early");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The newest complete checkpoint is where training resumes.
    let last = std::fs::read_dir(&checkpoints)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            name.strip_prefix("checkpoint-")?.parse::<u64>().ok()
        })
        .max()
        .unwrap();
    let target = last + 3;
    let mut resume = args(&out, target);
    resume.extend(["--resume".to_string(), "latest".to_string()]);
    let (ok, err) = diffuse_err(&resume);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("trained steps {last}..{target}")),
        "{err}"
    );

    let straight = tmp.0.join("straight");
    let (ok, err) = diffuse_err(&args(&straight, target));
    assert!(ok, "{err}");
    let curve = |dir: &Path| -> Vec<(u64, f64)> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
            })
            .collect()
    };
    let resumed = curve(&out);
    assert_eq!(resumed.len() as u64, target, "{resumed:?}");
    assert_eq!(resumed, curve(&straight));
}
