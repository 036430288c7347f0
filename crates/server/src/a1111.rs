//! The AUTOMATIC1111 web UI API (`/sdapi/v1/...`) that plugins, bots and tools speak.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use diffuse_pipelines::task::HiresFix;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::{ApiError, JsonBody};
use crate::jobs::{Job, JobSpec};
use crate::request::{Endpoint, GenerateRequest};
use crate::routes::{images_b64, run_to_end};
use crate::AppState;

/// The samplers this build runs, as `/sdapi/v1/samplers` lists them: the scheduler crate's
/// A1111 name table, each with the diffusers class it runs as its alias.
pub fn sampler_list() -> Vec<Value> {
    diffuse_schedulers::a1111_names()
        .into_iter()
        .filter_map(|name| {
            let (class, _) = diffuse_schedulers::resolve_name(name).ok()?;
            Some(json!({ "name": name, "aliases": [class], "options": {} }))
        })
        .collect()
}

/// `info` of a txt2img/img2img answer: A1111 sends it as a JSON string.
fn info_json(spec: &JobSpec, job: &Job) -> String {
    let st = job.state();
    let r = st.result.as_ref();
    let s = &spec.settings;
    let n = spec.n_iter * s.num_images;
    json!({
        "prompt": spec.written_prompt,
        "all_prompts": vec![&spec.written_prompt; n],
        "negative_prompt": s.negative_prompt,
        "all_negative_prompts": vec![&s.negative_prompt; n],
        "seed": s.seed,
        "all_seeds": r.map(|r| r.seeds.clone()).unwrap_or_default(),
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": s.width,
        "height": s.height,
        "sampler_name": r.map(|r| r.sampler.clone()),
        "cfg_scale": s.guidance_scale,
        "steps": s.steps,
        "batch_size": s.num_images,
        "n_iter": spec.n_iter,
        "denoising_strength": s.init.as_ref().map(|i| i.strength),
        "sd_model_name": spec.model,
        "infotexts": r.map(|r| r.infotexts.clone()).unwrap_or_default(),
        "job_timestamp": job.created,
        "warnings": r.map(|r| r.warnings.clone()).unwrap_or_default(),
    })
    .to_string()
}

/// The request as it came, without the (large) images, for `parameters`.
fn echo(raw: &Value) -> Value {
    let mut v = raw.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("init_images");
        o.remove("mask");
    }
    v
}

async fn generate(
    state: AppState,
    raw: Value,
    endpoint: Endpoint,
) -> Result<Json<Value>, ApiError> {
    let req: GenerateRequest = crate::error::from_value(&raw)?;
    let spec = req.into_spec(endpoint, &state).await?;
    let job = run_to_end(&state, spec).await?;
    Ok(Json(json!({
        "images": images_b64(&job),
        "parameters": echo(&raw),
        "info": info_json(&job.spec, &job),
    })))
}

pub async fn txt2img(
    State(state): State<AppState>,
    JsonBody(raw): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    generate(state, raw, Endpoint::Txt2Img).await
}

pub async fn img2img(
    State(state): State<AppState>,
    JsonBody(raw): JsonBody<Value>,
) -> Result<Json<Value>, ApiError> {
    generate(state, raw, Endpoint::Img2Img).await
}

#[derive(Deserialize)]
pub struct ProgressQuery {
    skip_current_image: Option<bool>,
}

/// Progress of the running job: share done, seconds left, and the latest step preview.
pub async fn progress(
    State(state): State<AppState>,
    Query(q): Query<ProgressQuery>,
) -> Json<Value> {
    let counts = state.queue.counts();
    let running = state.queue.running();
    let (mut progress, mut eta, mut step, mut steps) = (0.0, 0.0, 0, 0);
    let (mut job_id, mut stamp, mut interrupted, mut image) = (String::new(), 0, false, None);
    if let Some(job) = &running {
        let s = job.state();
        (step, steps) = (s.step, s.steps);
        progress = step as f64 / steps.max(1) as f64;
        if let (Some(t), true) = (s.started, progress > 0.0) {
            let elapsed = t.elapsed().as_secs_f64();
            eta = elapsed / progress - elapsed;
        }
        job_id = job.id.clone();
        stamp = job.created;
        interrupted = job.cancel_requested();
        if !q.skip_current_image.unwrap_or(false) {
            image = s
                .preview
                .as_ref()
                .map(|p| base64::engine::general_purpose::STANDARD.encode(p));
        }
    }
    Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": interrupted,
            "job": job_id,
            "job_count": counts.queued + counts.running,
            "job_timestamp": stamp.to_string(),
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": steps,
        },
        "current_image": image,
        "textinfo": null,
    }))
}

/// Stops the running job (its synchronous caller gets 409; its SSE stream `cancelled`).
pub async fn interrupt(State(state): State<AppState>) -> Json<Value> {
    let job = state.queue.interrupt();
    Json(json!({ "interrupted": job.map(|j| j.id.clone()) }))
}

