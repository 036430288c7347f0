//! Single files, PyTorch pickles, LoRAs, embeddings and `convert` on the repository's own
//! fixtures (pinned to the repository copy: these tests know the files' contents), with the bad
//! inputs a user can hand over: each must be a clear error naming the file, never a panic.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::DType;
use diffuse_core::testing::to_vec_f64;
use diffuse_loaders::pickle::PickleTensors;
use diffuse_loaders::textual_inversion::TextualInversion;
use diffuse_pipelines::convert::{folder_to_single_file, single_file_to_folder};
use diffuse_pipelines::{
    load_pipeline, EmbeddingSpec, GenerationParams, LoadOptions, LoraSpec, Pipeline,
    StableDiffusionPipeline, Text2ImageRequest,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}
fn single_file() -> PathBuf {
    fixtures().join("cases/_adapters/tiny_sd_single_file.safetensors")
}
fn ldm_config() -> PathBuf {
    fixtures().join("cases/_models/tiny_sd_ldm_layout")
}
fn tiny_sd() -> PathBuf {
    fixtures().join("pipelines/tiny_sd")
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("diffuse-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load(path: &Path, opts: LoadOptions) -> diffuse_core::Result<StableDiffusionPipeline> {
    match load_pipeline(path, &opts)? {
        Pipeline::StableDiffusion(p) => Ok(*p),
        _ => panic!("expected Stable Diffusion"),
    }
}

fn image(p: &StableDiffusionPipeline) -> Result<Vec<f64>> {
    let req = Text2ImageRequest {
        params: GenerationParams {
            prompts: vec!["a lighthouse".into()],
            steps: 2,
            seed: 7,
            ..Default::default()
        },
        height: Some(32),
        width: Some(32),
        latents: None,
    };
    to_vec_f64(&p.text_to_image(&req, None)?.images)
}

fn err_text(r: diffuse_core::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn ckpt_pickle_reads_the_same_tensors_as_safetensors() -> Result<()> {
    let ckpt = PickleTensors::open(&fixtures().join("adapters/tiny_sd_single_file_f16.ckpt"))?;
    let st = candle_core::safetensors::load(single_file(), &candle_core::Device::Cpu)?;
    let names = ckpt.names();
    assert_eq!(names.len(), st.len());
    for (k, v) in &st {
        let t = ckpt.get(&format!("state_dict.{k}"))?;
        assert_eq!(t.dtype(), DType::F16);
        assert_eq!(t.dims(), v.dims(), "{k}");
        assert_eq!(
            to_vec_f64(&t)?,
            to_vec_f64(&v.to_dtype(DType::F16)?)?,
            "{k}"
        );
    }
    // A .ckpt loads as a pipeline like the safetensors file (same weights in f16).
    let opts = || LoadOptions {
        config: Some(ldm_config()),
        ..Default::default()
    };
    let a = image(&load(
        &fixtures().join("adapters/tiny_sd_single_file_f16.ckpt"),
        opts(),
    )?)?;
    assert!(a.iter().all(|v| v.is_finite()));
    Ok(())
}

#[test]
fn a_pickle_that_runs_code_is_refused() {
    let e = err_text(PickleTensors::open(
        &fixtures().join("adapters/runs_code.ckpt"),
    ));
    assert!(
        e.contains("runs_code.ckpt") && e.contains("builtin__.eval"),
        "{e}"
    );
    let e = err_text(load(
        &fixtures().join("adapters/runs_code.ckpt"),
        LoadOptions::default(),
    ));
    assert!(e.contains("builtin__.eval"), "{e}");
}

#[test]
fn embedding_formats_agree() -> Result<()> {
    let st =
        TextualInversion::load(&fixtures().join("cases/_adapters/embedding_a1111.safetensors"))?;
    let pt = TextualInversion::load(&fixtures().join("adapters/embedding_a1111.pt"))?;
    let bin = TextualInversion::load(&fixtures().join("adapters/learned_embeds.bin"))?;
    assert_eq!(bin.stored_token.as_deref(), Some("<lighthouse-style>"));
    for other in [&pt, &bin] {
        assert_eq!(to_vec_f64(&other.vectors[0])?, to_vec_f64(&st.vectors[0])?);
    }
    Ok(())
}

#[test]
fn single_file_convert_round_trips_bit_exactly() -> Result<()> {
    let dir = temp("convert");
    let folder = dir.join("folder");
    single_file_to_folder(&single_file(), Some(&ldm_config()), &folder, None)?;
    let back = dir.join("back.safetensors");
    folder_to_single_file(&folder, &back, None)?;
    assert_eq!(std::fs::read(&back)?, std::fs::read(single_file())?);
    // The folder written runs exactly as the single file does.
    let a = image(&load(&folder, LoadOptions::default())?)?;
    let b = image(&load(
        &single_file(),
        LoadOptions {
            config: Some(ldm_config()),
            ..Default::default()
        },
    )?)?;
    assert_eq!(a, b);
    // And a folder round-trips too: folder -> file -> folder gives the same tensors.
    let again = dir.join("again");
    single_file_to_folder(&back, Some(&ldm_config()), &again, None)?;
    for c in [
        "unet/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
        "text_encoder/model",
    ] {
        let f = format!("{c}.safetensors");
        assert_eq!(
            std::fs::read(folder.join(&f))?,
            std::fs::read(again.join(&f))?,
            "{c}"
        );
    }
    // Nothing is written over an existing output.
    let e = err_text(single_file_to_folder(
        &single_file(),
        Some(&ldm_config()),
        &folder,
        None,
    ));
    assert!(e.contains("exists"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn bad_checkpoints_are_clear_errors() -> Result<()> {
    let dir = temp("bad");
    // Unknown key layout.
    let odd = dir.join("odd.safetensors");
    let t = candle_core::Tensor::zeros(4, DType::F32, &candle_core::Device::Cpu)?;
    candle_core::safetensors::save(&[("something.else", t)].into_iter().collect(), &odd)?;
    let e = err_text(load(&odd, LoadOptions::default()));
    assert!(
        e.contains("odd.safetensors") && e.contains("original layout"),
        "{e}"
    );
    // A truncated file.
    let bytes = std::fs::read(single_file())?;
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2])?;
    let e = err_text(load(&cut, LoadOptions::default()));
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // The tiny file without its config: the built-in SD 1.5 architecture does not fit it, and
    // the error says which tensors.
    let e = err_text(load(&single_file(), LoadOptions::default()));
    assert!(e.contains("do not fit") && e.contains("mis-shaped"), "{e}");
    // No such file or folder.
    let e = err_text(load(&dir.join("nope.safetensors"), LoadOptions::default()));
    assert!(e.contains("nope.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn bad_adapters_are_clear_errors() -> Result<()> {
    let dir = temp("adapters");
    let with = |loras: Vec<LoraSpec>, tis: Vec<EmbeddingSpec>| LoadOptions {
        loras,
        textual_inversions: tis,
        ..Default::default()
    };
    // A LoRA for another architecture: a module this UNet does not have, and one whose shape
    // does not fit.
    let dev = candle_core::Device::Cpu;
    let z = |s: &[usize]| candle_core::Tensor::zeros(s, DType::F32, &dev).unwrap();
    let other = dir.join("other.safetensors");
    candle_core::safetensors::save(
        &[
            (
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight".to_string(),
                z(&[4, 320]),
            ),
            (
                "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight".to_string(),
                z(&[320, 4]),
            ),
        ]
        .into_iter()
        .collect(),
        &other,
    )?;
    let e = err_text(load(
        &tiny_sd(),
        with(
            vec![LoraSpec {
                path: other,
                scale: 1.0,
            }],
            vec![],
        ),
    ));
    assert!(
        e.contains("other.safetensors") && e.contains("match no layer"),
        "{e}"
    );
    let wide = dir.join("wide.safetensors");
    candle_core::safetensors::save(
        &[
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight".to_string(),
                z(&[4, 640]),
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight".to_string(),
                z(&[640, 4]),
            ),
        ]
        .into_iter()
        .collect(),
        &wide,
    )?;
    let e = err_text(load(
        &tiny_sd(),
        with(
            vec![LoraSpec {
                path: wide,
                scale: 1.0,
            }],
            vec![],
        ),
    ));
    assert!(
        e.contains("wide.safetensors") && e.contains("does not fit"),
        "{e}"
    );
    // An embedding under a token already in the vocabulary.
    let emb = fixtures().join("cases/_adapters/embedding_a1111.safetensors");
    let tis = vec![EmbeddingSpec {
        path: emb.clone(),
        token: Some("a</w>".into()),
    }];
    let e = err_text(load(&tiny_sd(), with(vec![], tis)));
    assert!(
        e.contains("embedding_a1111") && e.contains("already in the tokenizer"),
        "{e}"
    );
    // A missing LoRA file.
    let e = err_text(load(
        &tiny_sd(),
        with(
            vec![LoraSpec {
                path: dir.join("none.safetensors"),
                scale: 1.0,
            }],
            vec![],
        ),
    ));
    assert!(e.contains("none.safetensors"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_lora_at_scale_zero_changes_nothing_and_fusing_is_exact() -> Result<()> {
    let lora = fixtures().join("cases/_adapters/lora_kohya.safetensors");
    let base = image(&load(&tiny_sd(), LoadOptions::default())?)?;
    let zero = image(&load(
        &tiny_sd(),
        LoadOptions {
            loras: vec![LoraSpec {
                path: lora.clone(),
                scale: 0.0,
            }],
            ..Default::default()
        },
    )?)?;
    assert_eq!(base, zero);
    // Two halves fuse to the same weights as one whole (up to f32 rounding).
    let half = |s| LoraSpec {
        path: lora.clone(),
        scale: s,
    };
    let one = image(&load(
        &tiny_sd(),
        LoadOptions {
            loras: vec![half(1.0)],
            ..Default::default()
        },
    )?)?;
    let two = image(&load(
        &tiny_sd(),
        LoadOptions {
            loras: vec![half(0.5), half(0.5)],
            ..Default::default()
        },
    )?)?;
    let worst = one
        .iter()
        .zip(&two)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-5, "{worst}");
    assert!(one != base);
    Ok(())
}
