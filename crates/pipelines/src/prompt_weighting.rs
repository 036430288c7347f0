//! AUTOMATIC1111's prompt syntax: attention weights and prompts longer than the text encoder's
//! 75-token window.
//!
//! - `(word)` multiplies the weight of what it holds by 1.1, `[word]` divides it by 1.1,
//!   `(word:1.3)` sets the factor; they nest; `\(` `\)` `\[` `\]` `\\` are literal; unclosed
//!   brackets apply to the end of the prompt; `BREAK` starts a new chunk.
//! - Tokens go into chunks of 75 (a chunk that would split a phrase moves the words after its
//!   last comma, if that comma is among its last 20 tokens, to the next chunk); each chunk is
//!   encoded on its own as `BOS, tokens, EOS` padded to 77, and the chunks are concatenated
//!   along the sequence.
//! - Each token's embedding is multiplied by its weight, then the chunk is rescaled so that its
//!   mean equals the unweighted mean.
//!
//! A prompt with no brackets and at most 75 tokens gives exactly diffusers' embeddings.

use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use diffuse_core::Result;
use diffuse_models::clip_tokenizer::ClipTokenizer;
use regex::Regex;

/// How prompt text is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptSyntax {
    /// diffusers: the text as is, truncated to the encoder's window.
    #[default]
    Plain,
    /// AUTOMATIC1111: weights, escapes, BREAK and unlimited length in chunks of 75 tokens.
    A1111,
}

/// Tokens per chunk between BOS and EOS.
pub const CHUNK_TOKENS: usize = 75;
/// How far back a chunk looks for a comma to break at (A1111's `comma_padding_backtrack`).
const COMMA_BACKTRACK: usize = 20;

fn attention_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:",
        )
        .expect("valid pattern")
    })
}

fn break_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\s*\bBREAK\b\s*").expect("valid pattern"))
}

/// A1111's LoRA tags, `<lora:name>` or `<lora:name:multiplier>` (`lyco` too): removed from the
/// prompt and returned as (name, multiplier) in order. Other `<type:...>` tags and plain
/// `<token>`s (textual-inversion triggers) stay.
pub fn extract_lora_tags(prompt: &str) -> Result<(String, Vec<(String, f64)>)> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"<(\w+):([^>]+)>").expect("valid pattern"));
    let mut tags = Vec::new();
    let mut bad = None;
    let cleaned = re.replace_all(prompt, |c: &regex::Captures| {
        let kind = &c[1];
        if kind != "lora" && kind != "lyco" {
            return c[0].to_string();
        }
        let mut args = c[2].split(':');
        let name = args.next().unwrap_or_default().trim().to_string();
        let weight = match args.next().map(str::trim) {
            None => Some(1.0),
            Some(w) => w.parse::<f64>().ok(),
        };
        match weight {
            Some(w) if !name.is_empty() => tags.push((name, w)),
            _ => bad = Some(c[0].to_string()),
        }
        String::new()
    });
    if let Some(tag) = bad {
        return Err(diffuse_core::Error::invalid(format!(
            "bad LoRA tag `{tag}`: write <lora:name> or <lora:name:0.8>"
        )));
    }
    Ok((cleaned.into_owned(), tags))
}

/// A piece of prompt text with its weight; `None` marks a `BREAK`.
pub type Segment = (String, Option<f64>);