/// The body of `POST /sdapi/v1/png-info`.
#[derive(Deserialize)]
pub struct PngInfoRequest {
    /// A PNG or JPEG, base64 (a `data:` URL prefix is allowed).
    image: String,
}

/// `POST /sdapi/v1/png-info` (A1111's PNG Info tab): an image's infotext (`info`, empty when it
/// has none) and its fields as A1111 splits them (`parameters`: `Prompt`, `Negative prompt`,
/// `Steps`, `Size-1`, ...). `items` (A1111's other text chunks) is always empty.
pub async fn png_info(JsonBody(req): JsonBody<PngInfoRequest>) -> Result<Json<Value>, ApiError> {
    let bytes = crate::request::decode_base64("image", &req.image)?;
    let info = diffuse_pipelines::png_info::read_image_parameters(&bytes)
        .map_err(|e| ApiError::field("image", format!("image: {e}")))?
        .unwrap_or_default();
    let parameters: Map<String, Value> = match info.is_empty() {
        true => Map::new(),
        false => diffuse_pipelines::png_info::parse_infotext(&info)
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
    };
    Ok(Json(
        json!({ "info": info, "items": {}, "parameters": parameters }),
    ))
}

pub async fn samplers() -> Json<Value> {
    Json(Value::Array(sampler_list()))
}

/// `GET /sdapi/v1/schedulers` (A1111 1.9+): the sigma schedules a request's `scheduler` may
/// name next to its sampler: the sampler's own (`Automatic`) or Karras's.
pub async fn schedulers() -> Json<Value> {
    Json(json!([
        { "name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1,
          "need_inner_model": false },
        { "name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0,
          "need_inner_model": false },
    ]))
}

/// `GET /sdapi/v1/upscalers`: the hires fix's one upscaler, Lanczos (A1111's `None`, a plain
/// resize, is the same here); no model upscalers.
pub async fn upscalers() -> Json<Value> {
    let entry = |name: &str| json!({ "name": name, "model_name": null, "model_path": null, "model_url": null, "scale": 4 });
    Json(json!([entry("None"), entry(HiresFix::UPSCALER)]))
}

/// `GET /sdapi/v1/sd-vae`: no separate VAE files; every model decodes with its own.
pub async fn sd_vae() -> Json<Value> {
    Json(json!([]))
}

/// `GET /sdapi/v1/loras`: the LoRAs `<lora:name:weight>` tags may name (the `*.safetensors`
/// files of `--lora-dir`; none without one), as A1111 lists them. `path` is the file name
/// alone: a client need not learn where the server keeps its files.
pub async fn loras(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let Some(dir) = &state.config.lora_dir else {
        return Ok(Json(json!([])));
    };
    let found =
        diffuse_pipelines::list_loras(dir).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(
        found
            .into_iter()
            .map(|(name, path)| {
                let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
                json!({ "name": name, "alias": name, "path": file, "metadata": {} })
            })
            .collect(),
    ))
}

/// `GET /sdapi/v1/embeddings`: the textual-inversion embeddings the loaded model took from
/// `--embedding-dir` (by token) and those it skipped (by file stem), as A1111 lists them.
pub async fn embeddings(State(state): State<AppState>) -> Json<Value> {
    Json(state.embeddings.report())
}

pub async fn sd_models(State(state): State<AppState>) -> Json<Value> {
    Json(state.models.entries().iter().map(|e| e.to_json()).collect())
}

pub async fn get_options(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "sd_model_checkpoint": state.models.default_name(),
        "samples_format": "png",
        "sd_checkpoint_hash": null,
    }))
}

/// `sd_model_checkpoint` switches the default model, once the worker has loaded it (behind
/// the jobs queued before). Other options are accepted and ignored.
pub async fn set_options(
    State(state): State<AppState>,
    JsonBody(opts): JsonBody<Map<String, Value>>,
) -> Result<Json<Value>, ApiError> {
    let Some(v) = opts.get("sd_model_checkpoint") else {
        return Ok(Json(json!({})));
    };
    let field = "sd_model_checkpoint";
    let name = v
        .as_str()
        .ok_or_else(|| ApiError::field(field, "sd_model_checkpoint must be a string"))?;
    let entry = state.models.get(name).ok_or_else(|| {
        ApiError::field(
            field,
            format!(
                "unknown model `{name}`; this server has: {}",
                state.models.names().join(", ")
            ),
        )
    })?;
    let name = entry.name.clone();
    let reply = state.queue.load(name.clone())?;
    match reply.await {
        Ok(Ok(())) => {
            state.models.set_default(&name);
            Ok(Json(json!({ "sd_model_checkpoint": name })))
        }
        Ok(Err(msg)) => Err(ApiError::internal(msg)),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the worker stopped before loading the model",
        )),
    }
}
