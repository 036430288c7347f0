//! Jobs and the bounded queue between the HTTP handlers and the worker thread.
//!
//! A job's events (queued, started, step, done / failed / cancelled) are kept in order, so a
//! client that subscribes late still sees all of them; a `watch` channel wakes the streams
//! whenever one is added.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use diffuse_pipelines::task::TaskSettings;
use diffuse_pipelines::LoraSpec;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

/// What a job runs: a validated request.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// A configured model name.
    pub model: String,
    /// One batch's settings; the seed is the first iteration's.
    pub settings: TaskSettings,
    /// Batches run one after another, with seeds `seed + k * num_images` (as A1111 does).
    pub n_iter: usize,
    /// `txt2img`, `img2img` or `inpaint`.
    pub task: &'static str,
    /// The LoRAs of the prompt's `<lora:...>` tags, fused into the model for this job (the
    /// worker keeps the model so loaded while the next job asks for the same ones).
    pub loras: Vec<LoraSpec>,
    /// The prompt as the request wrote it, tags included, for the infotext (`settings.prompt`
    /// is what the model reads, without them).
    pub written_prompt: String,
}

impl JobSpec {
    /// The seed of every image, in order.
    pub fn seeds(&self) -> Vec<u64> {
        let b = self.settings.num_images;
        (0..self.n_iter)
            .flat_map(|k| std::iter::repeat_n(self.settings.seed + (k * b) as u64, b))
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// One Server-Sent Event: its name and JSON data.
#[derive(Clone, Debug)]
pub struct Event {
    pub name: &'static str,
    pub data: Value,
}

/// What a finished job made.
#[derive(Clone, Debug, Default)]
pub struct JobResult {
    /// PNG files with their infotext.
    pub pngs: Vec<Vec<u8>>,
    /// One infotext per image.
    pub infotexts: Vec<String>,
    pub seeds: Vec<u64>,
    pub warnings: Vec<String>,
    /// The sampler as named in the request, else the model's scheduler class.
    pub sampler: String,
}

/// Why a job failed: the user's request (422 for synchronous calls) or the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    InvalidRequest,
    Internal,
}

#[derive(Debug)]
pub struct JobState {
    pub status: JobStatus,
    pub events: Vec<Event>,
    /// Steps done and to do over all batches.
    pub step: usize,
    pub steps: usize,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
    /// The latest step preview (PNG).
    pub preview: Option<Vec<u8>>,
    pub result: Option<JobResult>,
    pub error: Option<(FailureKind, String)>,
}

pub struct Job {
    pub id: String,
    pub spec: JobSpec,
    /// Unix seconds.
    pub created: u64,
    cancel: AtomicBool,
    state: Mutex<JobState>,
    version: watch::Sender<u64>,
}

/// What an event stream reads next.
pub enum Next {
    Event(Event),
    Wait,
    End,
}

impl Job {
    fn new(id: String, spec: JobSpec) -> Self {
        Self {
            id,
            spec,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            cancel: AtomicBool::new(false),
            state: Mutex::new(JobState {
                status: JobStatus::Queued,
                events: Vec::new(),
                step: 0,
                steps: 0,
                started: None,
                finished: None,
                preview: None,
                result: None,
                error: None,
            }),
            version: watch::channel(0).0,
        }
    }

    pub fn state(&self) -> MutexGuard<'_, JobState> {
        // A panic while the lock was held left consistent data (every update is one push or
        // one assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> JobStatus {
        self.state().status
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Runs `f` on the state, then wakes the event streams and waiters.
    fn update(&self, f: impl FnOnce(&mut JobState)) {
        f(&mut self.state());
        self.version.send_modify(|v| *v += 1);
    }

    pub fn push_event(&self, name: &'static str, data: Value) {
        self.update(|s| s.events.push(Event { name, data }));
    }

    /// Marks the job running.
    pub fn start(&self) {
        self.update(|s| {
            s.status = JobStatus::Running;
            s.started = Some(Instant::now());
            s.events.push(Event {
                name: "started",
                data: json!({ "id": self.id, "model": self.spec.model }),
            });
        });
    }

