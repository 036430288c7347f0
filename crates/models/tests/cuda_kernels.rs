//! The fused CUDA kernels against the generic ops they replace: GroupNorm(+SiLU), LayerNorm,
//! the attention softmax (through the attention entry points) and GEGLU, in f32, f16 and bf16,
//! on `DIFFUSE_DEVICE` (default `cuda:0`). Built only with the `cuda` feature (Cargo.toml's
//! `required-features`). The reference is the generic-op path on the CPU in f32, fed the same
//! inputs rounded to the tested dtype, so a half-precision result differs from it only by what
//! its own storage rounds.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use diffuse_core::testing::{assert_close, max_abs_diff, to_vec_f64};
use diffuse_models::activations::Activation;
use diffuse_models::attention::{
    multi_head_attention, scaled_dot_product_attention, scaled_dot_product_attention_reference,
};
use diffuse_models::normalization::{GroupNorm, LayerNorm};
use diffuse_models::ops::geglu::{geglu, geglu_reference};

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn gpu() -> Result<Device> {
    if std::env::var_os("DIFFUSE_DEVICE").is_none() {
        return Ok(Device::new_cuda(0)?);
    }
    diffuse_core::testing::test_device()
}

/// Absolute and relative tolerance per dtype, for values of order one.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 5e-5,
        DType::F16 => 1e-2,
        _ => 6e-2,
    }
}

fn cpu() -> Device {
    Device::Cpu
}

fn randn(shape: &[usize], std: f32) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, std, shape, &cpu())?)
}

/// `t` on `dev` in `dtype`, and the reference's copy: the same values rounded to `dtype`, back
/// in f32 on the CPU.
fn pair(t: &Tensor, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let ours = t.to_dtype(dtype)?.to_device(dev)?;
    let reference = t.to_dtype(dtype)?.to_dtype(DType::F32)?;
    Ok((ours, reference))
}

fn compare(what: &str, ours: &Tensor, want: &Tensor, dtype: DType) -> Result<()> {
    assert!(
        !ours.device().is_cpu(),
        "{what}: the result is not on the GPU"
    );
    let ours = ours.to_device(&cpu())?.to_dtype(DType::F32)?;
    assert_close(what, &ours, want, tol(dtype), tol(dtype))?;
    let d = max_abs_diff(&to_vec_f64(&ours)?, &to_vec_f64(want)?);
    eprintln!("{what}: max |diff| {d:.2e}");
    Ok(())
}

/// VarBuilders over random `weight`/`bias` of `c` values (scale around one): ours in `dtype`
/// on `dev`, the reference's rounded the same way on the CPU.
fn affine(
    c: usize,
    dtype: DType,
    dev: &Device,
) -> Result<(VarBuilder<'static>, VarBuilder<'static>)> {
    let (w, b) = ((randn(&[c], 0.5)? + 1.0)?, randn(&[c], 0.5)?);
    let ((w, w_ref), (b, b_ref)) = (pair(&w, dtype, dev)?, pair(&b, dtype, dev)?);
    let vb = |w, b, dtype, dev: &Device| {
        VarBuilder::from_tensors(
            HashMap::from([("weight".to_string(), w), ("bias".to_string(), b)]),
            dtype,
            dev,
        )
    };
    Ok((vb(w, b, dtype, dev), vb(w_ref, b_ref, DType::F32, &cpu())))
}

#[test]
fn group_norm_matches_generic_ops() -> Result<()> {
    let dev = gpu()?;
    let shapes: [(&[usize], usize); 4] = [
        (&[2, 320, 64, 64], 32),
        (&[1, 128, 7, 9], 32),
        (&[3, 64, 5], 8),
        (&[2, 1280, 8, 8], 32),
    ];
    for dtype in DTYPES {
        for (shape, groups) in shapes {
            let c = shape[1];
            let (vb, vb_ref) = affine(c, dtype, &dev)?;
            let (gn, gn_ref) = (
                GroupNorm::new(vb, groups, c, 1e-5)?,
                GroupNorm::new(vb_ref, groups, c, 1e-5)?,
            );
            // An offset mean, so a one-pass variance would lose digits.
            let (x, x_ref) = pair(&(randn(shape, 2.0)? + 3.0)?, dtype, &dev)?;
            let want = gn_ref.forward_reference(&x_ref)?;
            let what = format!("group norm {dtype:?} {shape:?}");
            compare(&what, &gn.forward(&x)?, &want, dtype)?;
            let ours = gn.forward_act(&x, Activation::Silu)?;
            compare(&format!("{what} +silu"), &ours, &want.silu()?, dtype)?;
        }
    }
    Ok(())
}

