//! `torch.nn.Linear` whose CPU inference runs the AVX2 GEMM of `microkernel`.
//!
//! The weight (`out × in`) is packed into column panels on every call rather than kept packed:
//! that costs one pass over the weight per call (about 1% of the product at the UNet's 64×64
//! and 32×32 token counts) and no second copy of every linear weight in memory. Up to 512
//! rows (the 16×16 and 8×8 levels, cross-attention keys over 77 tokens, time embeddings, CLIP)
//! packing the weight costs too much of the product, so those compute `yᵀ = w·xᵀ` instead
//! (measured in one process, alternating: 128 × 1280 → 1280 3.7 vs 4.7 ms, 154 × 3072 → 768
//! 6.9 vs 9.2 ms, 512 × 1280 → 10240 67 vs 74 ms; in a UNet step's profile the 16×16 level's
//! layers went from 138–157 to 174–193 GFLOP/s, while the 32×32 level's 683-row chunks got
//! slower, 133–145 against 160–170). Other devices take candle's matmul. In training the fast path has its own
//! backward, which computes only the gradients of what is tracked (a frozen layer under a
//! tracked input, adapter training, gets the input's alone).
//!
//! The weight may be kept in half precision (bf16/f16) under f32 activations: the layer then
//! computes in f32, widening the weight as it packs it (the diffusion transformers at their real
//! sizes keep their weights in bf16 to halve their memory).
//!
//! A bf16 layer under bf16 inputs outside training (`--dtype bf16`) gets bf16 products on CPUs
//! with AVX512-BF16: over 256 rows the input is read in place, the weight arranged into bf16
//! pair panels as it is stored (one pass per call), and the output rounded to bf16 block by
//! block; fewer rows take the transposed product above, its operands rounded to bf16 one
//! K-block at a time (the one-dot-per-output path stays f32).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::microkernel::{
    gemm_parallel, gemm_parallel_bf16, pack_kt, pack_pairs, pack_pairs_bf16_rows, transpose, BfA,
    BfB, BfOut, Gemm, B, NR,
};
use super::{f32_input, f32_output, has_avx2_fma, output_buffer, with_kept_buffer};

thread_local! {
    // Buffers overwritten in full on every call ([`with_kept_buffer`]): the packed weight
    // panels, and the transposed path's packed rows and product. Allocating them per call
    // made a fresh buffer to zero each time: 0.7 of the 4.3 GB an SD 1.5 UNet step zeroed.
    static PACKED_WEIGHT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static PACKED_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static PRODUCT_T: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest packed weight kept between calls (64 MiB): SD's widest, 1280 → 10240, is 52 MiB.
const PACKED_WEIGHT_MAX: usize = 16 << 20;
/// Largest buffer of the transposed path kept between calls (32 MiB): SD's largest product
/// is 10240 × 512 (20 MiB).
const KEPT_MAX: usize = 8 << 20;

/// Most rows for [`LinearOp::transposed`] of bf16 products (and for autocast's input gradient
/// on the bf16 tiles); more pack the weight.
const TRANSPOSED_MAX_ROWS: usize = 256;

/// Most rows for [`LinearOp::transposed`]: f32 products measured faster so up to 512 rows (module
/// docs); bf16 ones were tuned at [`TRANSPOSED_MAX_ROWS`].
fn transposed_max_rows(bf16: bool) -> usize {
    if bf16 {
        TRANSPOSED_MAX_ROWS
    } else {
        512
    }
}

/// Most rows for which a half-precision weight is read as it is stored, one dot product per
/// output ([`Weight::gemv`]): the adaptive norms' projections of a conditioning vector, whose
/// weights (up to 56 M values in Flux) would otherwise be widened to f32 whole on every call.
const GEMV_MAX_ROWS: usize = 4;

/// A linear layer's weight as stored: f32, or bf16/f16 widened where it is read.
enum Weight<'a> {
    F32(std::borrow::Cow<'a, [f32]>),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl<'a> Weight<'a> {
    fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("linear weight: the CPU kernel needs a contiguous weight")
        };
        Ok(match s {
            CpuStorage::BF16(v) => Self::Bf16(&v[start..end]),
            CpuStorage::F16(v) => Self::F16(&v[start..end]),
            _ => Self::F32(f32_input(s, l, "linear weight")?),
        })
    }

    /// Values `range` (of the row-major `(out, in)` weight) as f32.
    fn to_f32(&self, range: std::ops::Range<usize>) -> std::borrow::Cow<'_, [f32]> {
        use std::borrow::Cow;
        match self {
            Self::F32(w) => Cow::Borrowed(&w[range]),
            Self::Bf16(w) => Cow::Owned(w[range].iter().map(|v| v.to_f32()).collect()),
            Self::F16(w) => Cow::Owned(w[range].iter().map(|v| v.to_f32()).collect()),
        }
    }

    /// `y = x·wᵀ + b` for few rows of `x`, reading each weight row once, widened in lanes.
    fn gemv(&self, xs: &[f32], bias: Option<&[f32]>, (m, n, k): (usize, usize, usize)) -> Vec<f32> {
        // Output features in chunks big enough to amortise the task, small enough for both cores.
        let chunk = (1usize << 16).div_ceil(k.max(1)).max(1);
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, out)| {
                for (j, yj) in out.chunks_exact_mut(m).enumerate() {
                    let row = c * chunk + j;
                    let w = self.to_f32(row * k..(row + 1) * k);
                    for (r, y) in yj.iter_mut().enumerate() {
                        *y = super::dot(&xs[r * k..(r + 1) * k], &w) + bias.map_or(0.0, |b| b[row]);
                    }
                }
            });
        // `yt` is (n, m); the output (m, n).
        (0..m)
            .flat_map(|r| (0..n).map(move |j| (r, j)))
            .map(|(r, j)| yt[j * m + r])
            .collect()
    }
}

