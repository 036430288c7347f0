//! AUTOMATIC1111 prompt syntax on the tiny SD pipeline (the repository's own copy): properties
//! of the weighting and chunking that must hold whatever the weights are.

use std::path::Path;

use anyhow::Result;
use candle_core::{IndexOp, Tensor};
use diffuse_core::testing::{assert_close, to_vec_f64};
use diffuse_pipelines::prompt_weighting::{chunks, PromptSyntax, CHUNK_TOKENS};
use diffuse_pipelines::{
    load_pipeline, GenerationParams, LoadOptions, Pipeline, StableDiffusionPipeline,
};

fn pipe() -> StableDiffusionPipeline {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines/tiny_sd");
    match load_pipeline(&dir, &LoadOptions::default()).expect("tiny_sd loads") {
        Pipeline::StableDiffusion(p) => *p,
        _ => panic!("tiny_sd is a Stable Diffusion pipeline"),
    }
}

fn embeds(
    p: &StableDiffusionPipeline,
    prompt: &str,
    neg: &str,
    syntax: PromptSyntax,
) -> Result<Tensor> {
    let params = GenerationParams {
        prompts: vec![prompt.into()],
        negative_prompts: vec![neg.into()],
        guidance_scale: 7.0,
        prompt_syntax: syntax,
        ..Default::default()
    };
    Ok(p.encode_prompt(&params, &mut Vec::new())?.embeds)
}

#[test]
fn unweighted_short_prompts_give_diffusers_embeddings_exactly() -> Result<()> {
    let p = pipe();
    for (prompt, neg) in [
        ("a photograph of an astronaut riding a horse", "blurry"),
        ("", ""),
        (
            "lighthouse, dusk, watercolor",
            "low quality, jpeg artifacts",
        ),
    ] {
        let plain = embeds(&p, prompt, neg, PromptSyntax::Plain)?;
        let a1111 = embeds(&p, prompt, neg, PromptSyntax::A1111)?;
        assert_eq!(to_vec_f64(&plain)?, to_vec_f64(&a1111)?, "{prompt:?}");
    }
    Ok(())
}

#[test]
fn weights_change_only_their_tokens_before_the_rescale() -> Result<()> {
    let p = pipe();
    let base = embeds(&p, "a red house", "", PromptSyntax::A1111)?;
    let weighted = embeds(&p, "a (red:1.5) house", "", PromptSyntax::A1111)?;
    let (b, w) = (base.i(1)?, weighted.i(1)?);
    // Same token ids, so the encoder output is the same; the weighting multiplies the `red`
    // row (position 2) by 1.5 relative to the others, then rescales all to the old mean.
    let ratio = |t: &Tensor, i: usize, j: usize| -> Result<f64> {
        let (a, c) = (to_vec_f64(&t.i(i)?)?, to_vec_f64(&t.i(j)?)?);
        Ok(a[0] / c[0])
    };
    assert!((ratio(&w, 2, 1)? / ratio(&b, 2, 1)? - 1.5).abs() < 1e-4);
    assert!((ratio(&w, 3, 1)? / ratio(&b, 3, 1)? - 1.0).abs() < 1e-4);
    let mean = |t: &Tensor| -> Result<f64> { Ok(t.mean_all()?.to_scalar::<f32>()? as f64) };
    assert!((mean(&w)? - mean(&b)?).abs() < 1e-5);
    // The negative half is untouched.
    assert_close("uncond", &weighted.i(0)?, &base.i(0)?, 0.0, 0.0)?;
    Ok(())
}

#[test]
fn long_prompts_are_chunked_and_the_negative_padded_to_match() -> Result<()> {
    let p = pipe();
    let words: Vec<String> = (0..100).map(|i| format!("word{i}")).collect();
    let long = words.join(" ");
    let c = chunks(&p.tokenizer, &long, p.tokenizer.max_length());
    assert!(c.len() >= 2);
    for chunk in &c {
        assert_eq!(chunk.ids.len(), 77);
        assert_eq!(chunk.ids[0], p.tokenizer.bos_id());
        // Every token of the prompt is in some chunk, none lost to truncation.
        assert!(chunk.ids[1..].contains(&p.tokenizer.eos_id()));
    }
    let kept: usize = c
        .iter()
        .map(|ch| {
            ch.ids[1..]
                .iter()
                .position(|&i| i == p.tokenizer.eos_id())
                .unwrap()
        })
        .sum();
    assert_eq!(kept, p.tokenizer.encode(&long).len() - 2);
    assert!(c[0].ids[1..=CHUNK_TOKENS]
        .iter()
        .all(|&i| i != p.tokenizer.eos_id()));
    let e = embeds(&p, &long, "short", PromptSyntax::A1111)?;
    assert_eq!(e.dims()[1], 77 * c.len());
    // The first chunk is the plain encoding of its own ids.
    let first = p.text_encoder.forward(
        &Tensor::new(
            c[0].ids
                .iter()
                .map(|&i| i64::from(i))
                .collect::<Vec<_>>()
                .as_slice(),
            &candle_core::Device::Cpu,
        )?
        .unsqueeze(0)?,
    )?;
    assert_close(
        "chunk 0",
        &e.i((1..2, 0..77))?,
        &first.last_hidden_state,
        1e-6,
        0.0,
    )?;
    // BREAK starts a new chunk even for a short prompt.
    assert_eq!(chunks(&p.tokenizer, "a BREAK b", 77).len(), 2);
    Ok(())
}

#[test]
fn a_comma_near_the_end_of_a_full_chunk_moves_the_phrase_after_it() {
    let p = pipe();
    let tok = &p.tokenizer;
    // 70 one-token words, a comma, then 10 more: the chunk breaks after the comma.
    let text = format!("{} , {}", ["cat"; 70].join(" "), ["dog"; 10].join(" "));
    let c = chunks(tok, &text, 77);
    assert_eq!(c.len(), 2);
    let comma = tok.encode(",")[1];
    let first_eos = c[0].ids[1..]
        .iter()
        .position(|&i| i == tok.eos_id())
        .unwrap();
    assert_eq!(
        first_eos, 71,
        "70 words and the comma stay in the first chunk"
    );
    assert_eq!(c[0].ids[71], comma);
}
