//! Training checkpoints: `checkpoints/checkpoint-<step>/` holding the model, the EMA weights,
//! the optimizer moments (safetensors) and `state.json` (step, LR-schedule position, data
//! order position, RNG state, training config, and a size + CRC-32 of every file).
//!
//! A checkpoint is written into a temporary folder and renamed into place only when complete,
//! and `state.json` is written last: a crash leaves either the previous state or a `.tmp`
//! folder that is never read. Reading checks every file against the recorded size and
//! checksum, so a truncated or corrupted checkpoint is refused instead of silently resumed.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use diffuse_core::rng::GeneratorState;
use diffuse_core::{Error, Result};
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const FORMAT_VERSION: u32 = 1;
const PREFIX: &str = "checkpoint-";

/// Everything besides tensors that resuming needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Position in the learning-rate schedule (steps taken by it).
    pub lr_step: u64,
    /// AdamW's update count (bias correction).
    pub optimizer_step: u64,
    /// `EMAModel.optimization_step`, when EMA is on.
    pub ema_step: Option<u64>,
    /// Data order position: the epoch and the index within it.
    pub epoch: u64,
    pub epoch_pos: usize,
    pub images_seen: u64,
    /// The training generator (noise, timesteps, flips, label dropout).
    pub rng: GeneratorState,
    /// The training config the checkpoint was made with.
    pub config: serde_json::Value,
}

/// A checkpoint in memory.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub state: TrainState,
    /// Model weights by diffusers name.
    pub model: HashMap<String, Tensor>,
    pub ema: Option<HashMap<String, Tensor>>,
    /// `exp_avg.<name>` and `exp_avg_sq.<name>` for every trained parameter.
    pub optimizer: HashMap<String, Tensor>,
}

#[derive(Serialize, Deserialize)]
struct FileRecord {
    name: String,
    bytes: u64,
    crc32: u32,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    files: Vec<FileRecord>,
    state: TrainState,
}

/// The folder name of the checkpoint after `step` optimizer steps.
pub fn checkpoint_name(step: u64) -> String {
    format!("{PREFIX}{step}")
}

fn file_record(path: &Path, name: &str) -> Result<FileRecord> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(FileRecord {
        name: name.to_string(),
        bytes: data.len() as u64,
        crc32: crc32fast::hash(&data),
    })
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the renames durable; not every filesystem allows it, and failing
    // to do it only weakens crash safety, so errors are ignored.
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Writes `ckpt` as `<checkpoints_dir>/checkpoint-<step>` atomically and returns its path.
/// An existing checkpoint of the same step is replaced.
pub fn write_checkpoint(checkpoints_dir: &Path, ckpt: &Checkpoint) -> Result<PathBuf> {
    std::fs::create_dir_all(checkpoints_dir).map_err(|e| Error::io(checkpoints_dir, e))?;
    let name = checkpoint_name(ckpt.state.step);
    let final_dir = checkpoints_dir.join(&name);
    let tmp = checkpoints_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let result = (|| -> Result<()> {
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut files = Vec::new();
        let mut tensors = vec![(MODEL_FILE, &ckpt.model), (OPTIMIZER_FILE, &ckpt.optimizer)];
        if let Some(ema) = &ckpt.ema {
            tensors.push((EMA_FILE, ema));
        }
        for (file, map) in tensors {
            let path = tmp.join(file);
            diffuse_loaders::weights::save_safetensors(map, &path)?;
            files.push(file_record(&path, file)?);
        }
        let manifest = Manifest {
            format: FORMAT_VERSION,
            files,
            state: ckpt.state.clone(),
        };
        let json = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::invalid(format!("serializing the checkpoint state: {e}")))?;
        let state_path = tmp.join(STATE_FILE);
        let mut f = std::fs::File::create(&state_path).map_err(|e| Error::io(&state_path, e))?;
        f.write_all(json.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&state_path, e))?;
        sync_dir(&tmp);
        // A directory cannot be renamed over a non-empty one: move the old one aside first.
        let old = checkpoints_dir.join(format!(".{name}.old-{}", std::process::id()));
        if final_dir.exists() {
            std::fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
        sync_dir(checkpoints_dir);
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| final_dir)
}

fn corrupt(dir: &Path, detail: impl std::fmt::Display) -> Error {
    Error::invalid(format!(
        "checkpoint {} is corrupt or incomplete: {detail}; resume from another checkpoint",
        dir.display()
    ))
}

/// Reads a checkpoint folder, checking every file against its recorded size and checksum.
pub fn read_checkpoint(dir: &Path) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "checkpoint {} not found (expected a checkpoint-<step> folder)",
            dir.display()
        )));
    }
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| corrupt(dir, format!("cannot read {STATE_FILE}: {e}")))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| corrupt(dir, format!("{STATE_FILE} is not a valid state: {e}")))?;
    if manifest.format != FORMAT_VERSION {
        return Err(Error::invalid(format!(
            "checkpoint {} has format {}, this version reads format {FORMAT_VERSION}",
            dir.display(),
            manifest.format
        )));
    }
    let mut loaded: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    for rec in &manifest.files {
        let path = dir.join(&rec.name);
        let data = std::fs::read(&path).map_err(|e| corrupt(dir, format!("{}: {e}", rec.name)))?;
        if data.len() as u64 != rec.bytes {
            return Err(corrupt(
                dir,
                format!(
                    "{} has {} bytes, {} were written",
                    rec.name,
                    data.len(),
                    rec.bytes
                ),
            ));
        }
        if crc32fast::hash(&data) != rec.crc32 {
            return Err(corrupt(dir, format!("{} fails its checksum", rec.name)));
        }
        let tensors = candle_core::safetensors::load_buffer(&data, &Device::Cpu)
            .map_err(|e| corrupt(dir, format!("{}: {e}", rec.name)))?;
        loaded.insert(rec.name.clone(), tensors);
    }
    let mut take = |file: &str| loaded.remove(file);
    let model = take(MODEL_FILE).ok_or_else(|| corrupt(dir, format!("no {MODEL_FILE}")))?;
    let optimizer =
        take(OPTIMIZER_FILE).ok_or_else(|| corrupt(dir, format!("no {OPTIMIZER_FILE}")))?;
    let ema = take(EMA_FILE);
    if manifest.state.ema_step.is_some() && ema.is_none() {
        return Err(corrupt(
            dir,
            format!("EMA is on but there is no {EMA_FILE}"),
        ));
    }
    Ok(Checkpoint {
        state: manifest.state,
        model,
        ema,
        optimizer,
    })
}

/// The complete checkpoints in `checkpoints_dir` as `(step, path)`, oldest first. Temporary
/// folders of interrupted writes are not listed.
pub fn list_checkpoints(checkpoints_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !checkpoints_dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(checkpoints_dir).map_err(|e| Error::io(checkpoints_dir, e))? {
        let entry = entry.map_err(|e| Error::io(checkpoints_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes all but the newest `keep` checkpoints.
pub fn prune_checkpoints(checkpoints_dir: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(checkpoints_dir)?;
    let excess = all.len().saturating_sub(keep);
    for (_, path) in &all[..excess] {
        std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}
