//! `DiTPipeline` cases: class-conditional generation.

use anyhow::{bail, Context, Result};
use diffuse_pipelines::{load_pipeline, ClassToImageRequest, Pipeline};

use crate::harness::{trace_tensors, Case, Produced};

const ARGS: &[&str] = &[
    "class_labels",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "scheduler",
];

pub fn run(case: &Case) -> Result<Produced> {
    case.check_args_known(ARGS)?;
    if case.task != "class2img" {
        bail!("task {} is not handled by the DiT runner", case.task);
    }
    let opts = case.load_options()?;
    let Pipeline::DiT(pipe) = load_pipeline(&case.pipeline_path()?, &opts)? else {
        bail!("expected a DiT pipeline");
    };
    let class_labels: Vec<usize> = serde_json::from_value(case.args["class_labels"].clone())
        .context("args.class_labels: a list of class ids")?;
    let req = ClassToImageRequest {
        class_labels,
        guidance_scale: case.arg_f64("guidance_scale")?,
        steps: case.arg_usize("num_inference_steps")?,
        seed: case.seed()?,
        record_trace: true,
        ..Default::default()
    };
    let out = pipe.generate(&req, None)?;
    let mut got = trace_tensors(out.trace.as_ref().context("no trace recorded")?)?;
    got.insert("image".into(), out.images);
    Ok(got)
}
