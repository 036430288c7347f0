//! Register-blocked AVX2+FMA matrix products for the hot paths: attention's two block
//! products, linear layers, 1×1 and im2col convolutions, and the Winograd convolution GEMMs
//! (the `gemm` crate still serves the weight gradient of training).
//!
//! The `gemm` crate packs both operands on every call. Our products have one operand that is
//! already laid out for streaming (activations with tokens or pixels contiguous, or keys packed
//! once per head), so a single kernel shape serves them all: a tile of 6 rows of `a`
//! (broadcast one value at a time) by 16 columns of `b` (two ymm loads per k), whose
//! 6 × 16 accumulators stay in 12 of the 16 ymm registers for a whole K-block. Rows of `c`
//! are stored as vectors, or element by element when `c` is written transposed (a linear
//! layer over few rows computes `(x·wᵀ)ᵀ = w·xᵀ` so that the weight needs no packed copy).
//! Packing `a` as well (tiles of 6 rows, interleaved) made the K loop ~6% faster on one core
//! but cost more than that in copies, measured on the linear layers.
//!
//! Products of bf16 layers ([`Gemm::bf16`]) run on bf16 tiles where the CPU has AVX512-BF16
//! ([`avx512bf16`]): twice the multiply-adds per instruction. Their operands may come as the
//! layers hold them ([`gemm_parallel_bf16`]): a bf16 `a` read in place, a weight rounded into
//! bf16 panels once per call ([`PairPanels`]), a bf16 output.

use rayon::prelude::*;

use super::SendPtr;

/// Columns per tile and per packed panel: two ymm registers per row.
pub(crate) const NR: usize = 16;
/// Rows per AVX2 tile.
#[cfg_attr(not(x86_simd), allow(dead_code))]
const MR: usize = 6;
/// Row blocks of the parallel driver are multiples of this: whole tiles of every instruction
/// set (6 rows for AVX2, 8 for AVX-512).
const ROW_ALIGN: usize = 24;
/// Largest K-block: a tile's `MR × KC` slice of `a` (9 KiB) stays in L1 and the `KC × NR`
/// panel slices of `b` (24 KiB each) in L2 across a row block. K is split into equal blocks
/// so that no thin last block pays a full pass of loads and stores of `c`.
#[cfg_attr(not(x86_simd), allow(dead_code))] // (the AVX2 GEMM's)
pub(crate) const KC: usize = 384;

