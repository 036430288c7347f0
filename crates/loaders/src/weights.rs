//! Loading safetensors weights into models, with every mismatch reported at once.
//!
//! [`load_model`] builds a model through a [`VarBuilder`] whose backend reads memory-mapped
//! safetensors files. The backend records every tensor the model asks for; a missing or
//! mis-shaped tensor is recorded and replaced by zeros so that construction goes on, and at the
//! end one [`Error::Weights`] lists every missing, mis-shaped and unexpected tensor.
//!
//! Names are aliased where real checkpoints differ from what diffusers/transformers ask for
//! today: the legacy VAE attention names (`query`/`key`/`value`/`proj_attn`, sometimes stored as
//! 1x1 conv weights) and CLIP files written with or without the `text_model.` prefix.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use diffuse_core::{Error, Result};

/// Tensors stored in checkpoints that are buffers, not parameters: never reported as unexpected.
const IGNORED_SUFFIXES: &[&str] = &["embeddings.position_ids"];

/// Tied copies some checkpoints store next to the parameter the model reads (T5's token
/// embedding, `shared.weight`, is also `encoder.embed_tokens.weight`): never reported as
/// unexpected, and read when the file has only the copy.
const TIED_COPIES: &[(&str, &str)] = &[("shared.weight", "encoder.embed_tokens.weight")];

/// A file of tensors: memory-mapped safetensors, or a PyTorch pickle read on demand.
pub enum TensorContainer {
    Safetensors(MmapedSafetensors),
    Pickle(crate::pickle::PickleTensors),
}

/// One opened weight file, shared by every backend that reads from it (a single-file
/// checkpoint feeds the UNet, the VAE and the text encoder).
pub struct TensorFile {
    pub path: PathBuf,
    data: TensorContainer,
}

impl TensorFile {
    /// Opens a `.safetensors` file (memory-mapped) or, for other extensions, a PyTorch
    /// zip-pickle (`.ckpt`, `.pt`, `.bin`) read safely.
    pub fn open(path: &Path) -> Result<Self> {
        let is_safetensors = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
        let data = if is_safetensors {
            TensorContainer::Safetensors(open_safetensors(path)?)
        } else {
            if !path.is_file() {
                return Err(Error::Weights(format!("{}: no such file", path.display())));
            }
            TensorContainer::Pickle(crate::pickle::PickleTensors::open(path)?)
        };
        Ok(Self {
            path: path.to_path_buf(),
            data,
        })
    }

    /// (name, shape) of every tensor in the file.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        match &self.data {
            TensorContainer::Safetensors(st) => st
                .tensors()
                .into_iter()
                .map(|(n, v)| (n, v.shape().to_vec()))
                .collect(),
            TensorContainer::Pickle(p) => p.shapes(),
        }
    }

    /// One tensor in its stored dtype.
    pub fn load(&self, key: &str, dev: &Device) -> candle_core::Result<Tensor> {
        match &self.data {
            TensorContainer::Safetensors(st) => {
                let view = st.get(key)?;
                let tensor = view.load(dev)?;
                release_pages(view.data());
                Ok(tensor)
            }
            TensorContainer::Pickle(p) => p
                .get(key)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .to_device(dev),
        }
    }
}

/// Where a tensor the model may ask for is stored: a file, the key in it, optionally a block
/// of rows (a fused q/k/v projection split into three), and its shape as the model sees it.
#[derive(Clone, Debug)]
pub struct Stored {
    file: usize,
    key: String,
    rows: Option<(usize, usize)>,
    /// Stored transposed (OpenCLIP's `text_projection`).
    transpose: bool,
    shape: Vec<usize>,
}

/// One entry of a name map from a checkpoint's own layout to the model's names.
#[derive(Clone, Debug)]
pub struct MappedTensor {
    /// The name the model asks for (diffusers/transformers).
    pub name: String,
    /// The key in the file.
    pub key: String,
    /// `Some((start, len))`: only these rows (dim 0) of the stored tensor.
    pub rows: Option<(usize, usize)>,
    /// The stored 2-D tensor is the transpose of the model's.
    pub transpose: bool,
}

