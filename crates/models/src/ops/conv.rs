//! The models' `Conv2d`: 3×3 stride-1 padding-1 convolutions on the CPU by Winograd
//! F(4×4, 3×3) (by im2col and one GEMM per image on small maps, and for stride 2 in
//! inference), 1×1 convolutions as one matmul, everything else candle's `conv2d`.
//!
//! Winograd turns the 3×3 convolution of each 4×4 output tile into 36 element-wise products
//! of transformed 6×6 input tiles and transformed kernels, i.e. 36 GEMMs
//! `(Cout × Cin)·(Cin × tiles)`: 4× fewer multiplications than direct convolution. The
//! transformed kernels (4× the weight size) are cached in the layer from its second call on
//! (a layer run once keeps nothing), unless the weight is a training variable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use super::microkernel::gemm_rows;
use super::{f32_input, f32_output, kernel_dtype, simd_fn, LANES};

/// Output tile side, input tile side (m + r − 1) and transformed points per tile.
const M: usize = 4;
const A: usize = 6;
const POINTS: usize = A * A;
/// Tiles per task: the task's 36 GEMMs get `TILES` columns, enough to amortise packing the
/// transformed kernels, while the task's transformed tiles stay a few MiB.
const TILES: usize = 96;
/// Below this many tiles the 36 thin GEMMs re-read 4× the weights for little work; the
/// direct (im2col) convolution is faster there.
const MIN_TILES: usize = 128;
/// The weight gradient sums the batch in at most this many groups (in parallel), then adds
/// the groups in order.
const WEIGHT_GRAD_GROUPS: usize = 8;

/// Eight tiles side by side: the input and output transforms run on all eight at once, one
/// tile per SIMD lane.
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

/// `Bᵀ·d` for one column (or row) of a 6×6 input tile.
#[inline(always)]
fn input_1d<T: Num>(d: [T; A]) -> [T; A] {
    [
        d[0] * 4.0 - d[2] * 5.0 + d[4],
        d[3] + d[4] - (d[1] + d[2]) * 4.0,
        (d[1] - d[2]) * 4.0 - d[3] + d[4],
        (d[3] - d[1]) * 2.0 - d[2] + d[4],
        (d[1] - d[3]) * 2.0 - d[2] + d[4],
        d[1] * 4.0 - d[3] * 5.0 + d[5],
    ]
}

/// `Aᵀ·m` for one column (or row) of a 6×6 product tile.
#[inline(always)]
fn output_1d<T: Num>(m: [T; A]) -> [T; M] {
    let (s12, d12, s34, d34) = (m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]);
    [
        m[0] + s12 + s34,
        d12 + d34 * 2.0,
        s12 + s34 * 4.0,
        d12 + d34 * 8.0 + m[5],
    ]
}

/// `G·g` for one column (or row) of a 3×3 kernel.
#[inline(always)]
fn kernel_1d<T: Num>(g: [T; 3]) -> [T; A] {
    [
        g[0] * (1.0 / 4.0),
        (g[0] + g[1] + g[2]) * (-1.0 / 6.0),
        (g[0] - g[1] + g[2]) * (-1.0 / 6.0),
        g[0] * (1.0 / 24.0) + g[1] * (1.0 / 12.0) + g[2] * (1.0 / 6.0),
        g[0] * (1.0 / 24.0) - g[1] * (1.0 / 12.0) + g[2] * (1.0 / 6.0),
        g[2],
    ]
}

/// Applies a 1-d transform to the columns, then to the rows, of a row-major tile.
#[inline(always)]
fn transform_2d<T: Num, const I: usize, const O: usize>(
    tile: &[[T; I]; I],
    f: impl Fn([T; I]) -> [T; O],
) -> [[T; O]; O] {
    let mut cols = [[T::ZERO; I]; O]; // cols[o][i]: transformed column i, transposed
    for i in 0..I {
        let mut col = [T::ZERO; I];
        for r in 0..I {
            col[r] = tile[r][i];
        }
        let t = f(col);
        for o in 0..O {
            cols[o][i] = t[o];
        }
    }
    let mut out = [[T::ZERO; O]; O];
    for o in 0..O {
        out[o] = f(cols[o]);
    }
    out
}

