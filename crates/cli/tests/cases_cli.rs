//! The whole-pipeline reference cases (`fixtures/cases/*`, or under `DIFFUSE_FIXTURES`) run
//! through the `diffuse` command exactly as a user types it; every PNG written must match the
//! case's `image` within its `image_atol` plus half an 8-bit level (PNG rounding). A case
//! whose pipeline class has no command-line mapping here fails by name.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use diffuse_core::testing::{
    case_dirs, fixture_subdir, fixtures_dir, load_tensors, read_json, run_all,
};

/// The command line of a case, and the PNGs it writes.
struct Invocation {
    args: Vec<String>,
    outputs: Vec<PathBuf>,
}

type Mapper = fn(&Case, &Path) -> Result<Invocation>;

/// diffusers pipeline class -> how a user runs it from the command line.
const MAPPERS: &[(&str, Mapper)] = &[
    ("StableDiffusionPipeline", stable_diffusion),
    ("StableDiffusion3Pipeline", flow_matching),
    ("FluxPipeline", flow_matching),
    ("DiTPipeline", dit),
    ("StableDiffusionXLPipeline", stable_diffusion),
    ("StableDiffusionXLImg2ImgPipeline", stable_diffusion),
    ("StableDiffusionXLInpaintPipeline", stable_diffusion),
    ("StableDiffusionControlNetPipeline", controlnet),
    ("StableDiffusionXLControlNetPipeline", controlnet),
];

struct Case {
    dir: PathBuf,
    root: PathBuf,
    json: serde_json::Value,
}

impl Case {
    fn args(&self) -> &serde_json::Value {
        &self.json["args"]
    }

    fn path(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    /// A file of the case folder (`init_image`, `control_image`).
    fn case_file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// Fails on an args key the mapping does not turn into a flag (it would be dropped
    /// silently otherwise).
    fn check_known(&self, known: &[&str]) -> Result<()> {
        let obj = self.args().as_object().context("args is not an object")?;
        let unknown: Vec<&String> = obj
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .collect();
        if !unknown.is_empty() {
            bail!("args with no command-line mapping: {unknown:?}");
        }
        Ok(())
    }

    /// `--flag value` for every args key present, in the order given.
    fn flags(&self, map: &[(&str, &str)]) -> Vec<String> {
        let mut out = Vec::new();
        for (key, flag) in map {
            let v = &self.args()[*key];
            let text = match v {
                serde_json::Value::Null => continue,
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push(flag.to_string());
            out.push(text);
        }
        out
    }
}

/// The args every Stable Diffusion (1.x/2.x, SDXL) mapping turns into flags.
const SD_ARGS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "width",
    "height",
    "seed",
    "scheduler",
    "loras",
    "textual_inversions",
    "init_image",
    "mask_image",
    "strength",
];

/// The args the ControlNet mapping adds.
const CONTROLNET_ARGS: &[&str] = &[
    "control_image",
    "controlnet_conditioning_scale",
    "control_guidance_start",
    "control_guidance_end",
    "guess_mode",
];

/// Stable Diffusion 1.x/2.x and SDXL: `diffuse generate` (text-to-image, with LoRAs,
/// embeddings and single files), `diffuse img2img --init-image PNG --strength S` or
/// `diffuse inpaint --init-image PNG --mask PNG --strength S`.
fn stable_diffusion(case: &Case, out: &Path) -> Result<Invocation> {
    case.check_known(SD_ARGS)?;
    sd_command(case, out)
}

/// A ControlNet pipeline: the Stable Diffusion command plus `--controlnet DIR --control-image
/// PNG --controlnet-scale C` per ControlNet (a case's list settings give one flag each),
/// `--control-guidance-start/end` and `--guess-mode`.
fn controlnet(case: &Case, out: &Path) -> Result<Invocation> {
    case.check_known(&[SD_ARGS, CONTROLNET_ARGS].concat())?;
    let mut inv = sd_command(case, out)?;
    let items = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        match v {
            serde_json::Value::Array(a) => a.clone(),
            serde_json::Value::Null => vec![],
            other => vec![other.clone()],
        }
    };
    for net in items(&case.json["controlnet"]) {
        let rel = net.as_str().context("controlnet: a folder")?;
        inv.args.extend(["--controlnet".into(), case.path(rel)]);
    }
    for img in items(&case.args()["control_image"]) {
        let name = img.as_str().context("control_image: a file name")?;
        inv.args
            .extend(["--control-image".into(), case.case_file(name)]);
    }
    for (key, flag) in [
        ("controlnet_conditioning_scale", "--controlnet-scale"),
        ("control_guidance_start", "--control-guidance-start"),
        ("control_guidance_end", "--control-guidance-end"),
    ] {
        for v in items(&case.args()[key]) {
            inv.args.extend([flag.to_string(), v.to_string()]);
        }
    }
    if case.args()["guess_mode"].as_bool() == Some(true) {
        inv.args.push("--guess-mode".into());
    }
    Ok(inv)
}

