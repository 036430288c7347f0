//! SDXL single files and LoRAs on the repository's tiny SDXL (pinned to the repository copy):
//! the folder written as an SGM-layout single file loads to the same image and converts back
//! byte for byte; LoRAs in PEFT and Kohya (SGM module names) format give the image of a folder
//! whose weights the test merged by hand (`W + scale · alpha/rank · B·A`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use diffuse_core::testing::{max_abs_diff, to_vec_f64};
use diffuse_core::Generator;
use diffuse_pipelines::convert::{folder_to_single_file, single_file_to_folder};
use diffuse_pipelines::{
    load_pipeline, GenerationParams, LoadOptions, LoraSpec, Pipeline, SdxlOptions,
    Text2ImageRequest,
};

fn tiny_sdxl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/cases/_models/tiny_sdxl")
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("diffuse-sdxl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn image(path: &Path, opts: LoadOptions) -> Result<Vec<f64>> {
    let Pipeline::StableDiffusionXL(p) = load_pipeline(path, &opts)? else {
        bail!("{}: expected an SDXL pipeline", path.display());
    };
    let req = Text2ImageRequest {
        params: GenerationParams {
            prompts: vec!["a lighthouse at dusk".into()],
            negative_prompts: vec!["blurry".into()],
            steps: 2,
            seed: 7,
            ..Default::default()
        },
        height: Some(64),
        width: Some(64),
        latents: None,
    };
    to_vec_f64(&p.text_to_image(&req, &SdxlOptions::default(), None)?.images)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dst = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dst)?;
        } else {
            std::fs::copy(entry.path(), dst)?;
        }
    }
    Ok(())
}

fn header_keys(file: &Path) -> Result<Vec<String>> {
    let t = candle_core::safetensors::load(file, &Device::Cpu)?;
    let mut k: Vec<String> = t.into_keys().collect();
    k.sort();
    Ok(k)
}

#[test]
fn sdxl_single_file_loads_like_the_folder_and_round_trips() -> Result<()> {
    let tmp = temp("single");
    let file = tmp.join("tiny_sdxl.safetensors");
    folder_to_single_file(&tiny_sdxl(), &file, None)?;
    let keys = header_keys(&file)?;
    // The SGM layout of real SDXL files.
    for k in [
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "first_stage_model.decoder.conv_out.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
    ] {
        ensure!(
            keys.iter().any(|x| x == k),
            "{k} missing from the single file"
        );
    }
    ensure!(
        !keys.iter().any(|k| k.starts_with("down_blocks")),
        "diffusers names left in the file"
    );

    let folder = image(&tiny_sdxl(), LoadOptions::default())?;
    let single = image(
        &file,
        LoadOptions {
            config: Some(tiny_sdxl()),
            ..Default::default()
        },
    )?;
    let diff = max_abs_diff(&folder, &single);
    ensure!(diff == 0.0, "single file vs folder: max |diff| {diff}");

    let back = tmp.join("folder");
    single_file_to_folder(&file, Some(&tiny_sdxl()), &back, None)?;
    let again = tmp.join("again.safetensors");
    folder_to_single_file(&back, &again, None)?;
    ensure!(
        std::fs::read(&file)? == std::fs::read(&again)?,
        "file -> folder -> file changed bytes"
    );
    let converted = image(&back, LoadOptions::default())?;
    ensure!(max_abs_diff(&folder, &converted) == 0.0, "converted folder");

    // Without --config the built-in SDXL base architecture is used: the tiny file does not fit
    // it, and the error says which tensors.
    let e = image(&file, LoadOptions::default()).expect_err("tiny weights, real config");
    ensure!(format!("{e:#}").contains("shape"), "{e:#}");
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

/// One module's LoRA: `(component, diffusers module, weights file in the folder)`.
const MODULES: &[(&str, &str, &str)] = &[
    (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "unet/diffusion_pytorch_model.safetensors",
    ),
    (
        "text_encoder_2",
        "text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2/model.safetensors",
    ),
];
const RANK: usize = 2;

/// Random `(A, B)` of rank 2 for each module, from a seeded generator.
fn lora_weights() -> Result<Vec<(Tensor, Tensor)>> {
    let mut g = Generator::manual_seed(11);
    let mut v = Vec::new();
    for (_, _, file) in MODULES {
        // The UNet's cross-attention key is 64x64, the CLIP query 32x32.
        let n = if file.starts_with("unet") { 64 } else { 32 };
        let a = (g.randn((RANK, n), &Device::Cpu)? * 0.2)?;
        let b = (g.randn((n, RANK), &Device::Cpu)? * 0.2)?;
        v.push((a, b));
    }
    Ok(v)
}

/// A copy of the tiny SDXL with `W += factor · B·A` for every module.
fn merged_by_hand(dir: &Path, factor: f64) -> Result<()> {
    copy_dir(&tiny_sdxl(), dir)?;
    for ((_, module, file), (a, b)) in MODULES.iter().zip(lora_weights()?) {
        let path = dir.join(file);
        let mut w: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)?;
        let key = format!("{module}.weight");
        let old = w.get(&key).with_context(|| key.clone())?;
        let new = (old + (b.matmul(&a)? * factor)?)?;
        w.insert(key, new);
        candle_core::safetensors::save(&w, &path)?;
    }
    Ok(())
}

