//! The worker thread: it owns the loaded model and runs the jobs one at a time, off the async
//! runtime (candle's CPU work blocks). A job that fails or panics fails alone; the worker
//! goes on with the next one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use diffuse_core::Error;
use diffuse_pipelines::task::run_task;
use diffuse_pipelines::{
    load_pipeline, named_scheduler, EmbeddingSpec, LoadOptions, LoraSpec, Pipeline, StepInfo,
};
use image::DynamicImage;
use serde_json::{json, Map, Value};

use crate::jobs::{FailureKind, Job, JobQueue, JobResult, Work};
use crate::models::Models;

/// How often a running job makes a step preview at most.
const PREVIEW_EVERY: Duration = Duration::from_millis(200);

/// Starts the worker; it ends when the queue is closed and empty.
pub fn spawn(
    queue: Arc<JobQueue>,
    models: Arc<Models>,
    embeddings: Arc<Embeddings>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("diffuse-worker".into())
        .spawn(move || {
            let mut worker = Worker {
                models,
                embeddings,
                loaded: None,
            };
            while let Some(work) = queue.next() {
                match work {
                    Work::Load { model, reply } => {
                        let r = worker.ensure_loaded(&model, &[]).map(|_| ());
                        let _ = reply.send(r.map_err(|e| e.to_string()));
                    }
                    Work::Job(job) => {
                        let t = Instant::now();
                        let end = worker.run(&job);
                        // The queue forgets the job before its waiters hear the outcome, so a
                        // client that got its answer sees the queue without it.
                        queue.finished(t.elapsed());
                        end.publish(&job);
                    }
                }
            }
        })
}

/// The textual-inversion folder, and what the model loaded last took from it: A1111's
/// `/sdapi/v1/embeddings` (`loaded`, `skipped`).
pub struct Embeddings {
    dir: Option<PathBuf>,
    report: Mutex<Value>,
}

impl Embeddings {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            report: Mutex::new(json!({ "loaded": {}, "skipped": {} })),
        }
    }

    /// The report of the model loaded last.
    pub fn report(&self) -> Value {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adds every embedding of the folder to a Stable Diffusion pipeline, each under its
    /// token; one that does not fit (another text encoder width, an SDXL file on SD 1.5) is
    /// skipped with a warning, as A1111 skips it. Other pipelines take none.
    fn add_to(&self, pipeline: &mut Pipeline) {
        let (mut loaded, mut skipped) = (Map::new(), Map::new());
        let sd = matches!(
            pipeline,
            Pipeline::StableDiffusion(_) | Pipeline::StableDiffusionXL(_)
        );
        if let (Some(dir), true) = (&self.dir, sd) {
            let files = EmbeddingSpec::all_in(dir).unwrap_or_else(|e| {
                eprintln!("warning: {e}");
                Vec::new()
            });
            for f in files {
                let stem = f.path.file_stem().map(|s| s.to_string_lossy().into_owned());
                let stem = stem.unwrap_or_default();
                match pipeline.load_textual_inversion(&f.path, None) {
                    Ok(added) => {
                        loaded.insert(
                            added.token,
                            json!({ "step": null, "sd_checkpoint": null,
                                    "sd_checkpoint_name": null, "shape": added.width,
                                    "vectors": added.vectors }),
                        );
                    }
                    Err(e) => {
                        eprintln!("warning: embedding {stem} skipped: {e}");
                        skipped.insert(
                            stem,
                            json!({ "step": null, "sd_checkpoint": null,
                                    "sd_checkpoint_name": null, "shape": null, "vectors": null }),
                        );
                    }
                }
            }
        }
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) =
            json!({ "loaded": loaded, "skipped": skipped });
    }
}

struct Worker {
    models: Arc<Models>,
    embeddings: Arc<Embeddings>,
    /// One model at a time (as A1111), with the LoRAs fused into it: switching either loads
    /// it afresh and drops the previous one.
    loaded: Option<Loaded>,
}

struct Loaded {
    model: String,
    loras: Vec<LoraSpec>,
    pipeline: Pipeline,
}

