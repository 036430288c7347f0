//! A server on a free loopback port with the tiny fixture models, and an HTTP client for it.
#![allow(dead_code)]

use std::path::PathBuf;

use base64::Engine;
use diffuse_server::{Server, ServerConfig};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The repository's fixture folder (or `DIFFUSE_FIXTURES`).
pub fn fixtures() -> PathBuf {
    std::env::var_os("DIFFUSE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

/// The tiny Stable Diffusion pipeline (random weights, 64×64 images): fast.
pub fn tiny_sd() -> String {
    let p = fixtures().join("pipelines/tiny_sd");
    assert!(
        p.join("model_index.json").is_file(),
        "the tiny SD fixture pipeline is missing at {}",
        p.display()
    );
    p.display().to_string()
}

/// The bundled class-conditional Fashion-MNIST model (32×32 grayscale).
pub fn fashion() -> String {
    diffuse_server::bundled_model().display().to_string()
}

pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub state: diffuse_server::AppState,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server on 127.0.0.1 with a port the OS picks.
    pub async fn start(config: ServerConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::start(config).await.expect("server start");
        let state = server.state().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.serve(listener, async move {
            let _ = stopped.await;
        }));
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            state,
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// POSTs and reads the JSON answer, whatever its status.
    pub async fn post_json(&self, path: &str, body: &Value) -> Value {
        self.post(path, body).await.json().await.unwrap()
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    /// The whole event stream of a job.
    pub async fn events(&self, id: &str) -> Vec<(String, Value)> {
        read_events(&self.client, &self.url(&format!("/v1/jobs/{id}/events"))).await
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    /// Asks the server to shut down and waits until it has.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.handle.take().unwrap().await.unwrap()
    }
}

/// Asserts an error answer: status, JSON `error.field`, and a message.
pub async fn assert_error(resp: reqwest::Response, status: u16, field: Option<&str>) -> String {
    let got = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "status for {body}");
    assert_eq!(
        body["error"]["field"].as_str(),
        field,
        "error field of {body}"
    );
    let msg = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!msg.is_empty(), "no error message in {body}");
    msg
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}

/// Decodes a PNG: (width, height, infotext).
pub fn png_info(bytes: &[u8]) -> (u32, u32, Option<String>) {
    let img = image::load_from_memory(bytes).expect("a decodable PNG");
    let text = diffuse_pipelines::png_info::read_parameters(bytes).unwrap();
    (img.width(), img.height(), text)
}

/// A test picture as PNG bytes.
pub fn test_png(w: u32, h: u32, gray: bool) -> Vec<u8> {
    let img = if gray {
        image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, _| {
            image::Luma([if x < w / 2 { 0 } else { 255 }])
        }))
    } else {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
        }))
    };
    diffuse_pipelines::png_info::encode_png(&img, None).unwrap()
}

/// Reads a Server-Sent Events stream to its end: (event name, JSON data) in order.
pub async fn read_events(client: &reqwest::Client, url: &str) -> Vec<(String, Value)> {
    read_events_until(client, url, |_| false).await
}

/// Reads a Server-Sent Events stream until its end or the first event `stop` accepts.
pub async fn read_events_until(
    client: &reqwest::Client,
    url: &str,
    stop: impl Fn(&str) -> bool,
) -> Vec<(String, Value)> {
    let mut resp = client.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {url}");
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut buf = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .expect("the event stream did not end within 120 s")
            .unwrap();
        let Some(chunk) = chunk else { break };
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(cut) = buf.find("\n\n") {
            let block: String = buf.drain(..cut + 2).collect();
            let (mut name, mut data) = (String::from("message"), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if !data.is_empty() {
                let done = stop(&name);
                events.push((name, serde_json::from_str(&data).unwrap()));
                if done {
                    return events;
                }
            }
        }
    }
    events
}

/// Polls `GET /v1/jobs/{id}` until `pred` holds on it (at most 60 s).
pub async fn wait_job(server: &TestServer, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = server.get_json(&format!("/v1/jobs/{id}")).await;
        if pred(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} never reached the awaited state: {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