/// A low-rank weight update `factor · up · down` (LoRA), added to a weight when it is read.
#[derive(Clone, Debug)]
pub struct WeightDelta {
    /// (out, rank) or (out, rank, 1, 1).
    pub up: Tensor,
    /// (rank, in) or (rank, in, kh, kw).
    pub down: Tensor,
    pub factor: f64,
}

impl WeightDelta {
    /// The full-size update, shaped like `like` (f32).
    pub fn full(&self, like: &[usize]) -> candle_core::Result<Tensor> {
        let up = self.up.to_dtype(DType::F32)?;
        let down = self.down.to_dtype(DType::F32)?;
        let (out, rank) = (up.dim(0)?, up.elem_count() / up.dim(0)?);
        let up = up.reshape((out, rank))?;
        let down = down.reshape((rank, down.elem_count() / rank))?;
        let d = up.matmul(&down)?;
        if d.elem_count() != like.iter().product::<usize>() {
            candle_core::bail!(
                "update of shape {:?} x {:?} does not fit a weight of shape {like:?}",
                self.up.dims(),
                self.down.dims()
            );
        }
        (d * self.factor)?.reshape(like)
    }
}

#[derive(Default)]
struct Log {
    /// Model names asked for, with the requested shape.
    requested: BTreeMap<String, Vec<usize>>,
    /// Index names that were used (after aliasing).
    used: BTreeSet<String>,
    missing: BTreeMap<String, Vec<usize>>,
    /// model name -> (expected, found, file name)
    misshaped: BTreeMap<String, (Vec<usize>, Vec<usize>, String)>,
    /// Tensors found with the right shape that could not be read/converted.
    unreadable: BTreeMap<String, String>,
}

struct Inner {
    files: Vec<Arc<TensorFile>>,
    /// Model-side name -> where it is stored.
    index: HashMap<String, Stored>,
    /// File keys no name map covers (single files): reported as unexpected.
    unmapped: Vec<(String, Vec<usize>, usize)>,
    patches: Mutex<HashMap<String, Vec<WeightDelta>>>,
    log: Mutex<Log>,
}

/// A [`SimpleBackend`] over weight files that records what the model asks for.
///
/// Cheap to clone (shared state); keep a clone to inspect the record after building a model.
#[derive(Clone)]
pub struct CheckedBackend {
    inner: Arc<Inner>,
}

/// Opens a safetensors file, mapping failures to errors that name the file.
fn open_safetensors(path: &Path) -> Result<MmapedSafetensors> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Weights(format!(
            "{}: not a file (expected a .safetensors file)",
            path.display()
        )));
    }
    // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on it not being
    // truncated by another process while the model is built.
    unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
        Error::Weights(format!(
            "{}: not a valid safetensors file (truncated or corrupt?): {e}",
            path.display()
        ))
    })
}

impl CheckedBackend {
    /// Opens (memory-maps) the given safetensors files. A tensor name present in several files
    /// is taken from the last one.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let opened = files
            .iter()
            .map(|p| TensorFile::open(p).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let mut index = HashMap::new();
        for (i, f) in opened.iter().enumerate() {
            for (key, shape) in f.shapes() {
                let stored = Stored {
                    file: i,
                    key: key.clone(),
                    rows: None,
                    transpose: false,
                    shape,
                };
                index.insert(key, stored);
            }
        }
        Ok(Self::from_parts(opened, index, Vec::new()))
    }