    /// A step was done: progress, speed and maybe a preview.
    pub fn step(&self, step: usize, steps: usize, it_per_s: f64, preview: Option<Vec<u8>>) {
        use base64::Engine;
        self.update(|s| {
            s.step = step;
            s.steps = steps;
            let mut data = json!({
                "step": step,
                "steps": steps,
                "progress": step as f64 / steps.max(1) as f64,
                "it_per_s": (it_per_s * 100.0).round() / 100.0,
            });
            if let Some(png) = preview {
                data["preview"] = format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(&png)
                )
                .into();
                s.preview = Some(png);
            }
            s.events.push(Event { name: "step", data });
        });
    }

    /// Ends the job: status and its last event in one update, so a stream never sees one
    /// without the other.
    fn finish(&self, status: JobStatus, data: Value, f: impl FnOnce(&mut JobState)) {
        let name = match status {
            JobStatus::Done => "done",
            JobStatus::Failed => "failed",
            _ => "cancelled",
        };
        self.update(|s| {
            if s.status.is_terminal() {
                return;
            }
            s.status = status;
            s.finished = Some(Instant::now());
            // Previews only matter while the job runs; kept jobs hold their images only.
            s.preview = None;
            for e in &mut s.events {
                if let Some(o) = e.data.as_object_mut() {
                    o.remove("preview");
                }
            }
            s.events.push(Event { name, data });
            f(s);
        });
    }

    pub fn done(&self, result: JobResult) {
        let images: Vec<String> = (0..result.pngs.len())
            .map(|k| format!("/v1/jobs/{}/images/{k}.png", self.id))
            .collect();
        let data = json!({
            "id": self.id,
            "images": images,
            "infotexts": result.infotexts,
            "seeds": result.seeds,
            "warnings": result.warnings,
        });
        self.finish(JobStatus::Done, data, |s| s.result = Some(result));
    }

    pub fn fail(&self, kind: FailureKind, message: String) {
        let data = json!({ "id": self.id, "error": message, "kind": kind });
        self.finish(JobStatus::Failed, data, |s| s.error = Some((kind, message)));
    }

    pub fn cancelled(&self, reason: &str) {
        let data = json!({ "id": self.id, "reason": reason });
        self.finish(JobStatus::Cancelled, data, |_| {});
    }

