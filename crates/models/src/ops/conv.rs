//! The models' `Conv2d`: 3×3 stride-1 padding-1 convolutions on the CPU by Winograd
//! F(4×4, 3×3) (by im2col and one GEMM per image on tiny maps, and for stride 2), 1×1
//! convolutions as one GEMM per image straight from NCHW, everything else candle's `conv2d`.
//! Each has its own backward pass, of GEMMs on the same register tiles (candle's CPU backward
//! of a convolution goes through `conv_transpose2d`, tens of times slower than the forward,
//! and got the shapes of odd-sized stride-2 maps wrong). On a CUDA device, inference (nothing
//! tracked) takes [`cuda_gemm`]: im2col and cuBLAS, bypassing cuDNN's per-call cost; training
//! takes candle's `conv2d`.
//!
//! Winograd turns the 3×3 convolution of each 4×4 output tile into 36 element-wise products
//! of transformed 6×6 input tiles and transformed kernels, i.e. 36 GEMMs
//! `(tiles × Cin)·(Cin × Cout)` on the register tiles of `microkernel`: 4× fewer
//! multiplications than direct convolution. On large maps the transformed kernels (4× the
//! weight size) are cached in the layer from its second call on (a layer run once keeps
//! nothing), unless the weight is a training variable; on maps of fewer than 256 tiles (SD's
//! 32×32, 16×16 and 8×8 levels) each call transforms them block by block
//! (`convolve_small`).

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use super::microkernel::{
    even_split, gemm_parallel, gemm_parallel_bf16, pack_kt, pack_pairs, transpose, transpose_rows8,
    BfA, BfB, BfOut, Gemm, B, NR,
};
use super::{
    f32_input, f32_output, kernel_dtype, output_buffer, prefetch, simd_fn, SendPtr, LANES,
};

/// Output tile side, input tile side (m + r − 1) and transformed points per tile.
const M: usize = 4;
const A: usize = 6;
const POINTS: usize = A * A;
/// Tiles per task of the cached-kernel path: the task's 36 GEMMs get `TILES` rows, enough
/// to amortise streaming the transformed kernels, while its transformed tiles stay a few MiB.
const TILES: usize = 96;
/// Tiles per task for layers with cheap kernels ([`cheap_kernels`]: nothing to amortise):
/// a task's transformed tiles and products then stay within a 1 MiB L2 (0.9 MiB at
/// 64 → 64 channels; 96 tiles took 1.8 MiB).
const CHEAP_TILES: usize = 48;
/// From this many tiles per image on the transformed kernels are cached (from a layer's
/// second call) and the tiles split among tasks; below it each call transforms the kernels
/// itself ([`convolve_small`]). SD's 32×32 level with guidance (128 tiles) measured as fast or
/// faster per call (1280 → 1280: 193–202 vs 237–247 ms), and not caching its kernels saves
/// 950 MiB of a UNet step's peak memory (4,782 → 3,830 MiB).
const MIN_TILES: usize = 256;
/// Below this many tiles per image transforming the kernels costs more than the 4× fewer
/// multiplications save, and the direct (im2col) convolution is faster. Measured at 1280 →
/// 1280 channels: SD's 8×8 level (4 tiles per image) with guidance took 12.3 against 20.0 ms
/// by im2col, and 10.0–10.4 against 9.7–10.0 ms for one image; 4×4 maps (1 tile) 9.8
/// against 2.6 ms.
const MIN_SMALL_TILES: usize = 4;
/// [`MIN_SMALL_TILES`] for layers with cheap kernels ([`cheap_kernels`], the training-sized
/// models'), which take the cached-kernel path: their 8×8 maps stay on im2col.
const MIN_CHEAP_TILES: usize = 8;
/// Most `Cin·Cout` for which the kernels are transformed whole even on small maps (64 KiB per
/// point): the training-sized models' layers, whose batches have thousands of tiles that
/// [`convolve_small`] would stream through memory on one thread (a 32 → 32 layer at 32×32,
/// batch 32: 44 vs 124 GFLOP/s).
const CHEAP_KERNELS: usize = 16384;

fn cheap_kernels(cin: usize, cout: usize) -> bool {
    cin * cout <= CHEAP_KERNELS
}

/// The weight gradient sums the batch in at most this many groups (in parallel), then adds
/// the groups in order.
const WEIGHT_GRAD_GROUPS: usize = 8;

/// Eight channels of one tile point side by side: the input and output transforms run on
/// eight channels at once, one per SIMD lane.
#[derive(Clone, Copy)]
struct Lanes([f32; LANES]);

impl std::ops::Add for Lanes {
    type Output = Self;
    #[inline(always)]
    fn add(mut self, o: Self) -> Self {
        for i in 0..LANES {
            self.0[i] += o.0[i];
        }
        self
    }
}

impl std::ops::Sub for Lanes {
    type Output = Self;
    #[inline(always)]
    fn sub(mut self, o: Self) -> Self {
        for i in 0..LANES {
            self.0[i] -= o.0[i];
        }
        self
    }
}

impl std::ops::Mul<f32> for Lanes {
    type Output = Self;
    #[inline(always)]
    fn mul(mut self, k: f32) -> Self {
        for x in &mut self.0 {
            *x *= k;
        }
        self
    }
}

/// What the 1-d transforms compute on: single values (kernels) or [`Lanes`] (tiles).
trait Num:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<f32, Output = Self>
{
    const ZERO: Self;
}

impl Num for f32 {
    const ZERO: Self = 0.0;
}

impl Num for Lanes {
    const ZERO: Self = Lanes([0.0; LANES]);
}

/// A 1-d transform of a 6×6 tile's column (or row) into `O` values, applied by
/// [`transform_2d`] to columns and rows. A trait rather than a function value: a function
/// passed by value was called through `Fn::call`, which was not inlined into the AVX2 copies
/// and ran as 4-wide SSE code on values spilled to the stack.
trait Transform1d<const O: usize> {
    fn apply<T: Num>(d: [T; A]) -> [T; O];
}

/// `Bᵀ·d` for one column (or row) of a 6×6 input tile.
struct InputTransform;

impl Transform1d<A> for InputTransform {
    #[inline(always)]
    fn apply<T: Num>(d: [T; A]) -> [T; A] {
        [
            d[0] * 4.0 - d[2] * 5.0 + d[4],
            d[3] + d[4] - (d[1] + d[2]) * 4.0,
            (d[1] - d[2]) * 4.0 - d[3] + d[4],
            (d[3] - d[1]) * 2.0 - d[2] + d[4],
            (d[1] - d[3]) * 2.0 - d[2] + d[4],
            d[1] * 4.0 - d[3] * 5.0 + d[5],
        ]
    }
}

/// `Aᵀ·m` for one column (or row) of a 6×6 product tile.
struct OutputTransform;

impl Transform1d<M> for OutputTransform {
    #[inline(always)]
    fn apply<T: Num>(m: [T; A]) -> [T; M] {
        let (s12, d12, s34, d34) = (m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]);
        [
            m[0] + s12 + s34,
            d12 + d34 * 2.0,
            s12 + s34 * 4.0,
            d12 + d34 * 8.0 + m[5],
        ]
    }
}

/// `G'·g` for one column (or row) of a 3×3 kernel. Winograd's `G` is `S·G'`: `G'` has the
/// small integer rows (1, 0, 0), (1, 1, 1), (1, −1, 1), (1, 2, 4), (1, −2, 4), (0, 0, 1) and
/// [`KERNEL_SCALE`] is `S`'s diagonal. So `G·g·Gᵀ = S·(G'·g·G'ᵀ)·S`: the kernels are
/// transformed by `G'` alone, 8 operations per 1-d transform instead of 17, and the point
/// `(i, j)` of the transform is scaled by `sᵢ·sⱼ` afterwards, once per transformed kernel where
/// the kernels are cached, or once per product tile ([`transform_outputs`]), since a point's
/// scale factors out of its sum over the input channels, where they are not.
#[inline(always)]
fn kernel_1d<T: Num>(g: [T; 3]) -> [T; A] {
    let outer = g[0] + g[2];
    let far = g[0] + g[2] * 4.0;
    let mid = g[1] * 2.0;
    [g[0], outer + g[1], outer - g[1], far + mid, far - mid, g[2]]
}

/// The diagonal of `S` in `G = S·G'` ([`kernel_1d`]).
const KERNEL_SCALE: [f32; A] = [
    1.0 / 4.0,
    -1.0 / 6.0,
    -1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 24.0,
    1.0,
];

/// `sᵢ·sⱼ`: the scale of transformed point `(i, j)`.
fn point_scale(p: usize) -> f32 {
    KERNEL_SCALE[p / A] * KERNEL_SCALE[p % A]
}

/// Applies a 1-d transform to the columns, then to the rows, of a row-major tile.
#[inline(always)]
fn transform_2d<F: Transform1d<O>, T: Num, const O: usize>(tile: &[[T; A]; A]) -> [[T; O]; O] {
    let mut cols = [[T::ZERO; A]; O]; // cols[o][i]: transformed column i, transposed
    for i in 0..A {
        let mut col = [T::ZERO; A];
        for r in 0..A {
            col[r] = tile[r][i];
        }
        let t = F::apply(col);
        for o in 0..O {
            cols[o][i] = t[o];
        }
    }
    let mut out = [[T::ZERO; O]; O];
    for o in 0..O {
        out[o] = F::apply(cols[o]);
    }
    out
}

