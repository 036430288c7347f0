//! Reading `config.json`-style files into typed configs, with errors naming the field at fault.

use std::path::Path;

use diffuse_core::{Error, Result};
use serde::de::DeserializeOwned;

/// Reads and deserializes a JSON config file.
///
/// Unknown keys are ignored (diffusers and transformers add keys between versions). A missing
/// file is an [`Error::Io`] naming it; bad JSON or a value of the wrong type is an
/// [`Error::Config`] whose `field` is the JSON path of the culprit (e.g. `block_out_channels[2]`).
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_config(&text, &path.display().to_string())
}

/// Deserializes JSON text; `context` (usually the file name) is put into errors.
pub fn parse_config<T: DeserializeOwned>(text: &str, context: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        Error::config(context, field_name(&path, &message), message)
    })?;
    de.end()
        .map_err(|e| Error::config(context, "<document>", format!("trailing characters: {e}")))?;
    Ok(value)
}

/// The JSON path to report. serde reports a missing field at its parent; name the field itself.
fn field_name(path: &str, message: &str) -> String {
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    // serde_path_to_error writes `.` for the root and `?` where the position is unknown.
    let root = path == "." || path == "?";
    match (root, missing) {
        (true, Some(name)) => name.to_string(),
        (false, Some(name)) => format!("{path}.{name}"),
        (true, None) => "<document>".to_string(),
        (false, None) => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        size: usize,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Cfg {
        channels: Vec<usize>,
        inner: Inner,
    }

    fn field_of(text: &str) -> String {
        match parse_config::<Cfg>(text, "cfg.json") {
            Err(Error::Config { field, context, .. }) => {
                assert_eq!(context, "cfg.json");
                field
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn field_paths() {
        assert_eq!(
            field_of(r#"{"channels": [1, 2, "x"], "inner": {"size": 1}}"#),
            "channels[2]"
        );
        assert_eq!(field_of(r#"{"channels": [1]}"#), "inner");
        assert_eq!(field_of(r#"{"channels": [1], "inner": {}}"#), "inner.size");
        assert_eq!(field_of(r#"{"channels": [1], "#), "<document>");
        let ok: Cfg = parse_config(
            r#"{"channels": [1], "inner": {"size": 3}, "extra": null}"#,
            "c",
        )
        .unwrap();
        assert_eq!(ok.inner.size, 3);
    }
}
