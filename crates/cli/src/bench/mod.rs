//! `diffuse bench`: times the real Stable Diffusion / DDPM architectures (random weights) and
//! the hot ops alone, median of several runs after a warm-up, in one process. With
//! `--compare-torch` it runs `bench/torch_baseline.py` on the same machine and thread count
//! and prints ours / PyTorch for each line; `--rounds N` alternates the two N times and reports
//! the median ratio and its range, for machines whose speed drifts (shared VMs). A benchmark
//! program, not a test.

mod gpu_memory;
mod large;
mod lora;
mod pipeline;
mod torch;
mod train;
mod transformers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use diffuse_loaders::read_config;
use diffuse_models::clip_text::{ClipTextConfig, ClipTextModel};
use diffuse_models::{
    AutoencoderKL, AutoencoderKLConfig, UNet2DConditionConfig, UNet2DConditionModel, UNet2DConfig,
    UNet2DModel,
};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Folder of real model configs (fixtures_configs layout).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures_configs"))]
    pub configs: PathBuf,
    /// Timed runs per line (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Untimed warm-up runs per line.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Only the lines whose name starts with one of these (comma-separated), e.g. "op,vae".
    #[arg(long, default_value = "")]
    pub only: String,
    /// Write the results as JSON here, to compare runs.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also run bench/torch_baseline.py (needs torch + diffusers + transformers) and print
    /// ours / PyTorch per line.
    #[arg(long)]
    pub compare_torch: bool,
    /// The Python that has torch (default: $DIFFUSE_TORCH_PYTHON, else python3).
    #[arg(long)]
    pub python: Option<String>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight and activation precision of the op, model and pipeline lines (PyTorch's baseline
    /// runs the same; f16 on a GPU compares against PyTorch fp16 with SDPA attention).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: crate::device::DtypeArg,
    /// Also run a whole 512x512 SD 1.5 text-to-image generation (random weights of the real
    /// architecture, PNDM, guidance 7.5) and report each phase and the peak RSS; minutes on a
    /// CPU. `--only pipeline` runs it alone (so the peak RSS is the pipeline's).
    #[arg(long)]
    pub pipeline: bool,
    /// Also the large lines (minutes and 10+ GiB each; run them one at a time with --only so
    /// each peak RSS is its own): the SDXL UNet step (batch 2, 128x128 latents), the SDXL VAE
    /// decode at 1024x1024, the SD 1.5 VAE tiled decode at 2048x2048, an SDXL-Turbo-like
    /// 1-step 512x512 text-to-image run (both text encoders, no guidance, decode) and a whole
    /// 20-step 1024x1024 SDXL image (EulerDiscrete, guidance 5).
    #[arg(long)]
    pub large: bool,
    /// Also time one LoRA training step of the SD 1.5 UNet (random weights, rank 4 on the
    /// attention projections, batch 1, as `diffuse train-lora` runs it) at 256x256 and 512x512
    /// (the 512 line needs about 8 GiB; `--only "lora sd15 train step 256"` runs one). With
    /// `--dtype bf16`, the step of `train-lora --mixed-precision bf16` (CPU autocast).
    #[arg(long)]
    pub lora_train: bool,
    /// Also time one optimizer step of the bundled Fashion-MNIST model's recipe (its
    /// `train_config.json`: batch 64 at 32x32, v-prediction, Min-SNR-5, EMA) on random images;
    /// with `--dtype bf16` the step of `--mixed-precision bf16`. With `--profile`, the backward
    /// passes of the custom ops show as `... backward` rows.
    #[arg(long)]
    pub train: bool,
    /// Denoising steps of the --pipeline run (the peak memory does not depend on them).
    #[arg(long, default_value_t = 20)]
    pub pipeline_steps: usize,
    /// Also time the diffusion transformers at their real widths (random f32 weights): one
    /// SD3-medium step (the guided batch of 2, 77 + 256 text tokens) and FLUX.1-dev with one
    /// double-stream block, then with one single-stream block (512 text tokens, guidance), at
    /// `--transformer-size`. Minutes per line on a CPU: use `--runs 1 --warmup 0`.
    #[arg(long)]
    pub transformers: bool,
    /// Image side of the --transformers lines and of --flux-bf16-step.
    #[arg(long, default_value_t = 1024)]
    pub transformer_size: usize,
    /// `D,S`: build FLUX.1-dev with D double-stream and S single-stream blocks (the real model
    /// is 19,38) with random bf16 weights (activations in f32), run one step at
    /// `--transformer-size` and report the peak RSS. Alone in its process (`--only flux-bf16`),
    /// the peak is the step's; two depths give the memory per block.
    #[arg(long)]
    pub flux_bf16_step: Option<String>,
    /// With --compare-torch: run ours then PyTorch this many times, alternating, and report per
    /// line the median of the per-round ratios and their range (a shared machine's speed
    /// drifts over minutes; one round compares two different moments).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// After each line, where its time went: each kind of layer at each shape (convolution
    /// path, linear, attention, norms), its ms per run, share and GFLOP/s; "other" is the rest
    /// (candle's element-wise ops, copies). Timing each layer adds little overhead.
    #[arg(long)]
    pub profile: bool,
}

