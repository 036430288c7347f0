//! The fused CPU kernels of `diffuse_models::ops` against naive references built from generic
//! candle ops: values (f32 and half inputs) and gradients.

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarMap;
use diffuse_core::testing::to_vec_f64;
use diffuse_core::Generator;
use diffuse_models::activations::Activation;
use diffuse_models::attention::{
    causal_attention, causal_attention_reference, scaled_dot_product_attention,
    scaled_dot_product_attention_reference, softmax_attention,
};
use diffuse_models::normalization::{GroupNorm, LayerNorm};
use diffuse_models::ops::autocast_bf16_if;
use diffuse_models::ops::conv::Conv2d;

/// Fails unless `|got − want| ≤ tol · max|want|` everywhere (for empty tensors, equal shapes).
/// NaN-aware: a NaN anywhere in either tensor fails, naming its index (candle's `max` skips NaN
/// unless it is first, so a reduction over the difference would hide one).
fn check_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
    anyhow::ensure!(
        got.dims() == want.dims(),
        "{what}: shape {:?} != {:?}",
        got.dims(),
        want.dims()
    );
    let (g, w) = (to_vec_f64(got)?, to_vec_f64(want)?);
    if let Some(i) = (0..g.len()).find(|&i| g[i].is_nan() || w[i].is_nan()) {
        anyhow::bail!("{what}: element {i} is {}, expected {}", g[i], w[i]);
    }
    let scale = w.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
    let diff = g
        .iter()
        .zip(&w)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    anyhow::ensure!(
        diff <= tol * scale,
        "{what}: max diff {diff} vs max |want| {scale}"
    );
    Ok(())
}

/// Asserts [`check_close`].
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) -> Result<()> {
    check_close(what, got, want, tol as f64)
}

/// The kernels in use follow the build and `DIFFUSE_KERNELS` (`scripts/test` runs this file
/// with the `portable` feature, with `DIFFUSE_KERNELS=portable` and, so that an AVX-512
/// machine tests the AVX2 path too, with `DIFFUSE_KERNELS=avx2`; on a machine with bf16 dot
/// products that run also takes bf16 layers through the f32 tiles).
#[test]
fn kernel_choice_follows_build_and_environment() {
    use diffuse_models::ops::{detected_kernels, kernels, Kernels};
    if cfg!(feature = "portable") || !cfg!(target_arch = "x86_64") {
        assert_eq!(detected_kernels(), Kernels::Portable);
    }
    let asked = std::env::var("DIFFUSE_KERNELS").unwrap_or_default();
    let cap = match asked.as_str() {
        "portable" => Kernels::Portable,
        "avx2" => Kernels::Avx2,
        "avx512" => Kernels::Avx512,
        _ => Kernels::Avx512Bf16,
    };
    assert_eq!(kernels(), cap.min(detected_kernels()));
    eprintln!("kernels: {}", kernels().name());
}

#[test]
fn comparison_sees_nan_anywhere() -> Result<()> {
    let want = Tensor::arange(0f32, 16.0, &Device::Cpu)?;
    for at in [0usize, 5, 15] {
        let mut v = want.to_vec1::<f32>()?;
        v[at] = f32::NAN;
        let got = Tensor::new(v, &Device::Cpu)?;
        let err = check_close("nan", &got, &want, 1e-3).expect_err("a NaN must fail");
        assert!(err.to_string().contains(&format!("element {at}")), "{err}");
    }
    check_close("equal", &want, &want, 0.0)
}

thread_local! {
    // One generator per test (each test runs on its own thread), seeded the same every run:
    // the inputs, and so the results, repeat from run to run (candle's CPU `randn` cannot be
    // seeded; with it the large-score attention case below failed in about 1 run of 20).
    static GENERATOR: std::cell::RefCell<Generator> =
        std::cell::RefCell::new(Generator::manual_seed(20));
}

fn randn(shape: &[usize], std: f32) -> Result<Tensor> {
    let x = GENERATOR.with(|g| g.borrow_mut().randn(shape, &Device::Cpu))?;
    Ok((x * std as f64)?)
}

#[test]
fn attention_matches_reference_f32() -> Result<()> {
    // (batch·heads, query tokens, key tokens, head dim, value dim, score magnitude,
    // tolerance): blocks with remainders, cross-attention over 77 tokens, one query, one key,
    // large scores (online-softmax rescaling), value width ≠ key width. The large scores
    // (about 36 standard deviations, the largest of a row over 100) are each rounded to about
    // 1e-5 in f32, by the kernel and by the reference alike, which moves their weights by as
    // much: 3e-5 there (measured: up to 1.4e-5 over 80 unseeded runs).
    for &(bh, n, m, d, dv, std, tol) in &[
        (3, 130, 130, 40, 40, 1.0, 1e-5),
        (2, 300, 77, 64, 64, 1.0, 1e-5),
        (4, 1, 517, 80, 80, 1.0, 1e-5),
        (2, 65, 1, 8, 8, 1.0, 1e-5),
        (2, 200, 600, 16, 24, 6.0, 3e-5),
    ] {
        let (q, k, v) = (
            randn(&[bh, n, d], std)?,
            randn(&[bh, m, d], std)?,
            randn(&[bh, m, dv], 1.0)?,
        );
        let scale = 1.0 / (d as f64).sqrt();
        let got = scaled_dot_product_attention(&q, &k, &v, scale)?;
        let want = scaled_dot_product_attention_reference(&q, &k, &v, scale)?;
        assert_close(
            &format!("attention {bh}x{n}x{m}x{d}x{dv}"),
            &got,
            &want,
            tol,
        )?;
    }
    Ok(())
}