/// `y = x·wᵀ + b`, like `candle_nn::Linear` (whose weights and names it keeps).
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
}

/// A linear layer with a bias, weights `weight` `(out, in)` and `bias` `(out,)` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::from_candle(candle_nn::linear(in_dim, out_dim, vb)?))
}

/// [`linear`], with or without the bias.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::from_candle(candle_nn::linear_b(
        in_dim, out_dim, bias, vb,
    )?))
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::from_candle(candle_nn::Linear::new(weight, bias))
    }

    pub fn from_candle(inner: candle_nn::Linear) -> Self {
        Self { inner }
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// candle's linear layer: the reference for the fast path.
    pub fn forward_reference(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)
    }

    /// Whether `xs` takes the packed AVX2 GEMM: f32 inputs, and bf16 ones outside training
    /// (bf16 products; the backward is f32's).
    fn fast(&self, xs: &Tensor) -> bool {
        let w = self.inner.weight();
        let input_dtype = match xs.dtype() {
            candle_core::DType::F32 => true,
            candle_core::DType::BF16 => {
                !(xs.track_op() || w.track_op() || self.inner.bias().is_some_and(|b| b.track_op()))
            }
            _ => false,
        };
        let float = |t: &Tensor| super::kernel_dtype(t.dtype());
        let Ok((n, k)) = w.dims2() else { return false };
        // (No input features: the row count cannot be read off the flat input; candle's
        // matmul gives the zero-filled output.)
        k > 0
            && xs.device().is_cpu()
            && has_avx2_fma()
            && input_dtype
            && float(w)
            && self
                .inner
                .bias()
                .is_none_or(|b| float(b) && b.dims() == [n])
            && xs.dims().last() == Some(&k)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let fast = self.fast(xs);
        if xs.dtype() == candle_core::DType::BF16 && xs.device().is_cpu() && !fast {
            // candle's CPU matmul has no bf16: computed in f32 (as the bf16 kernels of PyTorch
            // accumulate), rounded back to bf16.
            let wide = xs.to_dtype(candle_core::DType::F32)?;
            return self.forward(&wide)?.to_dtype(xs.dtype());
        }
        let (n, k) = self.inner.weight().dims2()?;
        let rows = xs.elem_count() / k.max(1);
        let name = || {
            let bf16 = match xs.dtype() {
                candle_core::DType::BF16 => super::has_bf16_dot(),
                dtype => dtype == candle_core::DType::F32 && super::autocast(),
            };
            let kind = match (fast, xs.device().is_cuda()) {
                (true, _) if bf16 => "packed bf16",
                (true, _) => "packed",
                (false, true) => "cuda",
                (false, false) => "candle",
            };
            format!("linear {kind} {k}->{n} x{rows}")
        };
        let flops = 2.0 * (rows * n * k) as f64;
        crate::profile::timed(name, flops, || self.forward_path(xs, fast))
    }
}

