//! Resolving a model given as a local folder or a Hugging Face hub id.
//!
//! diffuse never downloads anything: a hub id is looked up in the local Hugging Face cache
//! (the layout `huggingface_hub` and `huggingface-cli download` write:
//! `<cache>/models--owner--name/refs/<revision>` holding a commit hash, and
//! `<cache>/models--owner--name/snapshots/<commit>/...` holding the files).

use std::path::{Path, PathBuf};

use diffuse_core::{Error, Result};

/// The Hugging Face hub cache folder, resolved like `huggingface_hub` does:
/// `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return PathBuf::from(p);
    }
    hf_home().join("hub")
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = var("HF_HOME") {
        return PathBuf::from(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("huggingface");
    }
    let home = var("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("huggingface")
}

/// Whether `HF_HUB_OFFLINE` is set to a true value.
pub fn hub_offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").map(|v| v.trim().to_ascii_lowercase()),
        Ok(v) if v == "1" || v == "true" || v == "yes" || v == "on"
    )
}

/// Resolves `spec` to a local model folder.
///
/// An existing local folder (or single-file checkpoint) is returned as is. Otherwise `spec` must be a hub id
/// (`owner/name` or `name`), looked up in the cache of [`hub_cache_dir`] at `revision`
/// (a branch/tag name whose `refs/` file gives the commit, or a 40-hex commit hash;
/// default `main`). A model not in the cache gives an error saying what to download.
pub fn resolve_model(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_model_in(spec, revision, &hub_cache_dir())
}

/// [`resolve_model`] with an explicit cache folder.
pub fn resolve_model_in(spec: &str, revision: Option<&str>, cache: &Path) -> Result<PathBuf> {
    let local = Path::new(spec);
    // A local folder, or a single-file checkpoint: as is.
    if local.exists() {
        return Ok(local.to_path_buf());
    }
    if !is_hub_id(spec) {
        return Err(Error::invalid(format!(
            "{spec}: no such folder, and not a Hugging Face hub id (expected owner/name)"
        )));
    }
    let revision = revision.unwrap_or("main");
    if !is_ref_name(revision) {
        return Err(Error::invalid(format!(
            "invalid revision `{revision}`: expected a branch or tag name (`main`, `fp16`, \
             `refs/pr/1`) or a 40-hex commit hash"
        )));
    }
    let repo_dir = cache.join(format!("models--{}", spec.replace('/', "--")));
    let commit = if is_commit_hash(revision) {
        Some(revision.to_string())
    } else {
        let ref_file = repo_dir.join("refs").join(revision);
        match std::fs::read_to_string(&ref_file) {
            // The ref file's content becomes a path component: only a commit hash may.
            Ok(s) if is_commit_hash(s.trim()) => Some(s.trim().to_string()),
            Ok(s) => {
                return Err(Error::invalid(format!(
                    "{}: holds {:?}, not a 40-hex commit hash (corrupt cache?)",
                    ref_file.display(),
                    s.trim()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(ref_file, e)),
        }
    };
    if let Some(commit) = commit {
        let snapshot = repo_dir.join("snapshots").join(&commit);
        if snapshot.is_dir() {
            return Ok(snapshot);
        }
    }
    Err(Error::invalid(not_cached_message(
        spec, revision, cache, &repo_dir,
    )))
}

fn not_cached_message(spec: &str, revision: &str, cache: &Path, repo_dir: &Path) -> String {
    let rev_arg = if revision == "main" {
        String::new()
    } else {
        format!(" --revision {revision}")
    };
    let why = if repo_dir.is_dir() {
        format!(
            "the cache has {} but no snapshot for revision `{revision}`",
            repo_dir.display()
        )
    } else {
        format!(
            "the Hugging Face cache at {} does not have it",
            cache.display()
        )
    };
    let offline = if hub_offline() {
        " (HF_HUB_OFFLINE is set)"
    } else {
        ""
    };
    format!(
        "model `{spec}` (revision `{revision}`) is not available locally: {why}. diffuse never \
         downloads{offline}; fetch it first with `huggingface-cli download {spec}{rev_arg}` (or \
         `hf download {spec}{rev_arg}`), which fills this cache (set HF_HOME or HF_HUB_CACHE to \
         use another cache), or pass the path of a local model folder"
    )
}

fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    if parts.is_empty() || parts.len() > 2 {
        return false;
    }
    parts.iter().all(|p| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && !p.contains("--")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    })
}

/// A branch or tag name that stays inside `refs/`: relative, `/`-separated parts that are not
/// empty, `.` or `..`, no backslashes or NULs.
fn is_ref_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.contains(['\\', '\0', ':'])
        && s.split('/')
            .all(|p| !p.is_empty() && p != "." && p != ".." && !p.starts_with('.'))
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(is_hub_id("runwayml/stable-diffusion-v1-5"));
        assert!(is_hub_id("gpt2"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("../x"));
        assert!(!is_hub_id("a b/c"));
        assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_hash("main"));
        for ok in ["main", "fp16", "v1.0", "refs/pr/1"] {
            assert!(is_ref_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../b",
            "a//b",
            "C:\\x",
            ".hidden",
            "a/./b",
        ] {
            assert!(!is_ref_name(bad), "{bad}");
        }
    }
}