/// Packs `scale · kᵀ` (`k`: m rows of d values, `ld` apart) into panels of [`NR`] rows of
/// `k`, each panel `d × NR` (row index fastest), the rows past `m` zero. `out` holds
/// `m.div_ceil(NR) · NR · d` values. The attention keys of one head, and the weights (or, over
/// few rows, the inputs) of a linear layer, are packed so.
pub(crate) fn pack_kt(k: &[f32], (m, d, ld): (usize, usize, usize), scale: f32, out: &mut [f32]) {
    debug_assert!(m == 0 || k.len() >= (m - 1) * ld + d);
    debug_assert!(out.len() >= m.div_ceil(NR) * NR * d);
    if d == 0 {
        return;
    }
    for (p, panel) in out.chunks_exact_mut(NR * d).enumerate() {
        // Eight rows of `k` at a time become eight columns of the panel, by 8 × 8 transposes
        // (element by element, every store would land in another cache line).
        for half in (0..NR).step_by(8) {
            let c0 = p * NR + half;
            if c0 + 8 <= m {
                let rows = std::array::from_fn(|j| &k[(c0 + j) * ld..(c0 + j) * ld + d]);
                transpose_rows8(rows, d, &mut panel[half..], NR);
            } else {
                for j in 0..8 {
                    for dd in 0..d {
                        panel[dd * NR + half + j] = if c0 + j < m {
                            k[(c0 + j) * ld + dd]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
        if scale != 1.0 {
            panel.iter_mut().for_each(|x| *x *= scale);
        }
    }
}

/// Packs `kc` rows (`ld` apart) of `n` columns into [`NR`]-column panels of `kc × NR`, one
/// after the other, the last one zero-padded.
pub(crate) fn pack_rows(b: &[f32], ld: usize, kc: usize, n: usize, out: &mut [f32]) {
    let (full, rem) = (n / NR, n % NR);
    for kk in 0..kc {
        let row = &b[kk * ld..kk * ld + n];
        for p in 0..full {
            let at = p * NR * kc + kk * NR;
            out[at..at + NR].copy_from_slice(&row[p * NR..(p + 1) * NR]);
        }
        if rem > 0 {
            let at = full * NR * kc + kk * NR;
            out[at..at + rem].copy_from_slice(&row[full * NR..]);
            out[at + rem..at + NR].fill(0.0);
        }
    }
}

/// `len` split into equal parts of at most `max`: the part size (≥ 1). (The GEMMs' K-blocks,
/// and the input-channel blocks of the per-call Winograd.)
pub(crate) fn even_split(len: usize, max: usize) -> usize {
    len.div_ceil(len.div_ceil(max).max(1)).max(1)
}

/// `0..len` in as few parts of at most `max` as it takes, whose sizes differ by at most one:
/// `(start, size)` of each. The row tiles of a product: 32 rows as 6, 6, 5, 5, 5, 5 rather than
/// five 6s and a 2, whose 4 accumulators (AVX2) cannot hide the FMA latency.
#[cfg(x86_simd)]
pub(crate) fn balanced_parts(len: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let parts = len.div_ceil(max.max(1));
    let (size, longer) = (len / parts.max(1), len % parts.max(1));
    (0..parts).map(move |i| (i * size + i.min(longer), size + usize::from(i < longer)))
}

/// The `b` operand (`k × n`) of a [`Gemm`]: where column panel `p` starts and how far apart
/// its rows are.
#[derive(Clone, Copy, Debug)]
pub(crate) enum B {
    /// Row-major, rows `ld` apart.
    Rows { ld: usize },
    /// [`pack_kt`] panels (`k × NR` each, rows `NR` apart), `panel_stride` apart.
    Packed { panel_stride: usize },
}

impl B {
    /// Packed panels one after the other (`k` rows each).
    pub(crate) fn packed(k: usize) -> Self {
        B::Packed {
            panel_stride: NR * k,
        }
    }
}

/// One product `c (+)= a (m × k, rows lda apart) · b (k × n) (+ bias)`, element `(i, j)`
/// of `c` at `i·rs_c + j·cs_c`. Run by [`gemm`] on one thread; the parallel drivers split it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub b: B,
    pub rs_c: usize,
    pub cs_c: usize,
    /// Add to `c` instead of overwriting it.
    pub accumulate: bool,
    /// The bias has one value per column of `c` (a linear layer's), not one per row.
    pub bias_per_col: bool,
    /// A bf16 layer's product: `a` and `b` rounded to bf16 and multiplied by AVX512-BF16 dot
    /// products, accumulated in f32, where the CPU has them ([`avx512bf16`]); elsewhere the f32
    /// product, which is the same maths when the operands are bf16 values already.
    #[cfg_attr(not(x86_simd), allow(dead_code))] // (read by the x86 dispatch only)
    pub bf16: bool,
}

impl Gemm {
    /// Smallest lengths of `a`, `b`, `c` that cover the product.
    fn extents(&self) -> (usize, usize, usize) {
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return (0, 0, 0);
        }
        let a = if k == 0 { 0 } else { (m - 1) * self.lda + k };
        let b = match self.b {
            _ if k == 0 => 0,
            B::Rows { ld } => (k - 1) * ld + n,
            B::Packed { panel_stride } => (n.div_ceil(NR) - 1) * panel_stride + NR * k,
        };
        (a, b, (m - 1) * self.rs_c + (n - 1) * self.cs_c + 1)
    }

    /// Panics unless operands of these lengths (`a`, `b`, `c`) and the bias cover the product.
    fn check(&self, (a, b, c): (usize, usize, usize), bias: Option<&[f32]>) {
        let (ea, eb, ec) = self.extents();
        assert!(a >= ea && b >= eb && c >= ec, "GEMM operands too short");
        assert!(
            bias.is_none_or(|x| x.len() >= if self.bias_per_col { self.n } else { self.m }),
            "GEMM bias too short"
        );
    }

    /// Runs the product on this thread (the callers are parallel tasks): the AVX2 tiles, or
    /// the `gemm` crate on other CPUs.
    pub(crate) fn run(&self, a: &[f32], b: &[f32], c: &mut [f32], bias: Option<&[f32]>) {
        self.check((a.len(), b.len(), c.len()), bias);
        let bias = bias.map_or(std::ptr::null(), |x| x.as_ptr());
        // SAFETY: checked above.
        unsafe { self.run_raw(a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), bias) }
    }

    /// [`Gemm::run`] on pointers (`bias` may be null).
    ///
    /// # Safety
    /// The pointers cover the product, and no other thread touches the elements of `c` it
    /// writes.
    unsafe fn run_raw(&self, a: *const f32, b: *const f32, c: *mut f32, bias: *const f32) {
        #[cfg(x86_simd)]
        match super::kernels() {
            super::Kernels::Avx512Bf16 if self.bf16 => {
                use avx512bf16::{ASrc, BSrc};
                return avx512bf16::gemm(self, ASrc::F32(a), BSrc::F32(b), c, bias);
            }
            super::Kernels::Avx512 | super::Kernels::Avx512Bf16 => {
                return avx512::gemm(self, a, b, c, bias)
            }
            super::Kernels::Avx2 => return avx2::gemm(self, a, b, c, bias),
            super::Kernels::Portable => {}
        }
        self.run_portable(a, b, c, bias)
    }

    /// The product through the `gemm` crate (one call per packed panel): the path of CPUs
    /// without AVX2, and the reference the tests hold the tiles to.
    ///
    /// # Safety
    /// As [`Gemm::run_raw`].
    unsafe fn run_portable(&self, a: *const f32, b: *const f32, c: *mut f32, bias: *const f32) {
        let (m, n, k) = (self.m, self.n, self.k);
        if m == 0 || n == 0 {
            return;
        }
        // c = (accumulate ? c : 0) + bias, then c += a·b.
        for i in 0..m {
            for j in 0..n {
                let add = match (bias.is_null(), self.bias_per_col) {
                    (true, _) => 0.0,
                    (false, true) => *bias.add(j),
                    (false, false) => *bias.add(i),
                };
                let at = c.add(i * self.rs_c + j * self.cs_c);
                *at = if self.accumulate { *at + add } else { add };
            }
        }
        let (ldb, panel_stride, panel) = match self.b {
            B::Rows { ld } => (ld, n, n),
            B::Packed { panel_stride } => (NR, panel_stride, NR),
        };
        for p0 in (0..n).step_by(panel) {
            gemm::gemm(
                m,
                panel.min(n - p0),
                k,
                c.add(p0 * self.cs_c),
                self.cs_c as isize,
                self.rs_c as isize,
                true,
                a,
                1,
                self.lda as isize,
                b.add(p0 / panel * panel_stride),
                1,
                ldb as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }

    /// The lengths of a bf16 product's operands, for [`Gemm::check`]: a [`PairPanels`] `b`
    /// must have been packed for this product's `n` and `k` (and then covers it).
    fn bf16_operand_lens(&self, a: BfA<'_>, b: BfB<'_>) -> (usize, usize) {
        let a_len = match a {
            BfA::F32(x) => x.len(),
            BfA::Bf16(x) => x.len(),
        };
        let b_len = match b {
            BfB::F32(x) => x.len(),
            BfB::Pairs(p) => {
                assert!(
                    p.n == self.n && p.k == self.k,
                    "GEMM operand packed for another product"
                );
                self.extents().1
            }
        };
        (a_len, b_len)
    }

    /// [`Gemm::run`] of a bf16 product ([`Gemm::bf16`]) from operands as
    /// [`gemm_parallel_bf16`] takes them, on this thread: operands converted once by the
    /// caller (a bf16 `a`, [`PairPanels`]) for products that would otherwise convert the same
    /// values again and again. On CPUs without the bf16 tiles a bf16 `a` is widened (and
    /// [`PairPanels`] do not exist there: [`pack_pairs`] gives none).
    pub(crate) fn run_bf16(&self, a: BfA<'_>, b: BfB<'_>, c: &mut [f32], bias: Option<&[f32]>) {
        let (a_len, b_len) = self.bf16_operand_lens(a, b);
        self.check((a_len, b_len, c.len()), bias);
        let widened;
        let a = match a {
            BfA::Bf16(x) if !(cfg!(x86_simd) && super::has_bf16_dot()) => {
                widened = super::bf16_to_f32(x);
                BfA::F32(&widened)
            }
            a => a,
        };
        let bias = bias.map_or(std::ptr::null(), |x| x.as_ptr());
        // SAFETY: checked above; `a` is f32 unless the CPU has the bf16 tiles.
        unsafe { self.run_bf16_raw(a, b, (0, 0, 0), c.as_mut_ptr(), bias) }
    }

    /// Runs this product, the block of a bf16 product whose first row of `a` is `r0`, whose
    /// first column is `n0` and whose `b` starts `b_off` values into an f32 `b`
    /// ([`Block`]), on the bf16 tiles where the CPU has them, else on the f32 tiles.
    ///
    /// # Safety
    /// As [`Gemm::run_raw`], for the block; `a` is f32 and `b` not [`PairPanels`] unless the
    /// CPU has the bf16 tiles.
    unsafe fn run_bf16_raw(
        &self,
        a: BfA<'_>,
        b: BfB<'_>,
        (r0, n0, b_off): (usize, usize, usize),
        c: *mut f32,
        bias: *const f32,
    ) {
        #[cfg(not(x86_simd))]
        let _ = n0; // (the first column locates pair panels, which only the bf16 tiles read)
        match (a, b) {
            #[cfg(x86_simd)]
            (a, b) if super::has_bf16_dot() => {
                use avx512bf16::{pair_panel_len, ASrc, BSrc, NB};
                let a = match a {
                    BfA::F32(x) => ASrc::F32(x.as_ptr().add(r0 * self.lda)),
                    BfA::Bf16(x) => ASrc::Bf16((x.as_ptr() as *const u16).add(r0 * self.lda)),
                };
                let b = match b {
                    BfB::F32(x) => BSrc::F32(x.as_ptr().add(b_off)),
                    BfB::Pairs(p) => BSrc::Pairs {
                        at: p.data.as_ptr().add(n0 / NB * pair_panel_len(p.k)),
                        panel_stride: pair_panel_len(p.k),
                    },
                };
                avx512bf16::gemm(self, a, b, c, bias)
            }
            (BfA::F32(a), BfB::F32(b)) => self.run_raw(
                a.as_ptr().add(r0 * self.lda),
                b.as_ptr().add(b_off),
                c,
                bias,
            ),
            _ => unreachable!("bf16 operands reach the bf16 tiles only"),
        }
    }
}

/// `dst[e · ld + j] = rows[j][e]` for `j < 8`, `e < len`: eight rows become the first eight
/// columns of `len` rows of `dst`, 8 × 8 blocks at a time with AVX2 shuffles (scalar copies
/// leave one store per element).
pub(crate) fn transpose_rows8(rows: [&[f32]; 8], len: usize, dst: &mut [f32], ld: usize) {
    assert!(rows.iter().all(|r| r.len() >= len) && ld >= 8);
    assert!(len == 0 || dst.len() >= (len - 1) * ld + 8);
    #[cfg_attr(not(x86_simd), allow(unused_mut))] // (set by the AVX2 copy only)
    let mut done = 0;
    #[cfg(x86_simd)]
    if super::has_avx2_fma() {
        done = len / 8 * 8;
        // SAFETY: the CPU has AVX2; the asserts bound the 8 × 8 blocks read and written.
        unsafe { avx2::transpose_blocks8(rows.map(|r| r.as_ptr()), len / 8, dst.as_mut_ptr(), ld) }
    }
    for e in done..len {
        for (j, row) in rows.iter().enumerate() {
            dst[e * ld + j] = row[e];
        }
    }
}

/// `dst (cols × rows) = srcᵀ` for a row-major `src` of `rows` rows, `ld` apart, of which the
/// first `cols` values are taken; on every core: each task writes a block of rows of `dst`,
/// eight columns at a time by [`transpose_rows8`].
pub(crate) fn transpose(src: &[f32], (rows, cols, ld): (usize, usize, usize), dst: &mut [f32]) {
    assert!(cols <= ld && dst.len() >= rows * cols);
    if rows * cols == 0 {
        return;
    }
    assert!(src.len() >= (rows - 1) * ld + cols);
    // 64 rows of `dst` per task: 256-byte runs of each row of `src`.
    const CHUNK: usize = 64;
    dst[..rows * cols]
        .par_chunks_mut(CHUNK * rows)
        .enumerate()
        .for_each(|(t, dst)| {
            let (c0, len) = (t * CHUNK, dst.len() / rows);
            let full = rows / 8 * 8;
            for r0 in (0..full).step_by(8) {
                let run = |j: usize| &src[(r0 + j) * ld + c0..(r0 + j) * ld + c0 + len];
                transpose_rows8(std::array::from_fn(run), len, &mut dst[r0..], rows);
            }
            for r in full..rows {
                for e in 0..len {
                    dst[e * rows + r] = src[r * ld + c0 + e];
                }
            }
        });
}

/// A block of a product that one task of the parallel drivers runs: `sub` starts at row `r0`
/// and column `n0` of the whole product.
struct Block {
    sub: Gemm,
    r0: usize,
    n0: usize,
}

impl Block {
    /// Where the block's bias starts.
    fn bias_at(&self) -> usize {
        if self.sub.bias_per_col {
            self.n0
        } else {
            self.r0
        }
    }

    /// Where the block's `b` starts in an f32 `b` laid out as the product says.
    fn b_off(&self) -> usize {
        match self.sub.b {
            B::Rows { .. } => self.n0,
            B::Packed { panel_stride } => self.n0 / NR * panel_stride,
        }
    }
}

/// How [`for_each_block`] splits `g` into blocks of rows × whole panels of `width` columns:
/// `(rows, panels)` per block and `(row_blocks, col_blocks)`; `None` for a product too small to
/// split (one block, on the calling thread).
fn blocking(g: &Gemm, width: usize) -> Option<((usize, usize), (usize, usize))> {
    if g.m * g.n * g.k < 1 << 16 {
        return None;
    }
    // Blocks of at least 48 rows × 64 columns (enough work per task to hide its startup),
    // at most 192 × 256 (a's K-block slice in L2).
    let want = 4 * rayon::current_num_threads();
    let panels = g.n.div_ceil(width);
    let row_blocks = g.m.div_ceil(192).max(want.min(g.m.div_ceil(48)));
    let col_blocks = panels
        .div_ceil(256 / width)
        .max(want.div_ceil(row_blocks).min(panels.div_ceil(64 / width)));
    let rows = g.m.div_ceil(row_blocks).next_multiple_of(ROW_ALIGN);
    let pb = panels.div_ceil(col_blocks);
    Some(((rows, pb), (g.m.div_ceil(rows), panels.div_ceil(pb))))
}

/// Calls `f` on every core with blocks of `g` (rows × whole panels of `width` columns) of
/// about equal size, at least `4 ×` as many as threads when the product is big enough; a
/// small product is one block, on this thread.
fn for_each_block(g: &Gemm, width: usize, f: impl Fn(Block) + Sync) {
    if g.m == 0 || g.n == 0 {
        return;
    }
    let Some(((rows, pb), (row_blocks, col_blocks))) = blocking(g, width) else {
        return f(Block {
            sub: *g,
            r0: 0,
            n0: 0,
        });
    };
    // Consecutive tasks (one thread's share of the range) walk along the bigger operand, so
    // that the smaller one is what they re-read from cache: row-block-major when `a` is the
    // bigger (column-block-major made both threads stream all of an 8192-token activation
    // and cost a UNet step about 10%), column-block-major when `b` is (a linear layer's
    // weight at 512 tokens, which row-block-major re-read from memory once per row block).
    let row_major = g.m >= g.n;
    (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
        let (rb, cb) = if row_major {
            (t / col_blocks, t % col_blocks)
        } else {
            (t % row_blocks, t / row_blocks)
        };
        let (r0, n0) = (rb * rows, cb * pb * width);
        let sub = Gemm {
            m: rows.min(g.m - r0),
            n: (pb * width).min(g.n - n0),
            ..*g
        };
        f(Block { sub, r0, n0 })
    });
}

/// Most values of a row-major `b` that [`gemm_parallel`] packs once for all of its row blocks
/// (32 MiB, kept by the calling thread from call to call): the images and im2col matrices of
/// the UNet's convolutions, not a VAE's at 512² (whose blocks pack their own slices).
const SHARED_PACK_MAX: usize = 8 << 20;

/// Runs `g` on every core ([`for_each_block`]).
///
/// A row-major `b` split over several row blocks is packed into panels once, on every core,
/// before the product: each block would otherwise pack its columns again. (The 1×1 and im2col
/// convolutions, `W · image`, have 3 to 8 row blocks of output channels.)
pub(crate) fn gemm_parallel(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32], bias: Option<&[f32]>) {
    g.check((a.len(), b.len(), c.len()), bias);
    if let B::Rows { ld } = g.b {
        let len = g.n.div_ceil(NR) * NR * g.k;
        let row_blocks = blocking(g, NR).map_or(1, |(_, (row_blocks, _))| row_blocks);
        if row_blocks > 1 && len <= SHARED_PACK_MAX {
            thread_local! {
                static PACKED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            return super::with_kept_buffer(&PACKED, len, SHARED_PACK_MAX, |packed| {
                // Panels of all K rows (`B::packed`), a few panels per task; `pack_rows`
                // writes every value of its panels, zero padding included.
                let per_task = 4;
                packed
                    .par_chunks_mut(per_task * NR * g.k)
                    .enumerate()
                    .for_each(|(t, out)| {
                        let n0 = t * per_task * NR;
                        let n = (per_task * NR).min(g.n - n0);
                        pack_rows(&b[n0..], ld, g.k, n, out);
                    });
                let packed_g = Gemm {
                    b: B::packed(g.k),
                    ..*g
                };
                gemm_parallel(&packed_g, a, packed, c, bias);
            });
        }
    }
    let c_ptr = SendPtr(c.as_mut_ptr());
    for_each_block(g, NR, |blk| {
        let bias = bias.map_or(std::ptr::null(), |x| x[blk.bias_at()..].as_ptr());
        // SAFETY: the blocks are parts of the product checked above, and no two write the
        // same element of `c`.
        unsafe {
            blk.sub.run_raw(
                a.as_ptr().add(blk.r0 * g.lda),
                b.as_ptr().add(blk.b_off()),
                c_ptr.get().add(blk.r0 * g.rs_c + blk.n0 * g.cs_c),
                bias,
            )
        }
    });
}

/// The `a` of a bf16 product ([`gemm_parallel_bf16`]) as the layer holds it.
#[derive(Clone, Copy)]
pub(crate) enum BfA<'a> {
    F32(&'a [f32]),
    /// Read in place by the bf16 tiles (widened first on other CPUs).
    Bf16(&'a [half::bf16]),
}

/// The `b` of a bf16 product: f32 values laid out as the product says, or [`PairPanels`].
#[derive(Clone, Copy)]
pub(crate) enum BfB<'a> {
    F32(&'a [f32]),
    Pairs(&'a PairPanels),
}

/// Where a bf16 product writes: `c` in f32 (as [`gemm_parallel`]), or row-major bf16 values
/// (`rs_c = n`, not accumulating), each task's block computed into an f32 buffer it keeps and
/// rounded from there. (An f32 output the size of the whole product, then rounded, took as
/// long again as the product of a linear layer at 8192 × 320 → 2560: 84 MB of fresh pages,
/// then a second pass.)
pub(crate) enum BfOut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [half::bf16]),
}

/// A product's whole `b` rounded to bf16 once, in the layout the bf16 tiles read in place
/// (panels of 32 columns, K values interleaved in pairs): for a `b` that every row block would
/// otherwise convert again (a linear layer's weight).
pub(crate) struct PairPanels {
    #[cfg_attr(not(x86_simd), allow(dead_code))] // (read by the bf16 tiles only)
    data: Vec<u16>,
    n: usize,
    k: usize,
}

/// `b` (f32, laid out as `g` says) as [`PairPanels`], on every core; `None` where the CPU has
/// no bf16 dot products.
pub(crate) fn pack_pairs(g: &Gemm, b: &[f32]) -> Option<PairPanels> {
    #[cfg(x86_simd)]
    if super::has_bf16_dot() {
        use avx512bf16::{pair_panel_len, NB};
        let (_, eb, _) = g.extents();
        assert!(b.len() >= eb, "GEMM operand too short");
        let len = pair_panel_len(g.k);
        let mut data = vec![0u16; g.n.div_ceil(NB) * len];
        if len > 0 {
            data.par_chunks_mut(len).enumerate().for_each(|(p, panel)| {
                // SAFETY: the CPU has the features; `b` covers the product's `b` (checked) and
                // `panel` one panel.
                unsafe { avx512bf16::pack_pairs(g, b.as_ptr(), p..p + 1, panel.as_mut_ptr()) }
            });
        }
        return Some(PairPanels {
            data,
            n: g.n,
            k: g.k,
        });
    }
    let _ = (g, b);
    None
}

/// A bf16 weight `w` stored `n × k` (a linear layer's: the product's `b` is `wᵀ`) as
/// [`PairPanels`], on every core: each column's pairs of K values sit side by side in its row
/// of `w` already, so the panels are a transpose of 32-bit pairs (no rounding, no f32 copy).
/// `None` where the CPU has no bf16 dot products.
pub(crate) fn pack_pairs_bf16_rows(w: &[half::bf16], (n, k): (usize, usize)) -> Option<PairPanels> {
    #[cfg(x86_simd)]
    if super::has_bf16_dot() {
        use avx512bf16::{pair_panel_len, NB};
        assert!(w.len() >= n * k, "GEMM operand too short");
        let len = pair_panel_len(k);
        let mut data = vec![0u16; n.div_ceil(NB) * len];
        if len > 0 {
            data.par_chunks_mut(len).enumerate().for_each(|(p, panel)| {
                for j in 0..NB.min(n - p * NB) {
                    let row = &w[(p * NB + j) * k..(p * NB + j + 1) * k];
                    for (q, two) in row.chunks(2).enumerate() {
                        let at = q * 2 * NB + 2 * j;
                        panel[at] = two[0].to_bits();
                        // (An odd K's last pair keeps its zero.)
                        if let Some(second) = two.get(1) {
                            panel[at + 1] = second.to_bits();
                        }
                    }
                }
            });
        }
        return Some(PairPanels { data, n, k });
    }
    let _ = (w, n, k);
    None
}

/// Runs the bf16 product `g` on every core ([`for_each_block`]) from operands as the layers
/// hold them: on the bf16 tiles where the CPU has them, else (the `a` widened) the f32 tiles.
pub(crate) fn gemm_parallel_bf16(
    g: &Gemm,
    a: BfA<'_>,
    b: BfB<'_>,
    out: BfOut<'_>,
    bias: Option<&[f32]>,
) {
    let (a_len, b_len) = g.bf16_operand_lens(a, b);
    let (c_f32, c_bf16, c_len) = match out {
        BfOut::F32(c) => (
            SendPtr(c.as_mut_ptr()),
            SendPtr(std::ptr::null_mut()),
            c.len(),
        ),
        BfOut::Bf16(c) => {
            assert!(g.rs_c == g.n && g.cs_c == 1 && !g.accumulate);
            (
                SendPtr(std::ptr::null_mut()),
                SendPtr(c.as_mut_ptr()),
                c.len(),
            )
        }
    };
    g.check((a_len, b_len, c_len), bias);
    let tiles = cfg!(x86_simd) && super::has_bf16_dot();
    let widened;
    let a = match a {
        BfA::Bf16(x) if !tiles => {
            widened = super::bf16_to_f32(x);
            BfA::F32(&widened)
        }
        a => a,
    };
    let width = match b {
        BfB::Pairs(_) => 2 * NR,
        BfB::F32(_) => NR,
    };
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    for_each_block(g, width, |blk| {
        let (m, n) = (blk.sub.m, blk.sub.n);
        let bias = bias.map_or(std::ptr::null(), |x| x[blk.bias_at()..].as_ptr());
        let mut scratch = SCRATCH.take();
        // The block's `c`: in place, or in the scratch (row-major, `n` apart).
        let (sub, c) = if c_bf16.get().is_null() {
            let at = blk.r0 * g.rs_c + blk.n0 * g.cs_c;
            // SAFETY: within the output (checked above).
            (blk.sub, unsafe { c_f32.get().add(at) })
        } else {
            scratch.resize(scratch.len().max(m * n), 0.0);
            (Gemm { rs_c: n, ..blk.sub }, scratch.as_mut_ptr())
        };
        // SAFETY: the blocks are parts of the product checked above, and no two write the
        // same elements of the output; `a` is f32 unless the CPU has the bf16 tiles.
        unsafe { sub.run_bf16_raw(a, b, (blk.r0, blk.n0, blk.b_off()), c, bias) }
        if !c_bf16.get().is_null() {
            for (i, row) in scratch[..m * n].chunks_exact(n).enumerate() {
                // SAFETY: row `r0 + i`, columns `n0..n0 + n` of the output (checked above to
                // hold the product) belong to this block alone.
                let dst = unsafe {
                    let at = c_bf16.get().add((blk.r0 + i) * g.n + blk.n0);
                    std::slice::from_raw_parts_mut(at, n)
                };
                super::narrow_bf16(row, dst);
            }
        }
        SCRATCH.set(scratch);
    });
}

/// The register tiles of one instruction set, which [`drive`] runs a product on.
#[cfg(x86_simd)]
pub(crate) trait TileKernels {
    /// Rows per tile.
    const MR: usize;

    /// One tile of `rows ≤ MR` rows and `cols ≤ NR` columns over a K-block of `kc`:
    /// `c (+)= a · b (+ bias)`; `flags`: (add to `c`, the bias or null).
    ///
    /// # Safety
    /// The CPU has the tiles' instruction set; the pointers cover the tile.
    unsafe fn tile_at(
        g: &Gemm,
        shape: (usize, usize, usize),
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        flags: (bool, *const f32),
    );
}

/// Runs the product `g` on this thread with the tiles `T`: K-blocks, then column panels (a
/// panel's K-block slice stays in L1), then row tiles. Inlined into each instruction set's
/// `gemm`, so that it is compiled for it.
///
/// # Safety
/// The CPU has `T`'s instruction set; `a`, `b`, `c` (and `bias`, unless null) cover `g`.
#[cfg(x86_simd)]
#[inline(always)]
unsafe fn drive<T: TileKernels>(
    g: &Gemm,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    bias: *const f32,
) {
    let (m, n, k) = (g.m, g.n, g.k);
    if m == 0 || n == 0 {
        return;
    }
    thread_local! {
        // Packed K-blocks of a row-major `b`, reused from call to call.
        static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut scratch = SCRATCH.take();
    let kc_max = even_split(k, KC);
    let (full, rem) = (n / NR, n % NR);
    let mut k0 = 0;
    loop {
        let kc = kc_max.min(k - k0);
        // Panel p of this K-block: `kc × NR`, rows NR apart. A row-major `b` is packed
        // first: its rows are often a power-of-two apart (image planes), and a panel read
        // straight from them would map to a few L1 sets and be re-read from L2 by every
        // row tile.
        let (bk, panel_stride) = match g.b {
            B::Packed { panel_stride } => (b.add(k0 * NR), panel_stride),
            B::Rows { ld } => {
                scratch.resize(scratch.len().max((full + 1) * NR * kc), 0.0);
                let len = if kc == 0 { 0 } else { (kc - 1) * ld + n };
                let rows = std::slice::from_raw_parts(b.add(k0 * ld), len);
                pack_rows(rows, ld, kc, n, &mut scratch);
                (scratch.as_ptr(), NR * kc)
            }
        };
        // Later K-blocks add to what the first wrote; the bias goes in once.
        let load_c = g.accumulate || k0 > 0;
        let panels = full + usize::from(rem > 0);
        // Panels outer: a panel's K-block slice (≤ 24 KiB) stays in L1 while every row
        // tile passes over it, and `a` streams from L2 (a tile's rows at a time).
        for p in 0..panels {
            let cols = NR.min(n - p * NR);
            for (r0, rows) in balanced_parts(m, T::MR) {
                let bias = match (bias.is_null() || k0 > 0, g.bias_per_col) {
                    (true, _) => std::ptr::null(),
                    (false, true) => bias.add(p * NR),
                    (false, false) => bias.add(r0),
                };
                T::tile_at(
                    g,
                    (rows, cols, kc),
                    a.add(r0 * g.lda + k0),
                    bk.add(p * panel_stride),
                    c.add(r0 * g.rs_c + p * NR * g.cs_c),
                    (load_c, bias),
                );
            }
        }
        k0 += kc;
        if k0 >= k {
            break;
        }
    }
    SCRATCH.set(scratch);
}

/// The tile's pointers to its `R` rows of `a`, after asking for its rows of `c` so that they
/// arrive while the K loop runs instead of stalling the stores at its end (rows of `c` are a
/// whole row of the output apart; their lines are rarely still cached). Shared by every
/// instruction set's tiles.
#[cfg(x86_simd)]
#[inline(always)]
unsafe fn start_tile<const R: usize>(g: &Gemm, a: *const f32, c: *mut f32) -> [*const f32; R] {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    if g.cs_c == 1 {
        for r in 0..R {
            let row = c.add(r * g.rs_c) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(4 * (NR - 1)));
        }
    }
    std::array::from_fn(|r| a.add(r * g.lda))
}

/// Stores a row of a tile element by element (columns `cs_c` apart, or a partial row):
/// `c[j] = (c[j] +) acc[j] + bias`, `bias` the column's when `col_bias` (from `bias`), else
/// `add`. Every instruction set's tiles store so, in this order, so that they agree to the bit.
#[cfg(x86_simd)]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn store_row_scalar(
    g: &Gemm,
    dst: *mut f32,
    acc: &[f32; NR],
    cols: usize,
    load_c: bool,
    add: f32,
    col_bias: bool,
    bias: *const f32,
) {
    for (j, &t) in acc.iter().enumerate().take(cols) {
        let d = dst.add(j * g.cs_c);
        let add = if col_bias { *bias.add(j) } else { add };
        *d = if load_c { *d + t + add } else { t + add };
    }
}

// The softmax's exponential (`softmax_exp`, and the vector rows of `avx2::exp_shifted_sum`
// and `avx512::exp_shifted_sum`, whose steps `exp_steps!` writes once for both instruction
// sets, so that all three give the same bits). The attention packs its keys times
// `scale · SOFTMAX_UNIT`, so the scores arrive in eighths of an octave and `e^s = 2^(t/8)`
// needs no multiplication first. `t ≤ 0` (a score minus its row's maximum, or more) is
// clamped to `EXP_MIN` from below (no clamp above: none exceeds 0) and rounded to the nearest
// integer `n` by adding `EXP_SHIFT`, which leaves `n` in the low mantissa bits; `t = n + g`
// with `g` exact, and `2^(t/8) = 2^⌊n/8⌋ · 2^((n mod 8)/8) · 2^(g/8)`: the middle factor from
// `EXP_TABLE` (one permute of a register, indexed by those low bits), the power of two added
// to its exponent field, and `2^(g/8) ≈ 1 + g·q(g)` on |g| ≤ ½ with `q` of degree 2, highest
// coefficient first (a fit of the relative error, `scripts/exp_poly.py`, which also replays
// the f32 steps: relative error under 1.2e-7 over [−1000, 0]). Against `e^x` from natural
// units (a multiplication by log2e and a degree-4 polynomial on the FMA units, the kernel's
// bottleneck) this is four FMA-unit operations per vector instead of seven.

/// How many [`softmax_exp`] units make one natural unit: `8·log2e`, eighths of an octave.
pub(crate) const SOFTMAX_UNIT: f32 = 8.0 * std::f32::consts::LOG2_E;
/// Smallest argument: `2^(−1000/8) = 2^−125`, still a normal number.
const EXP_MIN: f32 = -1000.0;
const EXP_POLY: [f32; 3] = [0.000_108_391_054, 0.003_754_025_3, 0.086_643_405];
/// `2^(j/8)` rounded to f32, `j = 0..8`.
const EXP_TABLE: [f32; 8] = [
    1.0,
    1.090_507_7,
    1.189_207_1,
    1.296_839_6,
    std::f32::consts::SQRT_2,
    1.542_210_8,
    1.681_792_9,
    1.834_008_1,
];
/// `1.5·2²³`: `t` plus this, rounded to an integer by the addition itself, holds `n` (two's
/// complement) in its low mantissa bits.
const EXP_SHIFT: f32 = 12_582_912.0;
/// The exponent field of `2^⌊n/8⌋` from the bits of `t + EXP_SHIFT`: `n·2²⁰` with its low 23
/// bits cleared (the shifter's high bits shift out).
const EXP_POWER_MASK: u32 = 0xFF80_0000;

/// `2^(t/8)` for `t ≤ 0` (`2^−125` below −1000; NaN stays NaN): the softmax's exponential of
/// scores in [`SOFTMAX_UNIT`]s, the vector kernels' steps one lane at a time (the same bits).
#[inline(always)]
pub(crate) fn softmax_exp(t: f32) -> f32 {
    // (Not `max`, which turns NaN into the bound.)
    let t = if t < EXP_MIN { EXP_MIN } else { t };
    let r = t + EXP_SHIFT;
    let bits = r.to_bits();
    let power = (bits << 20) & EXP_POWER_MASK;
    let scaled = f32::from_bits(EXP_TABLE[(bits & 7) as usize].to_bits().wrapping_add(power));
    let g = t - (r - EXP_SHIFT);
    let q = EXP_POLY[0].mul_add(g, EXP_POLY[1]).mul_add(g, EXP_POLY[2]);
    (scaled * g).mul_add(q, scaled)
}

/// [`softmax_exp`] of one register, from the instruction set's intrinsics (`set1`, `max`,
/// `fmadd`, `add`, `sub`, `mul`, the casts between float and integer lanes, and those of
/// integer lanes: `set1`, the shift left by 20, `and`, `add`) and `lookup`, [`EXP_TABLE`]'s
/// values at the low three bits of each lane.
#[cfg(x86_simd)]
macro_rules! exp_steps {
    ($t:expr, $set1:ident, $max:ident, $fmadd:ident, $add:ident, $sub:ident, $mul:ident,
     $to_int:ident, $to_float:ident,
     $set1_int:ident, $shl20:expr, $and:ident, $add_int:ident, $lookup:expr) => {{
        use super::{EXP_MIN, EXP_POLY, EXP_POWER_MASK, EXP_SHIFT};
        // `max` returns its second operand when either is NaN: `t` second, so that a NaN
        // stays NaN (first, it became a finite weight for a NaN score).
        let t = $max($set1(EXP_MIN), $t);
        let r = $add(t, $set1(EXP_SHIFT));
        let bits = $to_int(r);
        let power = $and($shl20(bits), $set1_int(EXP_POWER_MASK as i32));
        let scaled = $to_float($add_int($to_int($lookup(bits)), power));
        let g = $sub(t, $sub(r, $set1(EXP_SHIFT)));
        let q = $fmadd($set1(EXP_POLY[0]), g, $set1(EXP_POLY[1]));
        let q = $fmadd(q, g, $set1(EXP_POLY[2]));
        // 2^(t/8) = s + (s·g)·q(g), s = 2^(n/8)
        $fmadd($mul(scaled, g), q, scaled)
    }};
}

#[cfg(x86_simd)]
pub(crate) mod avx2 {
    use super::{Gemm, MR, NR};
    use crate::ops::{unrolled, with_rows};
    use std::arch::x86_64::*;

    /// Lane masks for the first `cols` columns of a `V`-register row.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn masks<const V: usize>(cols: usize) -> [__m256i; V] {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        std::array::from_fn(|v| {
            let limit = _mm256_set1_epi32(cols as i32 - 8 * v as i32);
            _mm256_cmpgt_epi32(limit, lanes)
        })
    }

    /// One step of the K loop: `acc[r] += a[r][kk] · b[kk]` (`rows[r]` points at row `r`'s
    /// element `kk` of `a`, `row` at row `kk` of `b`).
    #[inline(always)]
    unsafe fn fma_step<const R: usize, const V: usize, const MASK: bool>(
        acc: &mut [[__m256; V]; R],
        rows: &[*const f32; R],
        row: *const f32,
        mask: &[__m256i; V],
    ) {
        let mut bv = [_mm256_setzero_ps(); V];
        for (v, bv) in bv.iter_mut().enumerate() {
            *bv = if MASK {
                _mm256_maskload_ps(row.add(8 * v), mask[v])
            } else {
                _mm256_loadu_ps(row.add(8 * v))
            };
        }
        for (acc, &at) in acc.iter_mut().zip(rows) {
            let x = _mm256_broadcast_ss(&*at);
            for v in 0..V {
                acc[v] = _mm256_fmadd_ps(x, bv[v], acc[v]);
            }
        }
    }

    /// One register tile: `c[r][j] (+)= Σ_kk a[r·lda + kk] · b[kk·ldb + j] (+ bias[r] or
    /// bias[j])` for
    /// `r < R`, `j < cols ≤ 8·V`. `MASK`: `cols < 8·V`, so `b` is read under a lane mask.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<const R: usize, const V: usize, const MASK: bool>(
        g: &Gemm,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        kc: usize,
        c: *mut f32,
        cols: usize,
        (load_c, bias): (bool, *const f32),
    ) {
        let mask = masks::<V>(cols);
        let rows = super::start_tile::<R>(g, a, c);
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        unrolled!(kc, kk => {
            let at = rows.map(|p| p.add(kk));
            fma_step::<R, V, MASK>(&mut acc, &at, b.add(kk * ldb), &mask);
        });
        let (row_bias, col_bias) = match (bias.is_null(), g.bias_per_col) {
            (true, _) => (false, false),
            (false, per_col) => (!per_col, per_col),
        };
        for (r, acc) in acc.iter().enumerate() {
            let dst = c.add(r * g.rs_c);
            let add = if row_bias { *bias.add(r) } else { 0.0 };
            if g.cs_c == 1 && !MASK {
                for (v, &acc) in acc.iter().enumerate() {
                    let add = match col_bias {
                        true => _mm256_loadu_ps(bias.add(8 * v)),
                        false => _mm256_set1_ps(add),
                    };
                    let mut x = _mm256_add_ps(acc, add);
                    if load_c {
                        x = _mm256_add_ps(x, _mm256_loadu_ps(dst.add(8 * v)));
                    }
                    _mm256_storeu_ps(dst.add(8 * v), x);
                }
            } else {
                let mut tmp = [0f32; NR];
                for (v, &acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * v), acc);
                }
                super::store_row_scalar(g, dst, &tmp, cols, load_c, add, col_bias, bias);
            }
        }
    }

    /// One tile of `rows ≤ MR` rows and `cols ≤ NR` columns: picks the monomorphised kernel.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_at(
        g: &Gemm,
        (rows, cols, kc): (usize, usize, usize),
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        flags: (bool, *const f32),
    ) {
        match cols {
            NR => with_rows!(rows, [1, 2, 3, 4, 5] or MR:
                tile::<R, 2, false>(g, a, b, NR, kc, c, NR, flags)),
            8 => with_rows!(rows, [1, 2, 3, 4, 5] or MR:
                tile::<R, 1, false>(g, a, b, NR, kc, c, 8, flags)),
            1..8 => with_rows!(rows, [1, 2, 3, 4, 5] or MR:
                tile::<R, 1, true>(g, a, b, NR, kc, c, cols, flags)),
            _ => with_rows!(rows, [1, 2, 3, 4, 5] or MR:
                tile::<R, 2, true>(g, a, b, NR, kc, c, cols, flags)),
        }
    }

    /// The AVX2 register tiles.
    pub(crate) struct Avx2;

    impl super::TileKernels for Avx2 {
        const MR: usize = MR;

        #[inline(always)]
        unsafe fn tile_at(
            g: &Gemm,
            shape: (usize, usize, usize),
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            flags: (bool, *const f32),
        ) {
            tile_at(g, shape, a, b, c, flags)
        }
    }

    /// Runs the product `g` on this thread with the AVX2 tiles ([`super::drive`]).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `a`, `b`, `c` (and `bias`, unless null) cover `g`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn gemm(
        g: &Gemm,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        bias: *const f32,
    ) {
        super::drive::<Avx2>(g, a, b, c, bias)
    }

    /// [`super::softmax_exp`] of 8 lanes ([`exp_steps`]).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp_ps(t: __m256) -> __m256 {
        // SAFETY: EXP_TABLE holds 8 values.
        let table = unsafe { _mm256_loadu_ps(super::EXP_TABLE.as_ptr()) };
        exp_steps!(
            t,
            _mm256_set1_ps,
            _mm256_max_ps,
            _mm256_fmadd_ps,
            _mm256_add_ps,
            _mm256_sub_ps,
            _mm256_mul_ps,
            _mm256_castps_si256,
            _mm256_castsi256_ps,
            _mm256_set1_epi32,
            _mm256_slli_epi32::<20>,
            _mm256_and_si256,
            _mm256_add_epi32,
            |bits| _mm256_permutevar8x32_ps(table, bits)
        )
    }

    /// `blocks` 8 × 8 transposes along eight rows: block `b` of rows `src[j] + 8b` to the
    /// eight rows of `dst` from `8b · ld`. One call for a run of blocks, each inlined (a call
    /// per block passed its eight pointers through the stack).
    ///
    /// # Safety
    /// The CPU has AVX2; each `src[j]` is readable for `8 · blocks` floats, `dst` writable
    /// for `8 · blocks` rows of `ld`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn transpose_blocks8(
        src: [*const f32; 8],
        blocks: usize,
        dst: *mut f32,
        ld: usize,
    ) {
        for b in 0..blocks {
            let e0 = b * 8;
            // SAFETY: within the bounds the caller gives.
            unsafe { transpose8x8(src.map(|r| r.add(e0)), dst.add(e0 * ld), ld) }
        }
    }

    /// Reads an 8 × 8 block (row `j` at `src[j]`) and writes its transpose, row `i` at
    /// `dst + i · ld`.
    ///
    /// # Safety
    /// The CPU has AVX2; each `src[j]` is readable for 8 floats, `dst` writable for 8 rows.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn transpose8x8(src: [*const f32; 8], dst: *mut f32, ld: usize) {
        let r: [__m256; 8] = std::array::from_fn(|j| _mm256_loadu_ps(src[j]));
        // Pairs of rows interleaved, then pairs of pairs: 4 × 4 transposes in each 128-bit half.
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        let s: [__m256; 8] = std::array::from_fn(|i| {
            // s[0..4] from rows 0–3 (t[0..4]), s[4..8] from rows 4–7 (t[4..8]).
            let base = i / 4 * 4;
            let (a, b) = (t[base + (i % 4) / 2], t[base + 2 + (i % 4) / 2]);
            if i % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xEE>(a, b)
            }
        });
        for i in 0..4 {
            _mm256_storeu_ps(
                dst.add(i * ld),
                _mm256_permute2f128_ps::<0x20>(s[i], s[i + 4]),
            );
            _mm256_storeu_ps(
                dst.add((i + 4) * ld),
                _mm256_permute2f128_ps::<0x31>(s[i], s[i + 4]),
            );
        }
    }

    /// `row[i] = softmax_exp(row[i] − m)` for `m` at least every `row[i]` (scores in
    /// [`super::SOFTMAX_UNIT`]s); returns their sum. Two running sums, of the first and of the
    /// second 8 values of each 16 (the AVX-512 kernel's two halves of one register); a last 8
    /// go to the first, fewer to the scalar tail.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA (checked by the caller).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp_shifted_sum(row: &mut [f32], m: f32) -> f32 {
        let mv = _mm256_set1_ps(m);
        let (mut first, mut second) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let exp8 = |at: &mut [f32]| {
            let e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(at.as_ptr()), mv));
            _mm256_storeu_ps(at.as_mut_ptr(), e);
            e
        };
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            let (lo, hi) = c.split_at_mut(8);
            first = _mm256_add_ps(first, exp8(lo));
            second = _mm256_add_ps(second, exp8(hi));
        }
        let rest = chunks.into_remainder();
        let (eight, tail) = rest.split_at_mut(rest.len() / 8 * 8);
        if !eight.is_empty() {
            first = _mm256_add_ps(first, exp8(eight));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(first, second));
        let tail: f32 = tail
            .iter_mut()
            .map(|x| {
                *x = super::softmax_exp(*x - m);
                *x
            })
            .sum();
        lanes.iter().sum::<f32>() + tail
    }
}

