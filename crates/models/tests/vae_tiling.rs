//! Tiled and sliced VAE coding against diffusers' `enable_tiling` / `enable_slicing`
//! (`fixtures/vae_tiling/`, made by `fixtures/generate/vae_tiling.py` on the tiny VAE of
//! `fixtures/models/vae`).

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use diffuse_core::testing::{
    assert_close, fixture_subdir, get, load_tensors, max_abs_diff, read_json, to_vec_f64,
};
use diffuse_models::ModelMixin;
use diffuse_models::{AutoencoderKL, VaeTiling};

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;

fn vae() -> Result<AutoencoderKL> {
    let dir = fixture_subdir("models").join("vae");
    Ok(AutoencoderKL::from_pretrained(
        &dir,
        DType::F32,
        &Device::Cpu,
    )?)
}

fn diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(max_abs_diff(&to_vec_f64(a)?, &to_vec_f64(b)?))
}

#[test]
fn default_tiling_is_diffusers() -> Result<()> {
    let info = read_json(&fixture_subdir("vae_tiling").join("info.json"))?;
    let t = vae()?.default_tiling();
    let want = VaeTiling {
        tile_sample_min_size: info["tile_sample_min_size"].as_u64().unwrap_or(0) as usize,
        tile_latent_min_size: info["tile_latent_min_size"].as_u64().unwrap_or(0) as usize,
        tile_overlap_factor: info["tile_overlap_factor"].as_f64().unwrap_or(0.0),
    };
    ensure!(t == want, "{t:?} != diffusers' {want:?}");
    Ok(())
}

#[test]
fn tiled_and_sliced_coding_match_diffusers() -> Result<()> {
    let io = load_tensors(&fixture_subdir("vae_tiling").join("tiled_io.safetensors"))?;
    let mut vae = vae()?;
    let z = get(&io, "decode_latent")?;
    let whole = vae.decode(z)?;

    vae.enable_tiling();
    let tiled = vae.decode(z)?;
    assert_close(
        "tiled_decode",
        &tiled,
        get(&io, "tiled_decode")?,
        ATOL,
        RTOL,
    )?;
    // The fixture is only a test of the blending if tiles change the result.
    let seam = diff(&tiled, &whole)?;
    ensure!(seam > 1e-2, "tiled and whole decodes differ by only {seam}");

    vae.set_slicing(true);
    let both = vae.decode(z)?;
    assert_close(
        "tiled_sliced_decode",
        &both,
        get(&io, "tiled_sliced_decode")?,
        ATOL,
        RTOL,
    )?;

    vae.set_tiling(None);
    let sliced = vae.decode(z)?;
    assert_close(
        "sliced_decode",
        &sliced,
        get(&io, "sliced_decode")?,
        ATOL,
        RTOL,
    )?;
    vae.set_slicing(false);

    vae.enable_tiling();
    let small = vae.decode(get(&io, "small_latent")?)?;
    assert_close(
        "small_tiled_decode",
        &small,
        get(&io, "small_tiled_decode")?,
        ATOL,
        RTOL,
    )?;

    let posterior = vae.encode(get(&io, "encode_image")?)?;
    assert_close(
        "tiled_encode_mean",
        &posterior.mean,
        get(&io, "tiled_encode_mean")?,
        ATOL,
        RTOL,
    )?;
    assert_close(
        "tiled_encode_logvar",
        &posterior.logvar,
        get(&io, "tiled_encode_logvar")?,
        ATOL,
        RTOL,
    )?;
    eprintln!(
        "tiled decode max |diff| {:.1e} (tiles vs whole: {seam:.2})",
        diff(&tiled, get(&io, "tiled_decode")?)?
    );
    Ok(())
}
