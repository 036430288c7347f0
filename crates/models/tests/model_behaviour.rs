//! Errors on bad configs and inputs, gradients (training), half precision and the VAE
//! posterior sampling of the UNets and the VAE.

use diffuse_models::ModelMixin;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use diffuse_core::testing::{assert_close, fixture_subdir, get, load_tensors, read_json};
use diffuse_core::Generator;
use diffuse_loaders::{parse_config, RecordingBackend};
use diffuse_models::{
    AutoencoderKL, AutoencoderKLConfig, UNet2DConditionConfig, UNet2DConditionModel, UNet2DConfig,
    UNet2DModel,
};

const TINY_UNET2D: &str = r#"{"sample_size": 16, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8,
    "resnet_time_scale_shift": "scale_shift", "downsample_type": "resnet", "upsample_type": "resnet",
    "num_class_embeds": 3, "attn_norm_num_groups": 4}"#;

const TINY_COND: &str = r#"{"sample_size": 8, "block_out_channels": [8, 16], "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 12,
    "attention_head_dim": [2, 4], "use_linear_projection": true, "norm_num_groups": 4,
    "only_cross_attention": [true, false]}"#;

const TINY_VAE: &str = r#"{"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "latent_channels": 2}"#;

fn cpu() -> Device {
    Device::Cpu
}

fn err_text<T>(r: Result<T, impl std::fmt::Display>) -> String {
    match r {
        Ok(_) => String::from("<no error>"),
        Err(e) => e.to_string(),
    }
}

/// `text` with `key`'s JSON value replaced (keys are unique in the tiny configs).
fn with(text: &str, key: &str, value: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(text).expect("tiny config");
    v[key] = serde_json::from_str(value).expect("replacement value");
    v.to_string()
}