/// A NaN score makes its row NaN, as in PyTorch (and the reference): the exponential's range
/// clamp must not turn it into a finite weight. A NaN query value: its row; a NaN key value:
/// every row of its head. The other rows still match the reference.
#[test]
fn attention_spreads_a_nan_score_to_its_rows() -> Result<()> {
    let (bh, n, m, d) = (2usize, 150usize, 140usize, 40usize);
    let nan_at = |t: &Tensor, (h, r): (usize, usize)| -> Result<Tensor> {
        let mut v = t.flatten_all()?.to_vec1::<f32>()?;
        v[(h * t.dim(1)? + r) * d + 3] = f32::NAN;
        Ok(Tensor::new(v, &Device::Cpu)?.reshape(t.shape())?)
    };
    let (q, k, v) = (
        randn(&[bh, n, d], 1.0)?,
        randn(&[bh, m, d], 1.0)?,
        randn(&[bh, m, d], 1.0)?,
    );
    let scale = 1.0 / (d as f64).sqrt();
    for (what, q, k, nan_rows) in [
        ("query", nan_at(&q, (1, 130))?, k.clone(), vec![(1, 130)]),
        (
            "key",
            q.clone(),
            nan_at(&k, (0, 135))?,
            (0..n).map(|r| (0, r)).collect(),
        ),
    ] {
        let got = scaled_dot_product_attention(&q, &k, &v, scale)?;
        let want = scaled_dot_product_attention_reference(&q, &k, &v, scale)?;
        let (g, w) = (got.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
        for h in 0..bh {
            for r in 0..n {
                let nan_row = nan_rows.contains(&(h, r));
                for j in 0..d {
                    let (g, w) = (g[h][r][j], w[h][r][j]);
                    assert_eq!(w.is_nan(), nan_row, "{what}: reference at {h},{r},{j}");
                    if nan_row {
                        assert!(g.is_nan(), "{what}: {h},{r},{j} is {g}, expected NaN");
                    } else {
                        assert!((g - w).abs() <= 1e-5, "{what}: {h},{r},{j}: {g} vs {w}");
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn causal_attention_matches_reference() -> Result<()> {
    // CLIP's 77 tokens; several query and key blocks (rows past the first key block).
    for &(bh, n, d) in &[(4, 77, 64), (2, 300, 40), (1, 1, 8)] {
        let (q, k, v) = (
            randn(&[bh, n, d], 1.0)?,
            randn(&[bh, n, d], 1.0)?,
            randn(&[bh, n, d], 1.0)?,
        );
        let scale = 1.0 / (d as f64).sqrt();
        let got = causal_attention(&q, &k, &v, scale)?;
        let want = causal_attention_reference(&q, &k, &v, scale)?;
        assert_close(&format!("causal attention {bh}x{n}x{d}"), &got, &want, 1e-5)?;
    }
    // The gradients too: small heads (plain loops) and bigger ones (the blocked pass).
    for shape in [
        (2, 150, 150, 16, 16),
        (1, 300, 300, 16, 16),
        (2, 333, 333, 40, 40),
    ] {
        assert_attention_gradients(
            "causal",
            shape,
            causal_attention,
            causal_attention_reference,
        )?;
    }
    Ok(())
}

type AttentionFn = fn(&Tensor, &Tensor, &Tensor, f64) -> candle_core::Result<Tensor>;

/// Gradients of a weighted sum of `f`'s output with respect to q, k and v, against `reference`'s,
/// for shapes `(batch·heads, queries, keys, d, dv)`.
fn assert_attention_gradients(
    what: &str,
    (bh, n, m, d, dv): (usize, usize, usize, usize, usize),
    f: AttentionFn,
    reference: AttentionFn,
) -> Result<()> {
    let q = Var::from_tensor(&randn(&[bh, n, d], 1.0)?)?;
    let k = Var::from_tensor(&randn(&[bh, m, d], 1.0)?)?;
    let v = Var::from_tensor(&randn(&[bh, m, dv], 1.0)?)?;
    let weights = randn(&[bh, n, dv], 1.0)?;
    let grads = |f: AttentionFn| -> Result<Vec<Tensor>> {
        let loss = (f(&q, &k, &v, 0.25)? * &weights)?.sum_all()?;
        let g = loss.backward()?;
        Ok([&q, &k, &v]
            .iter()
            .map(|x| g.get(x.as_tensor()).expect("gradient").clone())
            .collect())
    };
    let (got, want) = (grads(f)?, grads(reference)?);
    for ((name, g), w) in ["q", "k", "v"].iter().zip(&got).zip(&want) {
        assert_close(&format!("{what} d{name}"), g, w, 1e-4)?;
    }
    Ok(())
}

/// The two-product attention the CUDA path runs (its scaled softmax has a CPU copy), against
/// the reference: the scale folded into the softmax in f32, into q for half inputs.
#[test]
fn softmax_attention_matches_reference() -> Result<()> {
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 5e-3)] {
        for (n, m, d) in [(100usize, 77usize, 40usize), (5, 300, 9)] {
            let q = randn(&[3, n, d], 1.0)?.to_dtype(dtype)?;
            let k = randn(&[3, m, d], 1.0)?.to_dtype(dtype)?;
            let v = randn(&[3, m, d], 1.0)?.to_dtype(dtype)?;
            let got = softmax_attention(&q, &k, &v, 0.3)?;
            assert_eq!(got.dtype(), dtype);
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            let want = scaled_dot_product_attention_reference(&f(&q)?, &f(&k)?, &f(&v)?, 0.3)?;
            assert_close(
                &format!("softmax attention {dtype:?} {n}x{m}x{d}"),
                &got,
                &want,
                tol,
            )?;
        }
    }
    Ok(())
}

#[test]
fn attention_half_inputs_are_computed_in_f32() -> Result<()> {
    for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 1e-2)] {
        let q = randn(&[2, 100, 40], 1.0)?.to_dtype(dtype)?;
        let k = randn(&[2, 77, 40], 1.0)?.to_dtype(dtype)?;
        let v = randn(&[2, 77, 40], 1.0)?.to_dtype(dtype)?;
        let got = scaled_dot_product_attention(&q, &k, &v, 0.2)?;
        assert_eq!(got.dtype(), dtype);
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let want = scaled_dot_product_attention_reference(&f(&q)?, &f(&k)?, &f(&v)?, 0.2)?;
        assert_close(&format!("attention {dtype:?}"), &got, &want, tol)?;
    }
    Ok(())
}

#[test]
fn attention_gradients_match_reference() -> Result<()> {
    // Small heads (plain loops; one query row) and bigger ones (the blocked pass: partial
    // query and key blocks, one head split into runs of keys, widths that are not multiples
    // of a panel).
    for shape in [
        (3, 70, 90, 16, 12),
        (2, 1, 5, 8, 8),
        (1, 300, 200, 16, 24),
        (2, 333, 270, 40, 40),
        (1, 260, 520, 20, 36),
    ] {
        assert_attention_gradients(
            "attention",
            shape,
            scaled_dot_product_attention,
            scaled_dot_product_attention_reference,
        )?;
    }
    Ok(())
}

/// Affine parameters drawn at random instead of the 1/0 initialisation.
fn randomise(varmap: &VarMap) -> Result<()> {
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let std = if name.ends_with("weight") { 0.5 } else { 1.0 };
        var.set(&(randn(var.dims(), std)? + 1.0)?)?;
    }
    Ok(())
}

fn varmap_vb(varmap: &VarMap) -> candle_nn::VarBuilder<'static> {
    candle_nn::VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu)
}