impl Linear {
    fn forward_path(&self, xs: &Tensor, fast: bool) -> Result<Tensor> {
        if !fast {
            // Contiguous first: candle 0.11's batched CPU matmul gives wrong values for some
            // strided inputs (a transposed-then-transposed-back batch, tests/kernels.rs).
            let xs = xs.contiguous()?;
            let w = self.inner.weight();
            let widened;
            let layer = if w.dtype() == xs.dtype() {
                &self.inner
            } else {
                // Half-precision weights under activations of another dtype: computed in the
                // activations' dtype.
                let bias = self
                    .inner
                    .bias()
                    .map(|b| b.to_dtype(xs.dtype()))
                    .transpose()?;
                widened = candle_nn::Linear::new(w.to_dtype(xs.dtype())?, bias);
                &widened
            };
            let tracked = xs.track_op()
                || layer.weight().track_op()
                || layer.bias().is_some_and(|b| b.track_op());
            if xs.device().is_cpu() && !tracked {
                return forward_in_fixed_blocks(layer, &xs);
            }
            let same_dtype = layer.bias().is_none_or(|b| b.dtype() == xs.dtype());
            if xs.device().is_cuda() && !tracked && same_dtype && super::kernel_dtype(xs.dtype()) {
                let w = layer.weight().contiguous()?;
                return match layer.bias() {
                    Some(b) => xs.apply_op3_no_bwd(&w, &b.contiguous()?, &CudaLinear),
                    None => xs.apply_op2_no_bwd(&w, &CudaLinear),
                };
            }
            return layer.forward(&xs);
        }
        let (xs, w) = (xs.contiguous()?, self.inner.weight().contiguous()?);
        // The op's backward gives the gradients of what is tracked only: a frozen layer
        // under a tracked input (adapter training) computes no weight gradient.
        let tracked =
            xs.track_op() || w.track_op() || self.inner.bias().is_some_and(|b| b.track_op());
        match (self.inner.bias(), tracked) {
            (Some(b), true) => xs.apply_op3(&w, b, LinearOp),
            (Some(b), false) => xs.apply_op3_no_bwd(&w, b, &LinearOp),
            (None, true) => xs.apply_op2(&w, LinearOp),
            (None, false) => xs.apply_op2_no_bwd(&w, &LinearOp),
        }
    }
}

/// Rows per product of [`forward_in_fixed_blocks`].
const FIXED_BLOCK_ROWS: usize = 128;

/// `layer` over the rows of `xs` in products of exactly [`FIXED_BLOCK_ROWS`] rows (the last
/// padded with zeros). candle's CPU matmul (the `gemm` crate) picks its kernels by the row
/// count, so a row's values would depend on how many rows share the call; with one shape for
/// every call, an image comes out the same in any batch on the portable path too (ranks
/// sharing a batch write the files of one process).
fn forward_in_fixed_blocks(layer: &candle_nn::Linear, xs: &Tensor) -> Result<Tensor> {
    let (n, k) = layer.weight().dims2()?;
    let rows = xs.elem_count() / k.max(1);
    if k == 0 || rows == 0 {
        return layer.forward(xs);
    }
    let x = xs.reshape((rows, k))?;
    let mut blocks = Vec::with_capacity(rows.div_ceil(FIXED_BLOCK_ROWS));
    for r0 in (0..rows).step_by(FIXED_BLOCK_ROWS) {
        let len = FIXED_BLOCK_ROWS.min(rows - r0);
        let block = x
            .narrow(0, r0, len)?
            .pad_with_zeros(0, 0, FIXED_BLOCK_ROWS - len)?;
        blocks.push(layer.forward(&block)?.narrow(0, 0, len)?);
    }
    let mut shape = xs.dims().to_vec();
    *shape
        .last_mut()
        .expect("a linear input has a last dimension") = n;
    Tensor::cat(&blocks, 0)?.reshape(shape)
}

