//! The T5 tokenizer of SD3 (`tokenizer_3/`) and Flux (`tokenizer_2/`), run by Hugging Face's
//! own Rust `tokenizers` crate from the folder's `tokenizer.json`.
//!
//! transformers 5's `T5Tokenizer` does not run the file's pipeline as it stands: it keeps the
//! file's Unigram vocabulary, added tokens and SentencePiece normalisation table
//! (`Precompiled`, dropping any other normaliser), and rebuilds the rest: whitespace split then
//! `▁`-prefixed pieces, and `</s>` appended. This does the same, so that the ids (and the
//! embeddings) equal diffusers'.

use std::path::Path;

use diffuse_core::{Error, Result};
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, PreTokenizerWrapper, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

/// A T5 tokenizer (`T5Tokenizer` / `T5TokenizerFast` of transformers).
#[derive(Clone)]
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    pad_token: String,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("pad_token", &self.pad_token)
            .field("pad_id", &self.pad_id)
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .finish()
    }
}

impl T5Tokenizer {
    /// Reads `dir/tokenizer.json`; the padding token is `pad_token` of `tokenizer_config.json`
    /// when the folder has one, else `<pad>` (T5's).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            let hint = if dir.join("spiece.model").is_file() {
                " (the folder has only the SentencePiece `spiece.model`; diffuse reads the fast \
                 tokenizer's `tokenizer.json`, which transformers' `save_pretrained` writes)"
            } else {
                ""
            };
            return Err(Error::invalid(format!(
                "{}: no tokenizer.json{hint}",
                dir.display()
            )));
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| {
            Error::invalid(format!(
                "{}: not a valid tokenizer file: {e}",
                path.display()
            ))
        })?;
        let config = dir.join("tokenizer_config.json");
        let pad_token = match std::fs::read_to_string(&config) {
            Ok(text) => {
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                    Error::config(config.display().to_string(), "<document>", e.to_string())
                })?;
                match v.get("pad_token") {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Object(o)) => o
                        .get("content")
                        .and_then(|c| c.as_str())
                        .unwrap_or("<pad>")
                        .to_string(),
                    _ => "<pad>".to_string(),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "<pad>".to_string(),
            Err(e) => return Err(Error::io(&config, e)),
        };
        Self::new(tokenizer, &pad_token)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))
    }

    /// Wraps a tokenizer read from a `tokenizer.json`, with the pipeline of transformers'
    /// `T5Tokenizer` (see the module docs); `pad_token` and `</s>` must be in its vocabulary.
    pub fn new(tokenizer: Tokenizer, pad_token: &str) -> Result<Self> {
        let id = |token: &str, what: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                Error::invalid(format!("the {what} `{token}` is not in the vocabulary"))
            })
        };
        let pad_id = id(pad_token, "padding token")?;
        let eos_id = id("</s>", "end-of-sequence token")?;
        let mut tokenizer = tokenizer;
        let precompiled = tokenizer.get_normalizer().and_then(precompiled_normalizer);
        tokenizer
            .with_normalizer(precompiled)
            .map_err(|e| Error::invalid(e.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::WhitespaceSplit(WhitespaceSplit),
            PreTokenizerWrapper::Metaspace(Metaspace::new('▁', PrependScheme::Always, true)),
        ])));
        let template = TemplateProcessing::builder()
            .try_single("$A </s>")
            .and_then(|b| b.try_pair("$A </s> $B </s>"))
            .map_err(|e| Error::invalid(format!("T5 post-processor: {e}")))?
            .special_tokens(vec![("</s>", eos_id)])
            .build()
            .map_err(|e| Error::invalid(format!("T5 post-processor: {e}")))?;
        tokenizer.with_post_processor(Some(template));
        tokenizer.with_decoder(Some(MetaspaceDecoder::new(
            '▁',
            PrependScheme::Always,
            true,
        )));
        // Plain `encode` neither truncates nor pads, whatever the file says.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::invalid(e.to_string()))?;
        tokenizer.with_padding(None);
        Ok(Self {
            tokenizer,
            pad_id,
            pad_token: pad_token.to_string(),
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token ids of `text` ending with `</s>`, neither truncated nor padded.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::invalid(format!("tokenizing {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids as the SD3 and Flux pipelines ask for them (`padding="max_length",
    /// truncation=True`): exactly `max_len` ids, a too long text cut so that `</s>` still ends
    /// it. Also returns whether the text was cut.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<(Vec<u32>, bool)> {
        if max_len == 0 {
            return Err(Error::invalid(
                "the maximum sequence length must be at least 1",
            ));
        }
        let mut t = self.tokenizer.clone();
        t.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| Error::invalid(e.to_string()))?;
        t.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        let enc = t.encode(text, true).map_err(|e| {
            Error::invalid(format!(
                "tokenizing {text:?} to {max_len} tokens: {e} (is the length too short?)"
            ))
        })?;
        let ids = enc.get_ids().to_vec();
        if ids.len() != max_len {
            return Err(Error::invalid(format!(
                "tokenizing {text:?} gave {} ids, not {max_len}",
                ids.len()
            )));
        }
        let truncated = !enc.get_overflowing().is_empty();
        Ok((ids, truncated))
    }

    /// The text of `ids`, special tokens dropped (to show what a truncation removed).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::invalid(format!("decoding ids: {e}")))
    }
}

/// The SentencePiece `Precompiled` normaliser of a `tokenizer.json` (alone or in a sequence),
/// the only normaliser transformers keeps for T5.
fn precompiled_normalizer(n: &NormalizerWrapper) -> Option<NormalizerWrapper> {
    match n {
        NormalizerWrapper::Precompiled(_) => Some(n.clone()),
        NormalizerWrapper::Sequence(seq) => seq.as_ref().iter().find_map(precompiled_normalizer),
        _ => None,
    }
}