/// The AVX-512 tiles: 8 rows of `a` by one 16-column zmm register of `b`, whose 8
/// accumulators hide the FMA latency; each `a` value is broadcast straight from memory into
/// its FMA. A last panel of at most 8 columns runs on the AVX2 tiles' single ymm register
/// (8 rows). Every element of `c` gets the same FMAs in the same order as in the AVX2 tiles
/// (and the same final additions), so both give the same bits.
#[cfg(x86_simd)]
pub(crate) mod avx512 {
    use super::{Gemm, NR};
    use crate::ops::{unrolled, with_rows};
    use std::arch::x86_64::*;

    /// Rows per tile.
    const MR: usize = 8;

    /// One step of the K loop: `acc[r] += a[r][kk] · b[kk]`.
    #[inline(always)]
    unsafe fn fma_step<const R: usize, const MASK: bool>(
        acc: &mut [__m512; R],
        rows: &[*const f32; R],
        row: *const f32,
        mask: __mmask16,
    ) {
        let bv = if MASK {
            _mm512_maskz_loadu_ps(mask, row)
        } else {
            _mm512_loadu_ps(row)
        };
        for (acc, &at) in acc.iter_mut().zip(rows) {
            *acc = _mm512_fmadd_ps(_mm512_set1_ps(*at), bv, *acc);
        }
    }

