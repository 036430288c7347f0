//! Reading diffusers `scheduler_config.json` files.
//!
//! Each scheduler reads the fields it knows with its own class defaults, as diffusers'
//! `from_config` does: unknown keys are ignored (so a config saved by another scheduler class
//! works), absent keys take the defaults of the class being built, and a value of the wrong
//! type or out of range is an error naming the field. Every value read is recorded, so the
//! resolved config can be written back out (`save_config`).

use diffuse_core::{Error, Result};
use serde_json::{Map, Value};

/// A scheduler config: the raw JSON object of `scheduler_config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulerConfig {
    pub map: Map<String, Value>,
}

impl SchedulerConfig {
    /// Parses the text of a `scheduler_config.json`. Python's json writes `Infinity`, `-Infinity`
    /// and `NaN` for non-finite floats (DPM-Solver's `lambda_min_clipped`), which strict JSON
    /// rejects: they are read as strings and understood by [`ConfigReader::f64`].
    pub fn from_json_str(text: &str) -> Result<Self> {
        let fixed = quote_non_finite(text);
        let v: Value = serde_json::from_str(&fixed).map_err(|e| {
            Error::config("scheduler config", "(json)", format!("invalid JSON: {e}"))
        })?;
        match v {
            Value::Object(map) => Ok(Self { map }),
            _ => Err(Error::config(
                "scheduler config",
                "(json)",
                "expected a JSON object",
            )),
        }
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config { field, message, .. } => Error::Config {
                context: path.display().to_string(),
                field,
                message,
            },
            e => e,
        })
    }

    /// The `_class_name` recorded in the file, if any.
    pub fn class_name(&self) -> Option<&str> {
        self.map.get("_class_name").and_then(|v| v.as_str())
    }

    pub fn set(&mut self, key: &str, value: Value) {
        self.map.insert(key.to_string(), value);
    }

    /// The config as JSON text in diffusers' format (non-finite floats unquoted again).
    pub fn to_json_string(&self) -> String {
        let s = serde_json::to_string_pretty(&Value::Object(self.map.clone())).unwrap_or_default();
        s.replace("\"-Infinity\"", "-Infinity")
            .replace("\"Infinity\"", "Infinity")
            .replace("\"NaN\"", "NaN")
    }
}

/// Quotes the bare tokens `Infinity`, `-Infinity` and `NaN` that appear outside strings.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        let tok = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t));
        if let Some(t) = tok {
            out.push('"');
            out.push_str(t);
            out.push('"');
            rest = &rest[t.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Reads typed fields out of a [`SchedulerConfig`] with class defaults, recording what it read.
pub struct ConfigReader<'a> {
    class: &'static str,
    src: &'a Map<String, Value>,
    resolved: Map<String, Value>,
}

impl<'a> ConfigReader<'a> {
    pub fn new(class: &'static str, cfg: &'a SchedulerConfig) -> Self {
        let mut resolved = Map::new();
        resolved.insert("_class_name".into(), Value::String(class.into()));
        Self {
            class,
            src: &cfg.map,
            resolved,
        }
    }

    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::config(format!("{} config", self.class), field, message)
    }

    /// The value of `key`, treating JSON `null` like an absent key.
    fn raw(&self, key: &str) -> Option<&'a Value> {
        self.src.get(key).filter(|v| !v.is_null())
    }

    pub fn f64(&mut self, key: &str, default: f64) -> Result<f64> {
        let v = match self.raw(key) {
            None => default,
            Some(v) => {
                parse_f64(v).ok_or_else(|| self.err(key, format!("expected a number, got {v}")))?
            }
        };
        self.resolved.insert(key.into(), f64_to_json(v));
        Ok(v)
    }

    pub fn opt_f64(&mut self, key: &str) -> Result<Option<f64>> {
        let v = match self.raw(key) {
            None => None,
            Some(v) => Some(
                parse_f64(v).ok_or_else(|| self.err(key, format!("expected a number, got {v}")))?,
            ),
        };
        self.resolved
            .insert(key.into(), v.map_or(Value::Null, f64_to_json));
        Ok(v)
    }

    pub fn usize(&mut self, key: &str, default: usize) -> Result<usize> {
        let v = match self.raw(key) {
            None => default,
            Some(v) => v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}")))?
                as usize,
        };
        self.resolved.insert(key.into(), Value::from(v));
        Ok(v)
    }

    pub fn bool(&mut self, key: &str, default: bool) -> Result<bool> {
        let v = match self.raw(key) {
            None => default,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(key, format!("expected true or false, got {v}")))?,
        };
        self.resolved.insert(key.into(), Value::Bool(v));
        Ok(v)
    }

    /// A string field restricted to `allowed` values.
    pub fn choice(&mut self, key: &str, default: &str, allowed: &[&str]) -> Result<String> {
        let v = match self.raw(key) {
            None => default.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(self.err(key, format!("expected a string, got {v}"))),
        };
        if !allowed.contains(&v.as_str()) {
            return Err(self.err(
                key,
                format!("unsupported value {v:?}; expected one of {allowed:?}"),
            ));
        }
        self.resolved.insert(key.into(), Value::String(v.clone()));
        Ok(v)
    }

    pub fn opt_f64_list(&mut self, key: &str) -> Result<Option<Vec<f64>>> {
        let v = match self.raw(key) {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        parse_f64(x)
                            .ok_or_else(|| self.err(&format!("{key}[{i}]"), "expected a number"))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(v) => return Err(self.err(key, format!("expected a list of numbers, got {v}"))),
        };
        self.resolved.insert(
            key.into(),
            v.as_ref()
                .map_or(Value::Null, |l| l.iter().map(|&x| f64_to_json(x)).collect()),
        );
        Ok(v)
    }

    pub fn usize_list(&mut self, key: &str) -> Result<Vec<usize>> {
        let v = match self.raw(key) {
            None => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_u64()
                        .map(|u| u as usize)
                        .ok_or_else(|| self.err(&format!("{key}[{i}]"), "expected an integer"))
                })
                .collect::<Result<Vec<_>>>()?,
            Some(v) => return Err(self.err(key, format!("expected a list of integers, got {v}"))),
        };
        self.resolved
            .insert(key.into(), v.iter().map(|&x| Value::from(x)).collect());
        Ok(v)
    }

    /// Records `value` for `key` in the resolved config in place of what was read (diffusers'
    /// `register_to_config` after mapping a value, e.g. UniPC's solver_type midpoint to bh2).
    pub fn record(&mut self, key: &str, value: Value) {
        self.resolved.insert(key.into(), value);
    }

    /// Checks a condition on values already read, as an error naming the field.
    pub fn ensure(&self, ok: bool, field: &str, message: &str) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(self.err(field, message))
        }
    }

    pub fn finish(self) -> SchedulerConfig {
        SchedulerConfig { map: self.resolved }
    }
}