/// Most input channels per block of `convolve_small` (blocks are equal): each block's 36
/// GEMMs add to the products, so fewer blocks make fewer passes over them, while the block's
/// kernel panels (up to 866 KiB) still sit in L2 between their transform and their GEMMs.
/// Against blocks of 128, alternating processes: 2 × 640 at 32×32 22.3–25.0 against
/// 24.5–28.4 ms, 2 × 1280 at 16×16 25.9–27.2 against 26.9–29.1 ms, and the Winograd-small
/// layers of a UNet step 942 and 928 against 977 and 970 ms.
const SMALL_CIN_BLOCK: usize = 384;
/// Panels of [`NR`] output channels per task of `convolve_small` from [`WIDE_MIN_TILES`]
/// tiles in the batch on. Each task streams every transformed tile once per block; at SD's
/// 32×32 level those (12 MiB at 2 × 640 channels) outgrow the L3 and came from memory once
/// per 16 output channels. Four panels read them a quarter as often: 2 × 640 at 32×32 took
/// 66.2–67.6 against 72.8–74.7 ms on two threads (1 thread, 4 alternating pairs: median
/// ratio 0.859). With fewer tiles the four panels' kernels (3.5 MiB) outgrow the L2 instead:
/// 2 × 1280 at 8×8 (8 tiles) took 1.08× as long, at 16×16 (32 tiles) about the same.
const WIDE_PANELS: usize = 4;
/// See [`WIDE_PANELS`].
const WIDE_MIN_TILES: usize = 64;
/// `G·g` for kernel column `c` of eight output channels (lanes from column `at` of `taps`).
#[inline(always)]
fn kernel_col(taps: &[[f32; NR]; 9], c: usize, at: usize) -> [Lanes; A] {
    kernel_1d([
        lanes_at(&taps[c], at),
        lanes_at(&taps[3 + c], at),
        lanes_at(&taps[6 + c], at),
    ])
}

#[inline(always)]
fn lanes_at(row: &[f32], at: usize) -> Lanes {
    let mut v = Lanes::ZERO;
    v.0.copy_from_slice(&row[at..at + LANES]);
    v
}

/// Input channels per block of [`transform_kernel_panel`]: the block's taps (18 KiB) stay in L1.
const KERNEL_BLOCK: usize = 32;

simd_fn! {
    /// The transformed kernels `G'·g·G'ᵀ` (unscaled: [`kernel_1d`]) of output channels
    /// `o0..o0 + NR` (those past `cout` zero) and input channels `c0..c0 + nb`: point `p`'s
    /// packed `nb × NR` panel (output channel fastest) at `dst[p · point_stride(nb)..]`. A
    /// block of input channels is first regrouped (`taps[ci][tap][j]`, 8 × 8 transposes), so
    /// that the transform runs on whole vectors of output channels (gathering lane by lane
    /// into vectors stalled on store forwarding). `flipped`: `w` is stored `(Cin, Cout, 3, 3)`
    /// and the kernel is its transpose rotated by 180° (a backward pass's `dx`), read so
    /// without a copy of `w`.
    #[allow(clippy::too_many_arguments)]
    fn transform_kernel_panel(w: &[f32], cout: usize, cin: usize, o0: usize, c0: usize, nb: usize, flipped: bool, dst: &mut [f32]) {
        let cols = NR.min(cout - o0);
        let mut taps = [[[0f32; NR]; 9]; KERNEL_BLOCK];
        for b0 in (c0..c0 + nb).step_by(KERNEL_BLOCK) {
            let block = &mut taps[..KERNEL_BLOCK.min(c0 + nb - b0)];
            // Each output channel's taps of the block are one contiguous run of `w`.
            let len = block.len() * 9;
            let run = |j: usize| &w[((o0 + j) * cin + b0) * 9..][..len];
            let flat = block.as_flattened_mut().as_flattened_mut();
            if flipped {
                // Each (input, output) pair's nine taps are a run of `w`, reversed.
                for (ci, ci_taps) in flat.chunks_exact_mut(9 * NR).enumerate() {
                    for j in 0..cols {
                        let taps = &w[((b0 + ci) * cout + o0 + j) * 9..][..9];
                        for (t, &x) in taps.iter().rev().enumerate() {
                            ci_taps[t * NR + j] = x;
                        }
                    }
                }
            }
            for j0 in (0..cols).step_by(LANES).filter(|_| !flipped) {
                if j0 + LANES <= cols {
                    transpose_rows8(std::array::from_fn(|j| run(j0 + j)), len, &mut flat[j0..], NR);
                } else {
                    for j in j0..cols {
                        for (e, &x) in run(j).iter().enumerate() {
                            flat[e * NR + j] = x;
                        }
                    }
                }
            }
            transform_taps(block, dst, (b0 - c0) * NR, point_stride(nb));
        }
    }
}

/// `G'·g·G'ᵀ` of the regrouped taps of a block of input channels ([`transform_kernel_panel`]):
/// input channel `ci`'s point `p` at `dst[p · ps + base + ci · NR..][..NR]`.
#[inline(always)]
fn transform_taps(block: &[[[f32; NR]; 9]], dst: &mut [f32], base: usize, ps: usize) {
    if block.is_empty() {
        return;
    }
    assert!((POINTS - 1) * ps + base + block.len() * NR <= dst.len());
    #[cfg(x86_simd)]
    if super::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA; the assert bounds every store.
        unsafe { avx2::transform_taps(block, dst.as_mut_ptr().add(base), ps) };
        return;
    }
    for (ci, ci_taps) in block.iter().enumerate() {
        for half in 0..NR / LANES {
            let at = half * LANES;
            // Plain calls, not closures: a closure is a function of its own, not
            // compiled into an AVX2 copy unless inlined.
            let [c0s, c1s, c2s] = [
                kernel_col(ci_taps, 0, at),
                kernel_col(ci_taps, 1, at),
                kernel_col(ci_taps, 2, at),
            ];
            let base = base + ci * NR + at;
            for (r, ((&x0, &x1), &x2)) in c0s.iter().zip(&c1s).zip(&c2s).enumerate() {
                for (k, val) in kernel_1d([x0, x1, x2]).iter().enumerate() {
                    let at = (r * A + k) * ps + base;
                    dst[at..at + LANES].copy_from_slice(&val.0);
                }
            }
        }
    }
}

#[cfg(x86_simd)]
mod avx2 {
    use super::{A, LANES, NR};
    use std::arch::x86_64::*;

    /// [`super::kernel_1d`] on eight lanes. `g0 + 4·g2` and `2·g1` are exact products, so
    /// the fused multiply-add rounds as the separate operations do: the same bits.
    #[inline(always)]
    unsafe fn kernel_1d(g: [__m256; 3]) -> [__m256; A] {
        let outer = _mm256_add_ps(g[0], g[2]);
        let far = _mm256_fmadd_ps(g[2], _mm256_set1_ps(4.0), g[0]);
        let mid = _mm256_add_ps(g[1], g[1]);
        [
            g[0],
            _mm256_add_ps(outer, g[1]),
            _mm256_sub_ps(outer, g[1]),
            _mm256_add_ps(far, mid),
            _mm256_sub_ps(far, mid),
            g[2],
        ]
    }

    /// [`super::transform_taps`] in registers: the generic code kept its 6 × 6 tiles and
    /// store offsets on the stack (bounds-checked index arithmetic and spills were most of
    /// its time), here each lane group's 36 points go straight from registers to `dst`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `dst` is writable at `p · ps + ci · NR..+ NR` for every
    /// point `p < 36` and `ci < block.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_taps(block: &[[[f32; NR]; 9]], dst: *mut f32, ps: usize) {
        for (ci, taps) in block.iter().enumerate() {
            for at in (0..NR).step_by(LANES) {
                let g: [__m256; 9] =
                    std::array::from_fn(|t| _mm256_loadu_ps(taps[t][at..].as_ptr()));
                let cols: [[__m256; A]; 3] =
                    std::array::from_fn(|c| kernel_1d([g[c], g[3 + c], g[6 + c]]));
                let out = dst.add(ci * NR + at);
                let rows: [[__m256; 3]; A] = std::array::from_fn(|r| cols.map(|c| c[r]));
                for (r, taps) in rows.into_iter().enumerate() {
                    let row = kernel_1d(taps);
                    for (k, val) in row.into_iter().enumerate() {
                        // SAFETY: point r · 6 + k of this channel and lane group, in bounds
                        // by the caller's contract.
                        _mm256_storeu_ps(out.add((r * A + k) * ps), val);
                    }
                }
            }
        }
    }
}

/// Kernels `(Cout, Cin, 3, 3)` → `G·g·Gᵀ` packed for the GEMMs' `b` operand: per panel of
/// [`NR`] output channels, the 36 points' `Cin × NR` panels ([`transform_kernel_panel`]),
/// one panel per task on every core: a point's panels are [`kernel_panels`] apart.
fn transform_kernels(w: &[f32], cout: usize, cin: usize, flipped: bool) -> Vec<f32> {
    let mut u = vec![0f32; cout.div_ceil(NR) * kernel_panels(cin)];
    u.par_chunks_mut(kernel_panels(cin).max(1))
        .enumerate()
        .for_each(|(panel, dst)| {
            transform_kernel_panel(w, cout, cin, panel * NR, 0, cin, flipped, dst);
            // Kept, so scaled once here ([`kernel_1d`]).
            for (p, point) in dst.chunks_exact_mut(point_stride(cin)).enumerate() {
                let scale = point_scale(p);
                point.iter_mut().for_each(|x| *x *= scale);
            }
        });
    u
}

