//! A generation request in AUTOMATIC1111's field names (the OpenAI endpoint and the job API
//! map onto it), checked against the limits and the model before it is queued: every
//! problem is a 422 naming its field.

use std::io::Cursor;
use std::path::Path;

use base64::Engine;
use diffuse_pipelines::prompt_weighting::{extract_lora_tags, PromptSyntax};
use diffuse_pipelines::task::{
    parse_class, random_seed, HiresFix, InitImage, PipelineKind, TaskSettings,
};
use diffuse_pipelines::{find_lora, LoraSpec};
use serde::Deserialize;

use crate::error::ApiError;
use crate::jobs::JobSpec;
use crate::models::{ModelEntry, Models};
use crate::{Limits, ServerConfig};

/// `override_settings` of an A1111 request.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct OverrideSettings {
    pub sd_model_checkpoint: Option<String>,
    /// A1111's clip skip: 1 reads the text encoder's last layer, 2 the one before it, ...
    #[serde(rename = "CLIP_stop_at_last_layers")]
    pub clip_stop_at_last_layers: Option<i64>,
}

/// The fields of `/sdapi/v1/txt2img`, `/sdapi/v1/img2img` and `POST /v1/jobs`. Unknown fields
/// are ignored; the A1111 features this server does not have (face restoration, tiling,
/// variation seeds, a refiner switch, a hires target size, "only masked" inpainting, resize
/// modes but "just resize") are refused when a request turns them on, not answered without
/// them.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub steps: Option<i64>,
    pub cfg_scale: Option<f64>,
    pub sampler_name: Option<String>,
    /// Older A1111 clients send the sampler here.
    pub sampler_index: Option<String>,
    /// A1111 1.9+ sends the sigma schedule apart from the sampler: `Karras` (appended to the
    /// sampler name), or `Automatic` (the sampler's own).
    pub scheduler: Option<String>,
    /// -1: random.
    pub seed: Option<i64>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub batch_size: Option<i64>,
    pub n_iter: Option<i64>,
    pub eta: Option<f64>,
    /// Class-conditional DDPM models: `[lo, hi]`, guide only at these timesteps (default
    /// `[100, 550]`; `[0, 1000]` guides every step).
    pub guidance_interval: Option<[f64; 2]>,
    /// A configured model name (the default model when absent).
    pub model: Option<String>,
    pub override_settings: Option<OverrideSettings>,
    /// img2img: base64 images (a `data:` URL prefix is allowed); the first is used.
    pub init_images: Option<Vec<String>>,
    /// Inpainting: base64 mask, white = repaint.
    pub mask: Option<String>,
    /// Inpainting: 1 repaints the black part of the mask instead.
    pub inpainting_mask_invert: Option<i64>,
    /// Inpainting "only masked" (a crop around the mask, redrawn at full size): refused.
    pub inpaint_full_res: Option<bool>,
    /// img2img: how the init image meets the output size; only 0 (just resize) is here.
    pub resize_mode: Option<i64>,
    pub denoising_strength: Option<f64>,
    /// Hires fix (Stable Diffusion txt2img): a second pass at `hr_scale` times the size, by
    /// img2img at `denoising_strength` (default 0.7) with `hr_second_pass_steps` (0: `steps`).
    pub enable_hr: Option<bool>,
    pub hr_scale: Option<f64>,
    pub hr_second_pass_steps: Option<i64>,
    /// `Lanczos`, or `None` (A1111's plain resize, also Lanczos); no model upscalers.
    pub hr_upscaler: Option<String>,
    pub hr_resize_x: Option<i64>,
    pub hr_resize_y: Option<i64>,
    pub restore_faces: Option<bool>,
    pub tiling: Option<bool>,
    pub subseed_strength: Option<f64>,
    pub refiner_checkpoint: Option<String>,
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Text-to-image only (`init_images` ignored, as A1111 does).
    Txt2Img,
    /// `init_images` required.
    Img2Img,
    /// Text-to-image, or img2img/inpainting when `init_images` is given.
    Job,
}

fn int_in(field: &str, v: Option<i64>, lo: i64, hi: usize) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x >= lo && x <= hi as i64 => Ok(Some(x as usize)),
        Some(x) => Err(ApiError::field(
            field,
            format!("{field} must be between {lo} and {hi}, got {x}"),
        )),
    }
}