fn parse_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ => None,
        },
        _ => None,
    }
}

fn f64_to_json(v: f64) -> Value {
    if v.is_finite() {
        Value::from(v)
    } else if v.is_nan() {
        Value::String("NaN".into())
    } else if v > 0.0 {
        Value::String("Infinity".into())
    } else {
        Value::String("-Infinity".into())
    }
}

/// The `clip_sample` / `clip_sample_range` pair of the schedulers that only clip (Heun, DDIM
/// inverse).
pub struct X0ClipFields;

impl X0ClipFields {
    /// The clipping range when `clip_sample` is on.
    pub fn read_simple(r: &mut ConfigReader) -> diffuse_core::Result<Option<f64>> {
        Self::read_simple_with_default(r, false)
    }

    /// The same with the class's default for `clip_sample`.
    pub fn read_simple_with_default(
        r: &mut ConfigReader,
        clip_default: bool,
    ) -> diffuse_core::Result<Option<f64>> {
        let on = r.bool("clip_sample", clip_default)?;
        let range = r.f64("clip_sample_range", 1.0)?;
        Ok(on.then_some(range))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_infinity_is_understood_and_written_back() {
        let c =
            SchedulerConfig::from_json_str(r#"{"a": -Infinity, "s": "NaN in a string", "b": 1}"#)
                .unwrap();
        let mut r = ConfigReader::new("X", &c);
        assert_eq!(r.f64("a", 0.0).unwrap(), f64::NEG_INFINITY);
        assert_eq!(r.f64("b", 0.0).unwrap(), 1.0);
        assert!(r.finish().to_json_string().contains("\"a\": -Infinity"));
        assert_eq!(c.map["s"], Value::String("NaN in a string".into()));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let c = SchedulerConfig::from_json_str(
            r#"{"beta_start": "big", "steps_offset": -1, "clip_sample": 3}"#,
        )
        .unwrap();
        let mut r = ConfigReader::new("DDIMScheduler", &c);
        let e = r.f64("beta_start", 0.1).unwrap_err().to_string();
        assert!(
            e.contains("beta_start") && e.contains("DDIMScheduler"),
            "{e}"
        );
        assert!(r
            .usize("steps_offset", 0)
            .unwrap_err()
            .to_string()
            .contains("steps_offset"));
        assert!(r
            .bool("clip_sample", false)
            .unwrap_err()
            .to_string()
            .contains("clip_sample"));
        let e = r
            .choice("beta_schedule", "cosine", &["linear"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta_schedule") && e.contains("cosine"), "{e}");
    }
}
