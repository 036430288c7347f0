//! The case format: `case.json` + `expected.safetensors` in one folder per case, and the
//! comparison of what a runner produced with every expected tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use diffuse_core::testing::{
    assert_close, load_tensors, max_abs_diff, read_json, reduced_precision_tolerance, test_device,
    test_dtype, to_vec_f64,
};
use diffuse_pipelines::{LoadOptions, Trace};

/// Every tensor a runner computed, by the case's names (`image`, `denoiser_input`, ...).
pub type Produced = HashMap<String, Tensor>;

/// One case folder.
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    /// The fixtures root: `pipeline`, `config`, `controlnet` and adapter files are relative to it.
    pub root: PathBuf,
    /// diffusers' pipeline class that made the case.
    pub class: String,
    pub task: String,
    pub json: serde_json::Value,
    pub args: serde_json::Value,
}

impl Case {
    pub fn load(dir: &Path, root: &Path) -> Result<Self> {
        let json = read_json(&dir.join("case.json"))?;
        let text = |k: &str| -> Result<String> {
            Ok(json[k]
                .as_str()
                .with_context(|| format!("case.json: `{k}` missing or not a string"))?
                .to_string())
        };
        Ok(Self {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dir: dir.to_path_buf(),
            root: root.to_path_buf(),
            class: text("pipeline_class")?,
            task: text("task")?,
            args: json["args"].clone(),
            json,
        })
    }

    /// A path relative to the fixtures root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The model (`pipeline`): a diffusers folder or a single file.
    pub fn pipeline_path(&self) -> Result<PathBuf> {
        Ok(self.path(
            self.json["pipeline"]
                .as_str()
                .context("case.json: `pipeline` missing")?,
        ))
    }

    /// How every runner loads the case's models: on the test device (`DIFFUSE_DEVICE`, so a
    /// CUDA build checks the pipelines on a GPU), in the test dtype (`DIFFUSE_DTYPE`, f32 by
    /// default), with the case's `scheduler` swapped in when it names one.
    pub fn load_options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            device: test_device()?,
            dtype: test_dtype()?,
            scheduler: self.opt_str("scheduler"),
            ..Default::default()
        })
    }

    /// An optional top-level path entry (`config`, `controlnet`).
    pub fn opt_path(&self, key: &str) -> Option<PathBuf> {
        self.json[key].as_str().map(|s| self.path(s))
    }

    /// A file in the case folder (`init_image`, `control_image`).
    #[allow(dead_code)] // image-conditioned runners use it
    pub fn case_file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn arg_str(&self, k: &str) -> Result<String> {
        self.opt_str(k)
            .with_context(|| format!("args.{k} missing or not a string"))
    }
    pub fn opt_str(&self, k: &str) -> Option<String> {
        self.args[k].as_str().map(str::to_string)
    }
    pub fn arg_f64(&self, k: &str) -> Result<f64> {
        self.opt_f64(k)
            .with_context(|| format!("args.{k} missing or not a number"))
    }
    pub fn opt_f64(&self, k: &str) -> Option<f64> {
        self.args[k].as_f64()
    }
    pub fn arg_usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)
            .with_context(|| format!("args.{k} missing or not an integer"))
    }
    pub fn opt_usize(&self, k: &str) -> Option<usize> {
        self.args[k].as_u64().map(|v| v as usize)
    }
    pub fn seed(&self) -> Result<u64> {
        self.args["seed"].as_u64().context("args.seed missing")
    }

    /// `tolerance.{key}`.
    fn tolerance(&self, key: &str) -> Result<f64> {
        self.json["tolerance"][key]
            .as_f64()
            .with_context(|| format!("case.json: tolerance.{key} missing"))
    }

    /// Every args key must be one a runner reads: a key no runner knows would otherwise be
    /// ignored silently and the case could pass for the wrong reason.
    pub fn check_args_known(&self, known: &[&str]) -> Result<()> {
        let obj = self.args.as_object().context("args is not an object")?;
        let unknown: Vec<&String> = obj
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .collect();
        if !unknown.is_empty() {
            bail!(
                "args the {} runner does not handle: {unknown:?}",
                self.class
            );
        }
        Ok(())
    }

    /// Compares `got` with `expected.safetensors`: every expected tensor must be produced, with
    /// the recorded shape, within the case's tolerance (in f16 or bf16: within
    /// [`reduced_precision_tolerance`] of the tensor's largest value). Returns one summary line.
    pub fn compare(&self, got: &Produced) -> Result<String> {
        let expected = load_tensors(&self.dir.join("expected.safetensors"))?;
        let shapes = self.json["expected"]
            .as_object()
            .context("case.json: `expected` missing")?;
        let mut names: Vec<&String> = expected.keys().collect();
        names.sort();
        let listed: Vec<&String> = shapes.keys().collect();
        if names.len() != listed.len() || names.iter().any(|n| !shapes.contains_key(*n)) {
            bail!("expected.safetensors holds {names:?} but case.json lists {listed:?}");
        }
        let image_atol = self.tolerance("image_atol")?;
        let (atol, rtol) = (
            self.tolerance("tensor_atol")?,
            self.tolerance("tensor_rtol")?,
        );
        let reduced = reduced_precision_tolerance(test_dtype()?);
        let mut summary = Vec::new();
        for name in names {
            let want = &expected[name];
            let ours = got
                .get(name)
                .with_context(|| format!("the runner produced no `{name}`"))?;
            let ours = ours.to_dtype(want.dtype())?;
            let (o, w) = (to_vec_f64(&ours)?, to_vec_f64(want)?);
            if want.dtype() == DType::I64 || want.dtype() == DType::U32 {
                if ours.dims() != want.dims() || o != w {
                    bail!("{name}: {o:?} != expected {w:?}");
                }
                continue;
            }
            let (a, r) = match reduced {
                Some(fraction) => (fraction * w.iter().fold(0.0, |m, x| x.abs().max(m)), 0.0),
                None if name == "image" => (image_atol, 0.0),
                None => (atol, rtol),
            };
            assert_close(name, &ours, want, a, r)?;
            summary.push(format!("{name} {:.1e}", max_abs_diff(&o, &w)));
        }
        Ok(summary.join(", "))
    }
}

/// The four loop tensors of a trace, stacked over the denoiser calls: `denoiser_input`,
/// `denoiser_timestep`, `denoiser_output`, `step_latents`.
pub fn trace_tensors(trace: &Trace) -> Result<Produced> {
    let mut out = Produced::new();
    let stack = |v: &[Tensor]| -> Result<Tensor> {
        if v.is_empty() {
            bail!("the trace recorded no denoiser calls");
        }
        Ok(Tensor::stack(v, 0)?)
    };
    out.insert("denoiser_input".into(), stack(&trace.unet_inputs)?);
    out.insert("denoiser_output".into(), stack(&trace.unet_outputs)?);
    out.insert("step_latents".into(), stack(&trace.step_latents)?);
    let ts: Vec<f32> = trace.unet_timesteps.iter().map(|&t| t as f32).collect();
    out.insert(
        "denoiser_timestep".into(),
        Tensor::new(ts.as_slice(), &candle_core::Device::Cpu)?,
    );
    Ok(out)
}