/// Splits a prompt into text runs with their weights (A1111's `parse_prompt_attention`).
pub fn parse_prompt_attention(text: &str) -> Vec<Segment> {
    let mut res: Vec<(String, f64, bool)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64, bool)>, start: usize, m: f64| {
        for r in res.iter_mut().skip(start) {
            r.1 *= m;
        }
    };
    for cap in attention_pattern().captures_iter(text) {
        let t = cap.get(0).map_or("", |m| m.as_str());
        let weight = cap.get(1).and_then(|w| w.as_str().parse::<f64>().ok());
        if let Some(lit) = t.strip_prefix('\\') {
            res.push((lit.to_string(), 1.0, false));
        } else if t == "(" {
            round.push(res.len());
        } else if t == "[" {
            square.push(res.len());
        } else if weight.is_some() && !round.is_empty() {
            let start = round.pop().unwrap_or(0);
            multiply(&mut res, start, weight.unwrap_or(1.0));
        } else if t == ")" && !round.is_empty() {
            let start = round.pop().unwrap_or(0);
            multiply(&mut res, start, 1.1);
        } else if t == "]" && !square.is_empty() {
            let start = square.pop().unwrap_or(0);
            multiply(&mut res, start, 1.0 / 1.1);
        } else {
            for (i, part) in break_pattern().split(t).enumerate() {
                if i > 0 {
                    res.push(("BREAK".into(), -1.0, true));
                }
                res.push((part.to_string(), 1.0, false));
            }
        }
    }
    for start in round {
        multiply(&mut res, start, 1.1);
    }
    for start in square {
        multiply(&mut res, start, 1.0 / 1.1);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0, false));
    }
    // Merge neighbours of equal weight.
    let mut i = 0;
    while i + 1 < res.len() {
        if res[i].1 == res[i + 1].1 && !res[i].2 && !res[i + 1].2 {
            let next = res.remove(i + 1);
            res[i].0.push_str(&next.0);
        } else {
            i += 1;
        }
    }
    res.into_iter()
        .map(|(t, w, brk)| (t, if brk { None } else { Some(w) }))
        .collect()
}

/// One encoder window: `BOS, tokens, EOS, padding` ids and each position's weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Tokenizes a prompt into chunks (A1111's `tokenize_line`). `window` is the encoder's token
/// count (77): each chunk holds `window - 2` tokens.
pub fn chunks(tokenizer: &ClipTokenizer, text: &str, window: usize) -> Vec<Chunk> {
    let per_chunk = window.saturating_sub(2).max(1);
    let comma = tokenizer.encode(",")[1];
    let mut out: Vec<Chunk> = Vec::new();
    let (mut ids, mut weights): (Vec<u32>, Vec<f32>) = (Vec::new(), Vec::new());
    let mut last_comma: Option<usize> = None;
    let close = |ids: &mut Vec<u32>, weights: &mut Vec<f32>, out: &mut Vec<Chunk>| {
        out.push(make_chunk(tokenizer, ids, weights, window));
        ids.clear();
        weights.clear();
    };
    for (segment, weight) in parse_prompt_attention(text) {
        let Some(weight) = weight else {
            close(&mut ids, &mut weights, &mut out);
            last_comma = None;
            continue;
        };
        let tokens = tokenizer.encode(&segment);
        for &tok in &tokens[1..tokens.len() - 1] {
            if tok == comma {
                last_comma = Some(ids.len());
            } else if let Some(c) =
                last_comma.filter(|&c| ids.len() == per_chunk && ids.len() - c <= COMMA_BACKTRACK)
            {
                // A full chunk breaks after its last comma when that is close to the end: the
                // words after it move to the next chunk.
                let rest_ids = ids.split_off(c + 1);
                let rest_w = weights.split_off(c + 1);
                close(&mut ids, &mut weights, &mut out);
                last_comma = None;
                ids = rest_ids;
                weights = rest_w;
            }
            if ids.len() == per_chunk {
                close(&mut ids, &mut weights, &mut out);
                last_comma = None;
            }
            ids.push(tok);
            weights.push(weight as f32);
        }
    }
    if !ids.is_empty() || out.is_empty() {
        close(&mut ids, &mut weights, &mut out);
    }
    out
}

fn make_chunk(tokenizer: &ClipTokenizer, ids: &[u32], weights: &[f32], window: usize) -> Chunk {
    let mut c = Chunk {
        ids: Vec::with_capacity(window),
        weights: Vec::with_capacity(window),
    };
    c.ids.push(tokenizer.bos_id());
    c.weights.push(1.0);
    c.ids.extend_from_slice(ids);
    c.weights.extend_from_slice(weights);
    c.ids.push(tokenizer.eos_id());
    // As diffusers pads: the pad id after the first EOS (EOS itself for SD 1.x, `!` for
    // OpenCLIP tokenizers).
    c.ids.resize(window, tokenizer.pad_id());
    c.weights.resize(window, 1.0);
    c
}