    /// One register tile, as the AVX2 `tile` (`cols ≤ 16`; `MASK`: `cols < 16`).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const MASK: bool>(
        g: &Gemm,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        kc: usize,
        c: *mut f32,
        cols: usize,
        (load_c, bias): (bool, *const f32),
    ) {
        let mask: __mmask16 = if MASK { (1u16 << cols) - 1 } else { !0 };
        let rows = super::start_tile::<R>(g, a, c);
        let mut acc = [_mm512_setzero_ps(); R];
        unrolled!(kc, kk => {
            let at = rows.map(|p| p.add(kk));
            fma_step::<R, MASK>(&mut acc, &at, b.add(kk * ldb), mask);
        });
        for (r, &acc) in acc.iter().enumerate() {
            store_row(g, c.add(r * g.rs_c), acc, cols, (load_c, bias), r);
        }
    }

    /// Stores row `r` of a tile, its first `cols ≤ 16` columns from `acc`: `c (+)= acc + bias`
    /// (the row's bias, or the columns').
    #[inline(always)]
    pub(super) unsafe fn store_row(
        g: &Gemm,
        dst: *mut f32,
        acc: __m512,
        cols: usize,
        (load_c, bias): (bool, *const f32),
        r: usize,
    ) {
        let mask: __mmask16 = if cols < NR { (1u16 << cols) - 1 } else { !0 };
        let col_bias = !bias.is_null() && g.bias_per_col;
        let add = if !bias.is_null() && !g.bias_per_col {
            *bias.add(r)
        } else {
            0.0
        };
        if g.cs_c == 1 {
            // The AVX2 tiles store whole 8-column registers as `(acc + bias) + c` and
            // everything else element by element as `(c + acc) + bias`; the same order here
            // gives the same bits.
            let vector_order = cols == NR || cols == 8;
            let addv = match col_bias {
                true => _mm512_maskz_loadu_ps(mask, bias),
                false => _mm512_set1_ps(add),
            };
            let x = match (load_c, vector_order) {
                (false, _) => _mm512_add_ps(acc, addv),
                (true, true) => {
                    _mm512_add_ps(_mm512_add_ps(acc, addv), _mm512_maskz_loadu_ps(mask, dst))
                }
                (true, false) => {
                    _mm512_add_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), acc), addv)
                }
            };
            _mm512_mask_storeu_ps(dst, mask, x);
        } else {
            let mut tmp = [0f32; NR];
            _mm512_storeu_ps(tmp.as_mut_ptr(), acc);
            super::store_row_scalar(g, dst, &tmp, cols, load_c, add, col_bias, bias);
        }
    }

    /// The AVX-512 register tiles.
    pub(crate) struct Avx512;

    impl super::TileKernels for Avx512 {
        const MR: usize = MR;

        #[inline(always)]
        unsafe fn tile_at(
            g: &Gemm,
            (rows, cols, kc): (usize, usize, usize),
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            flags: (bool, *const f32),
        ) {
            use super::avx2::tile as ymm;
            match cols {
                NR => with_rows!(rows, [1, 2, 3, 4, 5, 6, 7] or MR:
                    tile::<R, false>(g, a, b, NR, kc, c, NR, flags)),
                // A tail of up to 8 columns on ymm registers: half the cost of a masked zmm
                // FMA on CPUs that split 512-bit FMAs in two (AMD Zen 4).
                8 => with_rows!(rows, [1, 2, 3, 4, 5, 6, 7] or MR:
                    ymm::<R, 1, false>(g, a, b, NR, kc, c, cols, flags)),
                1..8 => with_rows!(rows, [1, 2, 3, 4, 5, 6, 7] or MR:
                    ymm::<R, 1, true>(g, a, b, NR, kc, c, cols, flags)),
                _ => with_rows!(rows, [1, 2, 3, 4, 5, 6, 7] or MR:
                    tile::<R, true>(g, a, b, NR, kc, c, cols, flags)),
            }
        }
    }

    /// Runs the product `g` on this thread with the AVX-512 tiles ([`super::drive`]).
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX2 and FMA; `a`, `b`, `c` (and `bias`, unless null) cover `g`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn gemm(
        g: &Gemm,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        bias: *const f32,
    ) {
        super::drive::<Avx512>(g, a, b, c, bias)
    }

    /// [`super::softmax_exp`] of 16 lanes: the AVX2 `exp_ps`'s steps ([`exp_steps`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn exp_ps(t: __m512) -> __m512 {
        // The permute reads the low four bits: the table twice.
        const TABLE: [f32; 16] = {
            let mut table = [0f32; 16];
            let mut i = 0;
            while i < 16 {
                table[i] = super::EXP_TABLE[i % 8];
                i += 1;
            }
            table
        };
        // SAFETY: TABLE holds 16 values.
        let table = unsafe { _mm512_loadu_ps(TABLE.as_ptr()) };
        exp_steps!(
            t,
            _mm512_set1_ps,
            _mm512_max_ps,
            _mm512_fmadd_ps,
            _mm512_add_ps,
            _mm512_sub_ps,
            _mm512_mul_ps,
            _mm512_castps_si512,
            _mm512_castsi512_ps,
            _mm512_set1_epi32,
            _mm512_slli_epi32::<20>,
            _mm512_and_si512,
            _mm512_add_epi32,
            |bits| _mm512_permutexvar_ps(bits, table)
        )
    }

    /// Lanes 8..16 (AVX-512F has no `vextractf32x8`; the 64-bit extract moves the same bits).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn high_half(v: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
    }

    /// `row[i] = softmax_exp(row[i] − m)` for `m` at least every `row[i]`; returns their sum: the
    /// AVX2 kernel's values and sum, bit for bit, at twice the width. One running sum of 16
    /// lanes, whose halves are the AVX2 kernel's two; a last 8 take a masked vector added to
    /// the first half, fewer the scalar tail.
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX2 and FMA (checked by the caller).
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn exp_shifted_sum(row: &mut [f32], m: f32) -> f32 {
        let (mv, mut acc) = (_mm512_set1_ps(m), _mm512_setzero_ps());
        let mut chunks = row.chunks_exact_mut(16);
        for c in &mut chunks {
            let e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), mv));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm512_add_ps(acc, e);
        }
        let rest = chunks.into_remainder();
        let (eight, tail) = rest.split_at_mut(rest.len() / 8 * 8);
        if !eight.is_empty() {
            let e = exp_ps(_mm512_sub_ps(
                _mm512_maskz_loadu_ps(0xff, eight.as_ptr()),
                mv,
            ));
            _mm512_mask_storeu_ps(eight.as_mut_ptr(), 0xff, e);
            acc = _mm512_mask_add_ps(acc, 0xff, acc, e);
        }
        let mut lanes = [0f32; 8];
        let sum = _mm256_add_ps(_mm512_castps512_ps256(acc), high_half(acc));
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let tail: f32 = tail
            .iter_mut()
            .map(|x| {
                *x = super::softmax_exp(*x - m);
                *x
            })
            .sum();
        lanes.iter().sum::<f32>() + tail
    }
}