/// Length of the 36 transformed kernel panels of [`NR`] output channels.
fn kernel_panels(cin: usize) -> usize {
    POINTS * point_stride(cin)
}

/// How far apart the points' kernel panels of `nb` input channels are: one spare row, since
/// panels a power of two apart map to the same few L1 sets.
fn point_stride(nb: usize) -> usize {
    (nb + 1) * NR
}

/// Where tile `t` of the batch sits: image, output row and column of its corner.
#[derive(Clone, Copy)]
struct Grid {
    h: usize,
    w: usize,
    tiles_x: usize,
    tiles_per_image: usize,
}

impl Grid {
    fn new(h: usize, w: usize) -> Self {
        let tiles_x = w.div_ceil(M);
        Self {
            h,
            w,
            tiles_x,
            tiles_per_image: h.div_ceil(M) * tiles_x,
        }
    }

    #[inline(always)]
    fn locate(&self, t: usize) -> (usize, usize, usize) {
        let (n, i) = (t / self.tiles_per_image, t % self.tiles_per_image);
        (n, (i / self.tiles_x) * M, (i % self.tiles_x) * M)
    }
}

simd_fn! {
    /// Transformed input tiles of a chunk of tiles (the GEMMs' `a`, one row per tile): the
    /// `Cin` values of point `p` of the chunk's tile `t` at `p · ps + t · ts` in `v`; pixels
    /// outside the image (padding 1, partial tiles) are zeros.
    fn transform_inputs(x: &[f32], v: &mut [f32], grid: Grid, cin: usize, chunk: Chunk, strides: (usize, usize)) {
        let Chunk { t0, nt } = chunk;
        let (ps, ts) = strides;
        // Eight channels at a time, one per lane. The six input rows of a row of tiles are
        // first interleaved into a band per eight channels (`band[r][x + 1][lane]`, zero
        // outside the image), by 8 × 8 transposes; each tile's 36 point vectors are then
        // plain loads. (Gathering them lane by lane from the eight planes stalled every
        // vector on store forwarding.) Tile by tile, all channels: each point's row of `v`
        // is written whole, not in 32-byte pieces a pass over the tiles apart.
        let bw = grid.tiles_x * M + 2;
        let band_len = A * bw * LANES;
        let mut bands = vec![0f32; cin.div_ceil(LANES) * band_len];
        let zeros = vec![0f32; grid.w];
        let mut filled = None;
        for t in 0..nt {
            let (n, y0, x0) = grid.locate(t0 + t);
            if filled != Some((n, y0)) {
                for (g, band) in bands.chunks_exact_mut(band_len).enumerate() {
                    let c0 = g * LANES;
                    let lanes = LANES.min(cin - c0);
                    fill_band(x, band, &zeros, grid, (n * cin + c0, lanes), y0);
                }
                filled = Some((n, y0));
            }
            for (g, band) in bands.chunks_exact(band_len).enumerate() {
                let c0 = g * LANES;
                let lanes = LANES.min(cin - c0);
                let mut d = [[Lanes::ZERO; A]; A];
                for (r, row) in d.iter_mut().enumerate() {
                    let src = &band[(r * bw + x0) * LANES..][..A * LANES];
                    for (px, vals) in row.iter_mut().zip(src.chunks_exact(LANES)) {
                        px.0.copy_from_slice(vals);
                    }
                }
                let tv = transform_2d::<InputTransform, _, A>(&d);
                for (p, val) in tv.iter().flatten().enumerate() {
                    copy_lanes(&mut v[p * ps + t * ts + c0..], &val.0, lanes);
                }
            }
        }
    }
}

/// The band of [`transform_inputs`] for the row of tiles at `y0` of planes
/// `first..first + lanes`: input rows `y0 − 1 ..= y0 + 4`, each pixel's lanes side by side
/// one column along (column 0 and those past the image stay zero: never written).
fn fill_band(
    x: &[f32],
    band: &mut [f32],
    zeros: &[f32],
    grid: Grid,
    (first, lanes): (usize, usize),
    y0: usize,
) {
    let plane = grid.h * grid.w;
    let row_len = band.len() / A;
    for (r, dst) in band.chunks_exact_mut(row_len).enumerate() {
        let dst = &mut dst[LANES..][..grid.w * LANES];
        let y = (y0 + r).wrapping_sub(1);
        if y >= grid.h {
            dst.fill(0.0);
            continue;
        }
        let rows = std::array::from_fn(|l| match l < lanes {
            true => &x[(first + l) * plane + y * grid.w..][..grid.w],
            false => zeros,
        });
        transpose_rows8(rows, grid.w, dst, LANES);
    }
}

/// `dst[..lanes] = src[..lanes]` for `lanes ≤ LANES`: a whole group compiles to one vector
/// move, where a run-time length would call `memcpy` for 32 bytes.
#[inline(always)]
fn copy_lanes(dst: &mut [f32], src: &[f32], lanes: usize) {
    if lanes == LANES {
        dst[..LANES].copy_from_slice(&src[..LANES]);
    } else {
        copy_some_lanes(dst, src, lanes);
    }
}

/// The partial group of [`copy_lanes`], out of line: inlined, both branches were the same
/// `memcpy(dst, src, 4 · lanes)` to the compiler, which merged them into one `memcpy` call
/// with a run-time length for every group, whole ones included.
#[cold]
#[inline(never)]
fn copy_some_lanes(dst: &mut [f32], src: &[f32], lanes: usize) {
    dst[..lanes].copy_from_slice(&src[..lanes]);
}

/// Tiles `t0..t0 + nt` of one task.
#[derive(Clone, Copy)]
struct Chunk {
    t0: usize,
    nt: usize,
}

simd_fn! {
    /// Inverse transform of the products `[tile][point][ld]` of a chunk of tiles for output
    /// channels `couts` (column `c − couts.start` of each row), plus the bias, into the
    /// `(N, Cout, H, W)` output (`Cout` = `bias.len()`). `unscaled`: the products are of
    /// kernels transformed by `G'` alone, each point still to be scaled ([`kernel_1d`]).
    #[allow(clippy::too_many_arguments)]
    fn transform_outputs(m: &[f32], ld: usize, couts: std::ops::Range<usize>, out: SendPtr, bias: &[f32], grid: Grid, chunk: Chunk, unscaled: bool) {
        let Chunk { t0, nt } = chunk;
        let cout = bias.len();
        let plane = grid.h * grid.w;
        // Tiles outer: a tile's products are one run of memory (its points' rows one after
        // the other), read in order (channels outer read half a cache line per point and
        // tile, in chunks of the cached-kernel path too big for L2: 4.4 MiB at 320 channels,
        // and took 11.75% of a 2 × 320 × 64² convolution by perf, nearly all waiting on
        // loads). The next tile's lines are asked for while this one is transformed: its 36
        // rows are more streams than the hardware prefetcher follows.
        for t in 0..nt {
            let (n, y0, x0) = grid.locate(t0 + t);
            for c0 in couts.clone().step_by(LANES) {
                let lanes = LANES.min(couts.end - c0);
                let mut tile = [[Lanes::ZERO; A]; A];
                let line_start = (c0 - couts.start).is_multiple_of(2 * LANES);
                for (p, val) in tile.iter_mut().flatten().enumerate() {
                    let at = (t * POINTS + p) * ld + c0 - couts.start;
                    if line_start {
                        prefetch(m.as_ptr().wrapping_add(at + POINTS * ld));
                    }
                    copy_lanes(&mut val.0, &m[at..], lanes);
                    if unscaled {
                        *val = *val * point_scale(p);
                    }
                }
                let y = transform_2d::<OutputTransform, _, M>(&tile);
                if lanes == LANES && y0 + M <= grid.h && x0 + M <= grid.w {
                    // A whole tile: each channel's row of M pixels in one store (element by
                    // element, the stores and lane extracts took most of this function).
                    let mut b = Lanes::ZERO;
                    b.0.copy_from_slice(&bias[c0..c0 + LANES]);
                    for (r, row) in y.iter().enumerate() {
                        let row = row.map(|v| v + b);
                        for l in 0..LANES {
                            let px: [f32; M] = std::array::from_fn(|k| row[k].0[l]);
                            let at = (n * cout + c0 + l) * plane + (y0 + r) * grid.w + x0;
                            let dst = out.get().wrapping_add(at);
                            // SAFETY: in bounds (a whole tile inside the image); these tiles
                            // and channels belong to this task alone.
                            unsafe { std::ptr::copy_nonoverlapping(px.as_ptr(), dst, M) };
                        }
                    }
                    continue;
                }
                for (l, &b) in bias[c0..c0 + lanes].iter().enumerate() {
                    let base = (n * cout + c0 + l) * plane;
                    for (r, row) in y.iter().enumerate().take(grid.h - y0) {
                        for (k, val) in row.iter().enumerate().take(grid.w - x0) {
                            // SAFETY: in bounds (rows/cols clipped to the image); these
                            // tiles and channels belong to this task alone.
                            unsafe { *out.get().add(base + (y0 + r) * grid.w + x0 + k) = val.0[l] + b };
                        }
                    }
                }
            }
        }
    }
}

