//! A bounded load test on the bundled Fashion-MNIST model: 50 concurrent requests, all
//! answered, none lost, the queue bound held. Prints the latency figures.

mod common;

use std::time::{Duration, Instant};

use common::*;
use diffuse_server::ServerConfig;
use serde_json::{json, Value};

const REQUESTS: usize = 50;
/// Few steps keep the test short; the figures are for this setting.
const STEPS: usize = 4;

/// Sends `REQUESTS` txt2img calls at once; returns (status, latency, body) per request.
async fn burst(s: &TestServer) -> Vec<(u16, Duration, Value)> {
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let client = s.client.clone();
            let url = s.url("/sdapi/v1/txt2img");
            tokio::spawn(async move {
                let body = json!({"prompt": "sneaker", "steps": STEPS, "seed": i});
                let t = Instant::now();
                let r = client
                    .post(url)
                    .json(&body)
                    .timeout(Duration::from_secs(120))
                    .send()
                    .await
                    .expect("every request is answered");
                let status = r.status().as_u16();
                let retry = r.headers().get("retry-after").cloned();
                let v: Value = r.json().await.unwrap();
                if status == 429 {
                    assert!(retry.is_some(), "429 without Retry-After");
                }
                (status, t.elapsed(), v)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let k = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[k]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_are_all_answered_within_the_queue_bound() {
    // A queue that holds them all: every request gets its image.
    let s = TestServer::start(ServerConfig {
        max_queue: REQUESTS,
        ..ServerConfig::default()
    })
    .await;
    let t = Instant::now();
    let results = burst(&s).await;
    let wall = t.elapsed();
    let mut latencies = Vec::new();
    for (i, (status, took, v)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {v}");
        let (w, h, text) = png_info(&unb64(v["images"][0].as_str().unwrap()));
        assert_eq!((w, h), (32, 32));
        // Each answer is its own request's image.
        assert!(
            text.unwrap().contains(&format!("Seed: {i}, ")),
            "request {i} got another request's image"
        );
        latencies.push(*took);
    }
    latencies.sort();
    let q = s.get_json("/v1/queue").await;
    assert_eq!(q["submitted"], REQUESTS);
    assert_eq!(q["rejected"], 0);
    assert!(q["high_water"].as_u64().unwrap() <= REQUESTS as u64);
    println!(
        "load (bundled fashion-mnist-ddpm, {STEPS} steps, queue {REQUESTS}): {REQUESTS} requests, \
         all 200 in {:.2} s ({:.1} images/s); latency p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        wall.as_secs_f64(),
        REQUESTS as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.95).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
    s.stop().await.unwrap();

    // A small queue: the overflow is refused with 429, nothing is lost or left hanging.
    let max_queue = 8;
    let s = TestServer::start(ServerConfig {
        max_queue,
        ..ServerConfig::default()
    })
    .await;
    let results = burst(&s).await;
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused = results.iter().filter(|r| r.0 == 429).count();
    assert_eq!(ok + refused, REQUESTS, "only 200 and 429 answers");
    assert!(ok >= max_queue, "the queue was used: {ok} served");
    assert!(refused > 0, "the bound was reached");
    let q = s.get_json("/v1/queue").await;
    assert_eq!(q["submitted"], ok);
    assert_eq!(q["rejected"], refused);
    assert!(
        q["high_water"].as_u64().unwrap() <= max_queue as u64,
        "queue bound exceeded: {q}"
    );
    assert_eq!(
        (q["queued"].as_u64(), q["running"].as_u64()),
        (Some(0), Some(0))
    );
    println!(
        "load (queue {max_queue}): {REQUESTS} requests, {ok} served, {refused} refused with 429, \
         most waiting at once {}",
        q["high_water"]
    );
    s.stop().await.unwrap();
}
