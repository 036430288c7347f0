//! `diffuse generate` end to end on the bundled tiny pipeline.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny_sd() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines/tiny_sd")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("diffuse-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn diffuse(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .output()
        .expect("running diffuse")
}

/// The `parameters` text of a PNG (tEXt or iTXt).
fn png_parameters(path: &Path) -> (u32, u32, String) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().expect("a valid PNG");
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone())
        .or_else(|| {
            info.utf8_text
                .iter()
                .find(|c| c.keyword == "parameters")
                .and_then(|c| c.get_text().ok())
        })
        .expect("a parameters chunk");
    (info.width, info.height, text)
}

#[test]
fn generate_writes_a_png_with_its_parameters() {
    let dir = temp_dir("generate");
    let out = dir.join("out.png");
    let model = tiny_sd();
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo",
        "--seed",
        "0",
        "--steps",
        "3",
        "--output",
        out.to_str().unwrap(),
    ];
    let run = diffuse(&args);
    assert!(
        run.status.success(),
        "diffuse failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let img = image::open(&out).expect("the PNG decodes");
    assert_eq!((img.width(), img.height()), (64, 64));
    let (w, h, text) = png_parameters(&out);
    assert_eq!((w, h), (64, 64));
    assert!(text.starts_with("a photo\n"), "{text}");
    assert!(text.contains("Seed: 0"), "{text}");
    assert!(text.contains("Steps: 3"), "{text}");
    assert!(text.contains("Size: 64x64"), "{text}");

    // Same seed again: refused without --force, identical pixels with it.
    let again = diffuse(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let mut forced = args.to_vec();
    forced.push("--force");
    assert!(diffuse(&forced).status.success());
    assert_eq!(image::open(&out).unwrap().to_rgb8(), img.to_rgb8());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_width_fails_and_writes_nothing() {
    let dir = temp_dir("bad-width");
    let out = dir.join("out.png");
    let model = tiny_sd();
    let run = diffuse(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo",
        "--seed",
        "0",
        "--steps",
        "3",
        "--width",
        "65",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("multiple"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_output_folder_is_a_clear_error() {
    let dir = temp_dir("no-parent");
    let out = dir.join("nope/out.png");
    let run = diffuse(&[
        "generate",
        "--steps",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("does not exist"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn img2img_and_inpaint_run_on_the_fixture_images() {
    let dir = temp_dir("img2img");
    let outputs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines/outputs");
    let init = outputs.join("init_image.png");
    let mask = outputs.join("mask.png");
    let a = dir.join("a.png");
    let run = diffuse(&[
        "img2img",
        "--prompt",
        "a photo",
        "--steps",
        "4",
        "--strength",
        "0.5",
        "--init-image",
        init.to_str().unwrap(),
        "--output",
        a.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let b = dir.join("b.png");
    let run = diffuse(&[
        "inpaint",
        "--model",
        tiny_sd()
            .with_file_name("tiny_sd_inpaint")
            .to_str()
            .unwrap(),
        "--cfg-scale",
        "1",
        "--steps",
        "2",
        "--init-image",
        init.to_str().unwrap(),
        "--mask",
        mask.to_str().unwrap(),
        "--output",
        b.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(image::open(&b).unwrap().width(), 64);
    let _ = std::fs::remove_dir_all(&dir);
}
