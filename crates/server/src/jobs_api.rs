//! The job API: queue a generation, follow it with Server-Sent Events, fetch its images,
//! cancel it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};

use crate::error::{ApiError, JsonBody};
use crate::jobs::{Job, Next};
use crate::request::{Endpoint, GenerateRequest};
use crate::AppState;

fn find(state: &AppState, id: &str) -> Result<Arc<Job>, ApiError> {
    state.queue.get(id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no job `{id}` (finished jobs are kept for a while only)"
        ))
    })
}

/// `POST /v1/jobs`: 202 with the job, or 429 when the queue is full.
pub async fn create(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    let spec = req.into_spec(Endpoint::Job, &state).await?;
    let job = state.queue.submit(spec)?;
    let body = job.to_json(state.queue.position(&job.id));
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{}", job.id))],
        Json(body),
    )
        .into_response())
}

pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let jobs: Vec<Value> = state
        .queue
        .recent()
        .iter()
        .map(|j| j.to_json(state.queue.position(&j.id)))
        .collect();
    Json(json!({ "jobs": jobs }))
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&state, &id)?;
    Ok(Json(job.to_json(state.queue.position(&id))))
}

/// `DELETE /v1/jobs/{id}`: a queued job is cancelled at once, a running one at its next step;
/// 409 for a job that has already ended.
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&state, &id)?;
    if !state.queue.cancel(&job, "cancelled by DELETE") {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_ended",
            format!("job `{id}` has already ended ({:?})", job.status()).to_lowercase(),
        ));
    }
    Ok(Json(job.to_json(None)))
}

/// `GET /v1/jobs/{id}/events`: every event of the job from the first (`queued`), then live
/// ones, until `done`, `failed` or `cancelled`.
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let job = find(&state, &id)?;
    let rx = job.subscribe();
    let stream = stream::unfold((job, rx, 0usize), |(job, mut rx, i)| async move {
        loop {
            // Mark the version seen before reading, so an event added after the read wakes us.
            rx.borrow_and_update();
            match job.next_event(i) {
                Next::Event(e) => {
                    let ev = SseEvent::default()
                        .event(e.name)
                        .id(i.to_string())
                        .data(e.data.to_string());
                    return Some((Ok(ev), (job, rx, i + 1)));
                }
                Next::End => return None,
                Next::Wait => {
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// `GET /v1/jobs/{id}/images/{k}.png`.
pub async fn image(
    State(state): State<AppState>,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let job = find(&state, &id)?;
    let k: usize = file
        .strip_suffix(".png")
        .unwrap_or(&file)
        .parse()
        .map_err(|_| ApiError::not_found(format!("no image `{file}`")))?;
    let s = job.state();
    let png = s
        .result
        .as_ref()
        .and_then(|r| r.pngs.get(k))
        .ok_or_else(|| ApiError::not_found(format!("job `{id}` has no image {k} (yet)")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png.clone()).into_response())
}

pub async fn queue(State(state): State<AppState>) -> Json<Value> {
    Json(serde_json::to_value(state.queue.counts()).unwrap_or_default())
}