    /// A backend over one opened file whose keys are in another layout: `map` gives the model
    /// name of each tensor used; `unexpected` lists file keys of this component that no map
    /// entry covers (reported like unexpected tensors). A map entry naming a key the file lacks
    /// is an error.
    pub fn mapped(
        file: Arc<TensorFile>,
        map: Vec<MappedTensor>,
        unexpected: Vec<String>,
    ) -> Result<Self> {
        let shapes: HashMap<String, Vec<usize>> = file.shapes().into_iter().collect();
        let mut index = HashMap::new();
        for m in map {
            let full = shapes.get(&m.key).ok_or_else(|| {
                Error::Weights(format!(
                    "{}: tensor `{}` (for `{}`) is not in the file",
                    file.path.display(),
                    m.key,
                    m.name
                ))
            })?;
            let mut shape = full.clone();
            if let Some((start, len)) = m.rows {
                if shape.is_empty() || start + len > shape[0] {
                    return Err(Error::Weights(format!(
                        "{}: `{}` of shape {full:?} has no rows {start}..{}",
                        file.path.display(),
                        m.key,
                        start + len
                    )));
                }
                shape[0] = len;
            }
            if m.transpose {
                if shape.len() != 2 {
                    return Err(Error::Weights(format!(
                        "{}: `{}` of shape {full:?} cannot be transposed",
                        file.path.display(),
                        m.key
                    )));
                }
                shape.swap(0, 1);
            }
            index.insert(
                m.name,
                Stored {
                    file: 0,
                    key: m.key,
                    rows: m.rows,
                    transpose: m.transpose,
                    shape,
                },
            );
        }
        let unmapped = unexpected
            .into_iter()
            .map(|k| {
                let shape = shapes.get(&k).cloned().unwrap_or_default();
                (k, shape, 0)
            })
            .collect();
        Ok(Self::from_parts(vec![file], index, unmapped))
    }