fn float_in(field: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v {
        Some(x) if !(x.is_finite() && (lo..=hi).contains(&x)) => Err(ApiError::field(
            field,
            format!("{field} must be between {lo} and {hi}, got {x}"),
        )),
        v => Ok(v),
    }
}

/// The bytes of a base64 field (optionally a `data:` URL; padding optional).
pub fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let b64 = match text.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => text,
    };
    let b64: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(&b64)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(&b64))
        .map_err(|e| ApiError::field(field, format!("{field}: not base64: {e}")))
}

/// Decodes a base64 image (optionally a `data:` URL), refusing images larger than `max_side`.
pub fn decode_image(
    field: &str,
    text: &str,
    max_side: usize,
) -> Result<image::DynamicImage, ApiError> {
    let bytes = decode_base64(field, text)?;
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::field(field, format!("{field}: {e}")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(max_side as u32);
    limits.max_image_height = Some(max_side as u32);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| ApiError::field(field, format!("{field}: not a readable image: {e}")))
}

impl GenerateRequest {
    /// [`GenerateRequest::to_spec`]; decoding uploaded images is CPU work, so a request that
    /// has some is checked on a blocking thread, off the async runtime.
    pub async fn into_spec(
        self,
        endpoint: Endpoint,
        state: &crate::AppState,
    ) -> Result<JobSpec, ApiError> {
        if self.init_images.is_none() && self.mask.is_none() {
            return self.to_spec(endpoint, &state.models, &state.config);
        }
        let (models, config) = (state.models.clone(), state.config.clone());
        tokio::task::spawn_blocking(move || self.to_spec(endpoint, &models, &config))
            .await
            .map_err(|e| ApiError::internal(format!("checking the request: {e}")))?
    }

    /// Refuses a request that turns on an A1111 feature this server does not have (clients
    /// send most of these switches off by default).
    fn check_unsupported(&self) -> Result<(), ApiError> {
        let on = |flag: Option<bool>| flag == Some(true);
        let asked = [
            (
                "hr_resize_x",
                self.hr_resize_x.is_some_and(|x| x != 0)
                    || self.hr_resize_y.is_some_and(|y| y != 0),
                "hires target size (give hr_scale)",
            ),
            ("restore_faces", on(self.restore_faces), "face restoration"),
            (
                "inpaint_full_res",
                on(self.inpaint_full_res),
                "\"only masked\" inpainting",
            ),
            (
                "resize_mode",
                self.resize_mode.is_some_and(|m| m != 0),
                "resize mode but 0 (just resize)",
            ),
            ("tiling", on(self.tiling), "seamless tiling"),
            (
                "subseed_strength",
                self.subseed_strength.is_some_and(|s| s != 0.0),
                "variation seeds",
            ),
            (
                "refiner_checkpoint",
                self.refiner_checkpoint
                    .as_deref()
                    .is_some_and(|s| !s.trim().is_empty() && s != "None"),
                "refiner switch",
            ),
        ];
        match asked.into_iter().find(|(_, on, _)| *on) {
            Some((field, _, what)) => Err(ApiError::field(
                field,
                format!("{field}: this server has no {what}; leave it out or turn it off"),
            )),
            None => Ok(()),
        }
    }

