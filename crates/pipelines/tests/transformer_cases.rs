//! The SD3, Flux and DiT reference cases through the pipelines: every tensor the case
//! recorded (prompt embeddings, every transformer call, the latents after each step, the image).

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::Tensor;
use diffuse_core::testing::{assert_close, fixtures_dir, load_tensors, read_json, run_all};
use diffuse_pipelines::{
    load_pipeline, ClassToImageRequest, FlowText2ImageRequest, LoadOptions, Pipeline, Trace,
};

fn stack(ts: &[Tensor]) -> Result<Tensor> {
    Ok(Tensor::stack(ts, 0)?)
}

fn trace_tensors(tr: &Trace, out: &mut HashMap<String, Tensor>) -> Result<()> {
    let ts: Vec<f32> = tr.unet_timesteps.iter().map(|&t| t as f32).collect();
    out.insert("denoiser_input".into(), stack(&tr.unet_inputs)?);
    out.insert("denoiser_output".into(), stack(&tr.unet_outputs)?);
    out.insert(
        "denoiser_timestep".into(),
        Tensor::new(ts.as_slice(), &candle_core::Device::Cpu)?,
    );
    out.insert("step_latents".into(), stack(&tr.step_latents)?);
    Ok(())
}

fn run_case(name: &str) -> Result<()> {
    let root = fixtures_dir();
    let dir = root.join("cases").join(name);
    let case = read_json(&dir.join("case.json"))?;
    let expected = load_tensors(&dir.join("expected.safetensors"))?;
    let args = &case["args"];
    let model = root.join(case["pipeline"].as_str().context("pipeline")?);
    let pipeline = load_pipeline(&model, &LoadOptions::default())?;
    let mut produced = HashMap::new();
    let usize_arg = |k: &str| args[k].as_u64().map(|v| v as usize);
    let flow_request = || FlowText2ImageRequest {
        prompts: vec![args["prompt"].as_str().unwrap_or_default().to_string()],
        negative_prompts: args["negative_prompt"]
            .as_str()
            .map(|s| vec![s.to_string()])
            .unwrap_or_default(),
        guidance_scale: args["guidance_scale"].as_f64().unwrap_or(7.0),
        steps: usize_arg("num_inference_steps").unwrap_or(28),
        seed: args["seed"].as_u64().unwrap_or(0),
        height: usize_arg("height"),
        width: usize_arg("width"),
        max_sequence_length: usize_arg("max_sequence_length"),
        record_trace: true,
        ..FlowText2ImageRequest::default()
    };
    let out = match &pipeline {
        Pipeline::StableDiffusion3(p) => {
            let mut req = flow_request();
            let max_len = req.max_sequence_length.unwrap_or(256);
            let text = p.encode_prompt(
                &req.prompts,
                &req.negative_prompts,
                true,
                max_len,
                None,
                &mut vec![],
            )?;
            produced.insert("prompt_embeds".into(), text.embeds.clone());
            produced.insert("pooled_prompt_embeds".into(), text.pooled.clone());
            let (neg, neg_pooled) = text.negative.clone().context("negative embeds")?;
            produced.insert("negative_prompt_embeds".into(), neg);
            produced.insert("negative_pooled_prompt_embeds".into(), neg_pooled);
            req.prompt_embeds = Some(text);
            p.text_to_image(&req, None)?
        }
        Pipeline::Flux(p) => {
            let mut req = flow_request();
            let text = p.encode_prompt(
                &req.prompts,
                req.max_sequence_length.unwrap_or(512),
                &mut vec![],
            )?;
            produced.insert("prompt_embeds".into(), text.embeds.clone());
            produced.insert("pooled_prompt_embeds".into(), text.pooled.clone());
            req.prompt_embeds = Some(text);
            p.text_to_image(&req, None)?
        }
        Pipeline::DiT(p) => {
            let labels: Vec<usize> = serde_json::from_value(args["class_labels"].clone())?;
            let req = ClassToImageRequest {
                class_labels: labels,
                guidance_scale: args["guidance_scale"].as_f64().unwrap_or(4.0),
                steps: usize_arg("num_inference_steps").unwrap_or(50),
                seed: args["seed"].as_u64().unwrap_or(0),
                record_trace: true,
            };
            p.generate(&req, None)?
        }
        _ => anyhow::bail!("not a transformer pipeline"),
    };
    trace_tensors(out.trace.as_ref().context("trace")?, &mut produced)?;
    produced.insert("image".into(), out.images.clone());
    let tol = &case["tolerance"];
    let (image_atol, atol, rtol) = (
        tol["image_atol"].as_f64().context("image_atol")?,
        tol["tensor_atol"].as_f64().context("tensor_atol")?,
        tol["tensor_rtol"].as_f64().context("tensor_rtol")?,
    );
    for (key, want) in &expected {
        let got = produced
            .get(key)
            .with_context(|| format!("no `{key}` produced"))?;
        let (a, r) = if key == "image" {
            (image_atol, 0.0)
        } else {
            (atol, rtol)
        };
        assert_close(key, got, want, a, r)?;
    }
    Ok(())
}

#[test]
fn transformer_pipelines_match_diffusers() {
    let cases = [
        "dit_class2img",
        "sd3_text2img_flowmatch",
        "flux_text2img_flowmatch",
    ];
    run_all(
        "transformer cases",
        &cases,
        |c| c.to_string(),
        |c| run_case(c),
    );
}