/// The command of a Stable Diffusion case, by its task.
fn sd_command(case: &Case, out: &Path) -> Result<Invocation> {
    let task = case.json["task"].as_str().context("task")?;
    let sub = match task {
        "text2img" => "generate",
        "img2img" => "img2img",
        "inpaint" => "inpaint",
        other => bail!("task {other} has no command-line mapping"),
    };
    let mut args = vec![
        sub.to_string(),
        "--model".into(),
        case.path(case.json["pipeline"].as_str().context("pipeline")?),
    ];
    for (key, flag) in [("init_image", "--init-image"), ("mask_image", "--mask")] {
        if let Some(name) = case.args()[key].as_str() {
            args.extend([flag.to_string(), case.case_file(name)]);
        }
    }
    if let Some(c) = case.json["config"].as_str() {
        args.extend(["--config".into(), case.path(c)]);
    }
    args.extend(case.flags(&[
        ("prompt", "--prompt"),
        ("negative_prompt", "--negative-prompt"),
        ("num_inference_steps", "--steps"),
        ("guidance_scale", "--guidance-scale"),
        ("width", "--width"),
        ("height", "--height"),
        ("seed", "--seed"),
        ("scheduler", "--scheduler"),
        ("strength", "--strength"),
    ]));
    for l in case.args()["loras"].as_array().into_iter().flatten() {
        let file = case.path(l["file"].as_str().context("loras[].file")?);
        args.extend(["--lora".into(), format!("{file}:{}", l["scale"])]);
    }
    for e in case.args()["textual_inversions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let file = case.path(e["file"].as_str().context("textual_inversions[].file")?);
        match e["token"].as_str() {
            Some(t) => args.extend(["--embedding".into(), format!("{file}:{t}")]),
            None => args.extend(["--embedding".into(), file]),
        }
    }
    let png = out.join("out.png");
    args.extend(["--output".into(), png.display().to_string()]);
    Ok(Invocation {
        args,
        outputs: vec![png],
    })
}

/// `diffuse generate` for SD3 and Flux text-to-image.
fn flow_matching(case: &Case, out: &Path) -> Result<Invocation> {
    if case.json["task"] != "text2img" {
        bail!("task {} has no command-line mapping", case.json["task"]);
    }
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        case.path(case.json["pipeline"].as_str().context("pipeline")?),
    ];
    args.extend(case.flags(&[
        ("prompt", "--prompt"),
        ("negative_prompt", "--negative-prompt"),
        ("num_inference_steps", "--steps"),
        ("guidance_scale", "--guidance-scale"),
        ("width", "--width"),
        ("height", "--height"),
        ("seed", "--seed"),
        ("scheduler", "--scheduler"),
        ("max_sequence_length", "--max-sequence-length"),
    ]));
    let png = out.join("out.png");
    args.extend(["--output".into(), png.display().to_string()]);
    Ok(Invocation {
        args,
        outputs: vec![png],
    })
}