    /// The hires fix the request asks for: Stable Diffusion text-to-image only, its second pass
    /// within the size limit.
    fn hires(
        &self,
        entry: &ModelEntry,
        image_task: bool,
        ([width, height], first_steps): ([usize; 2], usize),
        limits: &Limits,
    ) -> Result<Option<HiresFix>, ApiError> {
        if self.enable_hr != Some(true) {
            return Ok(None);
        }
        let field = "enable_hr";
        if entry.info.kind != PipelineKind::StableDiffusion || image_task {
            return Err(ApiError::field(
                field,
                format!(
                    "enable_hr: the hires fix is for Stable Diffusion txt2img, not {}",
                    if image_task {
                        "img2img".to_string()
                    } else {
                        format!("`{}`", entry.name)
                    }
                ),
            ));
        }
        match self.hr_upscaler.as_deref().map(str::trim) {
            None | Some("" | "None" | HiresFix::UPSCALER) => {}
            Some(other) => {
                return Err(ApiError::field(
                    "hr_upscaler",
                    format!(
                        "hr_upscaler: no `{other}` upscaler here; use {} (GET /sdapi/v1/upscalers)",
                        HiresFix::UPSCALER
                    ),
                ))
            }
        }
        let scale = float_in("hr_scale", self.hr_scale, 1.0, 8.0)?.unwrap_or(2.0);
        let steps = int_in(
            "hr_second_pass_steps",
            self.hr_second_pass_steps,
            0,
            limits.max_steps,
        )?
        .filter(|&n| n > 0);
        let strength =
            float_in("denoising_strength", self.denoising_strength, 0.0, 1.0)?.unwrap_or(0.7);
        let second = steps.unwrap_or(first_steps);
        if ((second as f64 * strength) as usize) < 1 {
            return Err(ApiError::field(
                "denoising_strength",
                format!(
                    "denoising_strength {strength} with {second} hires steps leaves no denoising step; raise either"
                ),
            ));
        }
        let hr = HiresFix {
            scale,
            steps,
            strength,
        };
        let factor = entry.info.size_multiple.unwrap_or(8);
        let (w, h) = hr
            .size((width, height), factor)
            .map_err(|e| ApiError::field("hr_scale", e.to_string()))?;
        if w.max(h) > limits.max_size {
            return Err(ApiError::field(
                "hr_scale",
                format!(
                    "hr_scale: the hires pass would be {w}x{h}; at most {} pixels a side",
                    limits.max_size
                ),
            ));
        }
        Ok(Some(hr))
    }

