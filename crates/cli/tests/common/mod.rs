//! Running the built `diffuse` binary, for the CLI tests (each uses a part of this).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::Command;

/// Runs `diffuse args…`: (success, stdout, stderr).
pub fn diffuse<S: AsRef<OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .output()
        .expect("running diffuse");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`diffuse`] for the commands that report on stderr only: (success, stderr).
pub fn diffuse_err<S: AsRef<OsStr>>(args: &[S]) -> (bool, String) {
    let (ok, _, err) = diffuse(args);
    (ok, err)
}
