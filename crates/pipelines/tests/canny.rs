//! The Canny preprocessor against OpenCV's `cv2.Canny` (`fixtures/canny/`, made by
//! `fixtures/generate/canny.py`): the same edge pixels.

use anyhow::{ensure, Context, Result};
use diffuse_core::testing::{fixture_subdir, read_json, run_all};
use diffuse_pipelines::canny;

#[test]
fn canny_matches_opencv() {
    let dir = fixture_subdir("canny");
    let cases = read_json(&dir.join("cases.json")).expect("cases.json")["cases"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!cases.is_empty(), "no canny cases");
    run_all(
        "canny",
        &cases,
        |c| c["edges"].as_str().unwrap_or("?").to_string(),
        |c| -> Result<()> {
            let open = |k: &str| -> Result<image::DynamicImage> {
                let p = dir.join(c[k].as_str().context("file name")?);
                image::open(&p).with_context(|| p.display().to_string())
            };
            let img = open("image")?.to_rgb8();
            let want = open("edges")?.to_luma8();
            let low = c["low"].as_f64().context("low")?;
            let high = c["high"].as_f64().context("high")?;
            let ours = canny(&img, low, high);
            let mut wrong = 0;
            for (o, w) in ours.pixels().zip(want.pixels()) {
                ensure!(o[0] == o[1] && o[1] == o[2], "edges are not gray");
                wrong += usize::from(o[0] != w[0]);
            }
            let edges = want.pixels().filter(|p| p[0] > 0).count();
            ensure!(edges > 0, "the reference has no edges");
            ensure!(
                wrong == 0,
                "{wrong} of {} pixels differ from OpenCV ({edges} edges)",
                want.len()
            );
            Ok(())
        },
    );
}