/// Kernels `(Cout, Cin, 3, 3)` → `G·g·Gᵀ` laid out `[point][Cout][Cin]` for the GEMMs, on
/// every core: each (Cout, Cin) pair's 36 values first, then regrouped by point.
fn transform_kernels(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let per_point = cout * cin;
    let mut pairs = vec![0f32; per_point * POINTS];
    pairs
        .par_chunks_mut(POINTS * cin.max(1))
        .zip(w.par_chunks(9 * cin.max(1)))
        .for_each(|(dst, w)| {
            for (d, g) in dst.chunks_exact_mut(POINTS).zip(w.chunks_exact(9)) {
                let tile = [[g[0], g[1], g[2]], [g[3], g[4], g[5]], [g[6], g[7], g[8]]];
                let t = transform_2d(&tile, kernel_1d);
                for (d, v) in d.iter_mut().zip(t.iter().flatten()) {
                    *d = *v;
                }
            }
        });
    let mut u = vec![0f32; POINTS * per_point];
    u.par_chunks_mut(per_point.max(1))
        .enumerate()
        .for_each(|(p, dst)| {
            for (d, pair) in dst.iter_mut().zip(pairs.chunks_exact(POINTS)) {
                *d = pair[p];
            }
        });
    u
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
    /// Transformed input tiles `[point][Cin][tile]` of a chunk of tiles; pixels outside the image (padding 1, partial
    /// tiles) and lanes past `nt` are zeros.
    fn transform_inputs(x: &[f32], v: &mut [f32], grid: Grid, cin: usize, chunk: Chunk) {
        let Chunk { t0, nt, stride } = chunk;
        let plane = grid.h * grid.w;
        // Channel-major so that each channel plane is read tile after tile and the 36 point
        // rows of `v` are written sequentially, eight tiles per store.
        for c in 0..cin {
            for tl in (0..nt).step_by(LANES) {
                let mut d = [[Lanes::ZERO; A]; A];
                for l in 0..LANES.min(nt - tl) {
                    let (n, y0, x0) = grid.locate(t0 + tl + l);
                    let img = &x[(n * cin + c) * plane..(n * cin + c + 1) * plane];
                    for (r, row) in d.iter_mut().enumerate() {
                        let y = (y0 + r).wrapping_sub(1);
                        if y >= grid.h {
                            continue;
                        }
                        let src = &img[y * grid.w..(y + 1) * grid.w];
                        for (k, px) in row.iter_mut().enumerate() {
                            let xx = (x0 + k).wrapping_sub(1);
                            if xx < grid.w {
                                px.0[l] = src[xx];
                            }
                        }
                    }
                }
                let tv = transform_2d(&d, input_1d);
                for (p, val) in tv.iter().flatten().enumerate() {
                    let at = (p * cin + c) * stride + tl;
                    v[at..at + LANES].copy_from_slice(&val.0);
                }
            }
        }
    }
}

/// Tiles `t0..t0 + nt` of one task, stored in rows of `stride` (a multiple of [`LANES`]).
#[derive(Clone, Copy)]
struct Chunk {
    t0: usize,
    nt: usize,
    stride: usize,
}

/// A raw output pointer shared by the tasks, which write disjoint tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used for writes to disjoint elements (each task owns its tiles).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

simd_fn! {
    /// Inverse transform of the products `[point][Cout][tile]` of a chunk of tiles, plus the bias, into the `(N, Cout, H, W)` output.
    fn transform_outputs(m: &[f32], out: OutPtr, bias: &[f32], grid: Grid, chunk: Chunk) {
        let Chunk { t0, nt, stride } = chunk;
        let cout = bias.len();
        let plane = grid.h * grid.w;
        for (c, &b) in bias.iter().enumerate() {
            for tl in (0..nt).step_by(LANES) {
                let mut tile = [[Lanes::ZERO; A]; A];
                for (p, val) in tile.iter_mut().flatten().enumerate() {
                    let at = (p * cout + c) * stride + tl;
                    val.0.copy_from_slice(&m[at..at + LANES]);
                }
                let y = transform_2d(&tile, output_1d);
                for l in 0..LANES.min(nt - tl) {
                    let (n, y0, x0) = grid.locate(t0 + tl + l);
                    let base = (n * cout + c) * plane;
                    for (r, row) in y.iter().enumerate().take(grid.h - y0) {
                        for (k, val) in row.iter().enumerate().take(grid.w - x0) {
                            // SAFETY: in bounds (rows/cols clipped to the image); tile
                            // `t0 + tl + l` belongs to this task alone.
                            unsafe { *out.0.add(base + (y0 + r) * grid.w + x0 + k) = val.0[l] + b };
                        }
                    }
                }
            }
        }
    }
}

