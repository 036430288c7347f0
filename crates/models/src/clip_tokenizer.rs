//! The CLIP byte-level BPE tokenizer, giving the ids of transformers' `CLIPTokenizer`.
//!
//! Steps, as the `tokenizers` backend of `CLIPTokenizer` does them: the special tokens
//! (`<|startoftext|>`, `<|endoftext|>`) are split out first; the rest is normalized (Unicode NFC,
//! runs of whitespace to one space, lower case), split with the CLIP pre-tokenizer pattern, each
//! piece mapped byte by byte to printable characters (GPT-2's `bytes_to_unicode`) and merged by
//! BPE with `</w>` marking the end of the word. The ids are wrapped in BOS ... EOS.

use std::collections::HashMap;
use std::path::Path;

use diffuse_core::{Error, Result};
use regex::Regex;
use unicode_normalization::UnicodeNormalization;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// The CLIP pre-tokenizer pattern (the special tokens are split out before it runs; they stay in
/// the pattern as in `tokenizer.json`, for a differently cased `<|ENDOFTEXT|>`).
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2's reversible map from bytes to printable unicode characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1u32..=0xAC);
    printable.extend(0xAEu32..=0xFF);
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0u32..256 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    map
}

/// A CLIP tokenizer read from a `tokenizer/` folder (`vocab.json` + `merges.txt`).
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    merge_ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    byte_decoder: HashMap<char, u8>,
    pattern: Regex,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    max_length: usize,
    /// Tokens added after loading (textual inversion), normalized, with their ids; matched
    /// in the normalized text before BPE, longest first, as `tokenizers`' added vocabulary does.
    added: Vec<(String, u32)>,
}

/// A special token as written in `tokenizer_config.json` / `special_tokens_map.json`: a plain
/// string or an object with `content`.
fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(Error::config(
            path.display().to_string(),
            "<document>",
            "expected a JSON object",
        )),
        Err(e) => Err(Error::config(
            path.display().to_string(),
            "<document>",
            e.to_string(),
        )),
    }
}

impl ClipTokenizer {
    /// Reads `vocab.json`, `merges.txt` and, when present, `tokenizer_config.json` and
    /// `special_tokens_map.json` (the latter wins, as in transformers: SD 2.1 pads with `!`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let vocab_text =
            std::fs::read_to_string(&vocab_path).map_err(|e| Error::io(&vocab_path, e))?;
        let encoder: HashMap<String, u32> =
            diffuse_loaders::parse_config(&vocab_text, &vocab_path.display().to_string())?;
        let merges_path = dir.join("merges.txt");
        let merges_text =
            std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
        let merges = parse_merges(&merges_text, &merges_path.display().to_string())?;

