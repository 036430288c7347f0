//! The CLIP text model beyond the parity run of `model_fixtures.rs` (which runs every io file,
//! `clip_text` included): f16 and u32 ids, bad inputs, config keys, the real SD 1.5 / 2.1 text
//! encoder architectures (names, shapes, parameter counts; no forward), gradients.

use diffuse_models::ModelMixin;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffuse_core::testing::{assert_close, fixture_subdir, get, load_tensors, read_json, run_all};
use diffuse_loaders::RecordingBackend;
use diffuse_models::clip_text::{ClipTextConfig, ClipTextModel};

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures_configs")
}

#[test]
fn clip_text_runs_in_f16_and_with_u32_ids() -> Result<()> {
    let models = fixture_subdir("models");
    let model =
        ClipTextModel::from_pretrained(&models.join("clip_text"), DType::F16, &Device::Cpu)?;
    let io = load_tensors(&models.join("clip_text_io.safetensors"))?;
    let ids = get(&io, "unpadded_input_ids")?.to_dtype(DType::U32)?;
    let out = model.forward(&ids)?;
    assert_eq!(out.last_hidden_state.dtype(), DType::F16);
    // Half precision: loose agreement only.
    assert_close(
        "f16 last_hidden_state",
        &out.last_hidden_state.to_dtype(DType::F32)?,
        get(&io, "unpadded_last_hidden_state")?,
        5e-2,
        5e-2,
    )?;
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let models = fixture_subdir("models");
    let model =
        ClipTextModel::from_pretrained(&models.join("clip_text"), DType::F32, &Device::Cpu)?;
    let too_long = Tensor::zeros((1, 78), DType::I64, &Device::Cpu)?;
    assert!(model.forward(&too_long).is_err());
    let out_of_vocab = Tensor::new(&[[49406i64, 49408]], &Device::Cpu)?;
    assert!(model.forward(&out_of_vocab).is_err());
    let one_d = Tensor::new(&[1i64, 2], &Device::Cpu)?;
    assert!(model.forward(&one_d).is_err());
    Ok(())
}

#[test]
fn config_accepts_dtype_keys_and_rejects_unknown_activations() -> Result<()> {
    let base = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 5"#;
    let a: ClipTextConfig =
        diffuse_loaders::parse_config(&format!("{{{base}, \"torch_dtype\": \"float16\"}}"), "a")?;
    assert_eq!(a.dtype.as_deref(), Some("float16"));
    let b: ClipTextConfig =
        diffuse_loaders::parse_config(&format!("{{{base}, \"dtype\": \"bfloat16\"}}"), "b")?;
    assert_eq!(b.dtype.as_deref(), Some("bfloat16"));
    let c: ClipTextConfig =
        diffuse_loaders::parse_config(&format!("{{{base}, \"hidden_act\": \"relu\"}}"), "c")?;
    let err = c.validate("c.json").unwrap_err().to_string();
    assert!(err.contains("hidden_act") && err.contains("relu"), "{err}");
    let three_heads = base.replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 3");
    let d: ClipTextConfig = diffuse_loaders::parse_config(&format!("{{{three_heads}}}"), "d")?;
    let err = d.validate("d.json").unwrap_err().to_string();
    assert!(err.contains("num_attention_heads"), "{err}");
    Ok(())
}

/// Builds the real architecture on a shapes-only backend and compares with `param_shapes.json`.
fn check_real_architecture(model: &str) -> Result<()> {
    let dir = configs_dir().join(model).join("text_encoder");
    let cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
    let shapes = read_json(&dir.join("param_shapes.json"))?;
    let rec = RecordingBackend::shapes_only();
    ClipTextModel::new(rec.var_builder(DType::F32, &Device::Cpu), &cfg)?;
    let ours = rec.parameters();
    let expected = shapes["tensors"].as_object().context("tensors")?;
    let total = shapes["total_params"].as_u64().context("total_params")? as usize;
    let count = shapes["num_tensors"].as_u64().context("num_tensors")? as usize;
    ensure!(
        rec.parameter_count() == total,
        "{model}: {} parameters, expected {total}",
        rec.parameter_count()
    );
    ensure!(
        ours.len() == count,
        "{model}: {} tensors, expected {count}",
        ours.len()
    );
    for (name, shape) in &ours {
        let want: Vec<usize> = expected
            .get(name)
            .with_context(|| format!("{model}: `{name}` is not in param_shapes.json"))?
            .as_array()
            .context("shape")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(0) as usize)
            .collect();
        ensure!(
            &want == shape,
            "{model}: `{name}` {shape:?}, expected {want:?}"
        );
    }
    Ok(())
}

#[test]
fn real_text_encoder_architectures() {
    let models = [
        "runwayml_stable_diffusion_v1_5",
        "stabilityai_stable_diffusion_2_1",
    ];
    run_all(
        "real text encoders",
        &models,
        |m| m.to_string(),
        |m| check_real_architecture(m),
    );
}

#[test]
fn gradients_reach_every_parameter() -> Result<()> {
    // Every op of the model must have a backward (fused candle layer norm / softmax have none).
    let cfg: ClipTextConfig = diffuse_loaders::parse_config(
        r#"{"vocab_size": 20, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 6, "hidden_act": "gelu",
            "eos_token_id": 2}"#,
        "tiny",
    )?;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = ClipTextModel::new(vb, &cfg)?;
    // Norm weights initialise to 1 and biases to 0: perturb every variable so that no
    // gradient vanishes by symmetry.
    for (i, var) in varmap.all_vars().iter().enumerate() {
        let t = var.as_tensor();
        let noise = Tensor::randn(0f32, 0.5, t.shape(), &Device::Cpu)?;
        var.set(&(t + noise)?.affine(1.0, 0.01 * i as f64)?)?;
    }
    let ids = Tensor::new(&[[3u32, 7, 19, 1, 0], [5, 5, 2, 19, 4]], &Device::Cpu)?;
    let out = model.forward(&ids)?;
    let loss = (out.last_hidden_state.sqr()?.sum_all()? + out.pooler_output.sum_all()?)?;
    let grads = loss.backward()?;
    let data = varmap.data().lock().unwrap();
    ensure!(data.len() == 2 + 2 * 16 + 2, "{} variables", data.len());
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .with_context(|| format!("no gradient for `{name}`"))?;
        let norm: f32 = g.sqr()?.sum_all()?.to_scalar()?;
        ensure!(norm.is_finite(), "`{name}`: gradient not finite");
        // Token rows never used get zero gradient; everything else must move.
        if !name.ends_with("token_embedding.weight") {
            ensure!(norm > 0.0, "`{name}`: zero gradient");
        }
    }
    Ok(())
}