#[test]
fn sdxl_loras_equal_weights_merged_by_hand() -> Result<()> {
    let tmp = temp("lora");
    let weights = lora_weights()?;
    let scale = 0.7;

    // PEFT / diffusers: alpha = rank when the header has no metadata.
    let mut peft = HashMap::new();
    for ((component, module, _), (a, b)) in MODULES.iter().zip(&weights) {
        peft.insert(format!("{component}.{module}.lora_A.weight"), a.clone());
        peft.insert(format!("{component}.{module}.lora_B.weight"), b.clone());
    }
    let peft_file = tmp.join("peft.safetensors");
    candle_core::safetensors::save(&peft, &peft_file)?;

    // Kohya: SGM module names for the UNet (down block 1, layer 0 of 2 -> input_blocks.4),
    // `lora_te2_` for the second text encoder, alpha 1 (factor alpha / rank = 0.5).
    let kohya_names = [
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    ];
    let mut kohya = HashMap::new();
    for (name, (a, b)) in kohya_names.iter().zip(&weights) {
        kohya.insert(format!("{name}.lora_down.weight"), a.clone());
        kohya.insert(format!("{name}.lora_up.weight"), b.clone());
        kohya.insert(format!("{name}.alpha"), Tensor::new(1f32, &Device::Cpu)?);
    }
    let kohya_file = tmp.join("kohya.safetensors");
    candle_core::safetensors::save(&kohya, &kohya_file)?;

    let base = image(&tiny_sdxl(), LoadOptions::default())?;
    for (file, factor) in [(&peft_file, scale), (&kohya_file, scale * 0.5)] {
        let with_lora = image(
            &tiny_sdxl(),
            LoadOptions {
                loras: vec![LoraSpec {
                    path: file.clone(),
                    scale,
                }],
                ..Default::default()
            },
        )?;
        let merged = tmp.join(format!("merged-{factor}"));
        merged_by_hand(&merged, factor)?;
        let by_hand = image(&merged, LoadOptions::default())?;
        let diff = max_abs_diff(&with_lora, &by_hand);
        ensure!(diff <= 1e-5, "{}: max |diff| {diff}", file.display());
        ensure!(
            max_abs_diff(&with_lora, &base) > 1e-3,
            "{}: the LoRA changed nothing",
            file.display()
        );
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

/// An SDXL embedding (`clip_l` + `clip_g`) whose two vectors are the encoders' own rows for
/// "big" and "dog": `a <bigdog> on a hill` must encode exactly as `a big dog on a hill` (the
/// token is written out as `<bigdog> <bigdog>_1` and each id looks up the given row), in both
/// encoders' hidden states.
#[test]
fn sdxl_textual_inversion_uses_both_tables() -> Result<()> {
    use diffuse_pipelines::EmbeddingSpec;
    let tmp = temp("ti");
    let Pipeline::StableDiffusionXL(base) = load_pipeline(&tiny_sdxl(), &LoadOptions::default())?
    else {
        bail!("expected SDXL");
    };
    let ids = base.tokenizer_2.encode("big dog");
    let words = Tensor::new(&[ids[1], ids[2]], &Device::Cpu)?;
    let rows = |file: &str| -> Result<Tensor> {
        let w = candle_core::safetensors::load(tiny_sdxl().join(file), &Device::Cpu)?;
        let table = w
            .get("text_model.embeddings.token_embedding.weight")
            .context("token table")?;
        Ok(table.index_select(&words, 0)?)
    };
    let emb = HashMap::from([
        (
            "clip_l".to_string(),
            rows("text_encoder/model.safetensors")?,
        ),
        (
            "clip_g".to_string(),
            rows("text_encoder_2/model.safetensors")?,
        ),
    ]);
    let file = tmp.join("bigdog.safetensors");
    candle_core::safetensors::save(&emb, &file)?;
    let opts = LoadOptions {
        textual_inversions: vec![EmbeddingSpec {
            path: file.clone(),
            token: Some("<bigdog>".into()),
        }],
        ..Default::default()
    };
    let Pipeline::StableDiffusionXL(with) = load_pipeline(&tiny_sdxl(), &opts)? else {
        bail!("expected SDXL");
    };
    let embeds = |p: &diffuse_pipelines::StableDiffusionXLPipeline, prompt: &str| {
        let params = GenerationParams {
            prompts: vec![prompt.into()],
            ..Default::default()
        };
        p.encode_prompt(&params, &SdxlOptions::default(), &mut Vec::new())
            .map(|e| e.prompt_embeds)
    };
    let want = to_vec_f64(&embeds(&base, "a big dog on a hill")?)?;
    let got = to_vec_f64(&embeds(&with, "a <bigdog> on a hill")?)?;
    let diff = max_abs_diff(&got, &want);
    ensure!(diff <= 1e-6, "max |diff| {diff}");
    // A single-table (SD) embedding does not fit SDXL.
    let sd = tmp.join("sd.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([(
            "emb_params".to_string(),
            rows("text_encoder/model.safetensors")?,
        )]),
        &sd,
    )?;
    let e = load_pipeline(
        &tiny_sdxl(),
        &LoadOptions {
            textual_inversions: vec![EmbeddingSpec {
                path: sd,
                token: None,
            }],
            ..Default::default()
        },
    )
    .err()
    .context("an SD embedding must not load into SDXL")?;
    ensure!(e.to_string().contains("clip_l"), "{e}");
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
