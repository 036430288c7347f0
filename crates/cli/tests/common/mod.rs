//! Running the built `diffuse` binary, for the CLI tests (each uses a part of this).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::Path;
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

/// A path in the repository, as a string for the command line.
pub fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
        .display()
        .to_string()
}

/// The names of the files in `dir`, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A tiny labelled dataset: two class folders of four 8×8 stripe images (horizontal, vertical).
pub fn write_two_classes(dir: &Path) {
    for (class, vertical) in [("a", false), ("b", true)] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..4u32 {
            let img = image::GrayImage::from_fn(8, 8, |x, y| {
                let k = if vertical { x } else { y };
                image::Luma([if (k + i) % 4 < 2 { 255 } else { 0 }])
            });
            img.save(dir.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
}