/// A GroupNorm with random affine parameters.
fn random_group_norm(varmap: &VarMap, groups: usize, channels: usize) -> Result<GroupNorm> {
    let gn = GroupNorm::new(varmap_vb(varmap), groups, channels, 1e-5)?;
    randomise(varmap)?;
    Ok(gn)
}

#[test]
fn layer_norm_matches_reference() -> Result<()> {
    let varmap = VarMap::new();
    let ln = LayerNorm::new(varmap_vb(&varmap), 24, 1e-5, true)?;
    randomise(&varmap)?;
    // Without affine parameters (the diffusion transformers' norms).
    let plain = LayerNorm::new(varmap_vb(&VarMap::new()), 24, 1e-6, false)?;
    for shape in [&[2, 37, 24][..], &[5, 24][..]] {
        let x = (randn(shape, 2.0)? + 3.0)?;
        assert_close(
            &format!("layer norm {shape:?}"),
            &ln.forward(&x)?,
            &ln.forward_reference(&x)?,
            1e-5,
        )?;
        assert_close(
            &format!("layer norm without affine {shape:?}"),
            &plain.forward(&x)?,
            &plain.forward_reference(&x)?,
            1e-5,
        )?;
        let x16 = x.to_dtype(DType::F16)?;
        let want = ln.forward_reference(&x16.to_dtype(DType::F32)?)?;
        assert_close(
            &format!("layer norm f16 {shape:?}"),
            &ln.forward(&x16)?,
            &want,
            2e-3,
        )?;
    }
    let x = Var::from_tensor(&randn(&[3, 7, 24], 1.0)?)?;
    let weights = randn(&[3, 7, 24], 1.0)?;
    let params: Vec<Tensor> = varmap
        .all_vars()
        .iter()
        .map(|v| v.as_tensor().clone())
        .collect();
    let grads = |y: Tensor| -> Result<Vec<Tensor>> {
        let g = (y * &weights)?.sum_all()?.backward()?;
        Ok(std::iter::once(x.as_tensor())
            .chain(&params)
            .map(|t| g.get(t).expect("gradient").clone())
            .collect())
    };
    for (i, (g, w)) in grads(ln.forward(&x)?)?
        .iter()
        .zip(&grads(ln.forward_reference(&x)?)?)
        .enumerate()
    {
        assert_close(&format!("layer norm gradient {i}"), g, w, 1e-4)?;
    }
    Ok(())
}

#[test]
fn group_norm_matches_reference() -> Result<()> {
    let varmap = VarMap::new();
    let gn = random_group_norm(&varmap, 4, 12)?;
    // Feature maps, token sequences, an offset mean (cancellation in the variance).
    for (shape, shift) in [
        (&[2, 12, 9, 7][..], 0.0),
        (&[3, 12, 33][..], 0.0),
        (&[1, 12, 16, 16][..], 100.0),
    ] {
        let x = (randn(shape, 2.0)? + shift)?;
        let want = gn.forward_reference(&x)?;
        assert_close(
            &format!("group norm {shape:?}"),
            &gn.forward(&x)?,
            &want,
            1e-5,
        )?;
        let got = gn.forward_act(&x, Activation::Silu)?;
        assert_close(
            &format!("group norm + silu {shape:?}"),
            &got,
            &want.silu()?,
            1e-5,
        )?;
        let x16 = x.to_dtype(DType::F16)?;
        let got = gn.forward_act(&x16, Activation::Silu)?;
        assert_eq!(got.dtype(), DType::F16);
        let want = gn.forward_reference(&x16.to_dtype(DType::F32)?)?.silu()?;
        assert_close(
            &format!("group norm + silu f16 {shape:?}"),
            &got,
            &want,
            2e-3,
        )?;
    }
    Ok(())
}

#[test]
fn group_norm_gradients_match_reference() -> Result<()> {
    // One channel per group, several, and a 32-group ResNet-like shape.
    for (groups, shape) in [
        (3, [2, 6, 5, 4]),
        (6, [3, 6, 3, 7]),
        (2, [2, 8, 1, 9]),
        (32, [2, 64, 8, 8]),
    ] {
        group_norm_gradients_case(groups, &shape)?;
    }
    Ok(())
}

fn group_norm_gradients_case(groups: usize, shape: &[usize]) -> Result<()> {
    let varmap = VarMap::new();
    let gn = random_group_norm(&varmap, groups, shape[1])?;
    let x = Var::from_tensor(&randn(shape, 1.5)?)?;
    let weights = randn(shape, 1.0)?;
    let params: Vec<Tensor> = varmap
        .all_vars()
        .iter()
        .map(|v| v.as_tensor().clone())
        .collect();
    for silu in [false, true] {
        let grads = |y: Tensor| -> Result<Vec<Tensor>> {
            let g = (y * &weights)?.sum_all()?.backward()?;
            Ok(std::iter::once(x.as_tensor())
                .chain(&params)
                .map(|t| g.get(t).expect("gradient").clone())
                .collect())
        };
        let (got, want) = if silu {
            (
                gn.forward_act(&x, Activation::Silu)?,
                gn.forward_reference(&x)?.silu()?,
            )
        } else {
            (gn.forward(&x)?, gn.forward_reference(&x)?)
        };
        for (i, (g, w)) in grads(got)?.iter().zip(&grads(want)?).enumerate() {
            assert_close(
                &format!("group norm {shape:?}/{groups} (silu {silu}) gradient {i}"),
                g,
                w,
                1e-4,
            )?;
        }
    }
    Ok(())
}