/// Winograd convolution of tiles `t0..t0 + nt`: input transform, 36 GEMMs
/// `(tiles × Cin)·(Cin × Cout)` on the register tiles, output transform.
#[allow(clippy::too_many_arguments)]
fn convolve_tiles(
    x: &[f32],
    u: &[f32],
    bias: &[f32],
    out: SendPtr,
    grid: Grid,
    (cin, cout): (usize, usize),
    t0: usize,
    nt: usize,
) {
    thread_local! {
        // Both buffers are overwritten in full each time, so a thread's scratch is reused
        // as is instead of allocating (and zeroing) megabytes per task.
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut scratch = SCRATCH.take();
    scratch.resize(scratch.len().max(POINTS * (cin + cout) * nt), 0.0);
    let (v, m) = scratch.split_at_mut(POINTS * cin * nt);
    let m = &mut m[..POINTS * cout * nt];
    let chunk = Chunk { t0, nt };
    transform_inputs(x, v, grid, cin, chunk, (nt * cin, cin));
    let g = Gemm {
        m: nt,
        n: cout,
        k: cin,
        lda: cin,
        b: B::Packed {
            panel_stride: kernel_panels(cin),
        },
        rs_c: POINTS * cout,
        cs_c: 1,
        accumulate: false,
        bias_per_col: false,
        bf16: false,
    };
    for p in 0..POINTS {
        g.run(
            &v[p * cin * nt..][..cin * nt],
            &u[p * point_stride(cin)..],
            &mut m[p * cout..],
            None,
        );
    }
    transform_outputs(m, cout, 0..cout, out, bias, grid, chunk, false);
    SCRATCH.set(scratch);
}

/// Winograd convolution of a small map (few tiles, e.g. SD's 32×32, 16×16 and 8×8 levels), with
/// no cached kernels: the input tiles of the whole batch are transformed once, then each task
/// takes [`NR`] output channels ([`WIDE_PANELS`] times that on many tiles) and, per block of
/// [`SMALL_CIN_BLOCK`] input channels, transforms their kernels (36 panels each) and adds the
/// block's 36 GEMMs `(tiles × block)·(block × channels)`, then runs the output transform.
/// Caching the transformed kernels of these 1,280-channel layers would take gigabytes, and
/// writing a whole panel's transform out to memory before its GEMMs cost more than the GEMMs
/// at 8×8.
fn convolve_small(
    x: &[f32],
    w: &GemmWeight<'_>,
    bias: &[f32],
    out: SendPtr,
    grid: Grid,
    (n, cin, cout): (usize, usize, usize),
    flipped: bool,
) {
    let nt = n * grid.tiles_per_image;
    let chunk = Chunk { t0: 0, nt };
    thread_local! {
        // The transformed tiles (on the calling thread), and each task's kernel panels and
        // products: overwritten in full on every use, so reused as they are.
        static TILES_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // Tile-major (`[tile][point][Cin]`, a tile's 36 rows padded by one panel so that the rows
    // a GEMM tile reads do not all map to one L1 set), so that each task transforms one row
    // of tiles into its own part of `v` on every core (on the calling thread alone, the
    // transform kept the other core idle for about 1% of an SD 1.5 UNet step).
    let ts = POINTS * cin + NR;
    let mut v = TILES_SCRATCH.take();
    v.resize(v.len().max(nt * ts), 0.0);
    v[..nt * ts]
        .par_chunks_mut(grid.tiles_x * ts)
        .enumerate()
        .for_each(|(i, v)| {
            let t0 = i * grid.tiles_x;
            let part = Chunk {
                t0,
                nt: grid.tiles_x.min(nt - t0),
            };
            transform_inputs(x, v, grid, cin, part, (cin, ts));
        });
    let panels = match nt >= WIDE_MIN_TILES {
        true => WIDE_PANELS,
        false => 1,
    };
    let width = panels * NR;
    (0..cout.div_ceil(width)).into_par_iter().for_each(|task| {
        let o0 = task * width;
        let cols = width.min(cout - o0);
        let mut scratch = SCRATCH.take();
        // Equal blocks: no thin last one paying a whole pass over the products.
        let block = even_split(cin, SMALL_CIN_BLOCK);
        let panels_len = panels * kernel_panels(block);
        scratch.resize(scratch.len().max(panels_len + POINTS * width * nt), 0.0);
        // A bf16 weight as stored: this task's output channels widened (one contiguous run
        // of the weight), not all of it for every call.
        let widened: Vec<f32>;
        let (wk, wk_cout, wk_o0) = match w {
            GemmWeight::F32(w) => (&w[..], cout, o0),
            GemmWeight::InPlace(w) => {
                let run = &w[o0 * cin * 9..(o0 + cols) * cin * 9];
                widened = {
                    let mut v = vec![0f32; run.len()];
                    super::widen_bf16(run, &mut v);
                    v
                };
                (&widened[..], cols, 0)
            }
        };
        let (u, m) = scratch.split_at_mut(panels_len);
        if cin == 0 {
            // No GEMM writes the products: the output is the bias alone.
            m.fill(0.0);
        }
        for c0 in (0..cin).step_by(block) {
            let nb = block.min(cin - c0);
            let panel_stride = kernel_panels(nb);
            for (q, u) in u
                .chunks_exact_mut(panel_stride)
                .take(cols.div_ceil(NR))
                .enumerate()
            {
                transform_kernel_panel(wk, wk_cout, cin, wk_o0 + q * NR, c0, nb, flipped, u);
            }
            let g = Gemm {
                m: nt,
                n: cols,
                k: nb,
                lda: ts,
                b: B::Packed { panel_stride },
                rs_c: POINTS * width,
                cs_c: 1,
                accumulate: c0 > 0,
                bias_per_col: false,
                bf16: false,
            };
            for p in 0..POINTS {
                g.run(
                    &v[p * cin + c0..],
                    &u[p * point_stride(nb)..],
                    &mut m[p * width..],
                    None,
                );
            }
        }
        transform_outputs(m, width, o0..o0 + cols, out, bias, grid, chunk, true);
        SCRATCH.set(scratch);
    });
    TILES_SCRATCH.set(v);
}

/// A layer's transformed kernels, and whether the layer already ran once.
#[derive(Debug, Default)]
struct WinogradCache {
    used: AtomicBool,
    kernels: OnceLock<Vec<f32>>,
}

/// The Winograd op over `(x, weight, bias)`; `cache` holds the transformed kernels of a frozen
/// weight. `flipped`: the weight is stored `(Cin, Cout, 3, 3)` and convolved transposed and
/// rotated by 180° (a backward pass's input gradient).
struct Winograd {
    cache: Option<Arc<WinogradCache>>,
    flipped: bool,
}

impl CustomOp3 for Winograd {
    fn name(&self) -> &'static str {
        "winograd-conv3x3"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = lx.shape().dims4()?;
        let (w0, w1, ..) = lw.shape().dims4()?;
        let cout = if self.flipped { w1 } else { w0 };
        let x = f32_input(sx, lx, "conv input")?;
        let bias = f32_input(sb, lb, "conv bias")?;
        let grid = Grid::new(h, w);
        let tiles = n * grid.tiles_per_image;
        // Every element is written: the tiles cover the map, and every output tile is written.
        let mut out = output_buffer(n * cout * h * w);
        let ptr = SendPtr(out.as_mut_ptr());
        // By the tiles of one image, as [`Conv2d::path`] chooses.
        if grid.tiles_per_image < MIN_TILES && !cheap_kernels(cin, cout) {
            let wt = match self.flipped {
                // (A flipped weight's output channels are not runs of it.)
                true => GemmWeight::F32(f32_input(sw, lw, "conv weight")?),
                false => GemmWeight::new(sw, lw)?,
            };
            convolve_small(&x, &wt, &bias, ptr, grid, (n, cin, cout), self.flipped);
            return Ok((f32_output(out, sx.dtype())?, Shape::from((n, cout, h, w))));
        }
        let transform = || -> Result<Vec<f32>> {
            Ok(transform_kernels(
                &f32_input(sw, lw, "conv weight")?,
                cout,
                cin,
                self.flipped,
            ))
        };
        let fresh;
        let u = match self.cache.as_ref().map(|c| &c.kernels) {
            Some(cache) => match cache.get() {
                Some(u) => u,
                None => {
                    let u = transform()?;
                    cache.get_or_init(|| u)
                }
            },
            None => {
                fresh = transform()?;
                &fresh
            }
        };
        // Equal chunks of about `per_task` tiles, at least one per thread where there are
        // enough tiles, so that both cores finish together.
        let per_task = match cheap_kernels(cin, cout) {
            true => CHEAP_TILES,
            false => TILES,
        };
        let chunks = tiles
            .div_ceil(per_task)
            .max(rayon::current_num_threads())
            .min(tiles.div_ceil(LANES));
        let chunk = tiles.div_ceil(chunks);
        (0..tiles.div_ceil(chunk)).into_par_iter().for_each(|i| {
            let t0 = i * chunk;
            convolve_tiles(
                &x,
                u,
                &bias,
                ptr,
                grid,
                (cin, cout),
                t0,
                chunk.min(tiles - t0),
            );
        });
        Ok((f32_output(out, sx.dtype())?, Shape::from((n, cout, h, w))))
    }

    /// Exact gradients without candle's CPU `conv_transpose2d` (tens of times slower than
    /// the forward): `dx` is itself a 3×3 "same" convolution of `dy` with the kernel
    /// transposed (in ↔ out) and rotated 180°, so it takes this Winograd path too; `dw` is
    /// nine GEMMs per image over shifted views of a bordered copy, with `db` in the same pass
    /// ([`WeightGrad`], [`same_conv_weight_grad`]).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (cout, cin, ..) = w.dims4()?;
        let grad = grad.contiguous()?;
        let zero_bias = Tensor::zeros(cin, grad.dtype(), grad.device())?;
        let flipped = Winograd {
            cache: None,
            flipped: true,
        };
        // Not for data (the first layer's input): its gradient would be thrown away.
        let grad_x = match x.track_op() {
            true => Some(timed_grad("dx winograd", x, w, 1, || {
                grad.apply_op3_no_bwd(&w.contiguous()?, &zero_bias, &flipped)
            })?),
            false => None,
        };
        if !w.track_op() && !b.track_op() {
            // A frozen layer (adapter training): its weight gradient would be thrown away.
            return Ok((grad_x, None, None));
        }
        let cols = Columns::Im2col { stride: 1 };
        let dwb = timed_grad("dw", x, w, 1, || {
            x.apply_op2_no_bwd(&grad, &WeightGrad { cols })
        })?;
        let grad_w = dwb.narrow(0, 0, cout * cin * 9)?.reshape(w.shape())?;
        let grad_b = dwb.narrow(0, cout * cin * 9, cout)?;
        Ok((grad_x, Some(grad_w), Some(grad_b)))
    }
}