    fn from_parts(
        files: Vec<Arc<TensorFile>>,
        index: HashMap<String, Stored>,
        unmapped: Vec<(String, Vec<usize>, usize)>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                files,
                index,
                unmapped,
                patches: Mutex::new(HashMap::new()),
                log: Mutex::new(Log::default()),
            }),
        }
    }

    /// Adds low-rank updates to weights (by model name, aliases resolved): each is added to
    /// its weight when the model reads it. Returns the names that match no stored weight; an
    /// update whose size does not fit its weight is an error naming both shapes.
    pub fn add_patches(&self, patches: Vec<(String, WeightDelta)>) -> Result<Vec<String>> {
        let mut unmatched = Vec::new();
        let mut map = self.inner.patches.lock().unwrap_or_else(|e| e.into_inner());
        for (name, delta) in patches {
            let Some((stored_name, stored)) = self.resolve(&name) else {
                unmatched.push(name);
                continue;
            };
            let (out, rank) = (delta.up.dim(0)?, delta.down.dim(0)?);
            let inner = delta.down.elem_count() / rank.max(1);
            let fits = delta.up.elem_count() == out * rank
                && stored.shape.first() == Some(&out)
                && out * inner == stored.shape.iter().product::<usize>();
            if !fits {
                return Err(Error::Weights(format!(
                    "update for `{name}` (up {:?}, down {:?}) does not fit the weight of shape {:?}",
                    delta.up.dims(),
                    delta.down.dims(),
                    stored.shape
                )));
            }
            map.entry(stored_name).or_default().push(delta);
        }
        Ok(unmatched)
    }

    /// Every tensor under its model-side name, in its stored dtype (row blocks and transposes
    /// applied, LoRA updates not): for converting between layouts.
    pub fn read_all(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, stored) in &self.inner.index {
            let file = &self.inner.files[stored.file];
            let mut t = file.load(&stored.key, &Device::Cpu)?;
            if let Some((start, len)) = stored.rows {
                t = t.narrow(0, start, len)?.contiguous()?;
            }
            if stored.transpose {
                t = t.t()?.contiguous()?;
            }
            out.insert(name.clone(), t);
        }
        Ok(out)
    }

    /// Checks the stored tensors against a model's parameters (name, shape), as building it
    /// would, without reading any data: one error lists every missing, mis-shaped and
    /// unexpected tensor. `params` comes from building the model on a
    /// [`RecordingBackend::shapes_only`].
    pub fn check_shapes(&self, params: &[(String, Vec<usize>)]) -> Result<()> {
        for (name, requested) in params {
            let resolved = self.resolve(name).map(|(n, st)| (n, st.clone()));
            let mut log = self.lock();
            log.requested.insert(name.clone(), requested.clone());
            match resolved {
                None => {
                    log.missing.insert(name.clone(), requested.clone());
                }
                Some((stored_name, stored)) => {
                    log.used.insert(stored_name.clone());
                    if !compatible(name, requested, &stored.shape) {
                        log.misshaped
                            .insert(name.clone(), (requested.clone(), stored.shape, stored_name));
                    }
                }
            }
        }
        self.check()
    }

    /// The model-side names of every stored tensor (what the model can ask for).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.index.keys().cloned().collect();
        v.sort();
        v
    }

    /// Names of all tensors stored in the files (for a mapped backend: the model-side names).
    pub fn stored_names(&self) -> Vec<String> {
        self.names()
    }

    /// A [`VarBuilder`] reading from this backend.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// The (model name, requested shape) of every tensor asked for so far.
    pub fn requested(&self) -> Vec<(String, Vec<usize>)> {
        let log = self.lock();
        log.requested
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        // A poisoned lock only means a panic elsewhere; the record itself is still usable.
        self.inner.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Finds the stored tensor for a model name, trying the known aliases.
    fn resolve(&self, name: &str) -> Option<(String, &Stored)> {
        aliases(name)
            .into_iter()
            .find_map(|n| self.inner.index.get(&n).map(|s| (n, s)))
    }

    fn read(
        &self,
        stored_name: &str,
        stored: &Stored,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let file = &self.inner.files[stored.file];
        let mut t = file.load(&stored.key, dev)?;
        if let Some((start, len)) = stored.rows {
            t = t.narrow(0, start, len)?.contiguous()?;
        }
        if stored.transpose {
            t = t.t()?.contiguous()?;
        }
        let patches = self.inner.patches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(deltas) = patches.get(stored_name) {
            // Fused in f32, then stored in the model's dtype.
            let mut w = t.to_dtype(DType::F32)?;
            for d in deltas {
                w = (w + d.full(&stored.shape)?.to_device(dev)?)?;
            }
            t = w;
        }
        t.to_dtype(dtype)
    }

    /// Checks the record: one error listing every missing, mis-shaped and unexpected tensor.
    pub fn check(&self) -> Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Weights(self.report(&problems)))
        }
    }

    fn problems(&self) -> Vec<String> {
        let log = self.lock();
        let mut out = Vec::new();
        for (name, shape) in &log.missing {
            out.push(format!("missing: `{name}` (model expects shape {shape:?})"));
        }
        for (name, (expected, found, stored)) in &log.misshaped {
            let alias = if stored != name {
                format!(" (stored as `{stored}`)")
            } else {
                String::new()
            };
            out.push(format!(
                "mis-shaped: `{name}`{alias}: model expects {expected:?}, file has {found:?}"
            ));
        }
        for (name, why) in &log.unreadable {
            out.push(format!("unreadable: `{name}`: {why}"));
        }
        let mut unexpected: Vec<(&String, &Stored)> = self
            .inner
            .index
            .iter()
            .filter(|(k, _)| !log.used.contains(*k))
            .filter(|(k, _)| !IGNORED_SUFFIXES.iter().any(|s| k.ends_with(s)))
            .filter(|(k, _)| !TIED_COPIES.iter().any(|(_, copy)| k == copy))
            .collect();
        unexpected.sort_by(|a, b| a.0.cmp(b.0));
        for (name, stored) in unexpected {
            out.push(format!(
                "unexpected: `{name}` {:?} in {} (the model has no such parameter)",
                stored.shape,
                self.inner.files[stored.file].path.display()
            ));
        }
        for (key, shape, file) in &self.inner.unmapped {
            out.push(format!(
                "unexpected: `{key}` {shape:?} in {} (no known layout maps it to a parameter)",
                self.inner.files[*file].path.display()
            ));
        }
        out
    }

    fn report(&self, problems: &[String]) -> String {
        let files: Vec<String> = self
            .inner
            .files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect();
        let log = self.lock();
        format!(
            "weights in {} do not fit the model ({} missing, {} mis-shaped, {} problems in all; \
             the model asked for {} tensors):\n  {}",
            files.join(", "),
            log.missing.len(),
            log.misshaped.len(),
            problems.len(),
            log.requested.len(),
            problems.join("\n  ")
        )
    }
}

