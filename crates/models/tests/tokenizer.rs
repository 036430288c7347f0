//! CLIP tokenizer parity with transformers' `CLIPTokenizer` on the fixture cases.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use diffuse_core::testing::{fixture_subdir, get, load_tensors, read_json, run_all};
use diffuse_models::clip_tokenizer::ClipTokenizer;

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixture_subdir("tokenizer")).expect("loading the fixture tokenizer")
}

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures_configs")
}

struct Case {
    text: String,
    hf: Vec<u32>,
}

#[test]
fn matches_transformers_on_every_case() {
    let tok = tokenizer();
    let cases_json = read_json(&fixture_subdir("tokenizer").join("tokenizer_check_cases.json"))
        .expect("reading tokenizer_check_cases.json");
    let cases: Vec<Case> = cases_json
        .as_array()
        .expect("a list of cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_string(),
            hf: c["hf"]
                .as_array()
                .expect("hf ids")
                .iter()
                .map(|v| v.as_u64().expect("an id") as u32)
                .collect(),
        })
        .collect();
    run_all(
        "clip tokenizer",
        &cases,
        |c| format!("{:?}", c.text),
        |c| {
            let ids = tok.encode(&c.text);
            ensure!(ids == c.hf, "ids {ids:?}\n   expected {:?}", c.hf);
            Ok(())
        },
    );
}

#[test]
fn padded_ids_match_the_clip_fixture_inputs() -> Result<()> {
    let tok = tokenizer();
    assert_eq!(tok.max_length(), 77);
    let io = load_tensors(&fixture_subdir("models").join("clip_text_io.safetensors"))?;
    let expected: Vec<Vec<i64>> = get(&io, "input_ids")?.to_vec2()?;
    let prompts = ["a photograph of an astronaut riding a horse", ""];
    ensure!(expected.len() == prompts.len());
    for (prompt, want) in prompts.iter().zip(&expected) {
        let (ids, truncated) = tok.encode_padded(prompt, 77)?;
        ensure!(!truncated, "{prompt:?} reported as truncated");
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        ensure!(&ids == want, "{prompt:?}: {ids:?}\n expected {want:?}");
    }
    let unpadded: Vec<Vec<i64>> = get(&io, "unpadded_input_ids")?.to_vec2()?;
    let ids: Vec<i64> = tok.encode(prompts[0]).iter().map(|&i| i as i64).collect();
    ensure!(ids == unpadded[0]);
    Ok(())
}

#[test]
fn long_prompts_are_truncated_keeping_eos() -> Result<()> {
    let tok = tokenizer();
    let text = "a very long prompt about a red cat, ".repeat(20);
    let full = tok.encode(&text);
    assert!(full.len() > 77);
    let (ids, truncated) = tok.encode_padded(&text, 77)?;
    assert!(truncated);
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[..76], full[..76]);
    assert_eq!(ids[76], tok.eos_id());
    // Exactly 77 tokens fit without truncation.
    let n_words = 75;
    let text: String = vec!["cat"; n_words].join(" ");
    let (ids, truncated) = tok.encode_padded(&text, 77)?;
    assert!(!truncated);
    assert_eq!(ids, tok.encode(&text));
    assert!(tok.encode_padded("x", 1).is_err());
    // What was cut can be shown to the user.
    assert_eq!(
        tok.decode(&tok.encode("A Photograph of a HORSE!")),
        "a photograph of a horse !"
    );
    Ok(())
}

#[test]
fn pad_token_follows_the_tokenizer_files() -> Result<()> {
    // SD 2.1 pads with "!" (id 0): its special_tokens_map.json overrides tokenizer_config.json.
    let fixture = fixture_subdir("tokenizer");
    for (model, expected_pad) in [
        ("stabilityai_stable_diffusion_2_1", "!"),
        ("runwayml_stable_diffusion_v1_5", "<|endoftext|>"),
    ] {
        let dir = std::env::temp_dir().join(format!(
            "diffuse-tok-{model}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir)?;
        for f in ["vocab.json", "merges.txt"] {
            std::fs::copy(fixture.join(f), dir.join(f))?;
        }
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            let src = configs_dir().join(model).join("tokenizer").join(f);
            std::fs::copy(&src, dir.join(f)).with_context(|| format!("{}", src.display()))?;
        }
        let tok = ClipTokenizer::from_dir(&dir)?;
        let vocab = read_json(&dir.join("vocab.json"))?;
        let pad = vocab[expected_pad].as_u64().context("pad token in vocab")? as u32;
        assert_eq!(tok.pad_id(), pad, "{model}");
        let (ids, _) = tok.encode_padded("a cat", 77)?;
        assert_eq!(ids[..4], tok.encode("a cat")[..]);
        assert!(ids[4..].iter().all(|&i| i == pad), "{model}: {ids:?}");
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

#[test]
fn missing_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("diffuse-tok-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = ClipTokenizer::from_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The vocabulary built into diffuse (for single files without a tokenizer) is the Stable
/// Diffusion one: the same ids as transformers on every case, and the OpenCLIP pad token.
#[test]
fn the_builtin_vocabulary_matches_transformers() -> Result<()> {
    let builtin = ClipTokenizer::builtin("<|endoftext|>")?;
    let cases = read_json(&fixture_subdir("tokenizer").join("tokenizer_check_cases.json"))?;
    for c in cases.as_array().context("a list of cases")? {
        let text = c["text"].as_str().context("text")?;
        let hf: Vec<u32> = c["hf"]
            .as_array()
            .context("hf")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(0) as u32)
            .collect();
        ensure!(builtin.encode(text) == hf, "{text:?}");
    }
    ensure!(builtin.vocab_size() == 49408);
    let open_clip = ClipTokenizer::builtin("!")?;
    ensure!(open_clip.pad_id() == 0 && builtin.pad_id() == builtin.eos_id());
    Ok(())
}