/// How a convolution's GEMM operand is read from one `(C, H, W)` image: the image itself
/// (a 1×1 convolution) or its im2col matrix (3×3, padding 1, stride 1 or 2).
#[derive(Clone, Copy, Debug)]
enum Columns {
    Pointwise,
    Im2col { stride: usize },
}

impl Columns {
    /// Rows of the matrix per input channel.
    fn taps(self) -> usize {
        match self {
            Columns::Pointwise => 1,
            Columns::Im2col { .. } => 9,
        }
    }

    /// The matrix `(C·taps, Ho·Wo)` of `img`: the image itself, or its im2col rows in `col`.
    fn of<'a>(
        self,
        img: &'a [f32],
        col: &'a mut [f32],
        (h, w): (usize, usize),
        (ho, wo): (usize, usize),
    ) -> &'a [f32] {
        match self {
            Columns::Pointwise => img,
            Columns::Im2col { stride: 1 } => {
                im2col(img, col, h, w);
                col
            }
            Columns::Im2col { .. } => {
                im2col_stride2(img, col, h, w, ho, wo);
                col
            }
        }
    }
}

/// `dw` and `db` of a convolution read as `out = W · cols(x) + b` ([`Columns`]), flat one
/// after the other, from `(x, dy)`: per image `dw += dy (Cout × Ho·Wo) · colsᵀ` and
/// `db += Σ dy` per channel (cheaper here than candle's strided sum), accumulated per thread.
struct WeightGrad {
    cols: Columns,
}

/// Rows `(c, ky, kx)` of the im2col matrix of one `(C, H, W)` image with padding 1 and
/// stride 2: row `j` holds `x[c, 2·oy + ky − 1, 2·ox + kx − 1]` (0 outside) for every output
/// `(oy, ox)` of the `(ho, wo)` map.
fn im2col_stride2(img: &[f32], col: &mut [f32], h: usize, w: usize, ho: usize, wo: usize) {
    let plane = h * w;
    for (j, row) in col.chunks_exact_mut(ho * wo).enumerate() {
        let (c, ky, kx) = (j / 9, j % 9 / 3, j % 3);
        let src = &img[c * plane..(c + 1) * plane];
        for (oy, dst) in row.chunks_exact_mut(wo).enumerate() {
            let sy = (2 * oy + ky).wrapping_sub(1);
            if sy >= h {
                dst.fill(0.0);
                continue;
            }
            let s = &src[sy * w..(sy + 1) * w];
            for (ox, d) in dst.iter_mut().enumerate() {
                let sx = (2 * ox + kx).wrapping_sub(1);
                *d = if sx < w { s[sx] } else { 0.0 };
            }
        }
    }
}

/// Rows `(c, ky, kx)` of the im2col matrix of one `(C, H, W)` image with padding 1.
fn im2col(img: &[f32], col: &mut [f32], h: usize, w: usize) {
    let plane = h * w;
    for (j, row) in col.chunks_exact_mut(plane).enumerate() {
        let (c, ky, kx) = (j / 9, j % 9 / 3, j % 3);
        let src = &img[c * plane..(c + 1) * plane];
        for (y, dst) in row.chunks_exact_mut(w).enumerate() {
            let sy = (y + ky).wrapping_sub(1);
            if sy >= h {
                dst.fill(0.0);
                continue;
            }
            let s = &src[sy * w..(sy + 1) * w];
            match kx {
                0 => {
                    dst[0] = 0.0;
                    dst[1..].copy_from_slice(&s[..w - 1]);
                }
                1 => dst.copy_from_slice(s),
                _ => {
                    dst[..w - 1].copy_from_slice(&s[1..]);
                    dst[w - 1] = 0.0;
                }
            }
        }
    }
}

impl candle_core::CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv-weight-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = lx.shape().dims4()?;
        let (_, cout, ho, wo) = lg.shape().dims4()?;
        let x = f32_input(sx, lx, "conv input")?;
        let g = f32_input(sg, lg, "conv output gradient")?;
        let (plane, k) = (ho * wo, cin * self.cols.taps());
        let bf16 = super::autocast();
        let col_len = if self.cols.taps() == 1 { 0 } else { k * plane };
        // Images are summed in fixed groups, and the groups in order, so that the gradient
        // does not depend on how rayon splits the work: training is reproducible bit for
        // bit (a resumed run equals an uninterrupted one).
        let per_group = n.div_ceil(WEIGHT_GRAD_GROUPS).max(1);
        let partial: Vec<Vec<f32>> = (0..n.div_ceil(per_group))
            .into_par_iter()
            .map(|grp| {
                let mut dwb = vec![0f32; cout * (k + 1)];
                let images = grp * per_group..((grp + 1) * per_group).min(n);
                if let Columns::Im2col { stride: 1 } = self.cols {
                    same_conv_weight_grad(&x, &g, images, (cin, cout, h, w), bf16, &mut dwb);
                    return dwb;
                }
                let mut col = vec![0f32; col_len];
                let mut dy_t = vec![0f32; cout.div_ceil(NR) * NR * plane];
                for i in images {
                    let img = &x[i * cin * h * w..(i + 1) * cin * h * w];
                    let cols = self.cols.of(img, &mut col, (h, w), (ho, wo));
                    let dy = &g[i * cout * plane..(i + 1) * cout * plane];
                    pack_kt(dy, (cout, plane, plane), 1.0, &mut dy_t);
                    let (dw, db) = dwb.split_at_mut(cout * k);
                    // dwᵀ (K × Cout) += cols · dyᵀ, stored transposed into dw.
                    let gemm = Gemm {
                        m: k,
                        n: cout,
                        k: plane,
                        lda: plane,
                        b: B::packed(plane),
                        rs_c: 1,
                        cs_c: k,
                        accumulate: true,
                        bias_per_col: false,
                        bf16,
                    };
                    gemm.run(cols, &dy_t, dw, None);
                    for (b, row) in db.iter_mut().zip(dy.chunks_exact(plane)) {
                        *b += super::sum(row);
                    }
                }
                dwb
            })
            .collect();
        let mut parts = partial.into_iter();
        let mut dwb = parts.next().unwrap_or_else(|| vec![0f32; cout * (k + 1)]);
        for p in parts {
            dwb.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        let len = dwb.len();
        Ok((f32_output(dwb, sx.dtype())?, Shape::from(len)))
    }
}

/// `dw` and `db` (flat, as [`WeightGrad`]) of a 3×3 padding-1 stride-1 convolution, summed
/// over `images` of `x` (`(N, Cin, H, W)`) and `dy` (`(N, Cout, H, W)`), without an im2col
/// matrix. Each image is copied into a zero border, `(H+2) × (W+2)` per channel, and `dy` into
/// rows of `W+2` whose last two values are 0. Then, over `m = y·(W+2) + x`, tap `(ky, kx)`'s
/// input `x[c, y+ky−1, x+kx−1]` is the bordered image at `c·(H+2)(W+2) + ky·(W+2) + kx + m`:
/// one shifted view, so each tap is one GEMM reading its rows straight from the bordered
/// copy (lda = the bordered plane), where the im2col matrix wrote and re-read 9 copies of the
/// image. The two padding columns of `dy` cancel the values that wrap around a row.
fn same_conv_weight_grad(
    x: &[f32],
    g: &[f32],
    images: std::ops::Range<usize>,
    (cin, cout, h, w): (usize, usize, usize, usize),
    bf16: bool,
    dwb: &mut [f32],
) {
    let (plane, wp) = (h * w, w + 2);
    let (pp, kp, k) = ((h + 2) * wp, h * wp, cin * 9);
    // The borders stay 0; only the interiors are written per image. Tap (2, 2) reads two
    // values past the last channel's plane (multiplied by the 0 columns of `dy`).
    let mut bordered = vec![0f32; cin * pp + 2];
    // In bf16, both operands are converted once per image rather than once per tap.
    let mut bordered_bf16 = vec![half::bf16::ZERO; if bf16 { bordered.len() } else { 0 }];
    let mut dy_rows = vec![0f32; cout * kp];
    let mut dy_t = vec![0f32; cout.div_ceil(NR) * NR * kp];
    let (dw, db) = dwb.split_at_mut(cout * k);
    // dwᵀ rows (c, tap) for every c: 9 rows apart in dw stored transposed.
    let gemm = Gemm {
        m: cin,
        n: cout,
        k: kp,
        lda: pp,
        b: B::packed(kp),
        rs_c: 9,
        cs_c: k,
        accumulate: true,
        bias_per_col: false,
        bf16,
    };
    for i in images {
        let img = &x[i * cin * plane..(i + 1) * cin * plane];
        for (src, dst) in img.chunks_exact(plane).zip(bordered.chunks_exact_mut(pp)) {
            for (s, d) in src.chunks_exact(w).zip(dst[wp + 1..].chunks_mut(wp)) {
                d[..w].copy_from_slice(s);
            }
        }
        let dy = &g[i * cout * plane..(i + 1) * cout * plane];
        for (src, dst) in dy.chunks_exact(plane).zip(dy_rows.chunks_exact_mut(kp)) {
            for (s, d) in src.chunks_exact(w).zip(dst.chunks_exact_mut(wp)) {
                d[..w].copy_from_slice(s);
            }
        }
        pack_kt(&dy_rows, (cout, kp, kp), 1.0, &mut dy_t);
        let pairs = match bf16 {
            true => {
                super::narrow_bf16(&bordered, &mut bordered_bf16);
                pack_pairs(&gemm, &dy_t)
            }
            false => None,
        };
        for tap in 0..9 {
            let shift = tap / 3 * wp + tap % 3;
            match &pairs {
                Some(pairs) => gemm.run_bf16(
                    BfA::Bf16(&bordered_bf16[shift..]),
                    BfB::Pairs(pairs),
                    &mut dw[tap..],
                    None,
                ),
                None => gemm.run(&bordered[shift..], &dy_t, &mut dw[tap..], None),
            }
        }
        for (b, row) in db.iter_mut().zip(dy.chunks_exact(plane)) {
            *b += super::sum(row);
        }
    }
}

