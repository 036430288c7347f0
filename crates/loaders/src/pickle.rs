//! Tensors from PyTorch pickle files (`.ckpt`, `.pt`, `.bin`), read without running any code.
//!
//! A PyTorch file is a zip holding `data.pkl` (the object graph as a pickle program) and one
//! entry per tensor storage. Python's unpickler *executes* that program: every `GLOBAL` it names
//! is imported and may be called, which is how a malicious checkpoint runs code. Here candle's
//! pickle reader only builds the object tree, and every global the program names is checked
//! against the short list a tensor checkpoint needs (tensor and storage rebuilders, ordered dicts,
//! numpy scalars, Lightning's checkpoint callback): anything else (`os.system`,
//! `builtins.exec`, ...) makes the whole file an error naming it.

use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::Tensor;
use diffuse_core::{Error, Result};

/// The globals a tensor checkpoint may name: `(module, class)`, `*` for any class.
const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    ("torch", "Size"),
    ("torch.nn.parameter", "Parameter"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("__builtin__", "set"),
    (
        "pytorch_lightning.callbacks.model_checkpoint",
        "ModelCheckpoint",
    ),
];

fn allowed(module: &str, class: &str) -> bool {
    ALLOWED_GLOBALS
        .iter()
        .any(|(m, c)| *m == module && (*c == "*" || *c == class))
}

/// A PyTorch zip-pickle file opened for reading its tensors.
pub struct PickleTensors {
    path: std::path::PathBuf,
    /// Every tensor, named by its path through nested dicts (`state_dict.model.x.weight`).
    infos: Vec<TensorInfo>,
}

impl PickleTensors {
    /// Parses the file's object graph (no tensor data yet). Errors name the file: not a zip
    /// (or a legacy non-zip pickle), no `data.pkl`, a global outside the allowed list.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |what: String| Error::Weights(format!("{}: {what}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
            bad(format!(
                "not a PyTorch zip checkpoint ({e}); legacy (pre-1.6) pickles are not supported, \
                 convert the file to .safetensors"
            ))
        })?;
        let names: Vec<String> = (0..zip.len())
            .filter_map(|i| {
                zip.name_for_index(i)
                    .and_then(|n| n.ok())
                    .map(|n| n.to_string())
            })
            .collect();
        let pkl = names
            .iter()
            .find(|n| n.ends_with("data.pkl"))
            .ok_or_else(|| bad("no data.pkl in the archive: not a PyTorch checkpoint".into()))?
            .clone();
        let dir = pkl.trim_end_matches(".pkl").to_string();
        let mut reader = BufReader::new(
            zip.by_name(&pkl)
                .map_err(|e| bad(format!("reading {pkl}: {e}")))?,
        );
        let mut stack = Stack::empty();
        loop {
            let done = stack
                .read(&mut reader)
                .map_err(|e| bad(format!("unreadable pickle: {e}")))?;
            // A GLOBAL op pushes the class it names: check each one as it appears, so that a
            // call whose result is later discarded is caught too.
            if let Some(Object::Class {
                module_name,
                class_name,
            }) = stack.stack().last()
            {
                if !allowed(module_name, class_name) {
                    return Err(bad(format!(
                        "the pickle refers to `{module_name}.{class_name}`, which is not part of a \
                         tensor checkpoint: loading it in Python would run code. diffuse reads \
                         tensors only and refuses this file"
                    )));
                }
            }
            if done {
                break;
            }
        }
        let root = stack
            .finalize()
            .map_err(|e| bad(format!("unreadable pickle: {e}")))?;
        let mut infos = Vec::new();
        collect(root, String::new(), Path::new(&dir), &mut infos);
        Ok(Self {
            path: path.to_path_buf(),
            infos,
        })
    }

    /// Names of all tensors, dotted through nested dicts.
    pub fn names(&self) -> Vec<&str> {
        self.infos.iter().map(|i| i.name.as_str()).collect()
    }

    /// (name, shape) of every tensor.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.infos
            .iter()
            .map(|i| (i.name.clone(), i.layout.dims().to_vec()))
            .collect()
    }

    /// Reads one tensor (in its stored dtype, on the CPU).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let info = self.infos.iter().find(|i| i.name == name).ok_or_else(|| {
            Error::Weights(format!("{}: no tensor `{name}`", self.path.display()))
        })?;
        read_tensor(&self.path, info).map_err(|e| {
            Error::Weights(format!(
                "{}: tensor `{name}` is unreadable (truncated file?): {e}",
                self.path.display()
            ))
        })
    }

    /// Reads every tensor.
    pub fn read_all(&self) -> Result<Vec<(String, Tensor)>> {
        self.infos
            .iter()
            .map(|i| Ok((i.name.clone(), self.get(&i.name)?)))
            .collect()
    }
}

/// Walks dicts depth-first, naming tensors by their key path.
fn collect(obj: Object, prefix: String, dir: &Path, out: &mut Vec<TensorInfo>) {
    let entries = match obj {
        Object::Dict(entries) => entries,
        // `OrderedDict` built with a state: candle leaves a Build of the (empty) dict.
        Object::Build { callable, args } => {
            collect(*callable, prefix.clone(), dir, out);
            collect(*args, prefix, dir, out);
            return;
        }
        _ => return,
    };
    for (key, value) in entries {
        let key = match &key {
            Object::Unicode(s) => s.clone(),
            Object::Int(i) => i.to_string(),
            Object::Long(i) => i.to_string(),
            _ => continue,
        };
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match value
            .clone()
            .into_tensor_info(Object::Unicode(name.clone()), dir)
        {
            Ok(Some(info)) => out.push(info),
            _ => collect(value, name, dir, out),
        }
    }
}

fn read_tensor(path: &Path, info: &TensorInfo) -> candle_core::Result<Tensor> {
    let file = std::fs::File::open(path)?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let mut reader = zip
        .by_name(&info.path)
        .map_err(|e| candle_core::Error::Msg(format!("storage {}: {e}", info.path)))?;
    let layout = &info.layout;
    let fortran = layout.is_fortran_contiguous() && layout.dims().len() > 1;
    if !layout.is_contiguous() && !fortran {
        candle_core::bail!("strided storage {:?} is not supported", layout);
    }
    let skip = layout.start_offset() as u64;
    if skip > 0 {
        std::io::copy(&mut reader.by_ref().take(skip), &mut std::io::sink())?;
    }
    let dims: Vec<usize> = if fortran {
        layout.dims().iter().rev().copied().collect()
    } else {
        layout.dims().to_vec()
    };
    let n: usize = dims.iter().product::<usize>() * info.dtype.size_in_bytes();
    let mut bytes = vec![0u8; n];
    reader.read_exact(&mut bytes)?;
    let t = Tensor::from_raw_buffer(&bytes, info.dtype, &dims, &candle_core::Device::Cpu)?;
    if fortran {
        let perm: Vec<usize> = (0..dims.len()).rev().collect();
        t.permute(perm)?.contiguous()
    } else {
        Ok(t)
    }
}