/// A convolution with random weights and bias; frozen (plain tensors) or training variables.
fn random_conv_strided(
    cin: usize,
    cout: usize,
    k: usize,
    pad: usize,
    stride: usize,
    frozen: bool,
) -> Result<(Conv2d, VarMap)> {
    let cfg = candle_nn::Conv2dConfig {
        padding: pad,
        stride,
        ..Default::default()
    };
    let varmap = VarMap::new();
    let conv = if frozen {
        let tensors = std::collections::HashMap::from([
            ("weight".to_string(), randn(&[cout, cin, k, k], 0.2)?),
            ("bias".to_string(), randn(&[cout], 1.0)?),
        ]);
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        Conv2d::new(cin, cout, k, cfg, vb)?
    } else {
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let conv = Conv2d::new(cin, cout, k, cfg, vb)?;
        for var in varmap.all_vars() {
            var.set(&randn(var.dims(), 0.2)?)?;
        }
        conv
    };
    Ok((conv, varmap))
}

#[test]
fn conv_matches_candle() -> Result<()> {
    // 3×3 maps large enough for cached-kernel Winograd (partial edge tiles, one channel,
    // channel counts off the 8-lane and 16-column multiples, twice through the cache), small
    // maps (per-call kernel transform, more input channels than one block, none at all, wide
    // tasks; down to SD's 8×8 level, 4 tiles per image), tiny ones (im2col + GEMM), stride 2
    // (even and odd sizes; im2col + GEMM when frozen, candle's path when trainable), 1×1
    // convolutions.
    for &(n, cin, cout, h, w, k, frozen, stride) in &[
        (2, 8, 12, 63, 61, 3, true, 1),
        (2, 19, 36, 65, 64, 3, true, 1),
        (1, 1, 3, 64, 64, 3, true, 1),
        (1, 5, 7, 50, 50, 3, false, 1),
        (2, 4, 6, 10, 10, 3, true, 1),
        (1, 130, 20, 12, 11, 3, true, 1),
        (1, 130, 131, 12, 11, 3, true, 1),
        (2, 130, 131, 8, 7, 3, true, 1),
        (1, 400, 41, 8, 8, 3, true, 1),
        // Enough tiles (70) for four panels of output channels per task: two blocks of input
        // channels, a last task of three channels.
        (2, 400, 131, 20, 28, 3, true, 1),
        (1, 130, 131, 4, 4, 3, true, 1),
        (2, 0, 5, 9, 9, 3, true, 1),
        (1, 0, 3, 48, 48, 3, true, 1),
        (1, 3, 4, 6, 6, 3, true, 1),
        (1, 3, 5, 7, 13, 3, false, 1),
        (2, 6, 5, 11, 9, 3, true, 2),
        (1, 3, 4, 8, 8, 3, true, 2),
        (1, 3, 4, 8, 8, 3, false, 2),
        (2, 12, 20, 9, 11, 1, true, 1),
        (2, 0, 5, 6, 7, 1, true, 1),
        (2, 3, 0, 6, 7, 1, true, 1),
        (2, 3, 0, 9, 9, 3, true, 2),
        // Stride 2 over enough output pixels that the packed im2col columns come in two
        // blocks (64 channels: 3,632 pixels per block of 2 Mi values; 4,096 here).
        (1, 64, 5, 128, 128, 3, true, 2),
    ] {
        let (conv, _) = random_conv_strided(cin, cout, k, k / 2, stride, frozen)?;
        for _ in 0..2 {
            let x = randn(&[n, cin, h, w], 1.0)?;
            let want = conv.forward_reference(&x)?;
            let what = format!("conv{k}x{k} {n}x{cin}x{h}x{w} -> {cout}");
            assert_close(&what, &conv.forward(&x)?, &want, 1e-4)?;
            // Half precision (computed in f32; bf16 keeps 8 bits of mantissa). An empty
            // output takes candle's convolution, whose CPU matmul has no bf16.
            let bf16 = (cout > 0).then_some((DType::BF16, 4e-2));
            for (dtype, tol) in std::iter::once((DType::F16, 1e-2)).chain(bf16) {
                let half = Conv2d::from_candle(candle_nn::Conv2d::new(
                    conv.weight().to_dtype(dtype)?,
                    Some(conv.bias().expect("bias").to_dtype(dtype)?),
                    candle_nn::Conv2dConfig {
                        padding: k / 2,
                        stride,
                        ..Default::default()
                    },
                ));
                let got = half.forward(&x.to_dtype(dtype)?)?;
                assert_eq!(got.dtype(), dtype);
                assert_close(&format!("{what} {dtype:?}"), &got, &want, tol)?;
            }
        }
    }
    Ok(())
}

/// candle's convolution of `x`; for stride 2 (whose odd sizes candle's backward gets wrong)
/// every other row and column of the stride-1 convolution with the same weights.
fn strided_reference(conv: &Conv2d, stride: usize, x: &Tensor) -> Result<Tensor> {
    if stride == 1 {
        return Ok(conv.forward_reference(x)?);
    }
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let dense = Conv2d::from_candle(candle_nn::Conv2d::new(
        conv.weight().clone(),
        conv.bias().cloned(),
        cfg,
    ))
    .forward_reference(x)?;
    let every_other =
        |len: usize| Tensor::arange_step(0u32, len as u32, stride as u32, &Device::Cpu);
    let (_, _, h, w) = dense.dims4()?;
    Ok(dense
        .index_select(&every_other(h)?, 2)?
        .index_select(&every_other(w)?, 3)?)
}

/// Our convolutions' outputs and gradients are candle's ([`conv_gradients_case`]).
#[test]
fn conv_gradients_match_candle() -> Result<()> {
    for case in CONV_GRADIENT_CASES {
        conv_gradients_case(case, &[false])?;
    }
    Ok(())
}

