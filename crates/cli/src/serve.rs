//! `diffuse serve`: the HTTP server (A1111 and OpenAI APIs, jobs with live progress, a web
//! page) of the `diffuse-server` crate, on a tokio runtime.

use std::io::Write;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use diffuse_server::{Limits, Server, ServerConfig};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A model to serve: a pipeline folder or a hub id in the local Hugging Face cache (repeat
    /// for several; requests pick one by name, the first is the default). Default: the bundled
    /// Fashion-MNIST model.
    #[arg(long = "model", value_name = "MODEL")]
    pub models: Vec<String>,
    /// Where the `<lora:name:weight>` tags of Stable Diffusion prompts find `name.safetensors`
    /// (listed by GET /sdapi/v1/loras). A job with other LoRAs than the last one loads the
    /// model afresh with them fused in (seconds); without this folder a tag is refused.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<std::path::PathBuf>,
    /// Textual-inversion embeddings (.pt, .safetensors, .bin) added to every Stable Diffusion
    /// model as it loads, each under its token (the file's own, else its stem); files that do
    /// not fit the model are skipped with a warning. GET /sdapi/v1/embeddings lists them.
    #[arg(long, value_name = "DIR")]
    pub embedding_dir: Option<std::path::PathBuf>,
    /// Address to listen on. Only loopback unless you say otherwise.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every API call (also read from DIFFUSE_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Jobs that may wait behind the running one; more are refused with 429.
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Largest image side a request may ask for.
    #[arg(long, default_value_t = 2048)]
    pub max_size: usize,
    /// Most denoising steps a request may ask for.
    #[arg(long, default_value_t = 150)]
    pub max_steps: usize,
    /// Most images per request.
    #[arg(long, default_value_t = 16)]
    pub max_images: usize,
    /// Seconds the running job gets to finish on shutdown (Ctrl-C) before it is cancelled.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<()> {
    if args.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    for (flag, dir) in [
        ("--lora-dir", &args.lora_dir),
        ("--embedding-dir", &args.embedding_dir),
    ] {
        if let Some(dir) = dir.as_ref().filter(|d| !d.is_dir()) {
            anyhow::bail!("{flag} {}: no such folder", dir.display());
        }
    }
    let config = ServerConfig {
        models: args.models.clone(),
        api_key: args
            .api_key
            .clone()
            .or_else(|| std::env::var("DIFFUSE_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        max_queue: args.max_queue,
        limits: Limits {
            max_size: args.max_size,
            max_steps: args.max_steps,
            max_images: args.max_images,
            max_batch: args.max_images.min(Limits::default().max_batch),
            ..Limits::default()
        },
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        lora_dir: args.lora_dir.clone(),
        embedding_dir: args.embedding_dir.clone(),
        ..ServerConfig::default()
    };
    if !args.host.is_loopback() && config.api_key.is_none() {
        eprintln!(
            "warning: listening on {} without --api-key: anyone who can reach it can use it",
            args.host
        );
    }
    let listener = tokio::net::TcpListener::bind((args.host, args.port))
        .await
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    eprintln!("loading the models...");
    let server = Server::start(config).await?;
    let shutdown = shutdown_signal();
    let names = server.state().models.names().join(", ");
    println!("diffuse serve: listening on http://{addr} (models: {names})");
    std::io::stdout().flush()?;
    server.serve(listener, shutdown).await?;
    eprintln!("diffuse serve: stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM. The handlers are installed here, before the server says it listens (a
/// signal future installs its handler only when first polled, and a SIGTERM arriving before
/// that took the default action: the process died instead of shutting down).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
                match s {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            let (int, term) = signals;
            tokio::select! {
                _ = wait(int) => {},
                _ = wait(term) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        eprintln!("diffuse serve: shutting down (queued jobs cancelled, the running one finishes)");
    }
}