        let mut tokens: HashMap<&str, String> = HashMap::new();
        let mut max_length = 77usize;
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(file);
            let Some(obj) = read_json_object(&path)? else {
                continue;
            };
            for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
                if let Some(v) = obj.get(key).and_then(token_content) {
                    tokens.insert(key, v);
                }
            }
            if let Some(v) = obj.get("model_max_length") {
                // Tokenizers without a limit store a huge number (1e30); keep the CLIP default.
                match v.as_f64() {
                    Some(n) if (1.0..=1e6).contains(&n) => max_length = n as usize,
                    Some(_) => {}
                    None => {
                        return Err(Error::config(
                            path.display().to_string(),
                            "model_max_length",
                            format!("expected a number, got {v}"),
                        ))
                    }
                }
            }
        }
        let id_of = |key: &str, default: &str| -> Result<u32> {
            let tok = tokens.get(key).map(String::as_str).unwrap_or(default);
            encoder.get(tok).copied().ok_or_else(|| {
                Error::config(
                    dir.display().to_string(),
                    key,
                    format!("token {tok:?} is not in vocab.json"),
                )
            })
        };
        let bos_id = id_of("bos_token", BOS)?;
        let eos_id = id_of("eos_token", EOS)?;
        let pad_id = id_of("pad_token", EOS)?;
        let unk_id = id_of("unk_token", EOS)?;
        Self::from_parts(encoder, merges, bos_id, eos_id, pad_id, unk_id, max_length)
    }

    /// The CLIP vocabulary built into diffuse (that of every Stable Diffusion checkpoint, 49408
    /// tokens), for single-file checkpoints that carry no tokenizer: max length 77, padding with
    /// `pad_token` (`<|endoftext|>` for SD 1.x and SDXL's first encoder, `!` for OpenCLIP ones).
    pub fn builtin(pad_token: &str) -> Result<Self> {
        let (vocab, merges) = Self::builtin_files()?;
        let encoder: HashMap<String, u32> =
            diffuse_loaders::parse_config(&vocab, "built-in vocab.json")?;
        let merges = parse_merges(&merges, "built-in merges.txt")?;
        let id = |t: &str| {
            encoder.get(t).copied().ok_or_else(|| {
                Error::invalid(format!("token {t:?} is not in the built-in vocabulary"))
            })
        };
        let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(pad_token)?);
        Self::from_parts(encoder, merges, bos, eos, pad, eos, 77)
    }

    /// The built-in `vocab.json` and `merges.txt` texts (for writing a tokenizer folder).
    pub fn builtin_files() -> Result<(String, String)> {
        let gunzip = |bytes: &[u8]| -> Result<String> {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(bytes), &mut s)
                .map_err(|e| Error::invalid(format!("built-in tokenizer: {e}")))?;
            Ok(s)
        };
        Ok((
            gunzip(include_bytes!("../assets/clip_vocab.json.gz"))?,
            gunzip(include_bytes!("../assets/clip_merges.txt.gz"))?,
        ))
    }

    /// Builds a tokenizer from a vocabulary and merges (rank = position in `merges`).
    pub fn from_parts(
        encoder: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        bos_id: u32,
        eos_id: u32,
        pad_id: u32,
        unk_id: u32,
        max_length: usize,
    ) -> Result<Self> {
        if max_length < 2 {
            return Err(Error::invalid(format!(
                "tokenizer max length {max_length} leaves no room for BOS and EOS"
            )));
        }
        let byte_encoder = bytes_to_unicode();
        let byte_decoder = byte_encoder
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let decoder = encoder.iter().map(|(k, v)| (*v, k.clone())).collect();
        let mut merge_ranks = HashMap::with_capacity(merges.len());
        for (rank, pair) in merges.into_iter().enumerate() {
            merge_ranks.entry(pair).or_insert(rank);
        }
        let pattern =
            Regex::new(PATTERN).map_err(|e| Error::invalid(format!("CLIP pattern: {e}")))?;
        Ok(Self {
            encoder,
            decoder,
            merge_ranks,
            byte_encoder,
            byte_decoder,
            pattern,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            max_length,
            added: Vec::new(),
        })
    }

    /// Adds `token` to the vocabulary with the next free id (transformers' `add_tokens`, as a
    /// normalized, non-special token) and returns the id. A token that is already a vocabulary
    /// entry or an added token is an error naming it.
    pub fn add_token(&mut self, token: &str) -> Result<u32> {
        let normalized = normalize(token);
        if normalized.trim().is_empty() {
            return Err(Error::invalid(format!(
                "cannot add the empty token {token:?} to the tokenizer"
            )));
        }
        // As diffusers checks it: the exact string among the vocabulary's entries.
        let known =
            self.encoder.contains_key(token) || self.added.iter().any(|(t, _)| *t == normalized);
        if known {
            return Err(Error::invalid(format!(
                "token {token:?} is already in the tokenizer's vocabulary; pick another token"
            )));
        }
        let id = self.encoder.len() as u32;
        self.encoder.insert(token.to_string(), id);
        self.decoder.insert(id, token.to_string());
        self.added.push((normalized, id));
        Ok(id)
    }

    /// The id of a token added with [`ClipTokenizer::add_token`].
    pub fn added_token_id(&self, token: &str) -> Option<u32> {
        let n = normalize(token);
        self.added.iter().find(|(t, _)| *t == n).map(|(_, id)| *id)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// `model_max_length` (77 for Stable Diffusion).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// Token ids of `text` wrapped in BOS ... EOS, without truncation or padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos_id];
        // As `tokenizers` does: `<|endoftext|>` (a non-normalized added token) is split out of
        // the raw text, `<|startoftext|>` (a normalized one) out of the normalized text.
        let mut first = true;
        for raw in text.split(EOS) {
            if !first {
                ids.push(self.special_id(EOS));
            }
            first = false;
            let normalized = normalize(raw);
            let mut first_inner = true;
            for piece in normalized.split(BOS) {
                if !first_inner {
                    ids.push(self.special_id(BOS));
                }
                first_inner = false;
                self.encode_normalized(piece, &mut ids);
            }
        }
        ids.push(self.eos_id);
        ids
    }

    fn special_id(&self, token: &str) -> u32 {
        match self.encoder.get(token) {
            Some(id) => *id,
            None if token == BOS => self.bos_id,
            None => self.eos_id,
        }
    }

    /// Ids of normalized text, appended to `out`: added tokens are split out first (leftmost,
    /// then longest match), the pieces between them go through the pre-tokenizer and BPE.
    fn encode_normalized(&self, text: &str, out: &mut Vec<u32>) {
        let mut rest = text;
        while !rest.is_empty() {
            let found = self
                .added
                .iter()
                .filter_map(|(t, id)| rest.find(t.as_str()).map(|at| (at, t.len(), *id)))
                .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)));
            let Some((at, len, id)) = found else { break };
            self.encode_plain(&rest[..at], out);
            out.push(id);
            rest = &rest[at + len..];
        }
        self.encode_plain(rest, out);
    }

    /// Ids of normalized text with no added tokens left in it, appended to `out`.
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        for m in self.pattern.find_iter(text) {
            let mapped: String = m
                .as_str()
                .bytes()
                .map(|b| self.byte_encoder[b as usize])
                .collect();
            for token in self.bpe(&mapped) {
                out.push(self.encoder.get(&token).copied().unwrap_or(self.unk_id));
            }
        }
    }

    /// Byte-pair merges of one pre-token (already mapped to unicode), `</w>` on the last symbol.
    fn bpe(&self, word: &str) -> Vec<String> {
        let mut symbols: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        match symbols.last_mut() {
            Some(last) => last.push_str(END_OF_WORD),
            None => return vec![],
        }
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.merge_ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let (a, b) = (symbols[i].clone(), symbols[i + 1].clone());
            // Merge every occurrence of the pair, left to right.
            let mut merged = Vec::with_capacity(symbols.len());
            let mut j = 0;
            while j < symbols.len() {
                if j + 1 < symbols.len() && symbols[j] == a && symbols[j + 1] == b {
                    merged.push(format!("{a}{b}"));
                    j += 2;
                } else {
                    merged.push(std::mem::take(&mut symbols[j]));
                    j += 1;
                }
            }
            symbols = merged;
        }
        symbols
    }

    /// Ids truncated and padded to `max_len`, as Stable Diffusion tokenizes prompts
    /// (`padding="max_length", truncation=True`): a too long text keeps its first
    /// `max_len - 2` tokens between BOS and EOS, and `truncated` is true.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<(Vec<u32>, bool)> {
        if max_len < 2 {
            return Err(Error::invalid(format!(
                "max length {max_len} leaves no room for BOS and EOS"
            )));
        }
        let mut ids = self.encode(text);
        let truncated = ids.len() > max_len;
        if truncated {
            ids.truncate(max_len - 1);
            ids.push(self.eos_id);
        }
        ids.resize(max_len, self.pad_id);
        Ok((ids, truncated))
    }

    /// The text of ids (special tokens and padding dropped), e.g. to show what was truncated.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut text = String::new();
        for id in ids {
            if [self.bos_id, self.eos_id].contains(id) {
                continue;
            }
            if let Some(tok) = self.decoder.get(id) {
                text.push_str(tok);
            }
        }
        let text = text.replace(END_OF_WORD, " ");
        let bytes: Vec<u8> = text
            .chars()
            .flat_map(|c| match self.byte_decoder.get(&c) {
                Some(b) => vec![*b],
                None => c.to_string().into_bytes(),
            })
            .collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }
}