/// `dx = dy · w` for `y = x · wᵀ (+ b)`, in `dy`'s dtype: candle's matmul, or under autocast
/// our bf16 tiles ([`AutocastInputGrad`]).
fn linear_input_grad(w: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let grad = grad.contiguous()?;
    let rows = grad.elem_count() / n.max(1);
    let f32_cpu = grad.device().is_cpu() && grad.dtype() == candle_core::DType::F32;
    if f32_cpu && rows > TRANSPOSED_MAX_ROWS && super::autocast() {
        return grad.apply_op2_no_bwd(&w.contiguous()?, &AutocastInputGrad);
    }
    let mut shape = grad.dims().to_vec();
    *shape
        .last_mut()
        .expect("a linear output has a last dimension") = k;
    grad.reshape((rows, n))?
        .matmul(&w.to_dtype(grad.dtype())?)?
        .reshape(shape)
}

/// `dx = dy · w` over `(dy, w)` under autocast: the weight (`n × k`, the product's `b` as it is
/// stored) rounded into bf16 pair panels once, `dy` rounded as the tiles read it, f32 out.
/// Over few rows the weight's conversion would cost about as much as the product (as
/// packing it does in the forward pass), so those stay with candle's f32 matmul; in f32, our
/// tiles with a packed weight measured no faster than candle's matmul on these shapes.
struct AutocastInputGrad;

impl CustomOp2 for AutocastInputGrad {
    fn name(&self) -> &'static str {
        "linear-input-grad-bf16"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = lw.shape().dims2()?;
        let dy = f32_input(sg, lg, "linear output gradient")?;
        let weight = Weight::new(sw, lw)?;
        let w = weight.to_f32(0..n * k);
        let rows = dy.len().checked_div(n).unwrap_or(0);
        let mut dims = lg.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = k;
        }
        let g = Gemm {
            m: rows,
            n: k,
            k: n,
            lda: n,
            b: B::Rows { ld: k },
            rs_c: k,
            cs_c: 1,
            accumulate: false,
            bias_per_col: false,
            bf16: true,
        };
        // A product over no outputs (K = 0) writes nothing: zeros. Otherwise every element is
        // written.
        let mut out = match n {
            0 => vec![0f32; rows * k],
            _ => output_buffer(rows * k),
        };
        let pairs = pack_pairs(&g, &w);
        let b = pairs.as_ref().map_or(BfB::F32(&w), BfB::Pairs);
        gemm_parallel_bf16(&g, BfA::F32(&dy), b, BfOut::F32(&mut out), None);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `(dw, db)` for `y = x · wᵀ + b`: `dyᵀ · x` over all rows in one product (no per-image
/// weight gradients to sum, as candle's batched matmul makes) and the column sums of `dy`.
fn linear_weight_grads(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, k) = w.dims2()?;
    let rows = grad.elem_count() / n.max(1);
    let dy = grad.contiguous()?.reshape((rows, n))?;
    let x = x.contiguous()?.reshape((rows, k))?.to_dtype(dy.dtype())?;
    let dy_t = dy.t()?.contiguous()?;
    let dw = dy_t.matmul(&x)?.to_dtype(w.dtype())?;
    // The bias gradient as row sums of the transposed copy: candle sums over a leading
    // axis with an index division per element (1% of a small UNet's training step).
    Ok((dw, dy_t.sum(1)?))
}