/// Random weights of the requested shapes (N(0, 0.02²); norm scales around 1), so models of
/// the real size run without checkpoints.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let is_norm_scale = name.ends_with("norm.weight")
            || name.contains("norm") && name.ends_with(".weight") && s.rank() == 1;
        let t = if is_norm_scale {
            Tensor::ones(s, DType::F32, dev)?
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: no shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn random_vb(device: &Device) -> VarBuilder<'static> {
    random_vb_dtype(device, DType::F32)
}

fn random_vb_dtype(device: &Device, dtype: DType) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}

/// A file of this repository: where the build saw it, else relative to the current folder
/// (a binary carried to another machine and run from a copy of the repository).
pub(crate) fn repo_path(rel: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    if built.exists() {
        built
    } else {
        PathBuf::from(rel)
    }
}

/// The VAE's dtype in an SDXL pipeline run in `dtype`, as `diffuse generate` loads it: f16
/// becomes f32 when the VAE's config says `force_upcast` (SDXL's VAE overflows in f16).
fn vae_dtype(dtype: DType, cfg: &AutoencoderKLConfig) -> DType {
    match dtype {
        DType::F16 if cfg.force_upcast => DType::F32,
        d => d,
    }
}

/// Peak resident memory of this process so far (Linux), in MiB.
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct Line {
    name: String,
    ms: f64,
    gflop: Option<f64>,
    /// On a GPU the line's peak device memory, else the process's peak RSS when it finished.
    peak_mib: Option<f64>,
}

struct Bench<'a> {
    args: &'a BenchArgs,
    device: Device,
    /// `--dtype`.
    dtype: DType,
    lines: Vec<Line>,
    /// Peak device memory per line on a GPU.
    gpu_memory: Option<gpu_memory::Sampler>,
}