/// `merges.txt`: an optional `#version` line, then one `a b` pair per line.
fn parse_merges(text: &str, context: &str) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => {
                return Err(Error::config(
                    context,
                    format!("line {}", i + 1),
                    format!("expected two space-separated symbols, got {line:?}"),
                ))
            }
        }
    }
    Ok(merges)
}

/// NFC, whitespace runs to a single space, lower case (char by char, as `tokenizers` does).
fn normalize(text: &str) -> String {
    let nfc: String = text.nfc().collect();
    let mut out = String::with_capacity(nfc.len());
    let mut in_space = false;
    for c in nfc.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let m = bytes_to_unicode();
        let set: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[b' ' as usize], '\u{120}');
    }

    #[test]
    fn normalization() {
        assert_eq!(normalize("A  B\t\nC"), "a b c");
        // Decomposed e + combining acute becomes the composed é.
        assert_eq!(normalize("e\u{301}"), "\u{e9}");
    }

    /// A small vocabulary: the 256 byte symbols with and without `</w>`, and a few merges.
    fn tiny() -> ClipTokenizer {
        let bytes = bytes_to_unicode();
        let mut enc = HashMap::new();
        for c in bytes {
            let n = enc.len() as u32;
            enc.insert(c.to_string(), n);
        }
        for c in bytes {
            let n = enc.len() as u32;
            enc.insert(format!("{c}{END_OF_WORD}"), n);
        }
        let merges = vec![
            ("c".to_string(), "a".to_string()),
            ("ca".into(), "t</w>".into()),
        ];
        for (a, b) in &merges {
            let n = enc.len() as u32;
            enc.insert(format!("{a}{b}"), n);
        }
        for t in [BOS, EOS] {
            let n = enc.len() as u32;
            enc.insert(t.to_string(), n);
        }
        let (bos, eos) = (enc[BOS], enc[EOS]);
        ClipTokenizer::from_parts(enc, merges, bos, eos, eos, eos, 77).unwrap()
    }

    #[test]
    fn added_tokens_are_split_out_longest_first() {
        let mut t = tiny();
        let cat = t.encode("cat")[1];
        let a = t.add_token("<Style>").unwrap();
        let b = t.add_token("<style>_1").unwrap();
        assert_eq!(
            (a, b),
            (t.vocab_size() as u32 - 2, t.vocab_size() as u32 - 1)
        );
        // Matched after normalization (lower case), anywhere in the text, longest first.
        let ids = t.encode("a <STYLE> <style>_1cat");
        let space_free: Vec<u32> = ids[1..ids.len() - 1].to_vec();
        assert_eq!(space_free, vec![t.encode("a")[1], a, b, cat]);
        assert_eq!(t.added_token_id("<style>"), Some(a));
        // Re-adding, or adding an entry of the vocabulary, is an error.
        assert!(t.add_token("<style>").is_err());
        assert!(t.add_token("ca").is_err());
    }
}