/// `dx` of a convolution read as `out = W · cols(x) + b` ([`Columns`]) from `(w, dy)`: per
/// image `Wᵀ · dy`, the gradient of the columns, which for im2col columns is then added back
/// to the pixels they were read from. `(h, w)`: the input's size (a stride-2 output does not
/// tell it).
struct InputGrad {
    cols: Columns,
    h: usize,
    w: usize,
}

impl candle_core::CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv-input-grad"
    }

    fn cpu_fwd(
        &self,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cout, ho, wo) = lg.shape().dims4()?;
        let cin = lw.shape().dims4()?.1;
        let (h, w) = (self.h, self.w);
        let wt = f32_input(sw, lw, "conv weight")?;
        let g = f32_input(sg, lg, "conv output gradient")?;
        let (plane, k) = (ho * wo, cin * self.cols.taps());
        let mut w_t = vec![0f32; k * cout];
        transpose(&wt, (cout, k, k), &mut w_t);
        let gemm = Gemm {
            m: k,
            n: plane,
            k: cout,
            lda: cout,
            b: B::Rows { ld: plane },
            rs_c: plane,
            cs_c: 1,
            accumulate: false,
            bias_per_col: false,
            bf16: super::autocast(),
        };
        // Pointwise: the product is the gradient and writes all of it; im2col: the columns'
        // gradients are summed into zeros.
        let mut out = match self.cols {
            Columns::Pointwise => output_buffer(n * cin * h * w),
            Columns::Im2col { .. } => vec![0f32; n * cin * h * w],
        };
        per_image(&mut out, cin * h * w, |i, dx, parallel| {
            let dy = &g[i * cout * plane..(i + 1) * cout * plane];
            match self.cols {
                Columns::Pointwise => run_gemm(&gemm, &w_t, dy, dx, None, parallel),
                // The GEMM writes every element of the columns.
                Columns::Im2col { stride } => with_scratch(k * plane, |col| {
                    run_gemm(&gemm, &w_t, dy, col, None, parallel);
                    col2im(col, dx, (h, w), (ho, wo), stride);
                }),
            }
        });
        Ok((f32_output(out, sg.dtype())?, Shape::from((n, cin, h, w))))
    }
}

/// Adds im2col rows `(c, ky, kx)` (padding 1, `stride`) of an `(Ho, Wo)` output back onto the
/// `(C, H, W)` pixels they were read from: the adjoint of [`im2col`] / [`im2col_stride2`].
fn col2im(
    col: &[f32],
    img: &mut [f32],
    (h, w): (usize, usize),
    (ho, wo): (usize, usize),
    stride: usize,
) {
    let plane = h * w;
    for (j, row) in col.chunks_exact(ho * wo).enumerate() {
        let (c, ky, kx) = (j / 9, j % 9 / 3, j % 3);
        let dst = &mut img[c * plane..(c + 1) * plane];
        for (oy, src) in row.chunks_exact(wo).enumerate() {
            let sy = (stride * oy + ky).wrapping_sub(1);
            if sy >= h {
                continue;
            }
            let d = &mut dst[sy * w..(sy + 1) * w];
            for (ox, &v) in src.iter().enumerate() {
                let sx = (stride * ox + kx).wrapping_sub(1);
                if sx < w {
                    d[sx] += v;
                }
            }
        }
    }
}

/// The gradients of a convolution read as `out = W · cols(x) + b`: `dx` unless `x` is data
/// (nothing tracked), `dw` and `db` unless the layer is frozen (adapter training).
fn gemm_conv_grads(
    cols: Columns,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (_, _, h, wd) = x.dims4()?;
    let (cout, cin, kh, kw) = w.dims4()?;
    let grad = grad.contiguous()?;
    let stride = match cols {
        Columns::Pointwise => 1,
        Columns::Im2col { stride } => stride,
    };
    let grad_x = match x.track_op() {
        true => Some(timed_grad("dx", x, w, stride, || {
            w.contiguous()?
                .apply_op2_no_bwd(&grad, &InputGrad { cols, h, w: wd })
        })?),
        false => None,
    };
    if !w.track_op() && !b.track_op() {
        return Ok((grad_x, None, None));
    }
    let k = cin * kh * kw;
    let dwb = timed_grad("dw", x, w, stride, || {
        x.contiguous()?
            .apply_op2_no_bwd(&grad, &WeightGrad { cols })
    })?;
    let grad_w = dwb.narrow(0, 0, cout * k)?.reshape(w.shape())?;
    let grad_b = dwb.narrow(0, cout * k, cout)?;
    Ok((grad_x, Some(grad_w), Some(grad_b)))
}

/// Runs one half of a convolution's backward pass (`dx`, the input gradient, or `dw`, the
/// weight and bias gradients) under the profile, named as the forward is (`conv3x3/1 dw
/// 64->64 32x32`) and counted at the forward's FLOPs, which each half costs as well.
fn timed_grad<T>(
    half: &str,
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let (n, cin, h, wd) = x.dims4()?;
    let (cout, _, kh, kw) = w.dims4()?;
    let outputs = n * h.div_ceil(stride) * wd.div_ceil(stride);
    let flops = 2.0 * (outputs * cout * cin * kh * kw) as f64;
    crate::profile::timed(
        || format!("conv{kh}x{kw}/{stride} {half} {cin}->{cout} {h}x{wd}"),
        flops,
        f,
    )
}

/// A 3×3 padding-1 convolution (stride 1 or 2) as im2col and one multi-threaded GEMM per
/// image, `out (Cout × Ho·Wo) = W (Cout × Cin·9) · col + b`, written straight into NCHW: for
/// maps of fewer than [`MIN_SMALL_TILES`] tiles per image ([`MIN_CHEAP_TILES`] for cheap
/// kernels), where transforming the kernels would cost more than Winograd saves, and for the
/// downsamplers. In f32 the columns are built in the GEMM's panels, a block of output pixels
/// at a time ([`packed_im2col_conv`]); bf16 products take the whole row-major matrix. candle's
/// own path (im2col in NHWC order, a batched matmul, then a transpose copy) ran at half the
/// speed here.
struct Im2colConv {
    stride: usize,
}

impl CustomOp3 for Im2colConv {
    fn name(&self) -> &'static str {
        "im2col-conv3x3"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = lx.shape().dims4()?;
        let (cout, ..) = lw.shape().dims4()?;
        let x = f32_input(sx, lx, "conv input")?;
        let bias = f32_input(sb, lb, "conv bias")?;
        let wt = GemmWeight::new(sw, lw)?;
        let bf16 = sx.dtype() == DType::BF16 || super::autocast();
        let s = self.stride;
        // PyTorch's output size for kernel 3, padding 1.
        let (ho, wo) = ((h - 1) / s + 1, (w - 1) / s + 1);
        let (plane, k) = (ho * wo, cin * 9);
        // Every element is written: each image's GEMM writes all of its output.
        let mut out = output_buffer(n * cout * plane);
        per_image(&mut out, cout * plane, |i, dst, parallel| {
            let img = &x[i * cin * h * w..(i + 1) * cin * h * w];
            if let (BfA::F32(weight), false) = (wt.operand(), bf16) {
                let geometry = ColumnGeometry {
                    cin,
                    h,
                    w,
                    wo,
                    stride: s,
                };
                return packed_im2col_conv(img, geometry, weight, &bias, dst, parallel);
            }
            // The im2col functions write every element of the matrix.
            with_scratch(k * plane, |col| {
                // A channel's 9 rows of the im2col matrix at a time.
                let rows = |(c, rows): (usize, &mut [f32])| {
                    let src = &img[c * h * w..(c + 1) * h * w];
                    if s == 1 {
                        im2col(src, rows, h, w);
                    } else {
                        im2col_stride2(src, rows, h, w, ho, wo);
                    }
                };
                if parallel {
                    col.par_chunks_mut(9 * plane).enumerate().for_each(rows);
                } else {
                    col.chunks_mut(9 * plane).enumerate().for_each(rows);
                }
                weight_times_image(wt.operand(), col, &bias, dst, (parallel, bf16));
            });
        });
        Ok((f32_output(out, sx.dtype())?, Shape::from((n, cout, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.stride != 1 {
            return gemm_conv_grads(
                Columns::Im2col {
                    stride: self.stride,
                },
                x,
                w,
                b,
                grad,
            );
        }
        // The gradients of a stride-1 "same" convolution, whichever kernel computed it.
        Winograd {
            cache: None,
            flipped: false,
        }
        .bwd(x, w, b, res, grad)
    }
}

/// A convolution's weight for its GEMM: a bf16 layer's as stored where the bf16 tiles read it
/// in place (the other paths would widen all of it on every call: 118 MB for SD's
/// 2560 → 1280 layers), else in f32.
enum GemmWeight<'a> {
    InPlace(&'a [half::bf16]),
    F32(Cow<'a, [f32]>),
}

impl<'a> GemmWeight<'a> {
    fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::BF16(v), Some((start, end))) if super::has_bf16_dot() => {
                Ok(Self::InPlace(&v[start..end]))
            }
            _ => Ok(Self::F32(f32_input(s, l, "conv weight")?)),
        }
    }

    fn operand(&self) -> BfA<'_> {
        match self {
            Self::InPlace(w) => BfA::Bf16(w),
            Self::F32(w) => BfA::F32(w),
        }
    }
}