impl Bench<'_> {
    /// Random weights in `--dtype`.
    fn vb(&self) -> VarBuilder<'static> {
        random_vb_dtype(&self.device, self.dtype)
    }

    /// A standard-normal input in `--dtype`.
    fn randn<S: Into<Shape>>(&self, shape: S) -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    fn wanted(&self, name: &str) -> bool {
        let only: Vec<&str> = self
            .args
            .only
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        only.is_empty() || only.iter().any(|o| name.starts_with(o))
    }

    /// Times `f` (median and fastest of `runs` after `warmup`), synchronising the device after each run.
    fn time(
        &mut self,
        name: &str,
        gflop: Option<f64>,
        mut f: impl FnMut() -> Result<Tensor>,
    ) -> Result<()> {
        for _ in 0..self.args.warmup {
            f()?;
        }
        let (mut times, mut host) = (vec![], vec![]);
        if let Some(m) = &self.gpu_memory {
            m.reset();
        }
        diffuse_models::profile::enable(self.args.profile);
        for _ in 0..self.args.runs.max(1) {
            let t0 = Instant::now();
            let out = f()?;
            host.push(t0.elapsed().as_secs_f64() * 1000.0);
            self.device.synchronize()?;
            drop(out);
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        host.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2];
        let rate = gflop
            .map(|g| format!("{:>7.1} GFLOP/s", g / (ms / 1000.0)))
            .unwrap_or_default();
        let mut rss = self.peak_memory_text();
        if !self.device.is_cpu() {
            // The time to queue the work, before waiting for the device: near the total, the
            // line is bound by the host's per-op cost rather than by the GPU.
            rss += &format!("   host {:.1} ms", host[host.len() / 2]);
        }
        // The fastest run too: on a shared machine it is the least disturbed one.
        let min = times[0];
        println!("{name:<34} {ms:>10.1} ms (min {min:>8.1}) {rate:>16}   {rss}");
        if self.args.profile {
            diffuse_models::profile::enable(false);
            let total: f64 = times.iter().sum();
            print_profile(diffuse_models::profile::take(), total, times.len());
        }
        let peak = self.peak_memory_mib();
        self.lines.push(Line {
            name: name.to_string(),
            ms,
            gflop,
            peak_mib: peak,
        });
        Ok(())
    }

    /// The memory a line is judged by: the peak device memory on a GPU (this line's), else the
    /// process's peak RSS so far.
    fn peak_memory_mib(&self) -> Option<f64> {
        match &self.gpu_memory {
            Some(m) => Some(m.peak_mib()),
            None => peak_rss_mib(),
        }
    }

    /// [`Self::peak_memory_mib`] as the bench lines print it.
    fn peak_memory_text(&self) -> String {
        let what = if self.gpu_memory.is_some() {
            "GPU"
        } else {
            "RSS"
        };
        self.peak_memory_mib()
            .map(|m| format!("peak {what} {m:.0} MiB"))
            .unwrap_or_default()
    }

    fn ops(&mut self) -> Result<()> {
        // The convolution layer the models use (Winograd for 3x3 at these sizes). On large
        // maps a layer caches its transformed kernels from its *second* call on, so one
        // warm-up run would leave the transform in the first timed run: each layer is called
        // once before the warm-up, and the timed runs all use the cache (as a model's layers
        // do from the second denoising step on).
        // The UNet's levels at 64², 32², 16² and 8² (batch 2), the VAE decoder's 256², and
        // stride-2 downsamplers: the UNet's at 32² and a 512² image's first in the VAE encoder.
        for (n, c, h, stride) in [
            (2usize, 320usize, 64usize, 1usize),
            (1, 128, 256, 1),
            (2, 640, 32, 1),
            (2, 1280, 16, 1),
            (2, 1280, 8, 1),
            (2, 640, 32, 2),
            (1, 128, 512, 2),
        ] {
            let name = match stride {
                1 => format!("op conv3x3 {n}x{c}x{h}x{h}"),
                s => format!("op conv3x3/{s} {n}x{c}x{h}x{h}"),
            };
            if self.wanted(&name) {
                let cfg = candle_nn::Conv2dConfig {
                    padding: 1,
                    stride,
                    ..Default::default()
                };
                let conv = diffuse_models::ops::conv::Conv2d::new(c, c, 3, cfg, self.vb())?;
                let x = self.randn((n, c, h, h))?;
                let g = 2.0 * (n * c * h * h * c * 9) as f64 / 1e9 / (stride * stride) as f64;
                candle_core::Module::forward(&conv, &x)?;
                self.time(&name, Some(g), || {
                    Ok(candle_core::Module::forward(&conv, &x)?)
                })?;
            }
        }
        for (tokens, heads, d) in [(4096usize, 16usize, 40usize), (1024, 16, 80)] {
            let name = format!("op attention {heads}x{tokens}x{d}");
            if self.wanted(&name) {
                let q = self.randn((heads, tokens, d))?;
                let (k, v) = (q.clone(), self.randn((heads, tokens, d))?);
                let g = 4.0 * (heads * tokens * tokens * d) as f64 / 1e9;
                let scale = 1.0 / (d as f64).sqrt();
                self.time(&name, Some(g), || {
                    Ok(diffuse_models::attention::scaled_dot_product_attention(
                        &q, &k, &v, scale,
                    )?)
                })?;
            }
        }
        let name = "op groupnorm+silu 2x320x64x64";
        if self.wanted(name) {
            let gn = diffuse_models::normalization::GroupNorm::new(self.vb(), 32, 320, 1e-5)?;
            let x = self.randn((2, 320, 64, 64))?;
            self.time(name, None, || {
                Ok(gn.forward_act(&x, diffuse_models::activations::Activation::Silu)?)
            })?;
        }
        // nn.Linear: the UNet feed-forward's first layer at the 64x64 level (8192 tokens) and
        // at the 16x16 level (512 tokens, where the weight outweighs the activations), and
        // CLIP's MLP over 2 x 77 tokens.
        for (rows, k, n) in [
            (8192usize, 320usize, 2560usize),
            (512, 1280, 10240),
            (154, 768, 3072),
        ] {
            let name = format!("op linear {rows}x{k}x{n}");
            if self.wanted(&name) {
                let lin = diffuse_models::ops::linear::linear(k, n, self.vb())?;
                let x = self.randn((rows, k))?;
                let g = 2.0 * (rows * k * n) as f64 / 1e9;
                self.time(&name, Some(g), || {
                    Ok(candle_core::Module::forward(&lin, &x)?)
                })?;
            }
        }
        let name = "op matmul 8192x320x1280";
        if self.wanted(name) {
            let (a, b) = (self.randn((8192, 320))?, self.randn((320, 1280))?);
            self.time(name, Some(2.0 * 8192.0 * 320.0 * 1280.0 / 1e9), || {
                Ok(a.matmul(&b)?)
            })?;
        }
        Ok(())
    }

    fn models(&mut self) -> Result<()> {
        let dev = self.device.clone();
        let sd = self.args.configs.join("runwayml_stable_diffusion_v1_5");
        let cfg_path = |p: &Path| p.join("config.json");
        if self.wanted("unet sd15 step") || self.wanted("unet sd15 guided step") {
            let cfg: UNet2DConditionConfig = read_config(&cfg_path(&sd.join("unet")))?;
            let unet = UNet2DConditionModel::new(self.vb(), &cfg)?;
            let (lat, ctx) = (self.randn((2, 4, 64, 64))?, self.randn((2, 77, 768))?);
            let t = Tensor::new(&[999f32, 999.0], &dev)?;
            if self.wanted("unet sd15 step") {
                self.time("unet sd15 step", None, || Ok(unet.forward(&lat, &t, &ctx)?))?;
            }
            // The batch a guided pipeline runs: one latent twice, two texts.
            if self.wanted("unet sd15 guided step") {
                let one = lat.narrow(0, 0, 1)?;
                let lat = Tensor::cat(&[&one, &one], 0)?;
                self.time("unet sd15 guided step", None, || {
                    Ok(unet.forward(&lat, &t, &ctx)?)
                })?;
            }
        }
        if self.wanted("vae sd15 decode") {
            let cfg: AutoencoderKLConfig = read_config(&cfg_path(&sd.join("vae")))?;
            let vae = AutoencoderKL::new(self.vb(), &cfg)?;
            let z = self.randn((1, 4, 64, 64))?;
            self.time("vae sd15 decode", None, || Ok(vae.decode(&z)?))?;
        }
        if self.wanted("clip sd15 encode") {
            let cfg: ClipTextConfig = read_config(&cfg_path(&sd.join("text_encoder")))?;
            let clip = ClipTextModel::new(self.vb(), &cfg)?;
            let ids: Vec<u32> = (0..154u32).map(|i| (i * 7919) % 49408).collect();
            let ids = Tensor::from_vec(ids, (2, 77), &dev)?;
            self.time("clip sd15 encode", None, || {
                Ok(clip.forward(&ids)?.last_hidden_state)
            })?;
        }
        if self.wanted("unet ddpm-cat-256 step") {
            let p = self.args.configs.join("google_ddpm_cat_256/unet");
            let cfg: UNet2DConfig = read_config(&cfg_path(&p))?;
            let unet = UNet2DModel::new(self.vb(), &cfg)?;
            let x = self.randn((1, 3, 256, 256))?;
            let t = Tensor::new(&[500f32], &dev)?;
            self.time("unet ddpm-cat-256 step", None, || Ok(unet.forward(&x, &t)?))?;
        }
        Ok(())
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = crate::device::parse_device(&args.device)?;
    if !args.configs.is_dir() {
        bail!(
            "configs folder {} not found (--configs)",
            args.configs.display()
        );
    }
    let dtype = DType::from(args.dtype);
    println!(
        "diffuse bench on {:?}, {} threads, {}, median of {} runs after {} warm-up",
        device,
        rayon_threads(),
        dtype.as_str(),
        args.runs,
        args.warmup
    );
    let gpu_memory = gpu_memory::Sampler::start(&device)?;
    if args.profile && device.is_cuda() {
        diffuse_models::profile::sync_with(Some(device.clone()));
    }
    let rounds = if args.compare_torch { args.rounds } else { 1 };
    let mut lines: Vec<Line> = vec![];
    // Per round: ours and PyTorch's ms per line.
    let mut ours_rounds: Vec<BTreeMap<String, f64>> = vec![];
    let mut torch_rounds: Vec<BTreeMap<String, f64>> = vec![];
    for round in 1..=rounds {
        if rounds > 1 {
            println!("\nround {round} of {rounds}");
        }
        let mut b = Bench {
            args: &args,
            device: device.clone(),
            dtype,
            lines: vec![],
            gpu_memory: gpu_memory.clone(),
        };
        b.ops()?;
        b.models()?;
        if args.transformers {
            b.transformers()?;
        }
        if let Some(spec) = &args.flux_bf16_step {
            b.flux_bf16_step(spec)?;
        }
        b.large()?;
        if args.lora_train {
            b.lora_train()?;
        }
        if args.train {
            b.ddpm_train()?;
        }
        if args.pipeline {
            b.pipeline()?;
        }
        ours_rounds.push(b.lines.iter().map(|l| (l.name.clone(), l.ms)).collect());
        if lines.is_empty() {
            lines = b.lines;
        }
        if args.compare_torch {
            torch::release_freed_memory();
            torch_rounds.push(torch::torch_baseline(&args)?);
        }
    }
    let median = |mut v: Vec<f64>| -> Option<f64> {
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    let across = |rounds: &[BTreeMap<String, f64>], key: &str| -> Option<f64> {
        median(rounds.iter().filter_map(|r| r.get(key).copied()).collect())
    };
    let ours: BTreeMap<String, f64> = lines
        .iter()
        .filter_map(|l| Some((l.name.clone(), across(&ours_rounds, &l.name)?)))
        .collect();
    let torch: Option<BTreeMap<String, f64>> = args.compare_torch.then(|| {
        let keys: std::collections::BTreeSet<&String> =
            torch_rounds.iter().flat_map(|r| r.keys()).collect();
        keys.into_iter()
            .filter_map(|k| Some((k.clone(), across(&torch_rounds, k)?)))
            .collect()
    });
    if let Some(t) = &torch {
        let what = if rounds > 1 {
            format!("median of {rounds} alternating rounds; ratio range")
        } else {
            String::new()
        };
        println!(
            "\n{:<34} {:>10} {:>10} {:>8}   {what}",
            "line", "ours ms", "torch ms", "ratio"
        );
        // Our line `name` against PyTorch's line `key`: per-round ratios (each compares runs
        // minutes apart, not hours), their median and range.
        let ratio = |name: &str, key: &str| -> (Option<f64>, String) {
            let ratios: Vec<f64> = ours_rounds
                .iter()
                .zip(&torch_rounds)
                .filter_map(|(o, t)| Some(o.get(name)? / t.get(key)?))
                .collect();
            let range = match (
                ratios.iter().copied().reduce(f64::min),
                ratios.iter().copied().reduce(f64::max),
            ) {
                (Some(lo), Some(hi)) if rounds > 1 => format!("{lo:.2}-{hi:.2}"),
                _ => String::new(),
            };
            (median(ratios), range)
        };
        for l in &lines {
            let (median_ratio, range) = ratio(&l.name, &l.name);
            match (ours.get(&l.name), t.get(&l.name), median_ratio) {
                (Some(o), Some(tm), Some(ratio)) => {
                    println!(
                        "{:<34} {:>10.1} {:>10.1} {:>7.2}x   {range}",
                        l.name, o, tm, ratio
                    );
                    // The SD 1.5 UNet step's and the large lines' peak RSS (each process's
                    // peak so far: their own when run alone with --only), or on a GPU every
                    // line's peak device memory.
                    let (key, label) = match gpu_memory {
                        Some(_) => ("peak_gpu_mib", "  peak GPU memory"),
                        None => ("peak_rss_mib", "  peak RSS"),
                    };
                    if let (Some(ours), Some(theirs)) =
                        (l.peak_mib, t.get(&format!("{} {key}", l.name)))
                    {
                        println!(
                            "{label:<34} {ours:>6.0} MiB {theirs:>6.0} MiB {:>7.2}x",
                            ours / theirs
                        );
                    }
                }
                _ => println!("{:<34} {:>10} {:>10} {:>8}", l.name, "-", "-", "-"),
            }
            // PyTorch tuned (channels_last) next, where the baseline times it too.
            let tuned = format!("{} channels_last", l.name);
            if let (Some(o), Some(tm), (Some(r), range)) =
                (ours.get(&l.name), t.get(&tuned), ratio(&l.name, &tuned))
            {
                println!("{tuned:<34} {o:>10.1} {tm:>10.1} {r:>7.2}x   {range}");
            }
        }
        // The transformer lines run before the pipeline: the peak then is theirs.
        if let (true, false, Some(theirs), Some(ours)) = (
            args.transformers,
            args.pipeline,
            t.get("transformers peak_rss_mib"),
            peak_rss_mib(),
        ) {
            println!(
                "{:<34} {:>7.0} MiB {:>6.0} MiB {:>7.2}x",
                "peak RSS (transformer lines)",
                ours,
                theirs,
                ours / theirs
            );
        }
        let name = pipeline_name(args.pipeline_steps);
        if let (true, Some(theirs), Some(ours)) = (
            args.pipeline,
            t.get(&format!("{name} peak_rss_mib")),
            peak_rss_mib(),
        ) {
            println!(
                "{:<34} {:>7.0} MiB {:>6.0} MiB {:>7.2}x",
                "peak RSS (whole process)",
                ours,
                theirs,
                ours / theirs
            );
        }
    }
    if let Some(path) = &args.json {
        let lines: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::json!({"name": l.name, "ms": ours.get(&l.name), "gflop": l.gflop, "peak_mib": l.peak_mib, "torch_ms": torch.as_ref().and_then(|t| t.get(&l.name))}))
            .collect();
        let doc = serde_json::json!({"device": args.device, "threads": rayon_threads(), "peak_rss_mib": peak_rss_mib(), "lines": lines, "ours_ms": ours, "rounds": {"ours_ms": ours_rounds, "torch_ms": torch_rounds}});
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The per-layer table of `--profile`: per run, most time first, then the unprofiled rest.
fn print_profile(rows: Vec<(String, diffuse_models::profile::Entry)>, total_ms: f64, runs: usize) {
    if rows.is_empty() {
        return;
    }
    let per_run = |ms: f64| ms / runs as f64;
    let mut listed = 0.0;
    for (name, e) in &rows {
        let ms = e.time.as_secs_f64() * 1000.0;
        listed += ms;
        let rate = if e.flops > 0.0 {
            format!("{:>7.1} GFLOP/s", e.flops / e.time.as_secs_f64() / 1e9)
        } else {
            String::new()
        };
        println!(
            "    {name:<46} {:>4} calls {:>9.1} ms {:>5.1}% {rate}",
            e.calls / runs as u64,
            per_run(ms),
            100.0 * ms / total_ms
        );
    }
    let rest = total_ms - listed;
    println!(
        "    {:<46} {:>10} {:>9.1} ms {:>5.1}%",
        "other",
        "",
        per_run(rest),
        100.0 * rest / total_ms
    );
}

/// The `--large` SDXL-Turbo-like line.
const TURBO: &str = "pipeline sdxl-turbo 512 1 step";
/// The `--large` whole SDXL image.
const SDXL_1024: &str = "pipeline sdxl txt2img 1024 20 steps";

fn pipeline_name(steps: usize) -> String {
    format!("pipeline sd15 txt2img 512 {steps} steps")
}

fn rayon_threads() -> usize {
    candle_core::utils::get_num_threads()
}