/// Under bf16 autocast (how `--mixed-precision bf16` trains on the CPU) every path's output
/// and gradients stay near candle's f32 ones ([`conv_gradients_case`]). On a CPU with bf16 dot
/// products the weight gradient (the 4-d one: the variables come in no set order), a product
/// on every path, is not our f32 one (it did run in bf16); elsewhere autocast changes
/// nothing, bit for bit.
#[test]
fn conv_gradients_under_bf16_autocast_stay_near_candle() -> Result<()> {
    use diffuse_models::ops::{kernels, Kernels};
    let bf16 = kernels() == Kernels::Avx512Bf16;
    for case in CONV_GRADIENT_CASES {
        let runs = conv_gradients_case(case, &[false, true])?;
        for (i, (a, b)) in runs[1].iter().zip(&runs[0]).enumerate() {
            let same = to_vec_f64(a)? == to_vec_f64(b)?;
            if !bf16 {
                assert!(same, "{case:?} output/gradient {i}: autocast changed it");
            } else if i >= 2 && a.rank() == 4 {
                assert!(!same, "{case:?}: autocast gave the f32 weight gradient");
            }
        }
    }
    Ok(())
}

/// Linear layers and attention under bf16 autocast (`--mixed-precision bf16`, LoRA training
/// included): outputs and input gradients near the f32 ones: within 1e-2 of their largest
/// value for linear layers, 3e-2 for attention, whose bf16 probabilities and score gradients
/// enter sums that nearly cancel (over 40 random draws of this case: at most 0.8% for the
/// output, 1.7% for the gradients). On a CPU with bf16 dot products the products that run in
/// bf16 (the outputs; the input gradient of a linear layer over 256 rows; attention's
/// gradients) are not the f32 ones; every other value, and everything on other CPUs, is equal
/// bit for bit.
#[test]
fn linear_and_attention_under_bf16_autocast_stay_near_f32() -> Result<()> {
    use diffuse_models::ops::linear::Linear;
    use diffuse_models::ops::{kernels, Kernels};
    let bf16 = kernels() == Kernels::Avx512Bf16;
    // `runs[on]`: the values of the f32 run and of the autocast one; `in_bf16[i]`: whether
    // value `i` is a bf16 product under autocast.
    let check = |what: &str, runs: [Vec<Tensor>; 2], in_bf16: &[bool], tol: f32| -> Result<()> {
        for (i, (a, b)) in runs[1].iter().zip(&runs[0]).enumerate() {
            assert_close(&format!("{what} value {i} under autocast"), a, b, tol)?;
            let same = to_vec_f64(a)? == to_vec_f64(b)?;
            assert_eq!(
                same,
                !(bf16 && in_bf16[i]),
                "{what} value {i}: equal {same}"
            );
        }
        Ok(())
    };
    // The packed product (over 256 rows) and the transposed one.
    for (rows, k, n, dx_in_bf16) in [(600, 40, 33, true), (77, 24, 50, false)] {
        let layer = Linear::new(randn(&[n, k], 0.1)?, Some(randn(&[n], 1.0)?));
        let x = Var::from_tensor(&randn(&[rows, k], 1.0)?)?;
        let weights = randn(&[rows, n], 1.0)?;
        let run = |on| {
            autocast_bf16_if(on, || -> Result<Vec<Tensor>> {
                let y = layer.forward(&x)?;
                let g = (&y * &weights)?.sum_all()?.backward()?;
                Ok(vec![y, g.get(&x).expect("the input's gradient").clone()])
            })
        };
        let what = format!("linear {rows}x{k} -> {n}");
        check(&what, [run(false)?, run(true)?], &[true, dx_in_bf16], 1e-2)?;
    }
    // Heads big enough for the blocked backward pass: the output and the three gradients.
    let q = Var::from_tensor(&randn(&[2, 300, 40], 1.0)?)?;
    let k = Var::from_tensor(&randn(&[2, 200, 40], 1.0)?)?;
    let v = Var::from_tensor(&randn(&[2, 200, 24], 1.0)?)?;
    let weights = randn(&[2, 300, 24], 1.0)?;
    let run = |on| {
        autocast_bf16_if(on, || -> Result<Vec<Tensor>> {
            let o = scaled_dot_product_attention(&q, &k, &v, 0.2)?;
            let g = (&o * &weights)?.sum_all()?.backward()?;
            let grad = |x: &Var| g.get(x).expect("gradient").clone();
            Ok(vec![o, grad(&q), grad(&k), grad(&v)])
        })
    };
    check("attention", [run(false)?, run(true)?], &[true; 4], 3e-2)
}

/// Convolutions whose gradients the tests check, `(kernel, stride, n, cin, cout, h)`:
/// Winograd with its own backward (partial edge tiles, one input channel, more inputs than
/// outputs; a map of over 256 tiles, whose kernels are transformed whole; a small map with
/// many channels, whose kernels are transformed per block, by tasks of four panels on 84
/// tiles), a tiny map (im2col + GEMM, the same backward), stride 2 (odd and even sizes; im2col
/// + GEMM and its adjoint), 1×1.
const CONV_GRADIENT_CASES: [(usize, usize, usize, usize, usize, usize); 11] = [
    (3, 1, 1, 3, 17, 64),
    (3, 1, 2, 3, 5, 48),
    (3, 1, 3, 1, 4, 37),
    (3, 1, 2, 9, 2, 30),
    (3, 1, 1, 400, 390, 12),
    (3, 1, 2, 130, 131, 24),
    (3, 1, 2, 3, 5, 6),
    (3, 2, 2, 6, 5, 11),
    (3, 2, 1, 3, 4, 8),
    (1, 1, 2, 3, 5, 7),
    (1, 1, 3, 12, 20, 9),
];