/// `diffuse generate --class-labels 1,7` for DiT: one file per class, `out-0.png`, ...
fn dit(case: &Case, out: &Path) -> Result<Invocation> {
    if case.json["task"] != "class2img" {
        bail!("task {} has no command-line mapping", case.json["task"]);
    }
    let labels: Vec<String> = case.args()["class_labels"]
        .as_array()
        .context("class_labels")?
        .iter()
        .map(|l| l.to_string())
        .collect();
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        case.path(case.json["pipeline"].as_str().context("pipeline")?),
        "--class-labels".into(),
        labels.join(","),
    ];
    args.extend(case.flags(&[
        ("num_inference_steps", "--steps"),
        ("guidance_scale", "--guidance-scale"),
        ("seed", "--seed"),
        ("scheduler", "--scheduler"),
    ]));
    let png = out.join("out.png");
    args.extend(["--output".into(), png.display().to_string()]);
    let outputs = if labels.len() == 1 {
        vec![png]
    } else {
        (0..labels.len())
            .map(|i| out.join(format!("out-{i}.png")))
            .collect()
    };
    Ok(Invocation { args, outputs })
}

fn run_case(dir: &Path) -> Result<()> {
    let case = Case {
        dir: dir.to_path_buf(),
        root: fixtures_dir(),
        json: read_json(&dir.join("case.json"))?,
    };
    let class = case.json["pipeline_class"]
        .as_str()
        .context("pipeline_class")?;
    let Some((_, mapper)) = MAPPERS.iter().find(|(c, _)| *c == class) else {
        bail!("no command-line mapping for pipeline class {class}");
    };
    let name = dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let out = std::env::temp_dir().join(format!("diffuse-case-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let inv = mapper(&case, &out)?;
    let run = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(&inv.args)
        .output()
        .context("running diffuse")?;
    if !run.status.success() {
        bail!(
            "`diffuse {}` failed: {}",
            inv.args.join(" "),
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let expected = load_tensors(&case.dir.join("expected.safetensors"))?;
    let want = expected.get("image").context("expected image")?;
    let (b, h, w, _) = want.dims4()?;
    if inv.outputs.len() != b {
        bail!("{} output files for {b} images", inv.outputs.len());
    }
    let atol = case.json["tolerance"]["image_atol"]
        .as_f64()
        .context("image_atol")?
        + 0.5 / 255.0;
    let want = want.flatten_all()?.to_vec1::<f32>()?;
    let mut worst = 0f64;
    for (i, path) in inv.outputs.iter().enumerate() {
        let img = image::open(path)
            .with_context(|| format!("reading {}", path.display()))?
            .to_rgb8();
        if (img.height() as usize, img.width() as usize) != (h, w) {
            bail!(
                "{}: {}x{}, expected {w}x{h}",
                path.display(),
                img.width(),
                img.height()
            );
        }
        let offset = i * h * w * 3;
        for (k, &px) in img.as_raw().iter().enumerate() {
            let (ours, theirs) = (px as f64 / 255.0, want[offset + k] as f64);
            if !theirs.is_finite() {
                bail!("{}: expected value {k} is not finite", path.display());
            }
            worst = worst.max((ours - theirs).abs());
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    if worst > atol {
        bail!("PNG differs from the reference image by {worst:.4} (tolerance {atol:.4})");
    }
    eprintln!("{name}: ok through the CLI (max |diff| {worst:.4})");
    Ok(())
}

#[test]
fn every_case_runs_through_the_cli() {
    let dirs: Vec<PathBuf> = case_dirs(&fixture_subdir("cases"))
        .into_iter()
        .filter(|d| {
            !d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('_'))
        })
        .collect();
    run_all(
        "cases through the CLI",
        &dirs,
        |d| {
            d.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        },
        |d| run_case(d),
    );
}