    /// Event `i` of the stream, or whether to wait for more or stop.
    pub fn next_event(&self, i: usize) -> Next {
        let s = self.state();
        match s.events.get(i) {
            Some(e) => Next::Event(e.clone()),
            None if s.status.is_terminal() => Next::End,
            None => Next::Wait,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Waits until the job has ended; returns how.
    pub async fn wait(&self) -> JobStatus {
        let mut rx = self.subscribe();
        loop {
            rx.borrow_and_update();
            let status = self.status();
            if status.is_terminal() {
                return status;
            }
            if rx.changed().await.is_err() {
                return self.status();
            }
        }
    }

    /// The job as `GET /v1/jobs/{id}` shows it.
    pub fn to_json(&self, queue_position: Option<usize>) -> Value {
        let s = self.state();
        let mut v = json!({
            "id": self.id,
            "status": s.status,
            "task": self.spec.task,
            "model": self.spec.model,
            "created": self.created,
            "step": s.step,
            "steps": s.steps,
            "progress": if s.status == JobStatus::Done { 1.0 } else { s.step as f64 / s.steps.max(1) as f64 },
            "events": format!("/v1/jobs/{}/events", self.id),
        });
        if let Some(p) = queue_position {
            v["queue_position"] = p.into();
        }
        if let Some(r) = &s.result {
            v["images"] = (0..r.pngs.len())
                .map(|k| format!("/v1/jobs/{}/images/{k}.png", self.id))
                .collect::<Vec<_>>()
                .into();
            v["infotexts"] = r.infotexts.clone().into();
            v["seeds"] = r.seeds.clone().into();
        }
        if let Some((kind, msg)) = &s.error {
            v["error"] = json!({ "message": msg, "type": kind });
        }
        if let (Some(a), Some(b)) = (s.started, s.finished) {
            v["seconds"] = (b - a).as_secs_f64().into();
        }
        v
    }
}

/// What the worker takes from the queue.
pub enum Work {
    Job(Arc<Job>),
    /// Load a model (options `sd_model_checkpoint`), answering when done.
    Load {
        model: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({max} jobs waiting); retry later")]
    Full { max: usize, retry_after_s: u64 },
    #[error("the server is shutting down")]
    Closed,
}

struct Inner {
    waiting: VecDeque<Work>,
    /// Jobs among `waiting` (loads do not count against the bound).
    waiting_jobs: usize,
    running: Option<Arc<Job>>,
    closed: bool,
}

/// Counts for `GET /v1/queue`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct QueueCounts {
    pub queued: usize,
    pub running: usize,
    pub max_queue: usize,
    /// The most jobs that ever waited at once.
    pub high_water: usize,
    pub submitted: usize,
    pub rejected: usize,
}

/// Jobs by id, and their ids oldest first.
type JobTable = (HashMap<String, Arc<Job>>, VecDeque<String>);

/// The bounded FIFO of jobs, and the table of recent jobs by id.
pub struct JobQueue {
    inner: Mutex<Inner>,
    wake: Condvar,
    table: Mutex<JobTable>,
    max_queue: usize,
    keep_jobs: usize,
    high_water: AtomicUsize,
    submitted: AtomicUsize,
    rejected: AtomicUsize,
    /// Mean seconds of the last finished jobs, for Retry-After.
    mean_secs: Mutex<f64>,
}

impl JobQueue {
    /// `max_queue`: jobs that may wait (the running one not counted); `keep_jobs`: finished
    /// jobs kept for `GET /v1/jobs/{id}` and their images.
    pub fn new(max_queue: usize, keep_jobs: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                waiting: VecDeque::new(),
                waiting_jobs: 0,
                running: None,
                closed: false,
            }),
            wake: Condvar::new(),
            table: Mutex::new((HashMap::new(), VecDeque::new())),
            max_queue,
            keep_jobs,
            high_water: AtomicUsize::new(0),
            submitted: AtomicUsize::new(0),
            rejected: AtomicUsize::new(0),
            mean_secs: Mutex::new(1.0),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job, or refuses it when `max_queue` jobs are already waiting.
    pub fn submit(&self, spec: JobSpec) -> Result<Arc<Job>, SubmitError> {
        let job = Arc::new(Job::new(new_id(), spec));
        {
            let mut q = self.inner();
            if q.closed {
                return Err(SubmitError::Closed);
            }
            if q.waiting_jobs >= self.max_queue {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                let mean = *self.mean_secs.lock().unwrap_or_else(|e| e.into_inner());
                let ahead = q.waiting_jobs + usize::from(q.running.is_some());
                return Err(SubmitError::Full {
                    max: self.max_queue,
                    retry_after_s: (mean * ahead as f64).ceil().max(1.0) as u64,
                });
            }
            q.waiting.push_back(Work::Job(job.clone()));
            q.waiting_jobs += 1;
            self.high_water.fetch_max(q.waiting_jobs, Ordering::SeqCst);
            self.submitted.fetch_add(1, Ordering::Relaxed);
            job.push_event(
                "queued",
                json!({ "id": job.id, "position": q.waiting_jobs - 1 }),
            );
        }
        self.remember(&job);
        self.wake.notify_all();
        Ok(job)
    }

    /// Queues a model load behind the waiting jobs.
    pub fn load(
        &self,
        model: String,
    ) -> Result<oneshot::Receiver<Result<(), String>>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        let mut q = self.inner();
        if q.closed {
            return Err(SubmitError::Closed);
        }
        q.waiting.push_back(Work::Load { model, reply });
        drop(q);
        self.wake.notify_all();
        Ok(rx)
    }