/// One random convolution and input of a case, run once per entry of `autocast` (f32, or
/// under bf16 autocast): its output and gradients (input, weight, bias) are checked against
/// candle's, within 1e-4 of the largest value in f32 and 1e-2 under autocast (8 bits of
/// mantissa), and a layer fed
/// data must give the same weight gradients and no input gradient. Returns each run's output
/// and gradients.
fn conv_gradients_case(
    (k, stride, n, cin, cout, h): (usize, usize, usize, usize, usize, usize),
    autocast: &[bool],
) -> Result<Vec<Vec<Tensor>>> {
    let (conv, varmap) = random_conv_strided(cin, cout, k, k / 2, stride, false)?;
    let x = Var::from_tensor(&randn(&[n, cin, h, h + 3], 1.0)?)?;
    let want_y = strided_reference(&conv, stride, &x)?;
    let weights = randn(want_y.dims(), 1.0)?;
    let params: Vec<Tensor> = varmap
        .all_vars()
        .iter()
        .map(|v| v.as_tensor().clone())
        .collect();
    let outputs = |y: Tensor| -> Result<Vec<Tensor>> {
        let g = (&y * &weights)?.sum_all()?.backward()?;
        let grads = std::iter::once(x.as_tensor())
            .chain(&params)
            .map(|t| g.get(t).expect("gradient").clone());
        Ok(std::iter::once(y).chain(grads).collect())
    };
    let want = outputs(want_y)?;
    let data = x.as_tensor().detach();
    let mut runs = Vec::new();
    for &on in autocast {
        let (tol, mode) = match on {
            true => (1e-2, ", bf16 autocast"),
            false => (1e-4, ""),
        };
        let what = format!("conv{k}x{k}/{stride} {n}x{cin}x{h} -> {cout}{mode}");
        let got = autocast_bf16_if(on, || outputs(conv.forward(&x)?))?;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            check_close(&format!("{what}: output/gradient {i}"), g, w, tol)?;
        }
        // The first layer's input is data: no gradient for it, the same ones for the weights.
        let g = autocast_bf16_if(on, || {
            (conv.forward(&data)? * &weights)?.sum_all()?.backward()
        })?;
        assert!(g.get(&data).is_none(), "data got a gradient");
        for (i, (p, w)) in params.iter().zip(&want[2..]).enumerate() {
            let grad = g.get(p).expect("gradient");
            check_close(&format!("{what} on data: gradient {i}"), grad, w, tol)?;
        }
        runs.push(got);
    }
    Ok(runs)
}

/// Frozen layers under a tracked input (adapter training): the fast paths' backward gives the
/// input's gradient only, equal to candle's; the frozen weights get none.
#[test]
fn frozen_layers_give_the_input_gradient_of_candle() -> Result<()> {
    use diffuse_models::ops::linear::Linear;
    fn input_grad(y: Tensor, x: &Var, weights: &Tensor, frozen: &[&Tensor]) -> Result<Tensor> {
        let g = (y * weights)?.sum_all()?.backward()?;
        for w in frozen {
            assert!(g.get(w).is_none(), "a frozen weight got a gradient");
        }
        Ok(g.get(x.as_tensor()).expect("the input's gradient").clone())
    }
    // Winograd (large and small maps), im2col, stride 2, 1×1.
    for (k, stride, n, cin, cout, h) in [
        (3, 1, 1, 18, 3, 64),
        (3, 1, 2, 3, 5, 48),
        (3, 1, 2, 9, 2, 30),
        (3, 1, 2, 3, 5, 6),
        (3, 2, 2, 4, 3, 9),
        (1, 1, 2, 3, 5, 7),
    ] {
        let (conv, _) = random_conv_strided(cin, cout, k, k / 2, stride, true)?;
        let x = Var::from_tensor(&randn(&[n, cin, h, h + 3], 1.0)?)?;
        let weights = randn(conv.forward_reference(&x)?.dims(), 1.0)?;
        let got = input_grad(conv.forward(&x)?, &x, &weights, &[])?;
        let want = {
            let y = strided_reference(&conv, stride, &x)?;
            let g = (y * &weights)?.sum_all()?.backward()?;
            g.get(x.as_tensor()).expect("the input's gradient").clone()
        };
        assert_close(
            &format!("frozen conv{k}x{k}/{stride} {cin}->{cout} {h}"),
            &got,
            &want,
            1e-4,
        )?;
    }
    for (shape, out) in [(vec![2, 300, 40], 33), (vec![2, 77, 24], 20)] {
        let k = *shape.last().unwrap();
        let (w, b) = (randn(&[out, k], 0.1)?, randn(&[out], 1.0)?);
        for bias in [Some(b.clone()), None] {
            let layer = Linear::new(w.clone(), bias.clone());
            let x = Var::from_tensor(&randn(&shape, 1.0)?)?;
            let mut out_shape = shape.clone();
            *out_shape.last_mut().unwrap() = out;
            let weights = randn(&out_shape, 1.0)?;
            let frozen: Vec<&Tensor> = std::iter::once(&w).chain(bias.as_ref()).collect();
            let got = input_grad(layer.forward(&x)?, &x, &weights, &frozen)?;
            let want = input_grad(layer.forward_reference(&x)?, &x, &weights, &[])?;
            assert_close(
                &format!("frozen linear {shape:?} -> {out}"),
                &got,
                &want,
                1e-4,
            )?;
        }
    }
    Ok(())
}

/// A linear layer whose weights train: the fast path's gradients (input, weight, bias) equal
/// candle's, and data (an untracked input) gets none there.
#[test]
fn linear_gradients_match_reference() -> Result<()> {
    use diffuse_models::ops::linear::Linear;
    // The packed product (over 512 rows) and the transposed one (few rows), with and
    // without a bias.
    for (shape, out, bias) in [
        (vec![2, 300, 40], 33, true),
        (vec![1100, 24], 20, false),
        (vec![2, 77, 24], 50, true),
    ] {
        let k = *shape.last().unwrap();
        let w = Var::from_tensor(&randn(&[out, k], 0.1)?)?;
        let b = bias
            .then(|| -> Result<Var> { Ok(Var::from_tensor(&randn(&[out], 1.0)?)?) })
            .transpose()?;
        let layer = Linear::new(
            w.as_tensor().clone(),
            b.as_ref().map(|b| b.as_tensor().clone()),
        );
        let mut out_shape = shape.clone();
        *out_shape.last_mut().unwrap() = out;
        let weights = randn(&out_shape, 1.0)?;
        let params: Vec<&Tensor> = std::iter::once(w.as_tensor())
            .chain(b.as_ref().map(|b| b.as_tensor()))
            .collect();
        for tracked in [true, false] {
            let x = Var::from_tensor(&randn(&shape, 1.0)?)?;
            let x = match tracked {
                true => x.as_tensor().clone(),
                false => x.as_tensor().detach(),
            };
            let grads = |y: Tensor| -> Result<Vec<Option<Tensor>>> {
                let g = (y * &weights)?.sum_all()?.backward()?;
                Ok(std::iter::once(&x)
                    .chain(params.iter().copied())
                    .map(|t| g.get(t).cloned())
                    .collect())
            };
            let got = grads(layer.forward(&x)?)?;
            let want = grads(layer.forward_reference(&x)?)?;
            // (candle's matmul, the portable path, gives data a gradient too.)
            let fast = diffuse_models::ops::kernels() != diffuse_models::ops::Kernels::Portable;
            if tracked || fast {
                assert_eq!(got[0].is_some(), tracked, "input gradient of {shape:?}");
            }
            for (i, (g, w)) in got
                .iter()
                .zip(&want)
                .enumerate()
                .skip(usize::from(!tracked))
            {
                let (g, w) = (g.as_ref().expect("gradient"), w.as_ref().expect("gradient"));
                assert_close(
                    &format!("linear {shape:?} -> {out} gradient {i}"),
                    g,
                    w,
                    1e-4,
                )?;
            }
        }
    }
    Ok(())
}

