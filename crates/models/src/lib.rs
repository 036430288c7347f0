//! (in progress)
pub mod clip_text;
pub mod clip_tokenizer;