/// The gradients of [`LinearOp`]: of the input, the weight and the bias, each only when tracked.
fn linear_grads(x: &Tensor, w: &Tensor, b: Option<&Tensor>, grad: &Tensor) -> Result<LinearGrads> {
    let dx = match x.track_op() {
        true => Some(linear_input_grad(w, grad)?),
        false => None,
    };
    if !w.track_op() && !b.is_some_and(|b| b.track_op()) {
        return Ok((dx, None, None));
    }
    let (dw, db) = linear_weight_grads(x, w, grad)?;
    let db = b.map(|b| db.to_dtype(b.dtype())).transpose()?;
    Ok((dx, Some(dw), db))
}

type LinearGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// The op behind [`Linear`]'s fast path (with a backward of its own).
struct LinearOp;

impl LinearOp {
    fn forward(
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = w.1.shape().dims2()?;
        // A bf16 input (inference at `--dtype bf16`) gets bf16 products and a bf16 output; an
        // f32 one under autocast bf16 products and an f32 output.
        let dtype = x.0.dtype();
        let bf16_out = dtype == candle_core::DType::BF16;
        let bf16 = bf16_out || (dtype == candle_core::DType::F32 && super::autocast());
        let weight = Weight::new(w.0, w.1)?;
        let bias = bias
            .map(|(s, l)| f32_input(s, l, "linear bias"))
            .transpose()?;
        let m = x.1.shape().elem_count().checked_div(k).unwrap_or(0);
        let mut dims = x.1.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        // The bf16 tiles read a bf16 input in place; the other paths take it in f32.
        let bf16_x = match x.0 {
            CpuStorage::BF16(v) if m > TRANSPOSED_MAX_ROWS && super::has_bf16_dot() => {
                let Some((start, end)) = x.1.contiguous_offsets() else {
                    candle_core::bail!("linear input: the CPU kernel needs a contiguous input")
                };
                Some(&v[start..end])
            }
            _ => None,
        };
        let xs = match bf16_x {
            Some(_) => std::borrow::Cow::Borrowed(&[][..]),
            None => f32_input(x.0, x.1, "linear input")?,
        };
        if m <= GEMV_MAX_ROWS && !matches!(weight, Weight::F32(_)) {
            return Ok((
                f32_output(weight.gemv(&xs, bias.as_deref(), (m, n, k)), dtype)?,
                Shape::from(dims),
            ));
        }
        if m <= transposed_max_rows(bf16) {
            let ws = weight.to_f32(0..n * k);
            let out = Self::transposed(&xs, &ws, bias.as_deref(), (m, n, k), bf16);
            return Ok((f32_output(out, dtype)?, Shape::from(dims)));
        }
        let g = Gemm {
            m,
            n,
            k,
            lda: k,
            b: B::packed(k),
            rs_c: n,
            cs_c: 1,
            accumulate: false,
            bias_per_col: true,
            bf16,
        };
        // A bf16 layer on the bf16 tiles: the weight rounded to bf16 once, or taken as it is
        // stored (every row block would otherwise convert it again), the input read in place.
        let pairs = match (&weight, bf16) {
            (Weight::Bf16(w), true) => pack_pairs_bf16_rows(w, (n, k)),
            _ => None,
        };
        // Every element is written (here and below): `pack_kt` writes every panel value,
        // padding included, and the GEMMs (K > 0, not accumulating) and the transpose every
        // output value.
        let panels = if pairs.is_some() { 0 } else { n.div_ceil(NR) };
        let out = with_kept_buffer(&PACKED_WEIGHT, panels * NR * k, PACKED_WEIGHT_MAX, |wt| {
            if k > 0 {
                wt.par_chunks_mut(NR * k)
                    .enumerate()
                    .for_each(|(p, panel)| {
                        let rows = p * NR..((p + 1) * NR).min(n);
                        // (A half-precision weight is widened one panel at a time.)
                        let ws = weight.to_f32(rows.start * k..rows.end * k);
                        pack_kt(&ws, (rows.len(), k, k), 1.0, panel)
                    });
            }
            let wt = &*wt;
            if bf16 {
                let pairs = pairs.or_else(|| pack_pairs(&g, wt));
                let a = bf16_x.map_or(BfA::F32(&xs), BfA::Bf16);
                let b = pairs.as_ref().map_or(BfB::F32(wt), BfB::Pairs);
                if !bf16_out {
                    let mut out = output_buffer(m * n);
                    gemm_parallel_bf16(&g, a, b, BfOut::F32(&mut out), bias.as_deref());
                    return CpuStorage::F32(out);
                }
                let mut out = vec![half::bf16::ZERO; m * n];
                gemm_parallel_bf16(&g, a, b, BfOut::Bf16(&mut out), bias.as_deref());
                return CpuStorage::BF16(out);
            }
            let mut out = output_buffer(m * n);
            gemm_parallel(&g, &xs, wt, &mut out, bias.as_deref());
            CpuStorage::F32(out)
        });
        Ok((out, Shape::from(dims)))
    }