impl Worker {
    fn ensure_loaded(
        &mut self,
        name: &str,
        loras: &[LoraSpec],
    ) -> diffuse_core::Result<&mut Pipeline> {
        if self
            .loaded
            .as_ref()
            .is_none_or(|l| l.model != name || l.loras != loras)
        {
            let entry = self
                .models
                .get(name)
                .ok_or_else(|| Error::invalid(format!("unknown model `{name}`")))?;
            // Free the old model before loading the new one: both may not fit.
            self.loaded = None;
            let opts = LoadOptions {
                loras: loras.to_vec(),
                ..LoadOptions::default()
            };
            let mut pipeline = load_pipeline(&entry.dir, &opts)
                .map_err(|e| Error::invalid(format!("loading model `{name}`: {e}")))?;
            self.embeddings.add_to(&mut pipeline);
            self.loaded = Some(Loaded {
                model: name.to_string(),
                loras: loras.to_vec(),
                pipeline,
            });
        }
        Ok(&mut self.loaded.as_mut().expect("loaded above").pipeline)
    }

    fn run(&mut self, job: &Arc<Job>) -> End {
        if job.cancel_requested() {
            return End::Cancelled("cancelled before it started");
        }
        job.start();
        match catch_unwind(AssertUnwindSafe(|| self.generate(job))) {
            Ok(Ok(result)) => End::Done(result),
            Ok(Err(_)) if job.cancel_requested() => End::Cancelled("cancelled while running"),
            // A model that does not load is the server's problem, not the request's.
            Ok(Err(Failure::Load(e))) => End::Failed(FailureKind::Internal, e.to_string()),
            Ok(Err(Failure::Run(e))) => {
                let kind = match e {
                    Error::Invalid(_) | Error::Config { .. } => FailureKind::InvalidRequest,
                    _ => FailureKind::Internal,
                };
                End::Failed(kind, e.to_string())
            }
            Err(panic) => {
                // The model may be half-way through a change: load it afresh next time.
                self.loaded = None;
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                End::Failed(FailureKind::Internal, format!("internal error: {msg}"))
            }
        }
    }

    fn generate(&mut self, job: &Job) -> Result<JobResult, Failure> {
        let spec = &job.spec;
        let dir = self
            .models
            .get(&spec.model)
            .map(|e| e.dir.clone())
            .ok_or_else(|| {
                Failure::Run(Error::invalid(format!("unknown model `{}`", spec.model)))
            })?;
        let sampler = match &spec.settings.sampler {
            Some(name) => Some(named_scheduler(&dir, name).map_err(Failure::Run)?),
            None => None,
        };
        let pipeline = self.ensure_loaded(&spec.model, &spec.loras).map_err(|e| {
            match spec.loras.is_empty() {
                true => Failure::Load(e),
                // A LoRA the model cannot take is the request's choice, not a server fault.
                false => Failure::Run(Error::invalid(format!(
                    "{e} (with the LoRAs of the prompt)"
                ))),
            }
        })?;
        let own = sampler.map(|s| pipeline.replace_scheduler(s));
        let result = run_batches(pipeline, job);
        if let Some(own) = own {
            pipeline.replace_scheduler(own);
        }
        result.map_err(Failure::Run)
    }
}

/// How a job ended, told to its waiters by [`End::publish`].
enum End {
    Done(JobResult),
    Cancelled(&'static str),
    Failed(FailureKind, String),
}

impl End {
    fn publish(self, job: &Job) {
        match self {
            End::Done(r) => job.done(r),
            End::Cancelled(why) => job.cancelled(why),
            End::Failed(kind, msg) => job.fail(kind, msg),
        }
    }
}

/// Why a job did not finish.
enum Failure {
    Load(Error),
    Run(Error),
}

/// The job's `n_iter` batches, with progress and previews after every step.
fn run_batches(pipeline: &Pipeline, job: &Job) -> diffuse_core::Result<JobResult> {
    let spec = &job.spec;
    let mut result = JobResult {
        seeds: spec.seeds(),
        sampler: spec
            .settings
            .sampler
            .clone()
            .unwrap_or_else(|| pipeline.scheduler_name().to_string()),
        ..Default::default()
    };
    let mut last_preview: Option<Instant> = None;
    let mut progress = Progress::new(spec);
    let started = Instant::now();
    for k in 0..spec.n_iter {
        let mut settings = spec.settings.clone();
        settings.seed = spec.settings.seed + (k * settings.num_images) as u64;
        let mut callback = |info: StepInfo<'_>| -> diffuse_core::Result<()> {
            if job.cancel_requested() {
                return Err(Error::invalid("cancelled"));
            }
            let (done, total) = progress.step(&info);
            let preview = if last_preview.is_none_or(|t| t.elapsed() >= PREVIEW_EVERY) {
                last_preview = Some(Instant::now());
                // A preview is a nicety: one that fails to render is left out.
                latents_preview(info.latents).ok()
            } else {
                None
            };
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            job.step(done, total, rate, preview);
            Ok(())
        };
        let mut out = run_task(pipeline, &spec.model, &settings, Some(&mut callback))?;
        out.show_prompt_as_written(&settings.prompt, &spec.written_prompt);
        result.pngs.extend(out.pngs()?);
        result
            .infotexts
            .extend((0..out.images.len()).map(|i| out.infotext_of(i)));
        result.warnings.extend(out.warnings);
    }
    Ok(result)
}