/// Multiplies each position of `z` (1, T, H) by its weight and restores the unweighted mean.
pub fn apply_weights(z: &Tensor, weights: &[f32]) -> Result<Tensor> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(z.clone());
    }
    let dtype = z.dtype();
    let z32 = z.to_dtype(DType::F32)?;
    let before = z32.mean_all()?.to_scalar::<f32>()?;
    let w = Tensor::from_slice(weights, (1, weights.len(), 1), z.device())?;
    let weighted = z32.broadcast_mul(&w)?;
    let after = weighted.mean_all()?.to_scalar::<f32>()?;
    Ok((weighted * f64::from(before / after))?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(t: &str, w: f64) -> Segment {
        (t.to_string(), Some(w))
    }

    #[test]
    fn parses_weights_as_a1111() {
        // A1111's own doc examples.
        assert_eq!(
            parse_prompt_attention("normal text"),
            vec![seg("normal text", 1.0)]
        );
        assert_eq!(
            parse_prompt_attention("an (important) word"),
            vec![seg("an ", 1.0), seg("important", 1.1), seg(" word", 1.0)]
        );
        assert_eq!(
            parse_prompt_attention("(unbalanced"),
            vec![seg("unbalanced", 1.1)]
        );
        assert_eq!(
            parse_prompt_attention("\\(literal\\]"),
            vec![seg("(literal]", 1.0)]
        );
        assert_eq!(
            parse_prompt_attention("(unnecessary)(parens)"),
            vec![seg("unnecessaryparens", 1.1)]
        );
        // One of the three opening brackets before `house` is never closed: it weights
        // everything after it by 1.1.
        let r = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).");
        let want = [
            ("a ", 1.0),
            ("house", 1.3 * 1.1 * 1.1),
            (" ", 1.1),
            ("on", 1.1 / 1.1),
            (" a ", 1.1),
            ("hill", 0.5 * 1.1),
            (", sun, ", 1.1),
            ("sky", 1.1 * 1.1 * 1.1 * 1.1),
            (".", 1.1),
        ];
        assert_eq!(r.len(), want.len(), "{r:?}");
        for ((t, w), (wt, ww)) in r.iter().zip(want) {
            assert_eq!(t, wt);
            assert!((w.unwrap() - ww).abs() < 1e-12, "{t}: {w:?} vs {ww}");
        }
        let b = parse_prompt_attention("a BREAK b");
        assert_eq!(
            b,
            vec![seg("a", 1.0), ("BREAK".into(), None), seg("b", 1.0)]
        );
        assert_eq!(parse_prompt_attention(""), vec![seg("", 1.0)]);
    }

    #[test]
    fn lora_tags_are_extracted() {
        let (p, tags) = extract_lora_tags(
            "a <lora:ink:0.8> cat <lighthouse-style>, <lora:film> <hypernet:x:1>",
        )
        .unwrap();
        assert_eq!(p, "a  cat <lighthouse-style>,  <hypernet:x:1>");
        assert_eq!(
            tags,
            vec![("ink".to_string(), 0.8), ("film".to_string(), 1.0)]
        );
        assert!(extract_lora_tags("<lora:x:abc>").is_err());
    }

    #[test]
    fn weights_rescale_to_the_unweighted_mean() {
        let z = Tensor::new(
            &[[[1f32, 2.0], [3.0, 4.0], [5.0, 7.0]]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let w = [1.0, 2.0, 0.5];
        let out = apply_weights(&z, &w).unwrap();
        let mean = |t: &Tensor| t.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean(&out) - mean(&z)).abs() < 1e-6);
        let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Position 1 was doubled relative to position 0 before the common rescale.
        assert!((v[2] / v[0] - 3.0 * 2.0).abs() < 1e-5);
        assert_eq!(
            apply_weights(&z, &[1.0; 3])
                .unwrap()
                .to_vec3::<f32>()
                .unwrap(),
            z.to_vec3::<f32>().unwrap()
        );
    }
}