/// Where the im2col columns of one image come from: its `(cin, h, w)`, the output width and the
/// stride (kernel 3, padding 1).
#[derive(Clone, Copy)]
struct ColumnGeometry {
    cin: usize,
    h: usize,
    w: usize,
    wo: usize,
    stride: usize,
}

/// Most values of a block of [`packed_im2col_conv`]'s columns (8 MiB: within [`SCRATCH_MAX`],
/// so the block's buffer is kept from call to call).
const PACKED_COLUMNS_MAX: usize = 2 << 20;

/// `dst = w · im2col(img) + bias` for one f32 image, the im2col matrix built block by block of
/// output pixels straight in the GEMM's packed panels ([`B::packed`]): no row-major matrix to
/// pack again (9% of a 2 × 640 × 32² stride-2 convolution by perf), and at most
/// [`PACKED_COLUMNS_MAX`] values of it at a time (a VAE encoder's stride-2 layer at 512²
/// built a 302 MB matrix). The panels hold the values the row-major matrix held, and the GEMM
/// splits no K, so the output is the same to the bit.
fn packed_im2col_conv(
    img: &[f32],
    geo: ColumnGeometry,
    w: &[f32],
    bias: &[f32],
    dst: &mut [f32],
    parallel: bool,
) {
    let (cout, k) = (bias.len(), geo.cin * 9);
    let plane = dst.len().checked_div(cout).unwrap_or(0);
    if k == 0 || plane == 0 {
        // No taps: the output is the bias.
        for (row, &b) in dst.chunks_exact_mut(plane.max(1)).zip(bias) {
            row.fill(b);
        }
        return;
    }
    let block = (PACKED_COLUMNS_MAX / (k * NR)).max(1) * NR;
    for p0 in (0..plane).step_by(block) {
        let np = block.min(plane - p0);
        with_scratch(np.div_ceil(NR) * NR * k, |cols| {
            let fill = |(q, panel): (usize, &mut [f32])| {
                let first = p0 + q * NR;
                pack_columns(img, geo, first..(first + NR).min(p0 + np), panel)
            };
            if parallel {
                cols.par_chunks_mut(NR * k).enumerate().for_each(fill);
            } else {
                cols.chunks_mut(NR * k).enumerate().for_each(fill);
            }
            let g = Gemm {
                m: cout,
                n: np,
                k,
                lda: k,
                b: B::packed(k),
                rs_c: plane,
                cs_c: 1,
                accumulate: false,
                bias_per_col: false,
                bf16: false,
            };
            run_gemm(&g, w, cols, &mut dst[p0..], Some(bias), parallel);
        });
    }
}

/// One packed panel (`K × NR`, row `(c, ky, kx)` holding the output pixels `pixels`, zero past
/// them) of the im2col matrix: `x[c, s·oy + ky − 1, s·ox + kx − 1]`, 0 outside the image.
fn pack_columns(
    img: &[f32],
    geo: ColumnGeometry,
    pixels: std::ops::Range<usize>,
    panel: &mut [f32],
) {
    let ColumnGeometry {
        h, w, wo, stride, ..
    } = geo;
    // Where each tap of each pixel reads in a channel's plane; `usize::MAX` (no value) for
    // padding and for the panel's columns past `pixels`.
    let mut at = [[usize::MAX; NR]; 9];
    for (j, p) in pixels.enumerate() {
        let (oy, ox) = (p / wo, p % wo);
        for (t, at) in at.iter_mut().enumerate() {
            let sy = (stride * oy + t / 3).wrapping_sub(1);
            let sx = (stride * ox + t % 3).wrapping_sub(1);
            if sy < h && sx < w {
                at[j] = sy * w + sx;
            }
        }
    }
    for (c, taps) in panel.chunks_exact_mut(9 * NR).enumerate() {
        let src = &img[c * h * w..(c + 1) * h * w];
        for (out, at) in taps.chunks_exact_mut(NR).zip(&at) {
            for (o, &i) in out.iter_mut().zip(at) {
                *o = src.get(i).copied().unwrap_or(0.0);
            }
        }
    }
}

/// `dst (Cout × P) = w (Cout × K) · x (K × P) + bias` for one image, all row-major, on every
/// core when `parallel`: an im2col matrix (K = 9·Cin) or the image itself (a 1×1 convolution,
/// K = Cin). The bias enters in the GEMM's first store, not as a pass of its own. `bf16`: a
/// bf16 layer's product ([`Gemm::bf16`]), on every core (the same values: the split is over
/// rows and columns, never K).
fn weight_times_image(
    w: BfA<'_>,
    x: &[f32],
    bias: &[f32],
    dst: &mut [f32],
    (parallel, bf16): (bool, bool),
) {
    let cout = bias.len();
    let w_len = match w {
        BfA::F32(w) => w.len(),
        BfA::Bf16(w) => w.len(),
    };
    let k = w_len.checked_div(cout).unwrap_or(0);
    let plane = dst.len().checked_div(cout).unwrap_or(0);
    let g = Gemm {
        m: cout,
        n: plane,
        k,
        lda: k,
        b: B::Rows { ld: plane },
        rs_c: plane,
        cs_c: 1,
        accumulate: false,
        bias_per_col: false,
        bf16,
    };
    match w {
        BfA::F32(w) if !bf16 => run_gemm(&g, w, x, dst, Some(bias), parallel),
        w => gemm_parallel_bf16(&g, w, BfB::F32(x), BfOut::F32(dst), Some(bias)),
    }
}

/// Largest buffer [`with_scratch`] keeps (16 MiB): the im2col matrices of small maps (a
/// training batch's 8×8 level, SD's 8×8 level: 3 MiB), not those of a VAE's stride-2
/// downsampler at 512² (300 MiB), which would stay allocated after the layer.
const SCRATCH_MAX: usize = 4 << 20;

/// Runs `f` on `len` values of a buffer this thread keeps from call to call, instead of
/// allocating and zeroing one per image ([`super::with_kept_buffer`], up to [`SCRATCH_MAX`]).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    super::with_kept_buffer(&SCRATCH, len, SCRATCH_MAX, f)
}

/// `g` on every core (`parallel`) or on this thread: the same values either way, since
/// [`gemm_parallel`] splits the rows and columns, never K.
fn run_gemm(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], bias: Option<&[f32]>, parallel: bool) {
    if parallel {
        gemm_parallel(g, a, b, c, bias)
    } else {
        g.run(a, b, c, bias)
    }
}

/// Calls `f(i, dst, parallel)` on image `i`'s slice `dst` (`len` values) of `out`: one image
/// per task when the batch gives every core several (a training batch of small maps, where
/// splitting each image's small GEMM cost more than it saved), else image after image with
/// `parallel` set, each image's work split over the cores.
fn per_image(out: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32], bool) + Sync) {
    if len == 0 {
        return;
    }
    if out.len() / len >= 4 * rayon::current_num_threads() {
        out.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, dst)| f(i, dst, false));
    } else {
        out.chunks_mut(len)
            .enumerate()
            .for_each(|(i, dst)| f(i, dst, true));
    }
}

/// A 1×1 convolution: `W·x + b` per image straight from NCHW, no copies. (candle's batched
/// matmul and a broadcast add of the bias ran at about 80 GFLOP/s here, and its backward
/// materialised the weight's gradient once per image.)
struct PointwiseConv;

