//! Fused CPU kernels behind candle custom ops: flash attention, GroupNorm(+SiLU), GEGLU,
//! quick-GELU and GELU, Winograd 3×3 convolution, and linear layers and 1×1 convolutions on our register-tile
//! GEMM (`microkernel`). Each has a generic-op backward pass so that training works (the
//! linear and 1×1 fast paths are inference-only and leave training to candle's matmul), and
//! falls back to plain candle ops off the CPU. With the `cuda` feature, GroupNorm(+SiLU),
//! LayerNorm, GEGLU, the attention softmax and flash attention, convolutions (im2col + cuBLAS,
//! or direct) and linear layers (cuBLAS onto the bias) also have CUDA paths (`cuda`, forward
//! only).
//!
//! The build targets baseline x86-64 (SSE2), so hot loops are compiled a second time with
//! AVX2+FMA and picked at run time (`simd_fn!`, [`kernels`]; `DIFFUSE_KERNELS=portable`
//! forces the plain copies), and the register-tile GEMM has AVX2 and AVX-512 tiles, and bf16
//! tiles (AVX512-BF16 dot products) for the products of bf16 layers: linear layers, 1×1 and
//! im2col convolutions and attention at `--dtype bf16`, and for the convolutions of f32
//! layers under [`autocast_bf16`] (mixed-precision training). The x86 code sits behind
//! `cfg(x86_simd)`, which `build.rs` sets on x86-64 unless the `portable` feature asks for the
//! build other architectures get.

pub mod activation;
pub mod attention;
pub mod conv;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod geglu;
pub mod group_norm;
pub mod linear;
mod microkernel;
pub mod transpose;
pub mod upsample;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::OnceLock;

/// The instruction sets the CPU kernels have copies for, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernels {
    /// Plain Rust, what every architecture runs (linear layers through candle's matmul).
    Portable,
    /// AVX2 + FMA copies of the hot loops and the register-tile GEMM.
    Avx2,
    /// The AVX2 loops, and the register-tile GEMM on AVX-512 registers (same results, bit for
    /// bit, as the AVX2 GEMM).
    Avx512,
    /// The AVX-512 kernels, and bf16 dot products (AVX512-BF16) for the products of bf16
    /// layers (`--dtype bf16`), which the narrower sets compute in f32.
    Avx512Bf16,
}

impl Kernels {
    /// The name `DIFFUSE_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Portable => "portable",
            Kernels::Avx2 => "avx2",
            Kernels::Avx512 => "avx512",
            Kernels::Avx512Bf16 => "avx512bf16",
        }
    }
}

/// The widest kernels this CPU and this build can run.
pub fn detected_kernels() -> Kernels {
    #[cfg(x86_simd)]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        if std::arch::is_x86_feature_detected!("avx512f") {
            if std::arch::is_x86_feature_detected!("avx512bf16")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                return Kernels::Avx512Bf16;
            }
            return Kernels::Avx512;
        }
        return Kernels::Avx2;
    }
    Kernels::Portable
}

/// The kernels in use: [`detected_kernels`], capped by the environment variable
/// `DIFFUSE_KERNELS` (`portable`, `avx2`, `avx512`, `avx512bf16`, or `auto`, the default), read once, so
/// that each path can be tested on one machine. An unknown value is reported on stderr and
/// ignored.
pub fn kernels() -> Kernels {
    static ACTIVE: OnceLock<Kernels> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let best = detected_kernels();
        let asked = std::env::var("DIFFUSE_KERNELS").unwrap_or_default();
        match asked.as_str() {
            "" | "auto" => best,
            "portable" => Kernels::Portable,
            "avx2" => Kernels::Avx2.min(best),
            "avx512" => Kernels::Avx512.min(best),
            "avx512bf16" => Kernels::Avx512Bf16.min(best),
            other => {
                eprintln!(
                    "warning: DIFFUSE_KERNELS={other:?} is not portable, avx2, avx512, avx512bf16 \
                     or auto; using {}",
                    best.name()
                );
                best
            }
        }
    })
}

/// Whether the AVX2+FMA copies of the hot loops run.
pub(crate) fn has_avx2_fma() -> bool {
    kernels() >= Kernels::Avx2
}

/// Whether the products of bf16 layers run as bf16 dot products ([`Kernels::Avx512Bf16`]).
pub(crate) fn has_bf16_dot() -> bool {
    kernels() >= Kernels::Avx512Bf16
}