/// Winograd convolution of tiles `t0..t0 + nt`: input transform, 36 GEMMs, output transform.
#[allow(clippy::too_many_arguments)]
fn convolve_tiles(
    x: &[f32],
    u: &[f32],
    bias: &[f32],
    out: OutPtr,
    grid: Grid,
    (cin, cout): (usize, usize),
    t0: usize,
    nt: usize,
) {
    // Rows padded to whole lane groups; the pad columns are zeros in and ignored out.
    let stride = nt.next_multiple_of(LANES);
    thread_local! {
        // Both buffers are overwritten in full each time, so a thread's scratch is reused
        // as is instead of allocating (and zeroing) megabytes per task.
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut scratch = SCRATCH.take();
    scratch.resize(scratch.len().max(POINTS * (cin + cout) * stride), 0.0);
    let (v, m) = scratch.split_at_mut(POINTS * cin * stride);
    let m = &mut m[..POINTS * cout * stride];
    let chunk = Chunk { t0, nt, stride };
    transform_inputs(x, v, grid, cin, chunk);
    for p in 0..POINTS {
        gemm_rows(
            cout,
            stride,
            cin,
            &mut m[p * cout * stride..(p + 1) * cout * stride],
            &u[p * cout * cin..(p + 1) * cout * cin],
            &v[p * cin * stride..(p + 1) * cin * stride],
            stride,
            1,
            0.0,
            1.0,
        );
    }
    transform_outputs(m, out, bias, grid, chunk);
    SCRATCH.set(scratch);
}

/// A layer's transformed kernels, and whether the layer already ran once.
#[derive(Debug, Default)]
struct WinogradCache {
    used: AtomicBool,
    kernels: OnceLock<Vec<f32>>,
}

/// The Winograd op over `(x, weight, bias)`; `cache` holds the transformed kernels of a frozen
/// weight.
struct Winograd {
    cache: Option<Arc<WinogradCache>>,
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
        let (cout, ..) = lw.shape().dims4()?;
        let x = f32_input(sx, lx, "conv input")?;
        let bias = f32_input(sb, lb, "conv bias")?;
        let transform = || -> Result<Vec<f32>> {
            Ok(transform_kernels(
                &f32_input(sw, lw, "conv weight")?,
                cout,
                cin,
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
        let grid = Grid::new(h, w);
        let tiles = n * grid.tiles_per_image;
        let mut out = vec![0f32; n * cout * h * w];
        let ptr = OutPtr(out.as_mut_ptr());
        // Equal chunks of about TILES tiles, at least one per thread where there are enough
        // tiles, so that both cores finish together.
        let chunks = tiles
            .div_ceil(TILES)
            .max(rayon::current_num_threads())
            .min(tiles.div_ceil(LANES));
        let chunk = tiles.div_ceil(chunks).next_multiple_of(LANES);
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
    /// one im2col GEMM per image, with `db` in the same pass ([`WeightGrad`]).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (cout, cin, ..) = w.dims4()?;
        let grad = grad.contiguous()?;
        let rotate = Tensor::from_vec((0..9u32).rev().collect::<Vec<_>>(), 9, w.device())?;
        let w_t = w
            .transpose(0, 1)?
            .reshape((cin, cout, 9))?
            .index_select(&rotate, 2)?
            .reshape((cin, cout, 3, 3))?;
        let zero_bias = Tensor::zeros(cin, grad.dtype(), grad.device())?;
        let grad_x = grad.apply_op3_no_bwd(&w_t, &zero_bias, &Winograd { cache: None })?;
        let dwb = x.apply_op2_no_bwd(&grad, &WeightGrad)?;
        let grad_w = dwb.narrow(0, 0, cout * cin * 9)?.reshape(w.shape())?;
        let grad_b = dwb.narrow(0, cout * cin * 9, cout)?;
        Ok((Some(grad_x), Some(grad_w), Some(grad_b)))
    }
}

/// `dw` and `db` of a 3×3 stride-1 padding-1 convolution from `(x, dy)`, flat one after the
/// other: per image, the im2col matrix `(Cin·9, H·W)` of `x`, `dw += dy (Cout × H·W) · colᵀ`
/// and `db += Σ dy` per channel (cheaper here than candle's strided sum), accumulated per
/// thread.
struct WeightGrad;

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
        "conv3x3-weight-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w) = lx.shape().dims4()?;
        let (_, cout, ..) = lg.shape().dims4()?;
        let x = f32_input(sx, lx, "conv input")?;
        let g = f32_input(sg, lg, "conv output gradient")?;
        let (plane, k) = (h * w, cin * 9);
        // Images are summed in fixed groups, and the groups in order, so that the gradient
        // does not depend on how rayon splits the work: training is reproducible bit for
        // bit (a resumed run equals an uninterrupted one).
        let per_group = n.div_ceil(WEIGHT_GRAD_GROUPS).max(1);
        let partial: Vec<Vec<f32>> = (0..n.div_ceil(per_group))
            .into_par_iter()
            .map(|grp| {
                let mut dwb = vec![0f32; cout * (k + 1)];
                let mut col = vec![0f32; k * plane];
                for i in grp * per_group..((grp + 1) * per_group).min(n) {
                    im2col(&x[i * cin * plane..(i + 1) * cin * plane], &mut col, h, w);
                    let dy = &g[i * cout * plane..(i + 1) * cout * plane];
                    let (dw, db) = dwb.split_at_mut(cout * k);
                    // colᵀ is read through strides (row stride 1, column stride H·W).
                    gemm_rows(cout, k, plane, dw, dy, &col, 1, plane, 1.0, 1.0);
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

/// A 3×3 padding-1 convolution (stride 1 or 2) as im2col and one multi-threaded GEMM per
/// image, `out (Cout × Ho·Wo) = W (Cout × Cin·9) · col + b`, written straight into NCHW: for
/// the small maps where Winograd's 36 thin GEMMs would re-read 4× the weights, and for the
/// downsamplers. candle's own path (im2col in NHWC order, a batched matmul, then a transpose
/// copy) ran at half the speed here.
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
        let wt = f32_input(sw, lw, "conv weight")?;
        let bias = f32_input(sb, lb, "conv bias")?;
        let s = self.stride;
        // PyTorch's output size for kernel 3, padding 1.
        let (ho, wo) = ((h - 1) / s + 1, (w - 1) / s + 1);
        let (plane, k) = (ho * wo, cin * 9);
        let mut col = vec![0f32; k * plane];
        let mut out = vec![0f32; n * cout * plane];
        let threads = rayon::current_num_threads();
        for (i, dst) in out.chunks_exact_mut(cout * plane).enumerate() {
            let img = &x[i * cin * h * w..(i + 1) * cin * h * w];
            // Rows of the im2col matrix in parallel: a channel's 9 rows per task.
            col.par_chunks_mut(9 * plane)
                .enumerate()
                .for_each(|(c, rows)| {
                    let src = &img[c * h * w..(c + 1) * h * w];
                    if s == 1 {
                        im2col(src, rows, h, w);
                    } else {
                        im2col_stride2(src, rows, h, w, ho, wo);
                    }
                });
            for (row, &b) in dst.chunks_exact_mut(plane).zip(bias.iter()) {
                row.fill(b);
            }
            // SAFETY: dst is cout × plane, wt cout × k, col k × plane, all row-major.
            unsafe {
                gemm::gemm(
                    cout,
                    plane,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    plane as isize,
                    true,
                    wt.as_ptr(),
                    1,
                    k as isize,
                    col.as_ptr(),
                    1,
                    plane as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            }
        }
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
            // Not taken: Conv2d only sends frozen stride-2 inputs here.
            candle_core::bail!("im2col-conv3x3: no backward pass for stride 2");
        }
        // The gradients of a stride-1 "same" convolution, whichever kernel computed it.
        Winograd { cache: None }.bwd(x, w, b, res, grad)
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

    fn plain(&self) -> bool {
        let c = self.inner.config();
        c.groups == 1 && c.stride == 1 && c.dilation == 1
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let w = self.inner.weight();
        let (cout, cin, kh, kw) = w.dims4()?;
        let Some(bias) = self.inner.bias() else {
            return self.inner.forward(xs);
        };
        let Ok((n, xc, h, wd)) = xs.dims4() else {
            return self.inner.forward(xs);
        };
        let cfg = self.inner.config();
        let pad = cfg.padding;
        let fused_ok = xc == cin
            && xs.device().is_cpu()
            && kernel_dtype(xs.dtype())
            && w.dtype() == xs.dtype()
            && (kh, kw, pad, cfg.groups, cfg.dilation) == (3, 3, 1, 1, 1);
        // Downsamplers (stride 2) in inference; in training candle's conv has the backward.
        if fused_ok && cfg.stride == 2 && !xs.track_op() && !w.track_op() {
            return xs
                .contiguous()?
                .apply_op3(&w.contiguous()?, bias, Im2colConv { stride: 2 });
        }
        if !self.plain() || xc != cin || !xs.device().is_cpu() {
            return self.inner.forward(xs);
        }
        // (candle's CPU matmul has no bf16.)
        if (kh, kw, pad) == (1, 1, 0) && xs.dtype() != candle_core::DType::BF16 {
            // A 1×1 convolution is `W·x` per image: one batched matmul, output already NCHW.
            let x = xs.reshape((n, cin, h * wd))?;
            let w = w.reshape((cout, cin))?.broadcast_left(n)?;
            return w
                .matmul(&x)?
                .reshape((n, cout, h, wd))?
                .broadcast_add(&bias.reshape((1, cout, 1, 1))?);
        }
        let tiles = n * Grid::new(h, wd).tiles_per_image;
        if fused_ok {
            let x = xs.contiguous()?;
            if tiles >= MIN_TILES {
                let again = self.winograd.used.swap(true, Ordering::Relaxed);
                let cache = (!w.is_variable() && again).then(|| self.winograd.clone());
                return x.apply_op3(&w.contiguous()?, bias, Winograd { cache });
            }
            return x.apply_op3(&w.contiguous()?, bias, Im2colConv { stride: 1 });
        }
        self.inner.forward(xs)
    }
}
