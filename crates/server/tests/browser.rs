//! The web page in a real browser: headless Chromium (Debian package `chromium`, or the
//! binary `CHROMIUM` names) driven over the DevTools protocol loads `/`, types a prompt,
//! clicks Generate, waits for the image and checks it decoded; the screenshot is saved as
//! `target/test-artifacts/serve-page.png`.
//!
//! The DevTools protocol is JSON over one WebSocket; the few commands needed are sent by a
//! small client here (tungstenite) rather than a full generated protocol crate.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use diffuse_server::ServerConfig;
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// The Chromium binary: `CHROMIUM`, else the first of the usual names on PATH.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Some(p) = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        }) {
            return p;
        }
    }
    panic!(
        "no Chromium found: install it (Debian: apt-get install chromium) or set CHROMIUM; \
         .ci/run installs it"
    );
}

/// A headless Chromium with a fresh profile, killed on drop.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws_url: String,
}

impl Browser {
    fn launch() -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting chromium");
        // Chromium prints the DevTools address on stderr; keep draining stderr afterwards so
        // it never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_string());
                    }
                }
            }
        });
        let ws_url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("chromium did not print its DevTools address within 60 s");
        Self {
            child,
            _profile: profile,
            ws_url,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools protocol connection attached to one page (flat session mode).
struct Cdp {
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    fn connect(url: &str) -> Self {
        let (ws, _) = tungstenite::connect(url).expect("connecting to DevTools");
        Self {
            ws,
            next_id: 0,
            session: None,
        }
    }

    /// Sends a command and waits for its answer (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = s.clone().into();
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .expect("DevTools send");
        loop {
            let m = self.ws.read().expect("DevTools read");
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JS expression (awaiting promises) and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "JS error in {expr}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is true.
    fn wait_for(&mut self, expr: &str, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        while self.eval(expr) != json!(true) {
            if Instant::now() > deadline {
                let status = self.eval("document.getElementById('status').textContent");
                panic!("timed out waiting for {what} (page status: {status})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A real mouse click at the middle of the element `id`.
    fn click(&mut self, id: &str) {
        let r = self.eval(&format!(
            "(() => {{ const r = document.getElementById('{id}').getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (r[0].as_f64().unwrap(), r[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            );
        }
    }
}

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_generates_an_image_in_chromium() {
    // The bundled model first (what `diffuse serve` shows out of the box), the tiny SD second.
    let s = TestServer::start(ServerConfig {
        models: vec![fashion(), tiny_sd()],
        ..ServerConfig::default()
    })
    .await;
    let page = s.url("/");
    let shot = tokio::task::spawn_blocking(move || {
        let browser = Browser::launch();
        let mut cdp = Cdp::connect(&browser.ws_url);
        let targets = cdp.call("Target.getTargets", json!({}));
        let target = targets["targetInfos"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target")["targetId"]
            .clone();
        let attached = cdp.call(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        cdp.call("Page.enable", json!({}));
        cdp.call("Runtime.enable", json!({}));
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        );
        cdp.call("Page.navigate", json!({ "url": page }));
        cdp.wait_for(
            "document.readyState === 'complete' && document.getElementById('model').options.length === 2",
            Duration::from_secs(30),
            "the page and its model list",
        );
        assert_eq!(cdp.eval("document.getElementById('model').value"), "fashion-mnist-ddpm");
        assert_eq!(cdp.eval("document.getElementById('classes').children.length"), 10);
        // Type the prompt as a user does, and fewer steps to keep the test short.
        cdp.eval("(() => { const p = document.getElementById('prompt'); p.focus(); p.select(); })()");
        cdp.call("Input.insertText", json!({ "text": "Sneaker" }));
        cdp.eval("document.getElementById('steps').value = 20");
        cdp.eval("document.getElementById('seed').value = 7");
        assert_eq!(cdp.eval("document.getElementById('prompt').value"), "Sneaker");
        cdp.click("generate");
        cdp.wait_for(
            "(() => { const i = document.querySelector('#results img.result'); \
             return !!i && i.complete && i.naturalWidth > 0; })()",
            Duration::from_secs(60),
            "the generated image",
        );
        assert_eq!(cdp.eval("document.querySelector('#results img.result').naturalWidth"), 32);
        let info = cdp.eval("document.querySelector('#results .infotext').textContent");
        let info = info.as_str().unwrap();
        assert!(
            info.starts_with("Sneaker\n") && info.contains("Steps: 20") && info.contains("Seed: 7")
                && info.contains("Class: Sneaker"),
            "{info}"
        );
        assert_eq!(cdp.eval("document.querySelectorAll('#history img').length"), 1);
        assert_eq!(cdp.eval("document.getElementById('bar').style.width"), "100%");
        assert!(cdp
            .eval("document.getElementById('preview').src")
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,"));
        let shot = cdp.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = unb64(shot["data"].as_str().unwrap());
        let path = artifacts().join("serve-page.png");
        std::fs::write(&path, &png).unwrap();
        (path, png)
    })
    .await
    .unwrap();
    let (path, png) = shot;
    let (w, h, _) = png_info(&png);
    assert_eq!((w, h), (1280, 900), "screenshot {}", path.display());
    s.stop().await.unwrap();
}