thread_local! {
    static AUTOCAST_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the models' products in bf16 on this thread, after PyTorch's
/// `torch.autocast("cpu", dtype=torch.bfloat16)`: f32 tensors stay f32, but the GEMM convolutions
/// (im2col, 1×1, stride 2: forward and input gradient), every convolution's weight gradient, the
/// linear layers (forward, and the input gradient over 256 rows) and attention's products (forward,
/// and the blocked backward pass) multiply their operands rounded to bf16 on the AVX512-BF16 tiles,
/// accumulating in f32 into an f32 output (PyTorch rounds that output to bf16 as well). Winograd
/// convolutions stay f32: their products are of transformed tiles, sums of several inputs with
/// weights up to 5, and in bf16 the outputs were off by 6–8% of their largest value.
/// Normalisations, activations and the loss stay f32. On CPUs without bf16 dot products it changes
/// nothing: there bf16 could only be emulated, slower than the f32 tiles. The ops read the setting
/// on the thread that applies them (candle runs a backward pass on the thread that calls it), so a
/// training step wraps its forward and backward passes in one call.
pub fn autocast_bf16<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            AUTOCAST_BF16.set(self.0);
        }
    }
    let _restore = Restore(AUTOCAST_BF16.replace(true));
    f()
}

/// `f()`, under [`autocast_bf16`] when `on` (a training step under `--mixed-precision`).
pub fn autocast_bf16_if<R>(on: bool, f: impl FnOnce() -> R) -> R {
    match on {
        true => autocast_bf16(f),
        false => f(),
    }
}

/// Whether the products run in bf16 here ([`autocast_bf16`] on a CPU with bf16 dot products).
pub(crate) fn autocast() -> bool {
    AUTOCAST_BF16.get() && has_bf16_dot()
}

/// Defines a function whose body is compiled twice — for the baseline target and with
/// AVX2+FMA — and dispatched on the running CPU. Everything the body calls in its inner loops
/// must be `#[inline(always)]` to be compiled with the wider instructions too.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(x86_simd)]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if $crate::ops::has_avx2_fma() {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// `with_rows!(rows, [1, 2, ..] or MOST: f::<R, c..>(args..))` calls `f::<R, c..>(args..)` with
/// the const `R = rows`: each row count listed gets its own copy of the register tile `f`, any
/// other count (the tile's full height) the copy for `MOST`. Shared by the GEMM and attention
/// tiles of every instruction set.
#[cfg(x86_simd)]
macro_rules! with_rows {
    ($rows:expr, [$($r:literal),*] or $most:tt: $f:ident::<R $(, $c:tt)*>($($arg:expr),*)) => {
        // The call as one token tree, so that it can repeat once per row count.
        $crate::ops::with_rows!(@match $rows, [$($r),*], $most, ($f, [$(, $c)*], ($($arg),*)))
    };
    (@match $rows:expr, [$($r:literal),*], $most:tt, $call:tt) => {
        match $rows {
            $($r => $crate::ops::with_rows!(@call $r, $call),)*
            _ => $crate::ops::with_rows!(@call $most, $call),
        }
    };
    (@call $r:tt, ($f:ident, [$($c:tt)*], ($($arg:expr),*))) => {
        $f::<$r $($c)*>($($arg),*)
    };
}
#[cfg(x86_simd)]
pub(crate) use with_rows;

#[cfg(x86_simd)]
/// `unrolled!(len, k => body)` runs `body` for `k` in `0..len`, in order, four to a loop turn:
/// the K loops of the GEMM and attention tiles, so that the loop's own instructions (and the
/// rows' address arithmetic) do not crowd a step's FMAs out of the CPU's issue width
/// (measured ~73 → ~80–85 GFLOP/s on one core for the GEMM tile). A macro, not a closure: a
/// closure is a function of its own, not compiled for AVX2 unless inlined, and its
/// intrinsics then turn into calls.
macro_rules! unrolled {
    ($len:expr, $k:ident => $body:block) => {{
        let len = $len;
        let mut k0 = 0;
        while k0 + 4 <= len {
            for u in 0..4 {
                let $k = k0 + u;
                $body
            }
            k0 += 4;
        }
        while k0 < len {
            let $k = k0;
            $body
            k0 += 1;
        }
    }};
}
#[cfg(x86_simd)]
pub(crate) use unrolled;

