//! `diffuse serve` as a user runs it: the binary on a free loopback port, stopped with
//! SIGTERM. The same seed and settings give the same PNG bytes as `diffuse generate`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

/// `diffuse serve --port 0 args…`, once it prints its address; stopped on drop.
struct Served {
    child: Child,
    base: String,
}

impl Served {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_diffuse"))
            .args(["serve", "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting diffuse serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("diffuse serve did not print its address");
        let base = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        Self { child, base }
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("diffuse serve did not stop within 30 s of SIGTERM");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("diffuse-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `diffuse generate` with `args`, into `dir/out.png`; the PNG files' bytes in order.
fn generate(dir: &Path, n: usize, args: &[&str]) -> Vec<Vec<u8>> {
    let out = dir.join("out.png");
    let (ok, _, err) = common::diffuse(
        &[
            &["generate", "--force", "--output", out.to_str().unwrap()],
            args,
        ]
        .concat(),
    );
    assert!(ok, "diffuse generate failed: {err}");
    if n == 1 {
        vec![std::fs::read(&out).unwrap()]
    } else {
        (0..n)
            .map(|i| std::fs::read(dir.join(format!("out-{i}.png"))).unwrap())
            .collect()
    }
}

fn b64_images(v: &Value) -> Vec<Vec<u8>> {
    v["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s.as_str().unwrap())
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_gives_the_bytes_of_generate_and_stops_on_sigterm() {
    let tiny = repo("fixtures/pipelines/tiny_sd");
    let fashion = repo("models/fashion-mnist-ddpm");
    let server = Served::start(&["--model", &tiny, "--model", &fashion]);
    let client = reqwest::Client::new();
    let txt2img = |body: Value| {
        let (client, url) = (client.clone(), format!("{}/sdapi/v1/txt2img", server.base));
        async move {
            let r = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            b64_images(&r.json().await.unwrap())
        }
    };
    let dir = temp_dir("parity");

    // Stable Diffusion with an A1111 sampler name.
    let served = txt2img(json!({
        "prompt": "a lighthouse", "negative_prompt": "fog", "steps": 3, "seed": 1234,
        "sampler_name": "DPM++ 2M Karras", "cfg_scale": 6.5, "width": 64, "height": 48
    }))
    .await;
    let cli = generate(
        &dir,
        1,
        &[
            "--model",
            &tiny,
            "--prompt",
            "a lighthouse",
            "--negative-prompt",
            "fog",
            "--steps",
            "3",
            "--seed",
            "1234",
            "--scheduler",
            "DPM++ 2M Karras",
            "--guidance-scale",
            "6.5",
            "--width",
            "64",
            "--height",
            "48",
        ],
    );
    assert!(
        served[0] == cli[0],
        "txt2img bytes differ from diffuse generate"
    );

    // The model's own scheduler and defaults, two images in one batch.
    let served = txt2img(json!({"prompt": "a boat", "seed": 5, "steps": 2, "batch_size": 2})).await;
    let cli = generate(
        &dir,
        2,
        &[
            "--model",
            &tiny,
            "--prompt",
            "a boat",
            "--seed",
            "5",
            "--steps",
            "2",
            "--num-images",
            "2",
        ],
    );
    assert_eq!(served.len(), 2);
    assert!(served == cli, "batch bytes differ from diffuse generate");

    // The class-conditional DDPM model, named per request.
    let served = txt2img(
        json!({"prompt": "Ankle boot", "seed": 77, "steps": 5, "model": "fashion-mnist-ddpm"}),
    )
    .await;
    let cli = generate(
        &dir,
        1,
        &[
            "--model",
            &fashion,
            "--prompt",
            "Ankle boot",
            "--seed",
            "77",
            "--steps",
            "5",
        ],
    );
    assert!(
        served[0] == cli[0],
        "DDPM bytes differ from diffuse generate"
    );

    let status = server.terminate();
    assert!(status.success(), "diffuse serve exited with {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's one command: no arguments serve the bundled model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_without_arguments_serves_the_bundled_model() {
    let server = Served::start(&[]);
    let models: Value = reqwest::get(format!("{}/sdapi/v1/sd-models", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models[0]["title"], "fashion-mnist-ddpm");
    let page = reqwest::get(format!("{}/", server.base)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("id=\"generate\""));
    assert!(server.terminate().success());
}

#[test]
fn serve_refuses_bad_settings() {
    let (ok, _, err) = common::diffuse(&["serve", "--port", "0", "--model", "/no/such/folder"]);
    assert!(!ok);
    assert!(err.contains("/no/such/folder"), "{err}");
    let (ok, _, err) = common::diffuse(&["serve", "--port", "0", "--max-queue", "0"]);
    assert!(!ok);
    assert!(err.contains("--max-queue"), "{err}");
    let (ok, _, err) = common::diffuse(&["serve", "--port", "0", "--lora-dir", "/no/loras"]);
    assert!(!ok);
    assert!(
        err.contains("--lora-dir /no/loras: no such folder"),
        "{err}"
    );
}