/// Drops the pages of `bytes`, a tensor of a memory-mapped weight file that has just been
/// copied out, from this process's resident set. Mapped file pages count in the resident set
/// as long as they stay mapped: without this, loading a model peaked at twice its size (a
/// 1,280 MiB file at 2,563 MiB, `tests/load_memory.rs`), which for the 22.7 GiB of Flux-dev in
/// bf16 is more than a 24 GiB machine has. The pages stay in the page cache; a second read
/// of the tensor faults them in again.
fn release_pages(bytes: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let Ok(page) = usize::try_from(page) else {
            return;
        };
        if page == 0 {
            return;
        }
        // Only whole pages inside the tensor: its first and last may hold a neighbour's bytes.
        let start = (bytes.as_ptr() as usize).next_multiple_of(page);
        let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
        if end > start {
            // SAFETY: the range lies inside a read-only file mapping that stays mapped;
            // MADV_DONTNEED only drops its page table entries, so later reads see the same file
            // bytes again (faulted back in from the page cache). A failure changes nothing.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
}

/// The names under which a tensor the model asks for may be stored, preferred first.
fn aliases(name: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    out.extend(
        TIED_COPIES
            .iter()
            .filter(|(param, _)| *param == name)
            .map(|(_, copy)| copy.to_string()),
    );
    if let Some(legacy) = legacy_attention_name(name) {
        out.push(legacy);
    }
    // transformers >= 5 writes CLIP text encoders without the `text_model.` prefix.
    if let Some(rest) = name.strip_prefix("text_model.") {
        out.push(rest.to_string());
    } else if name.starts_with("embeddings.")
        || name.starts_with("encoder.")
        || name.starts_with("final_layer_norm.")
    {
        out.push(format!("text_model.{name}"));
    }
    out
}

/// `...attentions.N.to_q.weight` -> `...attentions.N.query.weight` (and key/value/proj_attn), the
/// names used by the VAE of the original Stable Diffusion checkpoints.
fn legacy_attention_name(name: &str) -> Option<String> {
    const MAP: &[(&str, &str)] = &[
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ];
    if !name.contains("attentions.") {
        return None;
    }
    MAP.iter().find_map(|(new, old)| {
        let pos = name.rfind(new)?;
        let suffix = &name[pos + new.len()..];
        if suffix == "weight" || suffix == "bias" {
            Some(format!("{}{}{}", &name[..pos], old, suffix))
        } else {
            None
        }
    })
}

/// A stored shape that may be read as the requested one: equal, or a `(out, in, 1, 1)` 1x1-conv
/// weight read as the `(out, in)` linear weight of an attention projection.
fn compatible(name: &str, requested: &[usize], stored: &[usize]) -> bool {
    if requested == stored {
        return true;
    }
    let is_attention_proj = legacy_attention_name(name).is_some();
    is_attention_proj
        && requested.len() == 2
        && stored.len() == 4
        && stored[..2] == requested[..]
        && stored[2] == 1
        && stored[3] == 1
}

impl SimpleBackend for CheckedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let requested = s.dims().to_vec();
        let resolved = self.resolve(name).map(|(n, st)| (n, st.clone()));
        let mut log = self.lock();
        log.requested.insert(name.to_string(), requested.clone());
        match resolved {
            None => {
                log.missing.insert(name.to_string(), requested);
            }
            Some((stored_name, stored)) => {
                log.used.insert(stored_name.clone());
                if compatible(name, &requested, &stored.shape) {
                    drop(log);
                    match self
                        .read(&stored_name, &stored, dtype, dev)
                        .and_then(|t| t.reshape(s.clone()))
                    {
                        Ok(t) => return Ok(t),
                        Err(e) => {
                            self.lock()
                                .unreadable
                                .insert(name.to_string(), e.to_string());
                        }
                    }
                } else {
                    log.misshaped
                        .insert(name.to_string(), (requested, stored.shape, stored_name));
                }
            }
        }
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((stored_name, stored)) = self.resolve(name).map(|(n, s)| (n, s.clone())) else {
            let mut log = self.lock();
            log.missing.insert(name.to_string(), vec![]);
            candle_core::bail!("tensor `{name}` not found in the weight files")
        };
        {
            let mut log = self.lock();
            log.requested.insert(name.to_string(), stored.shape.clone());
            log.used.insert(stored_name.clone());
        }
        self.read(&stored_name, &stored, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }
}

