//! The CUDA kernels against the generic ops they replace: GroupNorm(+SiLU) (one block per group
//! and the chunked form for large groups), LayerNorm, the attention softmax and the flash kernel
//! (through the attention entry points and directly), GEGLU, the im2col + cuBLAS and direct
//! convolutions, and the cuBLAS linear layer, in f32, f16 and bf16, on `DIFFUSE_DEVICE` (default
//! `cuda:0`). Built only with the `cuda` feature (Cargo.toml's `required-features`). The
//! reference is the generic-op path on the CPU in f32, fed the same inputs rounded to the tested
//! dtype, so a half-precision result differs from it only by what its own storage rounds.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use diffuse_core::testing::{assert_close, max_abs_diff, to_vec_f64};
use diffuse_models::activations::Activation;
use diffuse_models::attention::{
    flash_attention, multi_head_attention, scaled_dot_product_attention,
    scaled_dot_product_attention_reference,
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
    let shapes: [(&[usize], usize); 5] = [
        (&[2, 320, 64, 64], 32),
        (&[1, 128, 7, 9], 32),
        (&[3, 64, 5], 8),
        (&[2, 1280, 8, 8], 32),
        (&[1, 128, 256, 256], 32),
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
        // The flash kernel itself (the paths above take it only for very large score
        // matrices): split heads, merged heads, a head size padded from 40 to 48, keys past a
        // multiple of 64, and the largest head size.
        if dtype != DType::F32 {
            for (b, n, m, heads, dh) in [
                (4usize, 4096usize, 4096usize, 1usize, 40usize),
                (2, 300, 77, 8, 40),
                (2, 129, 1000, 2, 64),
                (1, 70, 65, 3, 128),
                (3, 5, 7, 1, 9),
            ] {
                let scale = 1.0 / (dh as f64).sqrt();
                let (q, q_ref) = pair(&randn(&[b, n, heads * dh], 1.0)?, dtype, &dev)?;
                let (k, k_ref) = pair(&randn(&[b, m, heads * dh], 1.0)?, dtype, &dev)?;
                let (v, v_ref) = pair(&randn(&[b, m, heads * dh], 1.0)?, dtype, &dev)?;
                let want = multi_head_attention(&q_ref, &k_ref, &v_ref, heads, scale, false)?;
                let ours = flash_attention(&q, &k, &v, heads, scale)?;
                let what = format!("flash attention {dtype:?} {b}x{n}x{heads}x{dh} over {m}");
                compare(&what, &ours, &want, dtype)?;
            }
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

#[test]
fn gemm_convolution_matches_generic_ops() -> Result<()> {
    use candle_nn::Conv2dConfig;
    use diffuse_models::ops::conv::cuda_gemm;
    let dev = gpu()?;
    // (input, weight, padding, stride, dilation, column budget in elements). By GEMM (more
    // than 8 output channels): SD's 3×3 in one batched GEMM, bands of three output rows (the
    // last one short), one image per call, stride 2 on an odd-sized map, a 1×1 straight from
    // the input, a dilated kernel. Direct (at most 8): a non-square kernel, stride 2, dilation,
    // and a model's last layer (320 → 4).
    type Case<'a> = (&'a [usize], &'a [usize], usize, usize, usize, usize);
    let cases: [Case; 10] = [
        (&[2, 64, 32, 32], &[96, 64, 3, 3], 1, 1, 1, 1 << 24),
        (&[1, 16, 13, 11], &[12, 16, 3, 3], 1, 1, 1, 3 * 144 * 11),
        (&[3, 8, 9, 9], &[9, 8, 3, 3], 1, 1, 1, 72 * 81 + 5),
        (&[2, 8, 9, 7], &[10, 8, 3, 3], 1, 2, 1, 1 << 24),
        (&[2, 24, 10, 6], &[12, 24, 1, 1], 0, 1, 1, 1),
        (&[1, 6, 12, 12], &[9, 6, 3, 3], 2, 1, 2, 1 << 24),
        (&[2, 5, 8, 6], &[3, 5, 3, 1], 1, 1, 1, 1 << 24),
        (&[2, 8, 9, 7], &[5, 8, 3, 3], 1, 2, 1, 1 << 24),
        (&[1, 6, 12, 12], &[4, 6, 3, 3], 2, 1, 2, 1 << 24),
        (&[2, 320, 16, 16], &[4, 320, 3, 3], 1, 1, 1, 1 << 24),
    ];
    for dtype in DTYPES {
        for (xs, ws, padding, stride, dilation, budget) in cases {
            let k: usize = ws[1..].iter().product();
            let (x, x_ref) = pair(&randn(xs, 1.0)?, dtype, &dev)?;
            let (w, w_ref) = pair(&randn(ws, 1.0 / (k as f32).sqrt())?, dtype, &dev)?;
            let (b, b_ref) = pair(&randn(&[ws[0]], 0.5)?, dtype, &dev)?;
            let want = x_ref
                .conv2d(&w_ref, padding, stride, dilation, 1)?
                .broadcast_add(&b_ref.reshape((1, ws[0], 1, 1))?)?;
            let cfg = Conv2dConfig {
                padding,
                stride,
                dilation,
                groups: 1,
                cudnn_fwd_algo: None,
            };
            let ours = cuda_gemm(&x, &w, &b, &cfg, budget * dtype.size_in_bytes())?;
            assert_eq!(ours.dims(), want.dims(), "{xs:?} * {ws:?}");
            let what = format!("conv {dtype:?} {xs:?} * {ws:?} pad {padding} stride {stride}");
            compare(&format!("{what} dil {dilation}"), &ours, &want, dtype)?;
        }
    }
    Ok(())
}

#[test]
fn linear_matches_generic_ops() -> Result<()> {
    use diffuse_models::ops::linear::Linear;
    let dev = gpu()?;
    // SD's feed-forward input (batched tokens), a 2-D batch of odd sizes, and a layer without
    // a bias (the attention projections).
    let cases: [(&[usize], usize, bool); 3] = [
        (&[2, 1024, 320], 1280, true),
        (&[7, 13], 5, true),
        (&[2, 77, 64], 96, false),
    ];
    for dtype in DTYPES {
        for (xs, n, with_bias) in cases {
            let k = *xs.last().unwrap();
            let (x, x_ref) = pair(&randn(xs, 1.0)?, dtype, &dev)?;
            let (w, w_ref) = pair(&randn(&[n, k], 1.0 / (k as f32).sqrt())?, dtype, &dev)?;
            let (b, b_ref) = pair(&randn(&[n], 0.5)?, dtype, &dev)?;
            let (b, b_ref) = match with_bias {
                true => (Some(b), Some(b_ref)),
                false => (None, None),
            };
            let want = candle_nn::Linear::new(w_ref, b_ref).forward(&x_ref)?;
            let ours = Linear::from_candle(candle_nn::Linear::new(w, b)).forward(&x)?;
            assert_eq!(ours.dims(), want.dims());
            let what = format!("linear {dtype:?} {xs:?} -> {n} bias {with_bias}");
            compare(&what, &ours, &want, dtype)?;
        }
    }
    Ok(())
}