    /// `y = x·wᵀ + b` for few rows, computed as `yᵀ = w·xᵀ + b`: the weight is read as it is
    /// stored (its rows are the GEMM's broadcast rows) and only the few rows of `x` are packed,
    /// where packing the weight would cost as much as the product. `yᵀ` is stored row-major
    /// and then transposed into `y` by 8 × 8 blocks: storing it straight into `y` took one
    /// store per element and slowed the GEMM by a third on one core (47 vs 65 GFLOP/s at
    /// 192 × 154 × 768); alternating in one process, 154 × 768 → 3072 took 8.7 vs 9.9 ms,
    /// 154 × 3072 → 768 8.0 vs 8.3 ms (medians of 29).
    fn transposed(
        xs: &[f32],
        ws: &[f32],
        bias: Option<&[f32]>,
        (m, n, k): (usize, usize, usize),
        bf16: bool,
    ) -> Vec<f32> {
        // The kept buffer for the packed rows of `x`.
        with_kept_buffer(&PACKED_ROWS, m.div_ceil(NR) * NR * k, KEPT_MAX, |xt| {
            pack_kt(xs, (m, k, k), 1.0, xt);
            // All of `xt`'s columns, its zero padding included, when that adds little: every
            // tile is then a whole one. Alternating in one process, 154 rows (9·16 + 10) took
            // 2.5–7% less time so (154 × 3072 → 768 6.1 vs 6.6 ms); 2 rows (a time embedding)
            // 23% more.
            let mp = if m >= 4 * NR {
                m.next_multiple_of(NR)
            } else {
                m
            };
            with_kept_buffer(&PRODUCT_T, n * mp, KEPT_MAX, |yt| {
                let g = Gemm {
                    m: n,
                    n: mp,
                    k,
                    lda: k,
                    b: B::packed(k),
                    rs_c: mp,
                    cs_c: 1,
                    accumulate: false,
                    bias_per_col: false,
                    bf16,
                };
                gemm_parallel(&g, ws, xt, yt, bias);
                let mut out = output_buffer(m * n);
                transpose(yt, (n, m, mp), &mut out);
                out
            })
        })
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        crate::profile::timed_backward(CustomOp2::name(self), grad, || {
            let (dx, dw, _) = linear_grads(x, w, None, grad)?;
            Ok((dx, dw))
        })
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::profile::timed_backward(CustomOp3::name(self), grad, || {
            linear_grads(x, w, Some(b), grad)
        })
    }
}

/// A linear layer on a CUDA device by one cuBLAS GEMM onto the bias (`cuda::linear_gemm`):
/// a CustomOp2 without a bias, a CustomOp3 with one. Forward only.
struct CudaLinear;

impl CustomOp2 for CudaLinear {
    fn name(&self) -> &'static str {
        "linear-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the CUDA linear layer runs on CUDA devices only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::linear_gemm((x, lx), (w, lw), None)
    }
}

impl CustomOp3 for CudaLinear {
    fn name(&self) -> &'static str {
        "linear-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the CUDA linear layer runs on CUDA devices only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::linear_gemm((x, lx), (w, lw), Some((b, lb)))
    }
}
