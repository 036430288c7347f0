//! The T5 tokenizer and encoder against transformers (`fixtures/generate/t5.py`): token ids
//! of several prompts, unpadded and padded/truncated to several lengths, for both tiny T5
//! tokenizers, and `T5EncoderModel` with bf16 weights and bad ids (its f32 parity run is
//! `model_fixtures.rs`'s `t5_encoder` case).

use diffuse_models::ModelMixin;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use diffuse_core::testing::{
    assert_close, fixture_subdir, fixtures_dir, get, load_tensors, read_json, run_all,
};
use diffuse_models::t5::T5EncoderModel;
use diffuse_models::t5_tokenizer::T5Tokenizer;

#[test]
fn t5_tokenizer_matches_transformers() {
    let cases_path = fixture_subdir("tokenizer").join("t5_check_cases.json");
    let cases = read_json(&cases_path).expect("t5_check_cases.json");
    let cases = cases.as_array().expect("a list of cases").clone();
    run_all(
        "t5 tokenizer",
        &cases,
        |c| format!("{} {:?}", c["tokenizer"], c["text"]),
        |c| {
            let dir = fixtures_dir().join(c["tokenizer"].as_str().context("tokenizer")?);
            let tok = T5Tokenizer::from_dir(&dir)?;
            let text = c["text"].as_str().context("text")?;
            let want: Vec<u32> = serde_json::from_value(c["ids"].clone())?;
            let got = tok.encode(text)?;
            ensure!(got == want, "unpadded: {got:?}, transformers {want:?}");
            let padded = c["padded"].as_object().context("padded")?;
            for (len, want) in padded {
                let n: usize = len.parse()?;
                let want: Vec<u32> = serde_json::from_value(want.clone())?;
                let (got, truncated) = tok.encode_padded(text, n)?;
                ensure!(got == want, "padded to {n}: {got:?}, transformers {want:?}");
                let full = tok.encode(text)?.len();
                ensure!(
                    truncated == (full > n),
                    "padded to {n}: truncated = {truncated} for {full} tokens"
                );
            }
            Ok(())
        },
    );
}

#[test]
fn t5_tokenizer_errors_are_clear() -> Result<()> {
    let missing = T5Tokenizer::from_dir(Path::new("/nonexistent-t5-dir"))
        .expect_err("a folder without tokenizer.json");
    ensure!(missing.to_string().contains("tokenizer.json"), "{missing}");
    let dir = fixtures_dir().join("cases/_models/tiny_flux/tokenizer_2");
    let tok = T5Tokenizer::from_dir(&dir)?;
    let zero = tok.encode_padded("a", 0).expect_err("length 0");
    ensure!(zero.to_string().contains("at least 1"), "{zero}");
    Ok(())
}

#[test]
fn t5_encoder_refuses_bad_ids() -> Result<()> {
    let dir = fixtures_dir().join("cases/_models/tiny_flux/text_encoder_2");
    let model = T5EncoderModel::from_pretrained(&dir, DType::F32, &Device::Cpu)?;
    let bad = candle_core::Tensor::new(&[[5u32, 1000]], &Device::Cpu)?;
    let err = model
        .forward(&bad)
        .expect_err("id 1000 of a 1000-token vocabulary");
    ensure!(err.to_string().contains("vocabulary"), "{err}");
    let flat = candle_core::Tensor::new(&[5u32, 1], &Device::Cpu)?;
    let err = model.forward(&flat).expect_err("1-D ids");
    ensure!(err.to_string().contains("(batch, tokens)"), "{err}");
    Ok(())
}

/// bf16 weights: the encoder still computes in f32 and stays near transformers' f32 output.
#[test]
fn t5_encoder_with_bf16_weights() -> Result<()> {
    let models = fixture_subdir("models");
    let io = load_tensors(&models.join("t5_encoder_io.safetensors"))?;
    let model =
        T5EncoderModel::from_pretrained(&models.join("t5_encoder"), DType::BF16, &Device::Cpu)?;
    let out = model.forward(get(&io, "input_ids")?)?;
    ensure!(out.dtype() == DType::F32);
    assert_close(
        "bf16 last_hidden_state",
        &out,
        get(&io, "last_hidden_state")?,
        5e-2,
        5e-2,
    )
}