/// Builds a model from safetensors files and checks that the weights fit it exactly.
///
/// The files are memory-mapped; tensors are converted to `dtype` (e.g. f16 files into f32
/// compute) and moved to `device`. The returned error lists every missing tensor, every
/// mis-shaped one (expected vs found) and every tensor in the files the model never asked for.
pub fn load_model<M>(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    if files.is_empty() {
        return Err(Error::Weights("no weight files given".to_string()));
    }
    load_with(&CheckedBackend::open(files)?, dtype, device, build)
}

/// Builds a model from a backend (e.g. a mapped single file, or one with LoRA patches) and
/// checks that the weights fit it exactly, as [`load_model`] does.
pub fn load_with<M>(
    backend: &CheckedBackend,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    let built = build(backend.var_builder(dtype, device));
    let problems = backend.problems();
    match built {
        Ok(model) if problems.is_empty() => Ok(model),
        Ok(_) => Err(Error::Weights(backend.report(&problems))),
        Err(e) if problems.is_empty() => Err(Error::Candle(e)),
        Err(e) => Err(Error::Weights(format!(
            "{}\nbuilding the model then failed: {e}",
            backend.report(&problems)
        ))),
    }
}

/// A backend that returns zeros and records every parameter asked for (for counting parameters
/// and checking names/shapes without weight files).
#[derive(Clone, Default)]
pub struct RecordingBackend {
    record: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
    shapes_only: bool,
}