    /// The job this request asks for, or the first problem with it.
    pub fn to_spec(
        &self,
        endpoint: Endpoint,
        models: &Models,
        config: &ServerConfig,
    ) -> Result<JobSpec, ApiError> {
        self.check_unsupported()?;
        let limits = &config.limits;
        let overrides = self.override_settings.clone().unwrap_or_default();
        let (model_field, model) = match (&self.model, &overrides.sd_model_checkpoint) {
            (Some(m), _) => ("model", m.clone()),
            (None, Some(m)) => ("override_settings.sd_model_checkpoint", m.clone()),
            _ => ("model", models.default_name()),
        };
        let entry = models.get(&model).ok_or_else(|| {
            ApiError::field(
                model_field,
                format!(
                    "unknown model `{model}`; this server has: {}",
                    models.names().join(", ")
                ),
            )
        })?;
        let info = &entry.info;

        let prompt = self.prompt.clone().unwrap_or_default();
        let negative_prompt = self.negative_prompt.clone().unwrap_or_default();
        for (field, text) in [("prompt", &prompt), ("negative_prompt", &negative_prompt)] {
            if text.chars().count() > limits.max_prompt_chars {
                return Err(ApiError::field(
                    field,
                    format!(
                        "{field} is longer than {} characters",
                        limits.max_prompt_chars
                    ),
                ));
            }
        }
        if info.kind == PipelineKind::Unconditional && !info.class_names.is_empty() {
            if prompt.trim().is_empty() {
                return Err(ApiError::field(
                    "prompt",
                    format!(
                        "`{}` is class-conditional: name a class in the prompt ({})",
                        entry.name,
                        info.class_names.join(", ")
                    ),
                ));
            }
            parse_class(&info.class_names, &prompt)
                .map_err(|e| ApiError::field("prompt", e.to_string()))?;
        }
        let clip_field = "override_settings.CLIP_stop_at_last_layers";
        let clip_skip = int_in(clip_field, overrides.clip_stop_at_last_layers, 1, 12)?
            .and_then(|k| k.checked_sub(1))
            .filter(|&k| k > 0);
        let text_encoded = matches!(
            info.kind,
            PipelineKind::StableDiffusion | PipelineKind::StableDiffusion3
        );
        if clip_skip.is_some() && !text_encoded {
            return Err(ApiError::field(
                clip_field,
                format!(
                    "{clip_field}: clip skip is for Stable Diffusion models, not `{}`",
                    entry.name
                ),
            ));
        }
        let written_prompt = prompt.clone();
        let (prompt, loras) = prompt_loras(&prompt, entry, config.lora_dir.as_deref())?;

        let steps = int_in("steps", self.steps, 1, limits.max_steps)?;
        let guidance = float_in("cfg_scale", self.cfg_scale, 0.0, 50.0)?
            .unwrap_or_else(|| info.default_guidance());
        let eta = float_in("eta", self.eta, 0.0, 1.0)?.unwrap_or(0.0);
        let guidance_interval = self.guidance_interval.map(|[lo, hi]| (lo, hi));
        if guidance_interval.is_some() && info.class_names.is_empty() {
            return Err(ApiError::field(
                "guidance_interval",
                format!(
                    "a guidance interval is for class-conditional DDPM models, not `{}`",
                    entry.name
                ),
            ));
        }
        diffuse_pipelines::check_guidance_interval(guidance_interval)
            .map_err(|e| ApiError::field("guidance_interval", e.to_string()))?;
        let sampler = match self
            .sampler_name
            .as_ref()
            .or(self.sampler_index.as_ref())
            .map(|s| s.trim())
        {
            None | Some("") => None,
            Some(name) => {
                let field = if self.sampler_name.is_some() {
                    "sampler_name"
                } else {
                    "sampler_index"
                };
                diffuse_schedulers::resolve_name(name)
                    .map_err(|e| ApiError::field(field, format!("{field}: {e}")))?;
                Some(name.to_string())
            }
        };
        // A1111's names and labels: `automatic`/`Automatic` is the sampler's own schedule.
        let schedule = self
            .scheduler
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty() && !k.eq_ignore_ascii_case("automatic"));
        let sampler = match (sampler, schedule) {
            (s, None) => s,
            (Some(name), Some(kind)) if name.to_lowercase().ends_with(&kind.to_lowercase()) => {
                Some(name)
            }
            (Some(name), Some(kind)) => {
                let full = format!("{name} {kind}");
                diffuse_schedulers::resolve_name(&full).map_err(|_| {
                    ApiError::field(
                        "scheduler",
                        format!(
                            "scheduler: there is no `{name}` sampler with the `{kind}` schedule"
                        ),
                    )
                })?;
                Some(full)
            }
            (None, Some(kind)) => {
                return Err(ApiError::field(
                    "scheduler",
                    format!("scheduler `{kind}` needs a sampler_name to go with"),
                ))
            }
        };
        let steps = match steps {
            Some(n) => n,
            None => {
                let class = match &sampler {
                    Some(name) => diffuse_schedulers::resolve_name(name).ok().map(|(c, _)| c),
                    None => None,
                };
                info.default_steps_for(class)
            }
        };
        let seed = match self.seed {
            None | Some(-1) => random_seed(),
            Some(s) if s >= 0 => s as u64,
            Some(s) => {
                return Err(ApiError::field(
                    "seed",
                    format!("seed must be -1 (random) or at least 0, got {s}"),
                ))
            }
        };
        let batch = int_in("batch_size", self.batch_size, 1, limits.max_batch)?.unwrap_or(1);
        let n_iter = int_in("n_iter", self.n_iter, 1, limits.max_images)?.unwrap_or(1);
        if batch * n_iter > limits.max_images {
            return Err(ApiError::field(
                "n_iter",
                format!(
                    "batch_size × n_iter = {} images; at most {} per request",
                    batch * n_iter,
                    limits.max_images
                ),
            ));
        }

        let init = match (endpoint, &self.init_images) {
            (Endpoint::Txt2Img, _) | (Endpoint::Job, None) => None,
            (Endpoint::Img2Img, None) => {
                return Err(ApiError::field("init_images", "init_images is required"))
            }
            (_, Some(images)) => {
                let first = images
                    .first()
                    .ok_or_else(|| ApiError::field("init_images", "init_images holds no image"))?;
                if info.kind != PipelineKind::StableDiffusion {
                    return Err(ApiError::field(
                        "init_images",
                        format!(
                            "img2img and inpainting need a Stable Diffusion model; `{}` is a {}",
                            entry.name, info.class_name
                        ),
                    ));
                }
                let image = decode_image("init_images", first, limits.max_size)?.to_rgb8();
                let mask = match &self.mask {
                    None => None,
                    Some(m) => {
                        let mut mask = decode_image("mask", m, limits.max_size)?.to_luma8();
                        let invert =
                            int_in("inpainting_mask_invert", self.inpainting_mask_invert, 0, 1)?;
                        if invert == Some(1) {
                            image::imageops::invert(&mut mask);
                        }
                        Some(mask)
                    }
                };
                let strength = float_in("denoising_strength", self.denoising_strength, 0.0, 1.0)?
                    .unwrap_or(0.75);
                if ((steps as f64 * strength) as usize) < 1 {
                    return Err(ApiError::field(
                        "denoising_strength",
                        format!(
                            "denoising_strength {strength} with {steps} steps leaves no denoising step; raise either"
                        ),
                    ));
                }
                Some(InitImage {
                    image,
                    mask,
                    strength,
                })
            }
        };

