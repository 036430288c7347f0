//! The router: the web page, the API key check, and what the endpoint families share.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::error::ApiError;
use crate::jobs::{FailureKind, Job, JobQueue, JobSpec, JobStatus};
use crate::{a1111, jobs_api, openai, AppState};

/// The web page: one static file with its CSS and JS, no outside resources.
const PAGE: &str = include_str!("../static/index.html");

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/upscalers", get(a1111::upscalers))
        .route("/sdapi/v1/sd-vae", get(a1111::sd_vae))
        .route("/sdapi/v1/png-info", post(a1111::png_info))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route("/sdapi/v1/embeddings", get(a1111::embeddings))
        // The folder is read on every request: there is nothing to refresh.
        .route("/sdapi/v1/refresh-loras", post(|| async { axum::Json(()) }))
        .route(
            "/sdapi/v1/options",
            get(a1111::get_options).post(a1111::set_options),
        )
        .route("/v1/images/generations", post(openai::generations))
        .route("/v1/models", get(openai::models))
        .route("/v1/jobs", post(jobs_api::create).get(jobs_api::list))
        .route("/v1/jobs/{id}", get(jobs_api::get).delete(jobs_api::cancel))
        .route("/v1/jobs/{id}/events", get(jobs_api::events))
        .route("/v1/jobs/{id}/images/{file}", get(jobs_api::image))
        .route("/v1/queue", get(jobs_api::queue))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/", get(page))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .with_state(state)
}

async fn page() -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(PAGE)).into_response()
}

/// With `--api-key`, every API call needs `Authorization: Bearer <key>` (the page itself is
/// static and asks for the key when the API answers 401).
async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_bytes(g.as_bytes(), key.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or wrong API key: send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares in time that depends on the length only, so the key cannot be guessed byte by
/// byte from response times.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Cancels its job when dropped before [`CancelOnDrop::disarm`]: a client that hangs up on a
/// synchronous call does not leave its job running.
struct CancelOnDrop {
    queue: Arc<JobQueue>,
    job: Option<Arc<Job>>,
}

impl CancelOnDrop {
    fn disarm(mut self) {
        self.job = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.queue.cancel(&job, "the client went away");
        }
    }
}

/// Queues a job and waits for it (the synchronous endpoints): its images, or an error
/// (422 for a bad request found while running, 409 when cancelled, 500 for a failure).
pub async fn run_to_end(state: &AppState, spec: JobSpec) -> Result<Arc<Job>, ApiError> {
    let job = state.queue.submit(spec)?;
    let guard = CancelOnDrop {
        queue: state.queue.clone(),
        job: Some(job.clone()),
    };
    let status = job.wait().await;
    guard.disarm();
    match status {
        JobStatus::Done => Ok(job),
        JobStatus::Cancelled => Err(ApiError::new(
            StatusCode::CONFLICT,
            "cancelled",
            "the job was cancelled (interrupt, DELETE or server shutdown) before it finished",
        )),
        _ => {
            let (kind, message) = job
                .state()
                .error
                .clone()
                .unwrap_or((FailureKind::Internal, "the job failed".into()));
            Err(match kind {
                FailureKind::InvalidRequest => ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request_error",
                    message,
                ),
                FailureKind::Internal => ApiError::internal(message),
            })
        }
    }
}

/// The PNGs of a finished job as base64.
pub fn images_b64(job: &Job) -> Vec<String> {
    use base64::Engine;
    let s = job.state();
    s.result
        .as_ref()
        .map(|r| {
            r.pngs
                .iter()
                .map(|p| base64::engine::general_purpose::STANDARD.encode(p))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_bytes_compares_whole_keys() {
        assert!(super::same_bytes(b"secret", b"secret"));
        assert!(!super::same_bytes(b"secret", b"secreT"));
        assert!(!super::same_bytes(b"secret", b"secret2"));
        assert!(!super::same_bytes(b"", b"x"));
    }
}