type UnaryOp = fn(&Tensor) -> candle_core::Result<Tensor>;

/// The gradient of `sum(f(x) ⊙ weights)` with respect to `x`.
fn weighted_grad(f: UnaryOp, x: &Var, weights: &Tensor) -> Result<Tensor> {
    let loss = (f(x.as_tensor())? * weights)?.sum_all()?;
    Ok(loss
        .backward()?
        .get(x.as_tensor())
        .expect("gradient")
        .clone())
}

#[test]
fn geglu_matches_reference_and_has_gradients() -> Result<()> {
    use diffuse_models::ops::geglu::{geglu, geglu_reference};
    // Values from −6 to 6 cover erf's tails; odd row lengths cover the SIMD remainder.
    for shape in [[2usize, 33, 2 * 77], [1, 5, 2 * 1280]] {
        let h = randn(&shape, 2.5)?;
        assert_close("geglu f32", &geglu(&h)?, &geglu_reference(&h)?, 2e-6)?;
        let half = h.to_dtype(DType::F16)?;
        assert_close(
            "geglu f16",
            &geglu(&half)?,
            &geglu_reference(&half.to_dtype(DType::F32)?)?,
            2e-3,
        )?;
    }
    let h = Var::from_tensor(&randn(&[3, 7, 2 * 19], 2.0)?)?;
    let weights = randn(&[3, 7, 19], 1.0)?;
    let grad = |f| weighted_grad(f, &h, &weights);
    assert_close("dgeglu", &grad(geglu)?, &grad(geglu_reference)?, 1e-5)?;
    assert!(geglu(&randn(&[2, 3], 1.0)?).is_err(), "odd last dimension");
    Ok(())
}

#[test]
fn linear_matches_reference() -> Result<()> {
    use diffuse_models::ops::linear::Linear;
    // (input shape, out features, bias): the weight packed (over 256 rows, with column and
    // row remainders and rank 3) and the transposed product over few rows (154, and 2 like a
    // time embedding).
    for (shape, out, bias) in [
        (vec![1100, 40], 33, true),
        (vec![2, 515, 64], 48, false),
        (vec![300, 50], 70, true),
        (vec![2, 77, 24], 200, true),
        (vec![2, 640], 96, true),
        (vec![1, 1, 300], 1000, false),
        (vec![1030, 300], 320, true),
        (vec![3, 0], 5, true),
    ] {
        let k = *shape.last().unwrap();
        let x = randn(&shape, 1.0)?;
        let w = randn(&[out, k], 0.1)?;
        let b = bias.then(|| randn(&[out], 1.0)).transpose()?;
        let layer = Linear::new(w, b);
        let got = layer.forward(&x)?;
        let want = layer.forward_reference(&x)?;
        assert_close(&format!("linear {shape:?} -> {out}"), &got, &want, 1e-5)?;
        // A transposed (non-contiguous) input.
        let xt = x.t()?.contiguous()?.t()?;
        assert_close(
            &format!("linear {shape:?}, strided input"),
            &layer.forward(&xt)?,
            &want,
            1e-5,
        )?;
        // Weights kept in bf16/f16 under f32 activations compute in f32: the same as the f32
        // layer whose weights are the half values, on the packed, transposed and
        // one-dot-per-output paths and on candle's (a tracked input).
        for dtype in [DType::BF16, DType::F16] {
            let half = Linear::new(
                layer.weight().to_dtype(dtype)?,
                layer.bias().map(|b| b.to_dtype(dtype)).transpose()?,
            );
            let widened = Linear::new(
                half.weight().to_dtype(DType::F32)?,
                half.bias().map(|b| b.to_dtype(DType::F32)).transpose()?,
            );
            let want = widened.forward_reference(&x)?;
            let got = half.forward(&x)?;
            assert_eq!(got.dtype(), DType::F32);
            assert_close(
                &format!("linear {dtype:?} weights {shape:?}"),
                &got,
                &want,
                1e-5,
            )?;
            let tracked = Var::from_tensor(&x)?;
            let got = half.forward(tracked.as_tensor())?;
            assert_close(
                &format!("linear {dtype:?} weights, tracked {shape:?}"),
                &got,
                &want,
                1e-5,
            )?;
        }
        // A bf16 layer under bf16 activations (inference at `--dtype bf16`): bf16 products
        // (AVX512-BF16 where the CPU has it, f32 ones elsewhere), the output rounded to bf16
        // (2⁻⁹ relative at most), on the packed, transposed and one-dot-per-output paths.
        let bf16 = |t: &Tensor| t.to_dtype(DType::BF16);
        let half = Linear::new(bf16(layer.weight())?, layer.bias().map(bf16).transpose()?);
        let xh = bf16(&x)?;
        let got = half.forward(&xh)?;
        assert_eq!(got.dtype(), DType::BF16);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let widened = Linear::new(f32(half.weight())?, half.bias().map(f32).transpose()?);
        let want = widened.forward_reference(&f32(&xh)?)?;
        assert_close(&format!("linear bf16 {shape:?}"), &f32(&got)?, &want, 4e-3)?;
    }
    Ok(())
}