/// Asks for the cache line at `p` ahead of its use (a hint: any address, nothing happens off
/// x86).
#[inline(always)]
pub(crate) fn prefetch(p: *const f32) {
    #[cfg(x86_simd)]
    // SAFETY: a prefetch reads nothing architecturally and never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[cfg(not(x86_simd))]
    let _ = p;
}

/// Lanes of the manual reductions: wide enough for one AVX2 register (the compiler does not
/// reorder float sums by itself).
pub(crate) const LANES: usize = 8;

/// `exp(x)` to about 2 ulp for any finite `x` (flushes to 0 below -87), written so that loops
/// over it vectorise: range reduction by rounding with the 1.5·2²³ trick, a degree-6 Taylor
/// polynomial of 2^f on |f| ≤ ½, and the exponent assembled from integer bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    exp_by::<false>(x)
}

/// [`exp`] with its polynomial in fused multiply-adds: for `simd_fn!` bodies (compiled for
/// FMA), where they halve the polynomial's instructions; elsewhere on x86 each is a library
/// call.
#[inline(always)]
pub(crate) fn exp_fused(x: f32) -> f32 {
    exp_by::<true>(x)
}

/// `a·b + c`, in one rounding when `FUSED`.
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn exp_by<const FUSED: bool>(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2: f32 = std::f32::consts::LN_2;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E;
    let r = t + MAGIC;
    let n = r - MAGIC;
    let f = (t - n) * LN2;
    // exp(f) for |f| ≤ ln2/2, by Horner.
    const TAYLOR: [f32; 7] = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let p = TAYLOR[1..]
        .iter()
        .fold(TAYLOR[0], |p, &c| madd::<FUSED>(p, f, c));
    // r's low mantissa bits hold round(t) as an integer offset from MAGIC's bits.
    let bits = r.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

/// `x · sigmoid(x)` (by [`exp_fused`]: for `simd_fn!` bodies).
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fused(-x))
}

/// Largest element (−∞ for an empty slice), in lanes so that it vectorises; NaN is skipped.
/// Four registers of running maxima: with one, each comparison waits for the one before (an
/// attention score row took 2 cycles per 8 values so).
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    const WIDE: usize = 4 * LANES;
    let bigger = |a: f32, b: f32| if b > a { b } else { a };
    let mut acc = [f32::NEG_INFINITY; WIDE];
    let mut chunks = xs.chunks_exact(WIDE);
    for c in &mut chunks {
        for i in 0..WIDE {
            acc[i] = bigger(acc[i], c[i]);
        }
    }
    // Halved in place down to one lane: a tree of vector maxima, not a scalar chain.
    let mut width = WIDE;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] = bigger(acc[i], acc[i + width]);
        }
    }
    chunks.remainder().iter().fold(acc[0], |m, &x| bigger(m, x))
}

/// Sum of the elements, in lanes so that it vectorises.
#[inline(always)]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `Σ a[i]·b[i]`, in lanes so that it vectorises.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A thread's buffer that a kernel keeps from call to call ([`with_kept_buffer`]).
pub(crate) type KeptBuffer = std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>;

/// Runs `f` on `len` values of the buffer `key` (one per thread), instead of allocating and
/// zeroing one per call; over `max` values, on a fresh buffer that is not kept (it would stay
/// allocated after the layer), filled on every core ([`output_buffer`]). The values are
/// whatever the last user left, so `f` must write every element it reads: debug builds, and so
/// the tests, fill them with NaN first, as [`output_buffer`] does. A nested call on the same
/// key gets a fresh buffer.
pub(crate) fn with_kept_buffer<R>(
    key: &'static KeptBuffer,
    len: usize,
    max: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    if len > max {
        return f(&mut output_buffer(len));
    }
    let mut buf = key.take();
    buf.resize(buf.len().max(len), 0.0);
    if cfg!(debug_assertions) {
        buf[..len].fill(f32::NAN);
    }
    let r = f(&mut buf[..len]);
    key.set(buf);
    r
}

/// A raw pointer into a kernel's output that parallel tasks share, each writing elements no
/// other task writes.
pub(crate) struct SendPtr<T = f32>(pub *mut T);
// SAFETY: only used for writes to disjoint elements (see each use).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