impl RecordingBackend {
    /// Returns real zero tensors: the model built can run.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns one zero broadcast to each shape, so that building even a full-size model costs
    /// no memory. The model is only for inspecting names and shapes, not for running.
    pub fn shapes_only() -> Self {
        Self {
            shapes_only: true,
            ..Self::default()
        }
    }

    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Every (name, shape) asked for, sorted by name.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        rec.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Total number of scalar parameters asked for.
    pub fn parameter_count(&self) -> usize {
        self.parameters()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.record
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), s.dims().to_vec());
        if self.shapes_only {
            Tensor::zeros((), dtype, dev)?.broadcast_as(s)
        } else {
            Tensor::zeros(s, dtype, dev)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("the recording backend needs a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The weight files of one component folder (`unet/`, `vae/`, `text_encoder/`, ...).
///
/// Looks for `diffusion_pytorch_model.safetensors` or `model.safetensors` (with `variant`, e.g.
/// `fp16`: `diffusion_pytorch_model.fp16.safetensors`), else a sharded
/// `*.safetensors.index.json` whose `weight_map` names the shard files.
pub fn component_weight_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut present: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    present.sort();
    const STEMS: &[&str] = &["diffusion_pytorch_model", "model"];
    let single = |stem: &str| match variant {
        Some(v) => format!("{stem}.{v}.safetensors"),
        None => format!("{stem}.safetensors"),
    };
    let index = |stem: &str| match variant {
        Some(v) => format!("{stem}.safetensors.index.{v}.json"),
        None => format!("{stem}.safetensors.index.json"),
    };
    for stem in STEMS {
        let name = single(stem);
        if present.contains(&name) {
            return Ok(vec![dir.join(name)]);
        }
    }
    for stem in STEMS {
        let name = index(stem);
        if present.contains(&name) {
            return shard_files(&dir.join(name));
        }
    }
    let mut msg = match variant {
        Some(v) => format!(
            "{}: no `{v}` variant safetensors weights (looked for {}, {})",
            dir.display(),
            single(STEMS[0]),
            single(STEMS[1])
        ),
        None => format!(
            "{}: no safetensors weights (looked for {}, {} and their .index.json)",
            dir.display(),
            single(STEMS[0]),
            single(STEMS[1])
        ),
    };
    let others: Vec<&String> = present
        .iter()
        .filter(|n| {
            n.ends_with(".safetensors")
                || n.ends_with(".bin")
                || n.ends_with(".ckpt")
                || n.ends_with(".pt")
        })
        .collect();
    if !others.is_empty() {
        let names: Vec<&str> = others.iter().map(|s| s.as_str()).collect();
        msg.push_str(&format!("; the folder has: {}", names.join(", ")));
        if variant.is_some() && names.iter().any(|n| n.ends_with(".safetensors")) {
            msg.push_str(" (try without the variant)");
        } else if !names.iter().any(|n| n.ends_with(".safetensors")) {
            msg.push_str(" (only PyTorch pickles: convert them to safetensors first)");
        }
    }
    Err(Error::Weights(msg))
}

/// The distinct shard files named in a sharded checkpoint's index, in first-seen order.
fn shard_files(index_path: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = crate::config::read_config(index_path)?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = index.weight_map.values().cloned().collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::Weights(format!(
            "{}: `weight_map` is empty",
            index_path.display()
        )));
    }
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let p = dir.join(&f);
        if f.contains('/') || f.contains('\\') || f.starts_with("..") {
            return Err(Error::Weights(format!(
                "{}: shard `{f}` is not a plain file name",
                index_path.display()
            )));
        }
        if !p.is_file() {
            return Err(Error::Weights(format!(
                "{}: shard `{f}` named in the index is missing ({})",
                index_path.display(),
                p.display()
            )));
        }
        out.push(p);
    }
    Ok(out)
}

/// Writes tensors as a safetensors file atomically: to a temporary file next to `path`, then
/// renamed over it, so that a crash never leaves a half-written file under the final name.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    save_safetensors_with_metadata(tensors, None, path)
}

/// [`save_safetensors`] with string metadata in the header's `__metadata__` (as diffusers
/// writes `lora_adapter_metadata` into LoRA files).
pub fn save_safetensors_with_metadata(
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> Result<()> {
        safetensors::serialize_to_file(tensors.iter(), metadata, &tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(io) => Error::io(&tmp, io),
            other => Error::Weights(format!("writing {}: {other}", tmp.display())),
        })?;
        let f = std::fs::File::open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        // safetensors writes through a private (0600) temporary file; a weights file is
        // readable by everyone, as any other file the user writes.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::Permissions::from_mode(0o644);
            std::fs::set_permissions(&tmp, mode).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_names() {
        assert_eq!(
            legacy_attention_name("encoder.mid_block.attentions.0.to_q.weight").as_deref(),
            Some("encoder.mid_block.attentions.0.query.weight")
        );
        assert_eq!(
            legacy_attention_name("decoder.mid_block.attentions.0.to_out.0.bias").as_deref(),
            Some("decoder.mid_block.attentions.0.proj_attn.bias")
        );
        assert_eq!(
            legacy_attention_name("attentions.0.to_out.0.lora.weight"),
            None
        );
        assert_eq!(legacy_attention_name("conv_in.weight"), None);
        let a = aliases("text_model.encoder.layers.0.mlp.fc1.weight");
        assert_eq!(a[1], "encoder.layers.0.mlp.fc1.weight");
        assert!(compatible(
            "a.attentions.0.to_q.weight",
            &[4, 4],
            &[4, 4, 1, 1]
        ));
        assert!(!compatible(
            "a.attentions.0.to_q.weight",
            &[4, 4],
            &[4, 4, 1, 2]
        ));
        assert!(!compatible("conv.weight", &[4, 4], &[4, 4, 1, 1]));
    }
}