#[test]
fn layer_norm_matches_generic_ops() -> Result<()> {
    let dev = gpu()?;
    for dtype in DTYPES {
        for shape in [&[2usize, 77, 768][..], &[4096, 320], &[3, 5]] {
            let c = *shape.last().unwrap();
            let (vb, vb_ref) = affine(c, dtype, &dev)?;
            let (ln, ln_ref) = (
                LayerNorm::new(vb, c, 1e-5, true)?,
                LayerNorm::new(vb_ref, c, 1e-5, true)?,
            );
            let (x, x_ref) = pair(&(randn(shape, 1.5)? - 2.0)?, dtype, &dev)?;
            let want = ln_ref.forward_reference(&x_ref)?;
            compare(
                &format!("layer norm {dtype:?} {shape:?}"),
                &ln.forward(&x)?,
                &want,
                dtype,
            )?;
            // Without affine parameters (SD3's and Flux's norms).
            let vb0 = VarBuilder::zeros(dtype, &dev);
            let ln0 = LayerNorm::new(vb0, c, 1e-6, false)?;
            let ln0_ref = LayerNorm::new(VarBuilder::zeros(DType::F32, &cpu()), c, 1e-6, false)?;
            let want = ln0_ref.forward_reference(&x_ref)?;
            compare(
                &format!("layer norm {dtype:?} {shape:?} no affine"),
                &ln0.forward(&x)?,
                &want,
                dtype,
            )?;
        }
    }
    Ok(())
}

#[test]
fn attention_matches_generic_ops() -> Result<()> {
    let dev = gpu()?;
    // SD 1.5's self-attention at 64² (a head count cut to keep the f32 reference quick), its
    // cross-attention over 77 tokens, an odd size, and rows too long for the softmax to keep
    // in shared memory.
    let shapes = [
        (4usize, 4096usize, 4096usize, 40usize),
        (16, 1024, 77, 80),
        (3, 5, 7, 9),
        (2, 8, 13000, 16),
    ];
    for dtype in DTYPES {
        for (bh, n, m, d) in shapes {
            let scale = 1.0 / (d as f64).sqrt();
            let (q, q_ref) = pair(&randn(&[bh, n, d], 1.0)?, dtype, &dev)?;
            let (k, k_ref) = pair(&randn(&[bh, m, d], 1.0)?, dtype, &dev)?;
            let (v, v_ref) = pair(&randn(&[bh, m, d], 1.0)?, dtype, &dev)?;
            let want = scaled_dot_product_attention_reference(&q_ref, &k_ref, &v_ref, scale)?;
            let ours = scaled_dot_product_attention(&q, &k, &v, scale)?;
            compare(
                &format!("attention {dtype:?} {bh}x{n}x{d} over {m}"),
                &ours,
                &want,
                dtype,
            )?;
        }
        // Heads merged in the channels, as the attention layers call it.
        let (b, n, m, heads, dh) = (2usize, 256usize, 77usize, 8usize, 40usize);
        let (q, q_ref) = pair(&randn(&[b, n, heads * dh], 1.0)?, dtype, &dev)?;
        let (k, k_ref) = pair(&randn(&[b, m, heads * dh], 1.0)?, dtype, &dev)?;
        let (v, v_ref) = pair(&randn(&[b, m, heads * dh], 1.0)?, dtype, &dev)?;
        let scale = 1.0 / (dh as f64).sqrt();
        let want = multi_head_attention(&q_ref, &k_ref, &v_ref, heads, scale, false)?;
        let ours = multi_head_attention(&q, &k, &v, heads, scale, false)?;
        compare(
            &format!("multi-head attention {dtype:?}"),
            &ours,
            &want,
            dtype,
        )?;
    }
    Ok(())
}

#[test]
fn geglu_matches_generic_ops() -> Result<()> {
    let dev = gpu()?;
    for dtype in DTYPES {
        for shape in [&[2usize, 4096, 2560][..], &[3, 2 * 7]] {
            let (h, h_ref) = pair(&randn(shape, 1.5)?, dtype, &dev)?;
            let want = geglu_reference(&h_ref)?;
            compare(
                &format!("geglu {dtype:?} {shape:?}"),
                &geglu(&h)?,
                &want,
                dtype,
            )?;
        }
    }
    Ok(())
}
