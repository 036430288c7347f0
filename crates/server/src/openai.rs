//! The OpenAI images API (`POST /v1/images/generations`, `GET /v1/models`) app developers call.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, JsonBody};
use crate::request::{Endpoint, GenerateRequest};
use crate::routes::{images_b64, run_to_end};
use crate::AppState;

/// OpenAI's fields, and a few of diffuse's (`negative_prompt`, `steps`, `seed`,
/// `guidance_scale`, `sampler`) that OpenAI clients may pass as extra body fields.
#[derive(Debug, Deserialize)]
pub struct ImagesRequest {
    prompt: Option<String>,
    n: Option<i64>,
    /// `"WxH"`.
    size: Option<String>,
    /// `b64_json` (default) or `url`.
    response_format: Option<String>,
    model: Option<String>,
    negative_prompt: Option<String>,
    steps: Option<i64>,
    seed: Option<i64>,
    guidance_scale: Option<f64>,
    sampler: Option<String>,
}

fn parse_size(size: &str) -> Result<(i64, i64), ApiError> {
    let bad = || {
        ApiError::field(
            "size",
            format!("size must be \"WIDTHxHEIGHT\" such as \"512x512\", got {size:?}"),
        )
    };
    let (w, h) = size.trim().split_once(['x', 'X']).ok_or_else(bad)?;
    Ok((
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    ))
}

pub async fn generations(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<ImagesRequest>,
) -> Result<Json<Value>, ApiError> {
    let prompt = req
        .prompt
        .ok_or_else(|| ApiError::field("prompt", "prompt is required"))?;
    let url = match req.response_format.as_deref() {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(other) => {
            return Err(ApiError::field(
                "response_format",
                format!("response_format must be b64_json or url, got {other:?}"),
            ))
        }
    };
    let (width, height) = match &req.size {
        Some(s) if s != "auto" => {
            let (w, h) = parse_size(s)?;
            (Some(w), Some(h))
        }
        _ => (None, None),
    };
    if let Some(n) = req
        .n
        .filter(|&n| n < 1 || n as usize > state.config.limits.max_batch)
    {
        return Err(ApiError::field(
            "n",
            format!(
                "n must be between 1 and {}, got {n}",
                state.config.limits.max_batch
            ),
        ));
    }
    let gen = GenerateRequest {
        prompt: Some(prompt),
        negative_prompt: req.negative_prompt,
        steps: req.steps,
        cfg_scale: req.guidance_scale,
        sampler_name: req.sampler,
        seed: req.seed,
        width,
        height,
        batch_size: req.n,
        model: req.model,
        ..Default::default()
    };
    let spec = gen
        .to_spec(Endpoint::Txt2Img, &state.models, &state.config)
        .map_err(|mut e| {
            // Name OpenAI's fields, not A1111's.
            e.field = e.field.map(|f| match f.as_str() {
                "width" | "height" => "size".into(),
                "batch_size" => "n".into(),
                "cfg_scale" => "guidance_scale".into(),
                "sampler_name" => "sampler".into(),
                _ => f,
            });
            e
        })?;
    let job = run_to_end(&state, spec).await?;
    let data: Vec<Value> = if url {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        let n = job.state().result.as_ref().map_or(0, |r| r.pngs.len());
        (0..n)
            .map(|k| json!({ "url": format!("http://{host}/v1/jobs/{}/images/{k}.png", job.id) }))
            .collect()
    } else {
        images_b64(&job)
            .into_iter()
            .map(|b| json!({ "b64_json": b }))
            .collect()
    };
    Ok(Json(json!({ "created": job.created, "data": data })))
}

pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .entries()
        .iter()
        .map(|e| json!({ "id": e.name, "object": "model", "created": 0, "owned_by": "diffuse" }))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}