// (By hand: derived, they would ask `T: Clone`.)
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// (A method, so that closures capture the whole wrapper rather than its field.)
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// A buffer of `len` values for a kernel's output. Zero-filled in release builds, never
/// uninitialised, since kernels hand out `&mut [f32]` into it; big buffers are filled on every
/// core (the kernels run their parallel part after this, and a one-thread `memset` of reused
/// memory took 2–3% of an SD 1.5 UNet step with the other core idle). Debug builds, and so the
/// tests, fill it with NaN instead, so that an element a kernel fails to write shows up in its
/// test.
pub(crate) fn output_buffer(len: usize) -> Vec<f32> {
    /// Values per task of the parallel fill (256 KiB); buffers of fewer than four of them
    /// (1 MiB) are filled on this thread.
    const FILL_CHUNK: usize = 1 << 16;
    let fill = if cfg!(debug_assertions) {
        f32::NAN
    } else {
        0.0
    };
    if len < 4 * FILL_CHUNK {
        return vec![fill; len];
    }
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(FILL_CHUNK)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(fill)));
    // SAFETY: the first `len` values were all written just above.
    unsafe { v.set_len(len) };
    v
}

/// The input of a CPU kernel as f32, borrowed when it already is f32. Bails on a layout that is
/// not contiguous (the ops make their inputs contiguous before dispatch).
pub(crate) fn f32_input<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: the CPU kernel needs a contiguous input")
    };
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::F16(v) => Cow::Owned(v[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::BF16(v) => Cow::Owned(bf16_to_f32(&v[start..end])),
        other => candle_core::bail!("{what}: unsupported dtype {:?}", other.dtype()),
    })
}

/// An f32 result as storage of `dtype` (the dtype of the kernel's input).
pub(crate) fn f32_output(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        DType::BF16 => CpuStorage::BF16(f32_to_bf16(&v)),
        d => candle_core::bail!("unsupported dtype {d:?}"),
    })
}

/// Values per task of the dtype conversions: large enough to hide a task's start.
const CONVERT_CHUNK: usize = 1 << 16;

/// `bf16 → f32` on every core (exact: the bf16 bits are the f32's upper half).
pub(crate) fn bf16_to_f32(src: &[half::bf16]) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(src.par_chunks(CONVERT_CHUNK))
        .for_each(|(d, s)| widen_bf16(s, d));
    out
}

simd_fn! {
    /// `dst = src` widened to f32 (exact), in a form that vectorises; on this thread.
    pub(crate) fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
}

simd_fn! {
    /// `dst = src` rounded to bf16, to nearest even as `half::bf16::from_f32` rounds (NaN stays
    /// NaN), in a branch-free form that vectorises; on this thread.
    pub(crate) fn narrow_bf16(src: &[f32], dst: &mut [half::bf16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let x = s.to_bits();
            let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
            let nan = x & 0x7fff_ffff > 0x7f80_0000;
            *d = half::bf16::from_bits(if nan { (x >> 16) as u16 | 0x40 } else { rounded });
        }
    }
}

/// `f32 → bf16` ([`narrow_bf16`]) on every core.
fn f32_to_bf16(src: &[f32]) -> Vec<half::bf16> {
    let mut out = vec![half::bf16::ZERO; src.len()];
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(src.par_chunks(CONVERT_CHUNK))
        .for_each(|(d, s)| narrow_bf16(s, d));
    out
}

/// Whether the fused CPU kernels handle tensors of this dtype (computed in f32).
pub(crate) fn kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Prepares `device` for the models: on a CUDA device (in a `cuda` build) the memory pool keeps
/// freed memory for the next allocations, and allocations made from here on carry no
/// cross-stream events. Call it before loading weights. Nothing to do on the CPU.
pub fn prepare_device(device: &candle_core::Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        // SAFETY: cudarc's events order a buffer's uses across streams, and it consults them
        // only once a context has several streams; diffuse runs all of a device's work on the
        // one stream candle gives it and creates no other. Each allocation otherwise creates
        // and destroys two driver events that nothing waits on.
        unsafe { dev.disable_event_tracking() };
        return cuda::keep_freed_memory(dev);
    }
    let _ = device;
    Ok(())
}

/// Hands the memory that [`prepare_device`] keeps for reuse back to the driver (on a CUDA
/// device, after waiting for it to finish), as PyTorch's `empty_cache` does; for measuring
/// what a piece of work needs on its own. Nothing to do on the CPU.
pub fn release_freed_memory(device: &candle_core::Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = device {
        return cuda::release_freed_memory(dev);
    }
    let _ = device;
    Ok(())
}

