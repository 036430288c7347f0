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

/// `diffuse generate` of "a photo" on the tiny SD pipeline (seed 0, 3 steps) into `out`, with
/// `extra` flags.
fn generate_photo(out: &Path, extra: &[&str]) -> std::process::Output {
    let model = tiny_sd();
    let base = [
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
    diffuse(&[&base[..], extra].concat())
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
    let run = generate_photo(&out, &[]);
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
    let again = generate_photo(&out, &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(generate_photo(&out, &["--force"]).status.success());
    assert_eq!(image::open(&out).unwrap().to_rgb8(), img.to_rgb8());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_settings_fail_naming_them_and_write_nothing() {
    let dir = temp_dir("bad-settings");
    let out = dir.join("out.png");
    // A NaN guidance scale or eta would have run the whole loop to a broken image; the flags
    // refuse numbers that are not finite by name.
    for (flag, value, says) in [
        ("--width", "65", "multiple"),
        ("--guidance-scale", "nan", "'nan' for '--guidance-scale"),
        ("--eta", "1e999", "'1e999' for '--eta"),
    ] {
        let run = generate_photo(&out, &[flag, value]);
        assert!(!run.status.success(), "{flag} {value} ran");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains(says), "{flag} {value}: {stderr}");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(
            left.is_empty(),
            "{flag} {value}: files left behind: {left:?}"
        );
    }
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

/// `--prompts-file`: prompt k (comments and blank lines skipped) draws from seed + k, so its
/// files are those of `--prompt P --seed S+k`; a file without prompts, or naming a LoRA, is
/// refused before the model loads.
#[test]
fn a_prompts_file_makes_the_images_of_each_prompt_with_its_own_seed() {
    let dir = temp_dir("prompts");
    let sd = tiny_sd();
    let sd = sd.to_str().unwrap();
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        "# two prompts\na red square\n\n  a blue circle  \n",
    )
    .unwrap();
    let (all, one) = (dir.join("all"), dir.join("one"));
    std::fs::create_dir_all(&all).unwrap();
    std::fs::create_dir_all(&one).unwrap();
    let common = ["--model", sd, "--steps", "2", "--num-images", "2"];
    let ok = |args: &[&str]| {
        let run = diffuse(&[&["generate"][..], &common, args].concat());
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    };
    let p = prompts.to_str().unwrap();
    ok(&[
        "--prompts-file",
        p,
        "--seed",
        "7",
        "--output",
        all.to_str().unwrap(),
    ]);
    let mut names: Vec<String> = std::fs::read_dir(&all)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "diffuse-7-0.png",
            "diffuse-7-1.png",
            "diffuse-8-0.png",
            "diffuse-8-1.png"
        ]
    );
    ok(&[
        "--prompt",
        "a blue circle",
        "--seed",
        "8",
        "--output",
        one.to_str().unwrap(),
    ]);
    for k in 0..2 {
        let name = format!("diffuse-8-{k}.png");
        assert!(
            std::fs::read(all.join(&name)).unwrap() == std::fs::read(one.join(&name)).unwrap(),
            "{name} differs from the single-prompt run"
        );
    }
    assert!(png_parameters(&all.join("diffuse-8-1.png"))
        .2
        .starts_with("a blue circle\n"));

    for (text, want) in [
        ("# nothing\n\n", "holds no prompts"),
        ("a cat <lora:style:0.5>\n", "line 1: <lora:...> tags"),
    ] {
        std::fs::write(&prompts, text).unwrap();
        let run = diffuse(&[&["generate"][..], &common, &["--prompts-file", p]].concat());
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            !run.status.success() && err.contains(want),
            "{text:?}: {err}"
        );
    }
}

/// `--output x.jpg` writes a JPEG (the parameters in EXIF); an extension diffuse does not write
/// fails before any work, naming the ones it does, and leaves nothing behind.
#[test]
fn jpeg_output_and_an_unknown_extension() {
    let dir = temp_dir("jpeg");
    let model = tiny_sd();
    let run = |out: &Path| {
        diffuse(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo",
            "--steps",
            "2",
            "--output",
            out.to_str().unwrap(),
        ])
    };
    let jpg = dir.join("out.JPG");
    let ok = run(&jpg);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bytes = std::fs::read(&jpg).unwrap();
    assert_eq!(
        image::guess_format(&bytes).unwrap(),
        image::ImageFormat::Jpeg
    );
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    // The EXIF UserComment holds the prompt, in UTF-16BE.
    let prompt: Vec<u8> = "a photo"
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect();
    assert!(bytes.windows(prompt.len()).any(|w| w == prompt));

    let webp = dir.join("out.webp");
    let bad = run(&webp);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains(".webp") && stderr.contains(".jpg"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["out.JPG"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hires_fix_draws_a_second_larger_pass() {
    let dir = temp_dir("hires");
    let out = dir.join("out.png");
    let run = generate_photo(&out, &["--hires-scale", "2", "--hires-strength", "0.5"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (w, h, text) = png_parameters(&out);
    assert_eq!((w, h), (128, 128));
    assert!(
        text.ends_with(
            "Size: 64x64, Model: tiny_sd, Denoising strength: 0.5, Hires upscale: 2, \
             Hires upscaler: Lanczos"
        ),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