impl CustomOp3 for PointwiseConv {
    fn name(&self) -> &'static str {
        "conv1x1"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = lx.shape().dims4()?;
        let (cout, ..) = lw.shape().dims4()?;
        let x = f32_input(sx, lx, "conv input")?;
        let bias = f32_input(sb, lb, "conv bias")?;
        let wt = GemmWeight::new(sw, lw)?;
        let bf16 = sx.dtype() == DType::BF16 || super::autocast();
        let plane = h * w;
        // Every element is written: each image's GEMM, or its bias fill when there are no
        // input channels, writes all of its output.
        let mut out = output_buffer(n * cout * plane);
        per_image(&mut out, cout * plane, |i, dst, parallel| {
            let img = &x[i * cin * plane..(i + 1) * cin * plane];
            weight_times_image(wt.operand(), img, &bias, dst, (parallel, bf16));
        });
        Ok((f32_output(out, sx.dtype())?, Shape::from((n, cout, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        gemm_conv_grads(Columns::Pointwise, x, w, b, grad)
    }
}

/// `torch.nn.Conv2d` with the fast CPU paths described in the module docs.
#[derive(Clone, Debug)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    /// Transformed Winograd kernels, kept from the second Winograd forward of a frozen weight
    /// on: a layer run once (a VAE decode) does not keep 4× its weights for nothing.
    winograd: Arc<WinogradCache>,
}

impl Conv2d {
    /// Weights `weight` `(out, in/groups, k, k)` and `bias` `(out,)`, like `candle_nn::conv2d`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        cfg: Conv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self::from_candle(candle_nn::conv2d(
            in_channels,
            out_channels,
            kernel_size,
            cfg,
            vb,
        )?))
    }

    pub fn from_candle(inner: candle_nn::Conv2d) -> Self {
        Self {
            inner,
            winograd: Arc::default(),
        }
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// The plain candle convolution: the reference for the fast paths.
    pub fn forward_reference(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)
    }

    /// candle's convolution; in bf16 on the CPU computed in f32 and rounded back (candle's
    /// CPU convolution and its backward run on its matmul, which has no bf16).
    fn candle_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let bf16 = candle_core::DType::BF16;
        if xs.dtype() != bf16 || !xs.device().is_cpu() {
            return self.inner.forward(xs);
        }
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        let bias = self.inner.bias().map(f32).transpose()?;
        let wide = candle_nn::Conv2d::new(f32(self.inner.weight())?, bias, *self.inner.config());
        wide.forward(&f32(xs)?)?.to_dtype(bf16)
    }

    fn plain(&self) -> bool {
        let c = self.inner.config();
        c.groups == 1 && c.stride == 1 && c.dilation == 1
    }
}

/// The most bytes the CUDA convolution's im2col buffer takes per call (larger inputs go in
/// bands of output rows): 256 MiB, a small part of a GPU next to the UNet's weights, and enough
/// for most convolutions of SD 1.5's and SDXL's UNets at batch 2 in one GEMM.
const CUDA_COL_BYTES: usize = 256 << 20;

/// Whether CUDA convolutions take [`cuda_gemm`]: yes unless `DIFFUSE_CUDA_CONV=cudnn`, which
/// keeps candle's cuDNN call (for comparing the two in `diffuse bench`).
fn cuda_gemm_enabled() -> bool {
    static GEMM: OnceLock<bool> = OnceLock::new();
    *GEMM.get_or_init(|| std::env::var("DIFFUSE_CUDA_CONV").map_or(true, |v| v != "cudnn"))
}

/// `conv2d(xs, w) + bias` on a CUDA device by im2col and cuBLAS GEMMs with f32 accumulation
/// (a 1×1 stride-1 convolution multiplies the input directly; at most 8 output channels take a
/// direct kernel), the column buffer bounded by `max_col_bytes`. Forward only (no gradient); groups must be 1. [`Conv2d`] takes this path
/// on CUDA devices; it is public for tests and callers with their own weights.
pub fn cuda_gemm(
    xs: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    cfg: &Conv2dConfig,
    max_col_bytes: usize,
) -> Result<Tensor> {
    if cfg.groups != 1 {
        candle_core::bail!(
            "the CUDA GEMM convolution takes groups = 1, not {}",
            cfg.groups
        );
    }
    let op = CudaGemmConv {
        stride: cfg.stride,
        padding: cfg.padding,
        dilation: cfg.dilation,
        max_col_bytes,
    };
    xs.contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &bias.contiguous()?, &op)
}

// Read only by `cuda_fwd`, which a build without the `cuda` feature does not have.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct CudaGemmConv {
    stride: usize,
    padding: usize,
    dilation: usize,
    max_col_bytes: usize,
}

impl CustomOp3 for CudaGemmConv {
    fn name(&self) -> &'static str {
        "conv2d-cuda-gemm"
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
        candle_core::bail!("the CUDA GEMM convolution runs on CUDA devices only")
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
        let spec = super::cuda::ConvSpec {
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            max_col_bytes: self.max_col_bytes,
        };
        super::cuda::conv2d_gemm((x, lx), (w, lw), (b, lb), &spec)
    }
}

/// Which kernel a [`Conv2d`] call takes.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Path {
    Candle,
    /// On a CUDA device: im2col (or the input itself) and cuBLAS, or the direct kernel
    /// ([`cuda_gemm`]).
    CudaGemm,
    Im2col {
        stride: usize,
    },
    Pointwise,
    /// `small`: few tiles, kernels transformed per call (`convolve_small`).
    Winograd {
        small: bool,
    },
}

impl Conv2d {
    fn path(&self, xs: &Tensor) -> Path {
        let w = self.inner.weight();
        let Ok((cout, cin, kh, kw)) = w.dims4() else {
            return Path::Candle;
        };
        let (Some(_), Ok((_, xc, h, wd))) = (self.inner.bias(), xs.dims4()) else {
            return Path::Candle;
        };
        if h == 0 || wd == 0 || cout == 0 {
            // An empty output: nothing for the kernels to do.
            return Path::Candle;
        }
        let cfg = self.inner.config();
        if xs.device().is_cuda() {
            let half_or_f32 = matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16);
            let ok = cuda_gemm_enabled()
                && half_or_f32
                && w.dtype() == xs.dtype()
                && xc == cin
                && cfg.groups == 1
                && self
                    .inner
                    .bias()
                    .is_some_and(|b| super::fused_on(&[xs, w, b]));
            return if ok { Path::CudaGemm } else { Path::Candle };
        }
        let pad = cfg.padding;
        let fused_ok = xc == cin
            && xs.device().is_cpu()
            && kernel_dtype(xs.dtype())
            && w.dtype() == xs.dtype()
            && (kh, kw, pad, cfg.groups, cfg.dilation) == (3, 3, 1, 1, 1);
        if fused_ok && cfg.stride == 2 {
            return Path::Im2col { stride: 2 };
        }
        if !self.plain() || xc != cin || !xs.device().is_cpu() {
            return Path::Candle;
        }
        if (kh, kw, pad) == (1, 1, 0) && kernel_dtype(xs.dtype()) && w.dtype() == xs.dtype() {
            return Path::Pointwise;
        }
        // Chosen by the tiles of one image, not of the batch: the paths round differently,
        // and an image must come out the same whatever batch it is in (several processes
        // sharing a batch each run a part of it).
        match fused_ok {
            true => match Grid::new(h, wd).tiles_per_image {
                t if cheap_kernels(cin, cout) && t < MIN_CHEAP_TILES => Path::Im2col { stride: 1 },
                t if t >= MIN_TILES || cheap_kernels(cin, cout) => Path::Winograd { small: false },
                t if t >= MIN_SMALL_TILES => Path::Winograd { small: true },
                _ => Path::Im2col { stride: 1 },
            },
            false => Path::Candle,
        }
    }

    fn run(&self, path: Path, xs: &Tensor) -> Result<Tensor> {
        let w = self.inner.weight();
        let bias = match (path, self.inner.bias()) {
            (Path::Candle, _) | (_, None) => return self.candle_forward(xs),
            (_, Some(b)) => b,
        };
        match path {
            Path::Pointwise if !xs.track_op() && !w.track_op() && !bias.track_op() => xs
                .contiguous()?
                .apply_op3_no_bwd(&w.contiguous()?, bias, &PointwiseConv),
            Path::Pointwise => xs
                .contiguous()?
                .apply_op3(&w.contiguous()?, bias, PointwiseConv),
            Path::Winograd { small: true } => xs.contiguous()?.apply_op3(
                &w.contiguous()?,
                bias,
                Winograd {
                    cache: None,
                    flipped: false,
                },
            ),
            Path::Winograd { small: false } => {
                let again = self.winograd.used.swap(true, Ordering::Relaxed);
                let cache = (!w.is_variable() && again).then(|| self.winograd.clone());
                xs.contiguous()?.apply_op3(
                    &w.contiguous()?,
                    bias,
                    Winograd {
                        cache,
                        flipped: false,
                    },
                )
            }
            Path::Im2col { stride } => {
                xs.contiguous()?
                    .apply_op3(&w.contiguous()?, bias, Im2colConv { stride })
            }
            Path::CudaGemm => cuda_gemm(xs, w, bias, self.inner.config(), CUDA_COL_BYTES),
            Path::Candle => unreachable!("handled above"),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let path = self.path(xs);
        let (cout, cin_g, kh, kw) = self.inner.weight().dims4()?;
        let Ok((n, cin, h, w)) = xs.dims4() else {
            return self.run(path, xs);
        };
        let cfg = self.inner.config();
        let out = |x: usize, k: usize| {
            (x + 2 * cfg.padding).saturating_sub(cfg.dilation * (k - 1) + 1) / cfg.stride + 1
        };
        let (ho, wo) = (out(h, kh), out(w, kw));
        let flops = 2.0 * (n * cout * ho * wo * cin_g * kh * kw) as f64;
        let name = || {
            let kind = match path {
                Path::Candle => "candle",
                Path::CudaGemm => "cuda",
                Path::Im2col { .. } => "im2col",
                Path::Pointwise => "matmul",
                Path::Winograd { small: false } => "winograd",
                Path::Winograd { small: true } => "winograd-small",
            };
            format!("conv{kh}x{kw}/{} {kind} {cin}->{cout} {h}x{w}", cfg.stride)
        };
        crate::profile::timed(name, flops, || self.run(path, xs))
    }
}
