//! `diffuse generate`'s flags for the diffusion transformers (`--max-sequence-length`,
//! `--class-labels`) are refused, before anything is written, where they do not apply; their
//! reference cases run through the command in `cases_cli.rs`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{ensure, Result};
use diffuse_core::testing::fixtures_dir;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("diffuse-cli-xfmr-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Flags given to a pipeline they do not apply to are refused with a message naming them,
/// before anything is written.
#[test]
fn transformer_flags_are_checked() -> Result<()> {
    let root = fixtures_dir();
    let tmp = temp_dir("flags");
    let out = tmp.join("out.png");
    let model = |m: &str| root.join(m).display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--model".into(),
                model("pipelines/tiny_sd"),
                "--class-labels".into(),
                "1".into(),
            ],
            "class labels are for DiT",
        ),
        (
            vec!["--model".into(), model("cases/_models/tiny_dit")],
            "class ids or names",
        ),
        (
            vec![
                "--model".into(),
                model("cases/_models/tiny_dit"),
                "--class-labels".into(),
                "goldfish".into(),
            ],
            "unknown class label",
        ),
        (
            vec![
                "--model".into(),
                model("cases/_models/tiny_flux"),
                "--max-sequence-length".into(),
                "600".into(),
            ],
            "max_sequence_length",
        ),
        (
            vec![
                "--model".into(),
                model("cases/_models/tiny_sd3"),
                "--class-labels".into(),
                "3".into(),
            ],
            "class labels are for DiT",
        ),
    ];
    for (args, want) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_diffuse"))
            .arg("generate")
            .args(&args)
            .args(["--steps", "1", "--output", &out.display().to_string()])
            .output()?;
        let err = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success(), "{args:?} succeeded");
        ensure!(
            err.contains(want),
            "{args:?}: {err} should mention {want:?}"
        );
        ensure!(!out.exists(), "{args:?} wrote an image");
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