/// The bf16 products: `a` and `b` rounded to bf16 (round to nearest even, as PyTorch's bf16
/// kernels see their operands) and multiplied by `vdpbf16ps`, which adds the products of two
/// consecutive K values into each f32 lane: twice the multiply-adds per instruction of the
/// f32 tiles. Each K-block of `a` is converted into rows of bf16 values, and of `b` into
/// panels of [`NB`] columns whose K values are interleaved in pairs; a tile of [`MB`] rows ×
/// 32 columns keeps its 16 accumulators in registers for the whole K-block.
#[cfg(x86_simd)]
pub(crate) mod avx512bf16 {
    use super::{even_split, Gemm, B, KC, NR};
    use crate::ops::with_rows;
    use std::arch::x86_64::*;

    /// Columns per tile and per converted panel: two zmm registers per row.
    pub(crate) const NB: usize = 2 * NR;
    /// Rows per tile (a divisor of `ROW_ALIGN`): 16 accumulators, 2 panel registers.
    const MB: usize = 8;

    /// Where a bf16 product's `a` comes from (rows `g.lda` values apart).
    #[derive(Clone, Copy)]
    pub(crate) enum ASrc {
        /// f32 values, rounded one K-block at a time.
        F32(*const f32),
        /// bf16 values, read in place (a K-block of odd length is copied with a zero pad).
        Bf16(*const u16),
    }