#[test]
fn activations_match_reference_and_have_gradients() -> Result<()> {
    use diffuse_models::ops::activation::{
        gelu, gelu_reference, gelu_tanh, gelu_tanh_reference, quick_gelu, quick_gelu_reference,
    };
    let ops: [(&str, UnaryOp, UnaryOp); 3] = [
        ("quick_gelu", quick_gelu, quick_gelu_reference),
        ("gelu", gelu, gelu_reference),
        ("gelu_tanh", gelu_tanh, gelu_tanh_reference),
    ];
    for (name, op, reference) in ops {
        // Values out to ±25 reach the saturated tails; 40,003 values span several parallel
        // chunks and end in a SIMD remainder.
        for shape in [[2usize, 77, 3072], [1, 1, 40_003]] {
            let x = randn(&shape, 10.0)?;
            assert_close(name, &op(&x)?, &reference(&x)?, 2e-6)?;
            let half = x.to_dtype(DType::F16)?;
            assert_close(
                &format!("{name} f16"),
                &op(&half)?,
                &reference(&half.to_dtype(DType::F32)?)?,
                2e-3,
            )?;
        }
        let x = Var::from_tensor(&randn(&[3, 7, 19], 3.0)?)?;
        let weights = randn(&[3, 7, 19], 1.0)?;
        let grad = |f| weighted_grad(f, &x, &weights);
        assert_close(&format!("d{name}"), &grad(op)?, &grad(reference)?, 1e-5)?;
    }
    Ok(())
}

/// The heads-in-place attention against splitting the heads out, the reference attention and
/// merging them back: cross- and self-attention, value width unlike the key width, query
/// counts that leave a partial block, causal, half inputs, and gradients (which take the
/// split path).
#[test]
fn multi_head_attention_matches_split_heads() -> Result<()> {
    use diffuse_models::attention::multi_head_attention;
    let split = |t: &Tensor, h: usize| -> Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        Ok(t.reshape((b, n, h, c / h))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * h, n, c / h))?)
    };
    let reference =
        |q: &Tensor, k: &Tensor, v: &Tensor, h: usize, causal: bool| -> Result<Tensor> {
            let (b, n, _) = q.dims3()?;
            let (q, k, v) = (split(q, h)?, split(k, h)?, split(v, h)?);
            let scale = 1.0 / (q.dim(2)? as f64).sqrt();
            let out = if causal {
                causal_attention_reference(&q, &k, &v, scale)?
            } else {
                scaled_dot_product_attention_reference(&q, &k, &v, scale)?
            };
            let dv = out.dim(2)?;
            Ok(out
                .reshape((b, h, n, dv))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, n, h * dv))?)
        };
    // (batch, queries, keys, heads, d, dv, causal)
    for (b, n, m, h, d, dv, causal) in [
        (2, 300, 77, 8, 40, 40, false),
        (1, 130, 130, 3, 16, 24, false),
        (2, 77, 77, 4, 8, 8, true),
        (1, 1, 5, 2, 4, 4, false),
    ] {
        let q = randn(&[b, n, h * d], 1.0)?;
        let k = randn(&[b, m, h * d], 1.0)?;
        let v = randn(&[b, m, h * dv], 1.0)?;
        let scale = 1.0 / (d as f64).sqrt();
        let want = reference(&q, &k, &v, h, causal)?;
        let what = format!("{b}x{n} over {m}, {h} heads of {d}/{dv}, causal {causal}");
        let got = multi_head_attention(&q, &k, &v, h, scale, causal)?;
        assert_close(&what, &got, &want, 1e-5)?;
        let half = |t: &Tensor| t.to_dtype(DType::F16);
        let got = multi_head_attention(&half(&q)?, &half(&k)?, &half(&v)?, h, scale, causal)?;
        assert_eq!(got.dtype(), DType::F16);
        assert_close(&format!("{what} f16"), &got, &want, 5e-3)?;
    }
    // Gradients flow (through the split path) and match the reference's.
    let (b, n, h, d) = (2, 9, 2, 4);
    let vars: Vec<Var> = (0..3)
        .map(|_| Var::from_tensor(&randn(&[b, n, h * d], 1.0).unwrap()))
        .collect::<candle_core::Result<_>>()?;
    let weights = randn(&[b, n, h * d], 1.0)?;
    let grads = |fast: bool| -> Result<Vec<Tensor>> {
        let (q, k, v) = (
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        );
        let out = if fast {
            multi_head_attention(q, k, v, h, 0.5, false)?
        } else {
            let (q, k, v) = (split(q, h)?, split(k, h)?, split(v, h)?);
            let out = scaled_dot_product_attention_reference(&q, &k, &v, 0.5)?;
            out.reshape((b, h, n, d))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, n, h * d))?
        };
        let g = (out * &weights)?.sum_all()?.backward()?;
        Ok(vars
            .iter()
            .map(|x| g.get(x.as_tensor()).expect("gradient").clone())
            .collect())
    };
    for (i, (got, want)) in grads(true)?.iter().zip(&grads(false)?).enumerate() {
        assert_close(&format!("gradient {i}"), got, want, 1e-5)?;
    }
    Ok(())
}

/// Nearest ×2 upsampling and its backward (the sum of each 2×2 block) equal, to the bit, the
/// broadcast from candle ops they replace in training; odd sizes, several planes per task,
/// and bf16 inputs (computed in f32, rounded once).
#[test]
fn upsample_2x_matches_reference_with_gradients() -> Result<()> {
    use diffuse_models::ops::upsample::{upsample_nearest_2x, upsample_nearest_2x_reference};
    for shape in [[2usize, 3, 5, 7], [1, 1, 1, 1], [3, 16, 8, 8]] {
        let x = Var::from_tensor(&randn(&shape, 1.0)?)?;
        let (got, want) = (upsample_nearest_2x(&x)?, upsample_nearest_2x_reference(&x)?);
        assert_close("upsample", &got, &want, 0.0)?;
        let weights = randn(got.dims(), 1.0)?;
        let grad = |f| weighted_grad(f, &x, &weights);
        assert_close(
            "upsample grad",
            &grad(upsample_nearest_2x)?,
            &grad(upsample_nearest_2x_reference)?,
            0.0,
        )?;
        let half = x.to_dtype(DType::BF16)?;
        let got = upsample_nearest_2x(&half)?;
        assert_eq!(got.dtype(), DType::BF16);
        assert_close(
            "upsample bf16",
            &got,
            &upsample_nearest_2x_reference(&half)?,
            0.0,
        )?;
    }
    Ok(())
}