    fn remember(&self, job: &Arc<Job>) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.0.insert(job.id.clone(), job.clone());
        t.1.push_back(job.id.clone());
        // Forget the oldest finished jobs past the limit (waiting and running ones stay).
        let mut i = 0;
        while t.1.len() > self.keep_jobs && i < t.1.len() {
            let id = t.1[i].clone();
            if t.0.get(&id).is_some_and(|j| j.status().is_terminal()) {
                t.0.remove(&id);
                t.1.remove(i);
            } else {
                i += 1;
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.0.get(id).cloned()
    }

    /// Recent jobs, newest first.
    pub fn recent(&self) -> Vec<Arc<Job>> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.1.iter()
            .rev()
            .filter_map(|id| t.0.get(id).cloned())
            .collect()
    }

    /// How many jobs wait before this one (`None` when it is not waiting).
    pub fn position(&self, id: &str) -> Option<usize> {
        let q = self.inner();
        q.waiting
            .iter()
            .filter_map(|w| match w {
                Work::Job(j) => Some(j),
                Work::Load { .. } => None,
            })
            .position(|j| j.id == id)
    }

    /// Cancels a job: a waiting one leaves the queue at once, a running one stops at its
    /// next step. Returns false for a job that had already ended.
    pub fn cancel(&self, job: &Arc<Job>, reason: &str) -> bool {
        let mut q = self.inner();
        let before = q.waiting.len();
        q.waiting
            .retain(|w| !matches!(w, Work::Job(j) if Arc::ptr_eq(j, job)));
        if q.waiting.len() < before {
            q.waiting_jobs -= 1;
            drop(q);
            job.cancelled(reason);
            return true;
        }
        drop(q);
        if job.status().is_terminal() {
            return false;
        }
        job.request_cancel();
        true
    }

    /// Cancels the running job (A1111 `interrupt`); returns it.
    pub fn interrupt(&self) -> Option<Arc<Job>> {
        let running = self
            .inner()
            .running
            .clone()
            .filter(|j| !j.status().is_terminal());
        if let Some(j) = &running {
            j.request_cancel();
        }
        running
    }

    pub fn running(&self) -> Option<Arc<Job>> {
        self.inner().running.clone()
    }

    pub fn counts(&self) -> QueueCounts {
        let q = self.inner();
        QueueCounts {
            queued: q.waiting_jobs,
            running: usize::from(q.running.is_some()),
            max_queue: self.max_queue,
            high_water: self.high_water.load(Ordering::SeqCst),
            submitted: self.submitted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// The worker's next piece of work (it becomes the running job); `None` once the queue
    /// is closed and empty.
    pub fn next(&self) -> Option<Work> {
        let mut q = self.inner();
        loop {
            if let Some(w) = q.waiting.pop_front() {
                if let Work::Job(j) = &w {
                    q.waiting_jobs -= 1;
                    q.running = Some(j.clone());
                }
                return Some(w);
            }
            if q.closed {
                return None;
            }
            q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The worker finished its running job.
    pub fn finished(&self, took: Duration) {
        self.inner().running = None;
        let mut m = self.mean_secs.lock().unwrap_or_else(|e| e.into_inner());
        *m = 0.8 * *m + 0.2 * took.as_secs_f64();
    }

    /// Refuses new work and cancels every waiting job; the running one goes on.
    pub fn close(&self) {
        let drained: Vec<Work> = {
            let mut q = self.inner();
            q.closed = true;
            q.waiting_jobs = 0;
            q.waiting.drain(..).collect()
        };
        self.wake.notify_all();
        for w in drained {
            match w {
                Work::Job(j) => j.cancelled("the server is shutting down"),
                Work::Load { reply, .. } => {
                    let _ = reply.send(Err("the server is shutting down".into()));
                }
            }
        }
    }
}

/// A 128-bit job id in hex from the OS-seeded hasher: unique and not sequential (access is
/// guarded by the API key, not by the id).
fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let part = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(n);
        h.write_u64(salt);
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    };
    format!("{:016x}{:016x}", part(1), part(2))
}