    /// Where its `b` comes from.
    #[derive(Clone, Copy)]
    pub(crate) enum BSrc {
        /// f32 values laid out as `g.b` says, rounded one K-block at a time.
        F32(*const f32),
        /// Panels laid out as [`pack_pairs`] makes them, `panel_stride` values apart, the
        /// first at the product's first column and K value, read in place.
        Pairs { at: *const u16, panel_stride: usize },
    }

    /// The bits of 16 bf16 values as an integer vector.
    #[inline(always)]
    fn bits256(v: __m256bh) -> __m256i {
        // SAFETY: both are 256 bits of plain data, every pattern valid for either.
        unsafe { std::mem::transmute::<__m256bh, __m256i>(v) }
    }

    /// 32 bf16 values from their bits.
    #[inline(always)]
    fn bf16x32(v: __m512i) -> __m512bh {
        // SAFETY: both are 512 bits of plain data, every pattern valid for either.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// `f32 → bf16` of `n ≤ 16` values (the rest zero), round to nearest even.
    #[inline(always)]
    unsafe fn to_bf16(src: *const f32, n: usize) -> __m256bh {
        let v = if n >= 16 {
            _mm512_loadu_ps(src)
        } else {
            _mm512_maskz_loadu_ps((1u16 << n).wrapping_sub(1), src)
        };
        _mm512_cvtneps_pbh(v)
    }

    /// Rows `0..m` of `a` (`lda` apart), `kc` values each, as bf16 rows of `kp` (even) values,
    /// the padding zero.
    #[inline(always)]
    unsafe fn copy_a(a: ASrc, lda: usize, (m, kc, kp): (usize, usize, usize), out: *mut u16) {
        for r in 0..m {
            let dst = out.add(r * kp);
            match a {
                ASrc::F32(a) => {
                    let src = a.add(r * lda);
                    for k0 in (0..kp).step_by(16) {
                        let v = to_bf16(src.add(k0), kc.saturating_sub(k0).min(16));
                        let n = (kp - k0).min(16);
                        let mask = (1u32 << n).wrapping_sub(1) as u16;
                        _mm256_mask_storeu_epi16(dst.add(k0) as *mut i16, mask, bits256(v));
                    }
                }
                ASrc::Bf16(a) => {
                    std::ptr::copy_nonoverlapping(a.add(r * lda), dst, kc);
                    dst.add(kc).write_bytes(0, kp - kc);
                }
            }
        }
    }

    /// Element `(kk, j)` of `b` for `j` in `j0..j0 + 16` (`n` columns in all, `kk < kc`):
    /// its address and how many of the 16 exist.
    #[inline(always)]
    unsafe fn b_row(g: &Gemm, b: *const f32, kk: usize, j0: usize) -> (*const f32, usize) {
        let cols = g.n.saturating_sub(j0).min(NR);
        let at = match g.b {
            B::Rows { ld } => b.add(kk * ld + j0),
            // Whole NR-column panels: `j0` is a multiple of NR.
            B::Packed { panel_stride } => b.add(j0 / NR * panel_stride + kk * NR),
        };
        (at, cols)
    }

    /// Rows `k0..k0 + kc` of `b` (f32, laid out as `g.b` says) as panels `panels` of [`NB`]
    /// columns, `kp / 2` pairs of K values each, one after the other from `out`: a pair is 32
    /// bf16, column `j`'s two values side by side; the padding zero.
    #[inline(always)]
    unsafe fn convert_b(
        g: &Gemm,
        b: *const f32,
        (k0, kc, kp): (usize, usize, usize),
        panels: std::ops::Range<usize>,
        out: *mut u16,
    ) {
        // Interleaves the 16 values of x (low half) and y (high half): x0 y0 x1 y1 …
        let order = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for (i, p) in panels.enumerate() {
            let panel = out.add(i * NB * kp);
            for pair in 0..kp / 2 {
                for half in 0..2 {
                    let j0 = p * NB + half * NR;
                    let row = |kk: usize| {
                        if kk >= kc || j0 >= g.n {
                            return _mm512_castsi256_si512(_mm256_setzero_si256());
                        }
                        let (at, cols) = b_row(g, b, k0 + kk, j0);
                        _mm512_castsi256_si512(bits256(to_bf16(at, cols)))
                    };
                    let (x, y) = (row(2 * pair), row(2 * pair + 1));
                    let both = _mm512_inserti64x4::<1>(x, _mm512_castsi512_si256(y));
                    let v = _mm512_permutexvar_epi16(order, both);
                    _mm512_storeu_si512(panel.add(pair * 2 * NB + half * 2 * NR) as *mut _, v);
                }
            }
        }
    }

    /// Values per panel of [`pack_pairs`] for `k` rows.
    pub(crate) fn pair_panel_len(k: usize) -> usize {
        NB * k.next_multiple_of(2)
    }

    /// Panels `panels` of all of `b` (f32, laid out as `g.b` says, `g.k` rows) in the layout
    /// [`BSrc::Pairs`] reads, [`pair_panel_len`] values each, into `out`.
    ///
    /// # Safety
    /// The CPU has AVX512-F/BW/VL/BF16; `b` covers `g`'s `b` and `out` the panels.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    pub(crate) unsafe fn pack_pairs(
        g: &Gemm,
        b: *const f32,
        panels: std::ops::Range<usize>,
        out: *mut u16,
    ) {
        let kp = g.k.next_multiple_of(2);
        convert_b(g, b, (0, g.k, kp), panels, out)
    }