fn temp_component(name: &str, config: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("diffuse-models-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("config.json"), config)?;
    Ok(dir)
}

#[test]
fn unsupported_block_types_are_errors_naming_them() -> Result<()> {
    let rec = RecordingBackend::shapes_only();
    let vb = || rec.var_builder(DType::F32, &cpu());

    let text = with(
        TINY_UNET2D,
        "down_block_types",
        r#"["DownBlock2D", "SkipDownBlock2D", "DownBlock2D"]"#,
    );
    let cfg: UNet2DConfig = parse_config(&text, "unet2d")?;
    let e = err_text(cfg.validate());
    ensure!(
        e.contains("SkipDownBlock2D") && e.contains("down_block_types[1]"),
        "{e}"
    );
    let e = err_text(UNet2DModel::new(vb(), &cfg));
    ensure!(e.contains("SkipDownBlock2D"), "{e}");
    // Through from_pretrained the error also names the file; weights are not even looked for.
    let dir = temp_component("unet2d", &text)?;
    let e = err_text(UNet2DModel::from_pretrained(&dir, DType::F32, &cpu()));
    ensure!(
        e.contains("SkipDownBlock2D") && e.contains("config.json"),
        "{e}"
    );

    let text = with(
        TINY_COND,
        "up_block_types",
        r#"["UpBlock2D", "SimpleCrossAttnUpBlock2D"]"#,
    );
    let cfg: UNet2DConditionConfig = parse_config(&text, "cond")?;
    let e = err_text(UNet2DConditionModel::new(vb(), &cfg));
    ensure!(
        e.contains("SimpleCrossAttnUpBlock2D") && e.contains("up_block_types[1]"),
        "{e}"
    );
    let text = with(
        TINY_COND,
        "mid_block_type",
        r#""UNetMidBlock2DSimpleCrossAttn""#,
    );
    let cfg: UNet2DConditionConfig = parse_config(&text, "cond")?;
    let e = err_text(cfg.validate());
    ensure!(
        e.contains("UNetMidBlock2DSimpleCrossAttn") && e.contains("mid_block_type"),
        "{e}"
    );

    let text = with(
        TINY_VAE,
        "down_block_types",
        r#"["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]"#,
    );
    let cfg: AutoencoderKLConfig = parse_config(&text, "vae")?;
    let e = err_text(AutoencoderKL::new(vb(), &cfg));
    ensure!(e.contains("AttnDownEncoderBlock2D"), "{e}");
    Ok(())
}

#[test]
fn unsupported_settings_are_errors_naming_the_field() -> Result<()> {
    let cases = [
        (
            with(TINY_COND, "addition_embed_type", r#""text""#),
            "addition_embed_type",
        ),
        (with(TINY_COND, "act_fn", r#""tanh""#), "act_fn"),
        (
            with(TINY_COND, "attention_head_dim", "[2, 4, 8]"),
            "attention_head_dim",
        ),
        (
            with(TINY_COND, "dual_cross_attention", "true"),
            "dual_cross_attention",
        ),
        (
            with(TINY_COND, "time_embedding_type", r#""learned""#),
            "time_embedding_type",
        ),
    ];
    for (text, field) in &cases {
        let cfg: UNet2DConditionConfig = parse_config(text, "cond")?;
        let e = err_text(cfg.validate());
        ensure!(e.contains(field), "{field}: {e}");
    }
    let cfg: UNet2DConfig = parse_config(
        &with(TINY_UNET2D, "class_embed_type", r#""projection""#),
        "u",
    )?;
    let e = err_text(cfg.validate());
    ensure!(e.contains("class_embed_type"), "{e}");
    // A value of the wrong type is reported by the config reader with its path.
    let dir = temp_component(
        "badtype",
        &with(TINY_VAE, "block_out_channels", r#"[8, "x"]"#),
    )?;
    let e = err_text(AutoencoderKL::from_pretrained(&dir, DType::F32, &cpu()));
    ensure!(e.contains("block_out_channels"), "{e}");
    // GroupNorm groups must divide the channels.
    let cfg: AutoencoderKLConfig = parse_config(&with(TINY_VAE, "norm_num_groups", "3"), "vae")?;
    let rec = RecordingBackend::shapes_only();
    ensure!(AutoencoderKL::new(rec.var_builder(DType::F32, &cpu()), &cfg).is_err());
    Ok(())
}

/// The repository's own model fixtures: tests that know their shapes (a context width, an
/// input size) read these, not a `DIFFUSE_FIXTURES` set that may hold other models.
fn repo_fixture(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let models = repo_fixture("models");
    let unet =
        UNet2DConditionModel::from_pretrained(&models.join("unet2d_cond_sd1"), DType::F32, &cpu())?;
    let sample = Tensor::zeros((2, 4, 8, 8), DType::F32, &cpu())?;
    let ehs = Tensor::zeros((2, 5, 32), DType::F32, &cpu())?;
    let t = Tensor::new(&[10f32, 20.], &cpu())?;
    ensure!(unet.forward(&sample, &t, &ehs).is_ok());
    ensure!(
        unet.forward(&sample.get(0)?, &t, &ehs).is_err(),
        "3-d sample"
    );
    ensure!(
        unet.forward(&sample, &Tensor::new(&[1f32, 2., 3.], &cpu())?, &ehs)
            .is_err(),
        "3 timesteps"
    );
    ensure!(
        unet.forward(&sample, &t, &Tensor::zeros((2, 5, 16), DType::F32, &cpu())?)
            .is_err(),
        "context width"
    );
    ensure!(
        unet.forward(&Tensor::zeros((2, 3, 8, 8), DType::F32, &cpu())?, &t, &ehs)
            .is_err(),
        "channels"
    );
    // One timestep for the whole batch is broadcast, as in diffusers.
    ensure!(unet
        .forward(&sample, &Tensor::new(10f32, &cpu())?, &ehs)
        .is_ok());

    let unet2d = UNet2DModel::from_pretrained(&models.join("unet2d"), DType::F32, &cpu())?;
    let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &cpu())?;
    let t = Tensor::new(&[3f32], &cpu())?;
    let labels = Tensor::new(&[1u32], &cpu())?;
    ensure!(
        unet2d.forward_with_class(&x, &t, Some(&labels)).is_err(),
        "labels without a class embedding"
    );
    Ok(())
}

#[test]
fn class_conditional_unet2d_and_odd_sizes() -> Result<()> {
    // Resampling ResNets (`*sample_type: resnet`) only do exact x2 / /2, as in diffusers.
    let text = with(TINY_UNET2D, "downsample_type", r#""conv""#);
    let cfg: UNet2DConfig = parse_config(&with(&text, "upsample_type", r#""conv""#), "tiny")?;
    let varmap = VarMap::new();
    let unet = UNet2DModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &cpu()), &cfg)?;
    // 9 x 11 is not a multiple of the 4x downsampling: upsampling follows the skip sizes.
    let x = Tensor::randn(0f32, 1., (2, 3, 9, 11), &cpu())?;
    let t = Tensor::new(&[10f32, 500.], &cpu())?;
    let a = unet.forward_with_class(&x, &t, Some(&Tensor::new(&[0u32, 2], &cpu())?))?;
    let b = unet.forward_with_class(&x, &t, Some(&Tensor::new(&[1u32, 2], &cpu())?))?;
    ensure!(a.dims() == [2, 3, 9, 11], "{:?}", a.dims());
    let diff =
        |i: usize| -> Result<f32> { Ok((a.get(i)? - b.get(i)?)?.abs()?.max_all()?.to_scalar()?) };
    ensure!(
        diff(0)? > 0.0 && diff(1)? == 0.0,
        "labels must act per sample"
    );
    ensure!(
        unet.forward(&x, &t).is_err(),
        "a class-conditional model needs labels"
    );
    Ok(())
}

/// Perturbs every variable (norms start at exactly 1/0) and checks that `loss` gives each a
/// finite, non-zero gradient: no op without a backward pass on the way.
fn check_gradients(varmap: &VarMap, loss: impl FnOnce() -> Result<Tensor>) -> Result<()> {
    let vars: Vec<(String, Var)> = varmap.data().lock().unwrap().clone().into_iter().collect();
    for (i, (_, var)) in vars.iter().enumerate() {
        let t = var.as_tensor();
        let noise = Tensor::randn(0f32, 0.2, t.shape(), t.device())?;
        var.set(&(t + noise)?.affine(1.0, 0.001 * i as f64)?)?;
    }
    let grads = loss()?.backward()?;
    let mut bad = Vec::new();
    for (name, var) in &vars {
        let norm: f32 = match grads.get(var.as_tensor()) {
            Some(g) => g.sqr()?.sum_all()?.to_scalar()?,
            None => f32::NAN,
        };
        if !(norm.is_finite() && norm > 0.0) {
            bad.push(format!("`{name}` (gradient norm {norm})"));
        }
    }
    bad.sort();
    ensure!(
        bad.is_empty(),
        "{} of {} parameters get no gradient: {}",
        bad.len(),
        vars.len(),
        bad.join(", ")
    );
    Ok(())
}

#[test]
fn gradients_reach_every_parameter() -> Result<()> {
    let dev = cpu();
    let varmap = VarMap::new();
    let cfg: UNet2DConfig = parse_config(TINY_UNET2D, "tiny")?;
    let unet = UNet2DModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    check_gradients(&varmap, || {
        let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &dev)?;
        let labels = Tensor::new(&[0u32, 2], &dev)?;
        let out =
            unet.forward_with_class(&x, &Tensor::new(&[10f32, 700.], &dev)?, Some(&labels))?;
        Ok(out.sqr()?.sum_all()?)
    })
    .context("UNet2DModel")?;

    let varmap = VarMap::new();
    let cfg: UNet2DConditionConfig = parse_config(TINY_COND, "tiny")?;
    let unet = UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    check_gradients(&varmap, || {
        let x = Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev)?;
        let ehs = Tensor::randn(0f32, 1., (2, 7, 12), &dev)?;
        let out = unet.forward(&x, &Tensor::new(&[10f32, 700.], &dev)?, &ehs)?;
        Ok(out.sqr()?.sum_all()?)
    })
    .context("UNet2DConditionModel")?;

    let varmap = VarMap::new();
    let cfg: AutoencoderKLConfig = parse_config(TINY_VAE, "tiny")?;
    let vae = AutoencoderKL::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg)?;
    check_gradients(&varmap, || {
        let x = Tensor::randn(0f32, 1., (1, 3, 8, 8), &dev)?;
        let posterior = vae.encode(&x)?;
        let z = posterior.sample(&Tensor::randn(0f32, 1., posterior.mean.shape(), &dev)?)?;
        let recon = vae.decode(&z)?;
        Ok(((recon - x)?.sqr()?.sum_all()? + posterior.kl()?.sum_all()?)?)
    })
    .context("AutoencoderKL")
}

#[test]
fn half_precision_runs_close_to_f32() -> Result<()> {
    let models = fixture_subdir("models");
    let io = load_tensors(&models.join("unet2d_cond_sd2_io.safetensors"))?;
    let dir = models.join("unet2d_cond_sd2");
    let (x, t, ehs) = (
        get(&io, "a_sample")?,
        get(&io, "a_timestep")?,
        get(&io, "a_encoder_hidden_states")?,
    );
    let full =
        UNet2DConditionModel::from_pretrained(&dir, DType::F32, &cpu())?.forward(x, t, ehs)?;
    let half =
        UNet2DConditionModel::from_pretrained(&dir, DType::F16, &cpu())?.forward(x, t, ehs)?;
    ensure!(half.dtype() == DType::F16);
    assert_close("f16 UNet", &half, &full, 3e-2, 3e-2)?;

    let vae_dir = models.join("vae");
    let vio = load_tensors(&models.join("vae_io.safetensors"))?;
    let latent = get(&vio, "decode_latent")?;
    let full = AutoencoderKL::from_pretrained(&vae_dir, DType::F32, &cpu())?.decode(latent)?;
    let half = AutoencoderKL::from_pretrained(&vae_dir, DType::F16, &cpu())?
        .decode(&latent.to_dtype(DType::F16)?)?;
    assert_close("f16 VAE decode", &half, &full, 3e-2, 3e-2)
}

#[test]
fn posterior_sample_draws_noise_like_diffusers() -> Result<()> {
    // img2img: the first draw of the run's generator is the posterior noise; the seed is the
    // one outputs.json records for the run.
    let outputs = fixture_subdir("pipelines/outputs");
    let seed = read_json(&outputs.join("outputs.json"))?["img2img_pndm"]["generator_seed"]
        .as_u64()
        .context("outputs.json: img2img_pndm.generator_seed")?;
    let io = load_tensors(&outputs.join("img2img_pndm.safetensors"))?;
    let vae = AutoencoderKL::from_pretrained(
        &fixture_subdir("pipelines/tiny_sd").join("vae"),
        DType::F32,
        &cpu(),
    )?;
    let posterior = vae.encode(get(&io, "init_image_preprocessed")?)?;
    let ours = posterior.sample_with(&mut Generator::manual_seed(seed))?;
    let expected = posterior.sample(get(&io, "vae_posterior_noise")?)?;
    assert_close("posterior sample", &ours, &expected, 1e-6, 1e-6)?;
    let kl = posterior.kl()?;
    ensure!(
        kl.dims() == [1] && kl.to_vec1::<f32>()?[0].is_finite(),
        "kl {kl}"
    );
    Ok(())
}