/// Whether a fused op runs on `inputs` (the first one's dtype and device decide): on the CPU,
/// where the ops have backward passes, and in a `cuda` build on a CUDA device when no input
/// tracks a gradient (the CUDA kernels are forward-only; training takes the generic ops).
pub(crate) fn fused_on(inputs: &[&candle_core::Tensor]) -> bool {
    let Some(first) = inputs.first() else {
        return false;
    };
    if !kernel_dtype(first.dtype()) {
        return false;
    }
    if first.device().is_cpu() {
        return true;
    }
    cfg!(feature = "cuda") && first.device().is_cuda() && !inputs.iter().any(|t| t.track_op())
}

/// Whether the two halves of `x`'s first dimension hold the same values, bit for bit: an f32
/// tensor on the CPU, contiguous, with an even first dimension (anything else: `false`). A
/// guided batch repeats its latents, so everything that reads one sample at a time gives both
/// halves the same result until the text first enters. Halves that differ usually do so in
/// their first values, where the comparison stops.
pub(crate) fn halves_identical(x: &candle_core::Tensor) -> bool {
    let Some(&batch) = x.dims().first() else {
        return false;
    };
    if batch < 2 || batch % 2 != 0 || x.dtype() != candle_core::DType::F32 || !x.device().is_cpu() {
        return false;
    }
    let (storage, layout) = x.storage_and_layout();
    let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return false;
    };
    let (first, second) = v[start..end].split_at((end - start) / 2);
    // Runs of 256 compared without an early exit (so that they vectorise), the runs with one.
    first.chunks(256).zip(second.chunks(256)).all(|(a, b)| {
        a.iter()
            .zip(b)
            .fold(true, |same, (p, q)| same & (p.to_bits() == q.to_bits()))
    })
}

/// `f` over a batch `xs` (with a per-sample side input `side`, such as a time embedding), where
/// `f` treats each sample on its own: when both halves of `xs` and of `side` are equal
/// ([`halves_identical`]), `f` runs on the first halves only and its result is repeated, the
/// same bits as the kernels give a sample the same values in any batch.
pub(crate) fn once_for_equal_halves(
    xs: &candle_core::Tensor,
    side: Option<&candle_core::Tensor>,
    f: impl Fn(&candle_core::Tensor, Option<&candle_core::Tensor>) -> Result<candle_core::Tensor>,
) -> Result<candle_core::Tensor> {
    if !halves_identical(xs) || !side.is_none_or(halves_identical) {
        return f(xs, side);
    }
    let half = |t: &candle_core::Tensor| t.narrow(0, 0, t.dim(0)? / 2);
    let side = side.map(half).transpose()?;
    let out = f(&half(xs)?, side.as_ref())?;
    candle_core::Tensor::cat(&[&out, &out], 0)
}

#[cfg(test)]
mod tests {
    /// `max` finds the largest value wherever it sits (every lane of the running maxima, the
    /// tree that halves them, the tail), skips NaN, and gives −∞ with nothing else.
    #[test]
    fn max_finds_the_largest_anywhere() {
        assert_eq!(super::max(&[]), f32::NEG_INFINITY);
        assert_eq!(super::max(&[f32::NAN; 40]), f32::NEG_INFINITY);
        for len in 1..=80 {
            for at in 0..len {
                let mut xs: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin() - 2.0).collect();
                xs[at] = 5.0;
                xs[(at + 1) % len] = if len > 1 { f32::NAN } else { 5.0 };
                assert_eq!(super::max(&xs), 5.0, "length {len}, largest at {at}");
            }
        }
    }

    /// The vectorised conversions against `half`'s, on every kind of value: both signs, ties
    /// that round to even up and down, values that carry into the exponent, the largest finite
    /// values (which round to infinity), infinities, NaNs, subnormals and zeros.
    #[test]
    fn bf16_conversions_match_half() {
        let mut bits: Vec<u32> = vec![
            0,
            0x8000_0000,
            1,
            0x0000_8000,
            0x0001_8000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x3f80_7fff,
            0x3fff_ffff,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001,
            0xffff_ffff,
            0x007f_ffff,
            0x8000_8000,
        ];
        let mut seed = 1u32;
        bits.extend((0..100_000).map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed
        }));
        let xs: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let narrow = super::f32_to_bf16(&xs);
        for (x, got) in xs.iter().zip(&narrow) {
            let want = half::bf16::from_f32(*x);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{x:e} ({:#010x})",
                x.to_bits()
            );
        }
        let wide = super::bf16_to_f32(&narrow);
        for (got, b) in wide.iter().zip(&narrow) {
            assert_eq!(got.to_bits(), b.to_f32().to_bits());
        }
    }
}