        // The size: the model's own (unconditional models make nothing else), the init
        // image's rounded down, or the request's.
        let (native_h, native_w) = match (&init, info.size_multiple) {
            (Some(i), Some(f)) => (
                i.image.height() as usize / f * f,
                i.image.width() as usize / f * f,
            ),
            _ => info.size,
        };
        let mut size = [native_w, native_h];
        for (k, (field, v)) in [("width", self.width), ("height", self.height)]
            .into_iter()
            .enumerate()
        {
            let Some(v) = int_in(field, v, 1, limits.max_size)? else {
                continue;
            };
            match info.size_multiple {
                None if v != size[k] => {
                    return Err(ApiError::field(
                        field,
                        format!(
                            "`{}` generates {}x{} images only; leave out width and height or give those",
                            entry.name, info.size.1, info.size.0
                        ),
                    ))
                }
                Some(f) if !v.is_multiple_of(f) => {
                    return Err(ApiError::field(
                        field,
                        format!("{field} must be a multiple of {f}, got {v}"),
                    ))
                }
                _ => size[k] = v,
            }
        }
        if size[0] == 0 || size[1] == 0 {
            return Err(ApiError::field(
                "init_images",
                "the init image is smaller than the model's size multiple",
            ));
        }
        let hires = self.hires(entry, init.is_some(), (size, steps), limits)?;
        let task = match &init {
            None => "txt2img",
            Some(InitImage { mask: None, .. }) => "img2img",
            Some(_) => "inpaint",
        };
        Ok(JobSpec {
            model: entry.name.clone(),
            settings: TaskSettings {
                prompt,
                negative_prompt,
                steps: Some(steps),
                guidance_scale: Some(guidance),
                guidance_interval,
                sampler,
                seed,
                num_images: batch,
                shard: None,
                width: Some(size[0]),
                height: Some(size[1]),
                eta,
                init,
                // What A1111 clients write: weights, escapes, long prompts.
                prompt_syntax: PromptSyntax::A1111,
                clip_skip,
                hires,
                ..Default::default()
            },
            n_iter,
            task,
            loras,
            written_prompt,
        })
    }
}

/// The prompt without its A1111 `<lora:name:weight>` tags, and the LoRA files they name in the
/// server's LoRA folder (Stable Diffusion models only); a prompt without tags is unchanged.
fn prompt_loras(
    prompt: &str,
    entry: &ModelEntry,
    lora_dir: Option<&Path>,
) -> Result<(String, Vec<LoraSpec>), ApiError> {
    let bad = |message: String| ApiError::field("prompt", message);
    let (clean, tags) = extract_lora_tags(prompt).map_err(|e| bad(e.to_string()))?;
    if tags.is_empty() {
        return Ok((prompt.to_string(), Vec::new()));
    }
    if entry.info.kind != PipelineKind::StableDiffusion {
        return Err(bad(format!(
            "<lora:...> tags are for Stable Diffusion models, not `{}`",
            entry.name
        )));
    }
    let Some(dir) = lora_dir else {
        return Err(bad(
            "this server has no LoRA folder (diffuse serve --lora-dir DIR): remove the \
             <lora:...> tags"
                .into(),
        ));
    };
    let loras = tags
        .into_iter()
        .map(|(name, scale)| {
            if !scale.is_finite() {
                return Err(bad(format!(
                    "<lora:{name}:{scale}>: the weight must be a number"
                )));
            }
            // Not the folder's path: a client need not learn where the server keeps files.
            let path = find_lora(dir, &name).map_err(|_| {
                bad(format!(
                    "<lora:{name}>: no such LoRA on this server (GET /sdapi/v1/loras lists them)"
                ))
            })?;
            Ok(LoraSpec { path, scale })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok((clean, loras))
}
