//! `diffuse serve`: an HTTP server for the diffuse pipelines.
//!
//! * AUTOMATIC1111's API (`/sdapi/v1/txt2img`, `img2img`, `progress`, `interrupt`, `samplers`,
//!   `schedulers`, `sd-models`, `options`, `png-info`, `loras`, `embeddings`, `upscalers`,
//!   `sd-vae`; `<lora:name:weight>` prompt tags, clip skip) and OpenAI's
//!   (`/v1/images/generations`, `/v1/models`);
//! * jobs (`/v1/jobs`): queue, follow with Server-Sent Events, fetch images, cancel;
//! * a web page at `/` (one static file compiled into the binary).
//!
//! Every generation goes through one bounded queue to one worker thread that owns the loaded
//! model ([`worker`]); the async runtime only does I/O. Images are written with
//! [`diffuse_pipelines::task::run_task`], as `diffuse generate` writes them, so the same seed
//! and settings give the same PNG bytes.

mod a1111;
pub mod error;
pub mod jobs;
mod jobs_api;
pub mod models;
mod openai;
pub mod request;
mod routes;
pub mod worker;

use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use diffuse_core::{Error, Result};

pub use a1111::sampler_list;
pub use jobs::{JobQueue, JobSpec, JobStatus};
pub use models::{bundled_model, Models};
pub use routes::router;

/// What one request may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest image side (also for uploaded init images and masks).
    pub max_size: usize,
    pub max_steps: usize,
    /// Images per batch (`batch_size`, OpenAI's `n`).
    pub max_batch: usize,
    /// Images per request (`batch_size × n_iter`).
    pub max_images: usize,
    pub max_prompt_chars: usize,
    /// Request bodies over this are refused with 413.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_size: 2048,
            max_steps: 150,
            max_batch: 8,
            max_images: 16,
            max_prompt_chars: 10_000,
            max_body_bytes: 32 << 20,
        }
    }
}

/// How a server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Model folders or hub ids (in the local Hugging Face cache); the first is the default.
    /// Empty: the bundled Fashion-MNIST model.
    pub models: Vec<String>,
    /// Required as `Authorization: Bearer <key>` on every API call when set.
    pub api_key: Option<String>,
    /// Jobs that may wait behind the running one; more get 429.
    pub max_queue: usize,
    /// Finished jobs kept (with their images) for `GET /v1/jobs/{id}`.
    pub keep_jobs: usize,
    pub limits: Limits,
    /// On shutdown the running job gets this long to finish before it is cancelled.
    pub shutdown_grace: Duration,
    /// Where the `<lora:name:weight>` tags of Stable Diffusion prompts find `name.safetensors`
    /// (also listed by `/sdapi/v1/loras`); `None`: a tag is refused.
    pub lora_dir: Option<std::path::PathBuf>,
    /// Textual-inversion embeddings (`.pt`, `.safetensors`, `.bin`) added to every Stable
    /// Diffusion model as it loads, each under its token (A1111's `embeddings` folder); files
    /// that do not fit the model are skipped.
    pub embedding_dir: Option<std::path::PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            api_key: None,
            max_queue: 16,
            keep_jobs: 64,
            limits: Limits::default(),
            shutdown_grace: Duration::from_secs(30),
            lora_dir: None,
            embedding_dir: None,
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub queue: Arc<JobQueue>,
    pub models: Arc<Models>,
    pub config: Arc<ServerConfig>,
    /// The embeddings the loaded model took and skipped (`/sdapi/v1/embeddings`).
    pub embeddings: Arc<worker::Embeddings>,
}

/// A started server: the worker runs and the default model is loaded.
pub struct Server {
    state: AppState,
    worker: JoinHandle<()>,
}

impl Server {
    /// Resolves the models, starts the worker and loads the default model (so a broken one
    /// fails here, and the first request does not wait for the load).
    pub async fn start(config: ServerConfig) -> Result<Self> {
        if config.max_queue == 0 {
            return Err(Error::invalid("the queue must hold at least one job"));
        }
        let models = Arc::new(Models::from_specs(&config.models)?);
        let queue = Arc::new(JobQueue::new(config.max_queue, config.keep_jobs.max(1)));
        let embeddings = Arc::new(worker::Embeddings::new(config.embedding_dir.clone()));
        let worker = worker::spawn(queue.clone(), models.clone(), embeddings.clone())
            .map_err(|e| Error::invalid(format!("starting the worker thread: {e}")))?;
        let loaded = queue
            .load(models.default_name())
            .map_err(|e| Error::invalid(e.to_string()))?
            .await;
        let state = AppState {
            queue,
            models,
            config: Arc::new(config),
            embeddings,
        };
        let server = Self { state, worker };
        match loaded {
            Ok(Ok(())) => Ok(server),
            Ok(Err(msg)) => {
                server.stop_worker();
                Err(Error::invalid(msg))
            }
            Err(_) => Err(Error::invalid("the worker stopped while loading the model")),
        }
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    fn stop_worker(self) {
        self.state.queue.close();
        let _ = self.worker.join();
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down gracefully: no new
    /// connections or jobs, queued jobs cancelled, the running job finished (cancelled after
    /// [`ServerConfig::shutdown_grace`]), open requests and event streams answered.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let queue = self.state.queue.clone();
        let grace = self.state.config.shutdown_grace;
        let signal = async move {
            shutdown.await;
            queue.close();
            let q = queue.clone();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                q.interrupt();
            });
        };
        let app = router(self.state.clone());
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(signal)
            .await;
        // Make sure the worker ends even if serving failed before the signal.
        self.state.queue.close();
        let worker = self.worker;
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        served
    }
}