    /// One tile: `R ≤ MB` rows × `cols ≤ 32` columns over `kp / 2` pairs (rows of `a` `lda`
    /// values apart); `W` registers per row (1 when `cols ≤ 16`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const W: usize>(
        g: &Gemm,
        (a, lda): (*const u16, usize),
        kp: usize,
        b: *const u16,
        c: *mut f32,
        cols: usize,
        flags: (bool, *const f32),
    ) {
        let rows: [*const u16; R] = std::array::from_fn(|r| a.add(r * lda));
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        for pair in 0..kp / 2 {
            let bv: [__m512bh; W] = std::array::from_fn(|w| {
                #[allow(unused_mut)]
                let mut v = _mm512_loadu_si512(b.add(pair * 2 * NB + w * 2 * NR) as *const _);
                // Bochs 3.0 reads `vdpbf16ps`'s memory operand from the wrong address when its
                // displacement is compressed (disp8·64), the form a load used once (one-row
                // tiles) is folded into: under emulation `v` stays in a register. SAFETY: the
                // template is empty: no instruction, no memory access.
                #[cfg(feature = "avx512-emulation")]
                std::arch::asm!("/* {0} */", inout(zmm_reg) v, options(pure, nomem, nostack));
                bf16x32(v)
            });
            for (acc, &row) in acc.iter_mut().zip(&rows) {
                let two = (row.add(2 * pair) as *const i32).read_unaligned();
                let av = bf16x32(_mm512_set1_epi32(two));
                for w in 0..W {
                    acc[w] = _mm512_dpbf16_ps(acc[w], av, bv[w]);
                }
            }
        }
        let (_, bias) = flags;
        for (r, acc) in acc.iter().enumerate() {
            for (w, &acc) in acc.iter().enumerate() {
                let part = cols.saturating_sub(w * NR).min(NR);
                if part == 0 {
                    continue;
                }
                // The columns' bias moves with them; a row's stays.
                let bias = match (bias.is_null(), g.bias_per_col) {
                    (false, true) => bias.add(w * NR),
                    _ => bias,
                };
                let dst = c.add(r * g.rs_c + w * NR * g.cs_c);
                super::avx512::store_row(g, dst, acc, part, (flags.0, bias), r);
            }
        }
    }

    /// Runs the product `g` on this thread: per K-block (of even length but the last), `a`
    /// and `b` converted unless they are read in place, then column panels (a panel's K-block,
    /// at most 24 KiB, stays in L1), then row tiles.
    ///
    /// # Safety
    /// The CPU has AVX512-F/BW/VL/BF16; `a`, `b`, `c` (and `bias`, unless null) cover `g`
    /// (`b` as [`pack_pairs`] lays it out for `BSrc::Pairs`, whose panel `p` is the product's
    /// column panel `p`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    pub(crate) unsafe fn gemm(g: &Gemm, a: ASrc, b: BSrc, c: *mut f32, bias: *const f32) {
        let (m, n, k) = (g.m, g.n, g.k);
        if m == 0 || n == 0 {
            return;
        }
        thread_local! {
            // The converted K-blocks of `a` and `b`, reused from call to call.
            static SCRATCH: std::cell::RefCell<(Vec<u16>, Vec<u16>)> =
                const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        let (mut sa, mut sb) = SCRATCH.take();
        // Even, so that every K-block starts on a pair.
        let kc_max = even_split(k, KC).next_multiple_of(2);
        let panels = n.div_ceil(NB);
        let mut k0 = 0;
        loop {
            let kc = kc_max.min(k - k0);
            let kp = kc.next_multiple_of(2);
            let a_block = match a {
                ASrc::F32(a) => ASrc::F32(a.add(k0)),
                ASrc::Bf16(a) => ASrc::Bf16(a.add(k0)),
            };
            let a_rows = match a_block {
                ASrc::Bf16(a) if kc == kp => (a, g.lda),
                _ => {
                    sa.resize(sa.len().max(m * kp), 0);
                    copy_a(a_block, g.lda, (m, kc, kp), sa.as_mut_ptr());
                    (sa.as_ptr(), kp)
                }
            };
            let (b_panels, panel_stride) = match b {
                BSrc::Pairs { at, panel_stride } => (at.add(k0 * NB), panel_stride),
                BSrc::F32(b) => {
                    sb.resize(sb.len().max(panels * NB * kp), 0);
                    convert_b(g, b, (k0, kc, kp), 0..panels, sb.as_mut_ptr());
                    (sb.as_ptr(), NB * kp)
                }
            };
            // Later K-blocks add to what the first wrote; the bias goes in once.
            let load_c = g.accumulate || k0 > 0;
            for p in 0..panels {
                let cols = NB.min(n - p * NB);
                for r0 in (0..m).step_by(MB) {
                    let bias = match (bias.is_null() || k0 > 0, g.bias_per_col) {
                        (true, _) => std::ptr::null(),
                        (false, true) => bias.add(p * NB),
                        (false, false) => bias.add(r0),
                    };
                    let a = (a_rows.0.add(r0 * a_rows.1), a_rows.1);
                    let b = b_panels.add(p * panel_stride);
                    let c = c.add(r0 * g.rs_c + p * NB * g.cs_c);
                    let rows = MB.min(m - r0);
                    if cols > NR {
                        with_rows!(rows, [1, 2, 3, 4, 5, 6, 7] or MB:
                            tile::<R, 2>(g, a, kp, b, c, cols, (load_c, bias)));
                    } else {
                        with_rows!(rows, [1, 2, 3, 4, 5, 6, 7] or MB:
                            tile::<R, 1>(g, a, kp, b, c, cols, (load_c, bias)));
                    }
                }
            }
            k0 += kc;
            if k0 >= k {
                break;
            }
        }
        SCRATCH.set((sa, sb));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(len: usize, seed: &mut u32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (*seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Random operands of an `m × n × k` product: `a` with rows `k + 3` apart, a bias per row
    /// or (with accumulation, to keep the cases few) per column, `b` as `k × n` with rows
    /// `n + 5` apart and packed ([`pack_kt`], panels one after the other), and `c`'s values
    /// before the product.
    struct Operands {
        a: Vec<f32>,
        lda: usize,
        bias: Vec<f32>,
        b_rows: Vec<f32>,
        ld: usize,
        b_dense: Vec<f32>,
        c0: Vec<f32>,
    }

    impl Operands {
        fn new((m, n, k): (usize, usize, usize), bias_per_col: bool, seed: &mut u32) -> Self {
            let (lda, ld) = (k + 3, n + 5);
            let a = rand(m * lda, seed);
            let bias = rand(if bias_per_col { n } else { m }, seed);
            let b_rows = rand(k * ld, seed);
            let bt: Vec<f32> = (0..n * k).map(|i| b_rows[(i % k) * ld + i / k]).collect();
            let mut b_dense = vec![0f32; n.div_ceil(NR) * NR * k];
            pack_kt(&bt, (n, k, k), 1.0, &mut b_dense);
            let c0 = rand(m * n, seed);
            Self {
                a,
                lda,
                bias,
                b_rows,
                ld,
                b_dense,
                c0,
            }
        }

        /// `g`'s product of these operands (each passed through `op_a`, `op_b` first) in f64,
        /// bias and accumulated `c` included: element `(i, j)` at `i · n + j`.
        fn product(
            &self,
            g: &Gemm,
            (op_a, op_b): (impl Fn(f32) -> f32, impl Fn(f32) -> f32),
        ) -> Vec<f64> {
            let (m, n, k) = (g.m, g.n, g.k);
            let mut want = Vec::with_capacity(m * n);
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|kk| {
                            op_a(self.a[i * self.lda + kk]) as f64
                                * op_b(self.b_rows[kk * self.ld + j]) as f64
                        })
                        .sum();
                    let at = i * g.rs_c + j * g.cs_c;
                    want.push(
                        dot + self.bias[if g.bias_per_col { j } else { i }] as f64
                            + if g.accumulate {
                                self.c0[at] as f64
                            } else {
                                0.0
                            },
                    );
                }
            }
            want
        }

        /// Asserts that `c` holds `want` ([`Self::product`]) to within `1e-5·√(k+1)` plus `rel`
        /// of its size.
        fn assert_close(g: &Gemm, c: &[f32], want: &[f64], rel: f64, what: &str) {
            let (m, n, k) = (g.m, g.n, g.k);
            for i in 0..m {
                for j in 0..n {
                    let (at, want) = (i * g.rs_c + j * g.cs_c, want[i * n + j]);
                    assert!(
                        (c[at] as f64 - want).abs()
                            <= 1e-5 * (1.0 + k as f64).sqrt() + rel * want.abs(),
                        "{m}x{n}x{k} {what} at ({i},{j}): {} vs {want}",
                        c[at]
                    );
                }
            }
        }
    }

    #[test]
    fn transpose_rows8_matches_scalar() {
        let mut seed = 3;
        for len in [0, 5, 8, 27, 288] {
            let src: Vec<Vec<f32>> = (0..8).map(|_| rand(len + 2, &mut seed)).collect();
            let ld = 16;
            let mut dst = vec![f32::NAN; len * ld + 8];
            transpose_rows8(std::array::from_fn(|j| &src[j][..]), len, &mut dst, ld);
            for e in 0..len {
                for (j, row) in src.iter().enumerate() {
                    assert_eq!(dst[e * ld + j], row[e], "len {len} element {e} row {j}");
                }
                assert!(dst[e * ld + 8].is_nan(), "wrote past the eight columns");
            }
        }
    }

    /// The parts cover `0..len` in order, as few as `max` allows, no longer than `max`, and
    /// within one of each other.
    #[cfg(x86_simd)]
    #[test]
    fn balanced_parts_cover_evenly() {
        let sizes = |len, max| balanced_parts(len, max).map(|(_, n)| n).collect::<Vec<_>>();
        assert_eq!(sizes(32, 6), [6, 6, 5, 5, 5, 5]);
        assert_eq!(sizes(8, 6), [4, 4]);
        assert_eq!(sizes(0, 6), Vec::<usize>::new());
        for max in 1..10 {
            for len in 0..60 {
                let parts: Vec<_> = balanced_parts(len, max).collect();
                assert_eq!(parts.len(), len.div_ceil(max), "{len} by {max}");
                let mut next = 0;
                for &(start, n) in &parts {
                    let fits = start == next && (1..=max).contains(&n);
                    assert!(fits, "{len} by {max}: {parts:?}");
                    next += n;
                }
                assert_eq!(next, len, "{len} by {max}: {parts:?}");
                let n = || parts.iter().map(|p| p.1);
                let spread = n().max().unwrap_or(0) - n().min().unwrap_or(0);
                assert!(spread <= 1, "{len} by {max}: {parts:?}");
            }
        }
    }

    /// Row counts with and without a remainder of eight, column counts across several
    /// 64-column tasks and within one, rows longer than the columns taken.
    #[test]
    fn transpose_matches_scalar() {
        let mut seed = 5;
        for (rows, cols, ld) in [
            (1, 1, 1),
            (8, 64, 64),
            (13, 150, 160),
            (154, 37, 37),
            (3, 200, 205),
        ] {
            let src = rand(rows * ld, &mut seed);
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, (rows, cols, ld), &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * ld + c],
                        "{rows}x{cols} at ({r},{c})"
                    );
                }
            }
        }
    }

    /// Every tile shape (row and column remainders, masked and whole panels, several
    /// K-blocks), both `b` layouts, transposed output, accumulation and bias, on one thread,
    /// split over the pool and through the portable path, against a triple loop in f64.
    #[test]
    fn gemm_matches_naive() {
        let mut seed = 7;
        for (m, n, k) in [
            (1, 1, 1),
            (7, 9, 5),
            (6, 16, 3),
            (13, 40, 77),
            (25, 33, 800),
            (100, 8, 0),
            (200, 300, 64),
            (50, 70, 900),
            // Several row blocks over several K-blocks: `gemm_parallel` packs a row-major
            // `b` once for all of them.
            (150, 45, 700),
            (20, 8, 50),
            (17, 24, 390),
            (8, 3, 9),
        ] {
            for packed in [false, true] {
                for transposed in [false, true] {
                    for accumulate in [false, true] {
                        let bias_per_col = accumulate;
                        let ops = Operands::new((m, n, k), bias_per_col, &mut seed);
                        let (a, lda, bias, ld) = (&ops.a, ops.lda, &ops.bias, ops.ld);
                        let (b_rows, dense, c0) = (&ops.b_rows, &ops.b_dense, &ops.c0);
                        // Panels with NaN gaps between them: the stride is honoured.
                        let panel_stride = NR * k + 24;
                        let mut b_packed = vec![f32::NAN; n.div_ceil(NR) * panel_stride];
                        for (dst, src) in b_packed
                            .chunks_mut(panel_stride)
                            .zip(dense.chunks(NR * k.max(1)))
                        {
                            dst[..src.len()].copy_from_slice(src);
                        }
                        let (rs_c, cs_c) = if transposed { (1, m) } else { (n, 1) };
                        let g = Gemm {
                            m,
                            n,
                            k,
                            lda,
                            b: if packed {
                                B::Packed { panel_stride }
                            } else {
                                B::Rows { ld }
                            },
                            rs_c,
                            cs_c,
                            accumulate,
                            bias_per_col,
                            bf16: false,
                        };
                        let b = if packed { &b_packed } else { b_rows };
                        // The f64 product once for every path below (once per path, it was a
                        // quarter of the test's time).
                        let same = |x: f32| x;
                        let want = ops.product(&g, (same, same));
                        // Each instruction set's tiles this CPU has.
                        let mut by_isa: Vec<Vec<f32>> = vec![];
                        for how in ["tiles", "parallel", "portable", "avx2", "avx512"] {
                            let mut c = c0.clone();
                            let (pa, pb, pc, pbias) =
                                (a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), bias.as_ptr());
                            match how {
                                "parallel" => gemm_parallel(&g, a, b, &mut c, Some(bias)),
                                // SAFETY: the slices cover the product.
                                "portable" => unsafe { g.run_portable(pa, pb, pc, pbias) },
                                #[cfg(x86_simd)]
                                "avx2"
                                    if std::arch::is_x86_feature_detected!("avx2")
                                        && std::arch::is_x86_feature_detected!("fma") =>
                                {
                                    // SAFETY: the CPU has the features; the slices cover
                                    // the product.
                                    unsafe { avx2::gemm(&g, pa, pb, pc, pbias) }
                                }
                                #[cfg(x86_simd)]
                                "avx512"
                                    if std::arch::is_x86_feature_detected!("avx512f")
                                        && std::arch::is_x86_feature_detected!("fma") =>
                                {
                                    // SAFETY: as above.
                                    unsafe { avx512::gemm(&g, pa, pb, pc, pbias) }
                                }
                                "avx2" | "avx512" => continue,
                                _ => g.run(a, b, &mut c, Some(bias)),
                            }
                            if how.starts_with("avx") {
                                by_isa.push(c.clone());
                            }
                            let what = format!("packed {packed} transposed {transposed} accumulate {accumulate} {how}");
                            Operands::assert_close(&g, &c, &want, 0.0, &what);
                        }
                        if let [avx2, avx512] = &by_isa[..] {
                            let same = avx2
                                .iter()
                                .zip(avx512)
                                .all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(
                                same,
                                "{m}x{n}x{k} packed {packed} transposed {transposed} accumulate {accumulate}: AVX2 and AVX-512 tiles differ"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The bf16 products: every tile shape (8-row tiles and their remainders, 32-column panels,
    /// one-register panels of at most 16 columns, odd K, several K-blocks), both `b` layouts,
    /// transposed output, accumulation and both biases, on one thread and split over the
    /// pool, and from operands as the layers hold them (`a` in bf16, `b` packed in pairs, a
    /// bf16 output), against a triple loop in f64 over the operands rounded to bf16 (round to
    /// nearest even). Where the CPU has no bf16 dot products the f32 tiles run, on the f32
    /// operands as given: the expectation follows.
    #[test]
    fn bf16_gemm_matches_naive() {
        let round = |x: f32| half::bf16::from_f32(x).to_f32();
        let rounds = crate::ops::has_bf16_dot();
        let mut seed = 11;
        for (m, n, k) in [
            (1, 1, 1),
            (9, 17, 3),
            (8, 32, 2),
            (13, 40, 77),
            (25, 50, 800),
            (100, 8, 0),
            (200, 300, 64),
            (17, 33, 391),
            (3, 16, 5),
        ] {
            for (packed, transposed, accumulate) in [
                (false, false, false),
                (true, false, true),
                (true, true, false),
                (false, true, true),
            ] {
                let bias_per_col = accumulate;
                let ops = Operands::new((m, n, k), bias_per_col, &mut seed);
                let (a, lda, bias, ld) = (&ops.a, ops.lda, &ops.bias, ops.ld);
                let (b_rows, b_packed, c0) = (&ops.b_rows, &ops.b_dense, &ops.c0);
                let (rs_c, cs_c) = if transposed { (1, m) } else { (n, 1) };
                let g = Gemm {
                    m,
                    n,
                    k,
                    lda,
                    b: if packed { B::packed(k) } else { B::Rows { ld } },
                    rs_c,
                    cs_c,
                    accumulate,
                    bias_per_col,
                    bf16: true,
                };
                let b = if packed { &b_packed } else { &b_rows };
                let op = |x: f32| if rounds { round(x) } else { x };
                // The f64 products, once per case: `a` as given, and `a` rounded to bf16 (where
                // it is passed in bf16, the expectation rounds it whatever the CPU).
                let want = ops.product(&g, (op, op));
                let want_a_rounded = ops.product(&g, (round, op));
                // The operands as the layers hold them: `a` in bf16 (read in place), `b` packed
                // into pairs once (where the CPU has bf16 dot products), a bf16 output.
                let a_bf16: Vec<half::bf16> = a.iter().map(|&x| half::bf16::from_f32(x)).collect();
                let pairs = pack_pairs(&g, b);
                assert_eq!(pairs.is_some(), rounds);
                let bf16_out = !transposed && !accumulate;
                for how in ["one thread", "parallel", "in place", "bf16 output"] {
                    let mut c = c0.clone();
                    let b_src = pairs.as_ref().map_or(BfB::F32(b), BfB::Pairs);
                    match how {
                        "one thread" => g.run(a, b, &mut c, Some(bias)),
                        "parallel" => gemm_parallel(&g, a, b, &mut c, Some(bias)),
                        "in place" => {
                            let out = BfOut::F32(&mut c);
                            gemm_parallel_bf16(&g, BfA::Bf16(&a_bf16), b_src, out, Some(bias))
                        }
                        _ if !bf16_out => continue,
                        _ => {
                            let mut out = vec![half::bf16::ZERO; m * n];
                            let a_src = BfA::Bf16(&a_bf16);
                            gemm_parallel_bf16(&g, a_src, b_src, BfOut::Bf16(&mut out), Some(bias));
                            c = out.iter().map(|x| x.to_f32()).collect();
                        }
                    }
                    // A bf16 output is rounded once more (2⁻⁹ relative at most).
                    let rel = if how == "bf16 output" {
                        1.0 / 256.0
                    } else {
                        0.0
                    };
                    let what = format!(
                        "packed {packed} transposed {transposed} accumulate {accumulate} {how}"
                    );
                    let want = match how {
                        "in place" | "bf16 output" => &want_a_rounded,
                        _ => &want,
                    };
                    Operands::assert_close(&g, &c, want, rel, &what);
                }
            }
        }
    }
}