/// A job's steps over all its denoising loops: one per batch, and with a hires fix one more
/// per image of the batch. The loops to come are counted at the running one's length (a
/// hires pass runs fewer steps than the first), so the total is exact once the last starts.
struct Progress {
    loops: usize,
    started: usize,
    /// Steps of the loops before the running one, and the running one's.
    done_before: usize,
    running: usize,
}

impl Progress {
    fn new(spec: &crate::jobs::JobSpec) -> Self {
        let hires = spec
            .settings
            .hires
            .as_ref()
            .map_or(0, |_| spec.settings.num_images);
        Self {
            loops: spec.n_iter * (1 + hires),
            started: 0,
            done_before: 0,
            running: 0,
        }
    }

    /// `(steps done, steps in all)` after this step.
    fn step(&mut self, info: &StepInfo<'_>) -> (usize, usize) {
        if info.step == 0 {
            self.started += 1;
            self.done_before += self.running;
            self.running = info.num_steps;
        }
        let to_come = self.loops.saturating_sub(self.started) * self.running;
        (
            self.done_before + info.step + 1,
            self.done_before + self.running + to_come,
        )
    }
}

/// A picture of the first image's latents after a step: the noisy image itself for pixel-space
/// models (1 or 3 channels in about [-1, 1]), else the first three latent channels, each
/// stretched over its own range (a false-colour view; decoding with the VAE every step would
/// cost as much as a step). Small ones are scaled up to 64 pixels.
pub fn latents_preview(latents: &Tensor) -> diffuse_core::Result<Vec<u8>> {
    let x = latents.get(0)?.to_dtype(DType::F32)?;
    let (c, h, w) = x.dims3()?;
    let data = x.flatten_all()?.to_vec1::<f32>()?;
    let plane = |k: usize| &data[k * h * w..(k + 1) * h * w];
    let to_u8 = |v: f32| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
    let img = match c {
        1 => DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(
                w as u32,
                h as u32,
                plane(0).iter().map(|&v| to_u8(v)).collect(),
            )
            .ok_or_else(|| Error::invalid("preview size"))?,
        ),
        _ => {
            let stretched: Vec<Vec<u8>> = (0..3)
                .map(|k| {
                    let p = plane(k.min(c - 1));
                    if c == 3 {
                        return p.iter().map(|&v| to_u8(v)).collect();
                    }
                    let (lo, hi) = p
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                            (a.min(v), b.max(v))
                        });
                    let scale = if hi > lo { 255.0 / (hi - lo) } else { 0.0 };
                    p.iter()
                        .map(|&v| ((v - lo) * scale).round() as u8)
                        .collect()
                })
                .collect();
            let rgb: Vec<u8> = (0..h * w)
                .flat_map(|i| [stretched[0][i], stretched[1][i], stretched[2][i]])
                .collect();
            DynamicImage::ImageRgb8(
                image::RgbImage::from_raw(w as u32, h as u32, rgb)
                    .ok_or_else(|| Error::invalid("preview size"))?,
            )
        }
    };
    let side = h.max(w);
    let img = if side < 64 {
        let k = 64usize.div_ceil(side) as u32;
        img.resize_exact(
            w as u32 * k,
            h as u32 * k,
            image::imageops::FilterType::Nearest,
        )
    } else {
        img
    };
    diffuse_pipelines::png_info::encode_png(&img, None)
}
