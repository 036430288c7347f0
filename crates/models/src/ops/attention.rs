//! Flash-attention style CPU kernel: `softmax(q·kᵀ·scale)·v` over `(B*heads, N, d)` without the
//! `N × M` score matrix. Each task owns one block of query rows, streams the keys/values in
//! blocks, and keeps a running max and sum per row (online softmax), so memory is
//! `O(block_q × (block_k + d))` per thread. The keys are packed once per head, scaled so that
//! the scores come out in eighths of an octave (`softmax_exp`, no multiplication before it); the
//! two block products run on the register tiles of `microkernel` (the `gemm` crate on
//! CPUs without AVX2), and the exponentials on AVX2 or AVX-512 (with the same bits). The
//! usual case (f32, no causal mask) runs fused, 6 query rows at a time on AVX2
//! (`attention/avx2.rs`), 8 on AVX-512 (`attention/avx512.rs`), with the same bits again.
//! The heads may also sit side by side in the last dimension, as the q/k/v projections
//! produce them (`FlashAttention::heads`): the kernel then reads and writes them in place,
//! with no copies to split and merge them. The backward pass is blocked the same way
//! (`flash_grads`): the score matrix is recomputed tile by tile, never stored.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::microkernel::{pack_kt, pack_rows, softmax_exp, Gemm, B, NR, SOFTMAX_UNIT};
use super::{exp, f32_input, f32_output, max, output_buffer, simd_fn, with_kept_buffer, SendPtr};

#[cfg(x86_simd)]
mod avx2;
#[cfg(x86_simd)]
mod avx512;

/// Query rows per task: enough rows to amortise streaming the head's keys and values, few
/// enough that a 4096-token head splits into many tasks for both cores.
const BLOCK_Q: usize = 128;
/// Keys per step (a multiple of the packed panel width): the `BLOCK_Q × BLOCK_K` score tile
/// (72 KiB with its padding) and the key block (20 KiB at d = 40) stay close to L1. 128, 256
/// and 512 measured within noise of each other on 16 heads × 4096 × 40; 128 is the smallest.
const BLOCK_K: usize = 128;
const _: () = assert!(BLOCK_K.is_multiple_of(NR));

/// The fused attention op; see [`super::attention`] module docs.
pub(crate) struct FlashAttention {
    pub scale: f64,
    /// Query `i` attends to keys `0..=i` only (CLIP's text encoder).
    pub causal: bool,
    /// Heads side by side in the last dimension: q `(B, N, heads·d)`, k `(B, M, heads·d)`,
    /// v `(B, M, heads·dv)` and the output `(B, N, heads·dv)`. With 1, the `(B·heads, N, d)`
    /// layout (the only one with a backward pass).
    pub heads: usize,
}

simd_fn! {
    /// One key block of the online softmax: turns the scores `s` (rows × `kb`, row stride
    /// `lds`) into probabilities relative to the updated running maxima, and rescales the
    /// running sums and output rows by how much each maximum moved.
    fn softmax_step(s: &mut [f32], lds: usize, kb: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) {
        // Sixteen rows at a time: their maxima first, then the factors by which their old
        // maxima moved as one vector `exp`. (With one scalar `exp` per row, a chain of
        // dependent operations between two rows' exponentials, this function took 7.5% of
        // the op at d = 40 by perf; 4.2% so.)
        for (c, rows) in s.chunks_mut(UPDATE_ROWS * lds).enumerate() {
            let r0 = c * UPDATE_ROWS;
            let n = m.len().min(r0 + UPDATE_ROWS) - r0;
            let mut best = [0f32; UPDATE_ROWS];
            for (b, row) in best.iter_mut().zip(rows.chunks(lds)).take(n) {
                *b = max(&row[..kb]);
            }
            let tile = r0..r0 + n;
            let acc = &mut acc[r0 * dv..(r0 + n) * dv];
            update_rows(rows, (lds, kb), &best[..n], (&mut m[tile.clone()], &mut l[tile]), acc);
        }
    }
}

/// Most rows of one [`update_rows`].
const UPDATE_ROWS: usize = 16;

/// The online-softmax update of up to [`UPDATE_ROWS`] rows of scores `s` (`kb` each, `lds`
/// apart) whose block maxima are `best`: the scores become probabilities relative to the
/// updated running maxima `m`, and the running sums `l` and output rows `acc` (`m.len()` rows)
/// are rescaled by how much each maximum moved, those factors as one vector `exp`.
#[inline(always)]
fn update_rows(
    s: &mut [f32],
    (lds, kb): (usize, usize),
    best: &[f32],
    (m, l): (&mut [f32], &mut [f32]),
    acc: &mut [f32],
) {
    let dv = acc.len() / best.len().max(1);
    let (mut m_new, mut moved) = ([0f32; UPDATE_ROWS], [0f32; UPDATE_ROWS]);
    for (i, &b) in best.iter().enumerate() {
        m_new[i] = m[i].max(b);
        moved[i] = m[i] - m_new[i];
    }
    // Through the row kernel: the same bits as `softmax_exp` lane by lane, without a call to
    // `fmaf` per lane where this code is not compiled for FMA.
    let mut corr = moved;
    exp_shifted_sum(&mut corr, 0.0);
    for (i, row) in s.chunks_mut(lds).take(best.len()).enumerate() {
        let sum = exp_shifted_sum(&mut row[..kb], m_new[i]);
        l[i] = l[i] * corr[i] + sum;
        m[i] = m_new[i];
        if corr[i] != 1.0 {
            acc[i * dv..(i + 1) * dv]
                .iter_mut()
                .for_each(|o| *o *= corr[i]);
        }
    }
}

/// `row[i] = softmax_exp(row[i] − m)` (scores in [`SOFTMAX_UNIT`]s); returns their sum.
fn exp_shifted_sum(row: &mut [f32], m: f32) -> f32 {
    #[cfg(x86_simd)]
    match super::kernels() {
        // SAFETY (both): the CPU has the features.
        super::Kernels::Avx512 | super::Kernels::Avx512Bf16 => {
            return unsafe { super::microkernel::avx512::exp_shifted_sum(row, m) }
        }
        super::Kernels::Avx2 => {
            return unsafe { super::microkernel::avx2::exp_shifted_sum(row, m) }
        }
        super::Kernels::Portable => {}
    }
    exp_shifted_sum_portable(row, m)
}

fn exp_shifted_sum_portable(row: &mut [f32], m: f32) -> f32 {
    let mut sums = [0f32; super::LANES];
    let mut chunks = row.chunks_exact_mut(super::LANES);
    for c in &mut chunks {
        for i in 0..super::LANES {
            c[i] = softmax_exp(c[i] - m);
            sums[i] += c[i];
        }
    }
    let tail: f32 = chunks
        .into_remainder()
        .iter_mut()
        .map(|x| {
            *x = softmax_exp(*x - m);
            *x
        })
        .sum();
    sums.iter().sum::<f32>() + tail
}

/// Attention of one block of query rows `q` (rows × d) over the `m_keys` keys of one head,
/// packed as `scale · SOFTMAX_UNIT · kᵀ` by [`pack_kt`] (scores in the units of
/// [`softmax_exp`]), with values `v` (M × dv) packed by [`pack_rows`], written to `out`
/// (rows × dv).
/// `causal`: the index of the block's first row in its head, whose row `i` sees keys `0..=i`.
/// `bf16`: bf16 inputs, whose two products are bf16 ones ([`Gemm::bf16`]; the probabilities
/// are rounded to bf16 for the second, as PyTorch's bf16 attention rounds them).
fn attend_block(
    q: &[f32],
    (kt, v): (&[f32], &[f32]),
    m_keys: usize,
    out: &mut [f32],
    (d, dv): (usize, usize),
    causal: Option<usize>,
    bf16: bool,
) {
    let rows = out.len() / dv;
    let bk = BLOCK_K.min(m_keys.next_multiple_of(NR));
    // Rows one panel longer than the block: 2 KiB-strided rows would share L1 sets.
    let lds = bk + NR;
    // Every element is written: the score GEMM writes columns 0..kb of every row, and only those are read.
    let mut s = output_buffer(rows * lds);
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    out.fill(0.0);
    // The keys any row of the block may see.
    let all_keys = m_keys;
    let m_keys = causal.map_or(m_keys, |r0| m_keys.min(r0 + rows));
    for k0 in (0..m_keys).step_by(bk) {
        let kb = bk.min(m_keys - k0);
        block_scores(
            q,
            &kt[k0 * d..],
            &mut s,
            (rows, d, lds),
            (k0, kb),
            causal,
            bf16,
        );
        softmax_step(&mut s, lds, kb, &mut m, &mut l, out, dv);
        // out += p · v_block
        let values = Gemm {
            m: rows,
            n: dv,
            k: kb,
            lda: lds,
            b: B::Packed {
                panel_stride: all_keys * NR,
            },
            rs_c: dv,
            cs_c: 1,
            accumulate: true,
            bias_per_col: false,
            bf16,
        };
        values.run(&s, &v[k0 * NR..], out, None);
    }
    for (row, l) in out.chunks_exact_mut(dv).zip(&l) {
        let inv = 1.0 / l;
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

/// Whether [`attend_block_fused`] takes a block: with AVX2 or AVX-512, without a causal
/// mask, in f32, and with `d` in one K-block of the GEMM (whose bits it reproduces).
fn fused_fits(causal: bool, bf16: bool, d: usize) -> bool {
    cfg!(x86_simd)
        && !causal
        && !bf16
        && d <= super::microkernel::KC
        && super::kernels() >= super::Kernels::Avx2
}

/// [`attend_block`] on the register tiles of the CPU's instruction set where [`fused_fits`]:
/// for each key block and each tile of query rows, the scores (their maxima from the
/// registers), the online-softmax update of [`update_rows`] on those rows, and the values,
/// while the tile's scores are in L1.
#[cfg(x86_simd)]
fn attend_block_fused(
    q: &[f32],
    kv: (&[f32], &[f32]),
    m_keys: usize,
    out: &mut [f32],
    dims: (usize, usize),
) {
    match super::kernels() {
        // SAFETY (both): the CPU has the tiles' instruction set.
        super::Kernels::Avx512 | super::Kernels::Avx512Bf16 => unsafe {
            fused_tiles(&AVX512_TILES, q, kv, m_keys, out, dims)
        },
        super::Kernels::Avx2 => unsafe { fused_tiles(&AVX2_TILES, q, kv, m_keys, out, dims) },
        super::Kernels::Portable => attend_block(q, kv, m_keys, out, dims, None, false),
    }
}

/// The register tiles of one instruction set for [`attend_block_fused`] (`attention/avx2.rs`,
/// `attention/avx512.rs`).
#[cfg(x86_simd)]
#[allow(clippy::type_complexity)] // (the tiles' own signatures)
struct FusedTiles {
    /// Most query rows per tile (at most [`MOST_TILE_ROWS`]).
    rows: usize,
    /// Whether every tile has all `rows` rows (the block is then padded with zero query
    /// rows); else the last tile may have fewer.
    whole: bool,
    /// `(q, d, kt, kb, s, lds, best)`: the scores of `best.len()` query rows over a key
    /// block, and each row's largest.
    scores: unsafe fn(&[f32], usize, &[f32], usize, &mut [f32], usize, &mut [f32]),
    /// `(s, lds, kb, v, panel_stride, out, dv)`: `out += p · v` for the tile's rows of
    /// probabilities in `s`.
    add_values: unsafe fn(&[f32], usize, usize, &[f32], usize, &mut [f32], usize),
}

/// Most rows of any [`FusedTiles`].
#[cfg(x86_simd)]
const MOST_TILE_ROWS: usize = 8;

#[cfg(x86_simd)]
const AVX2_TILES: FusedTiles = FusedTiles {
    rows: avx2::ROWS,
    whole: false,
    scores: avx2::scores,
    add_values: avx2::add_values,
};

#[cfg(x86_simd)]
const AVX512_TILES: FusedTiles = FusedTiles {
    rows: avx512::ROWS,
    whole: true,
    scores: avx512::scores,
    add_values: avx512::add_values,
};

#[cfg(x86_simd)]
const _: () = assert!(AVX2_TILES.rows <= MOST_TILE_ROWS && AVX512_TILES.rows <= MOST_TILE_ROWS);

/// [`attend_block_fused`] on the tiles `t`.
///
/// # Safety
/// The CPU has the tiles' instruction set.
#[cfg(x86_simd)]
unsafe fn fused_tiles(
    t: &FusedTiles,
    q: &[f32],
    (kt, v): (&[f32], &[f32]),
    m_keys: usize,
    out: &mut [f32],
    (d, dv): (usize, usize),
) {
    let rows = out.len() / dv;
    if t.whole && !rows.is_multiple_of(t.rows) {
        // A last tile of fewer rows: zero query rows make it whole.
        let padded = rows.next_multiple_of(t.rows);
        let mut qp = q[..rows * d].to_vec();
        qp.resize(padded * d, 0.0);
        let mut op = vec![0f32; padded * dv];
        // SAFETY: as the caller promises.
        unsafe { fused_tiles(t, &qp, (kt, v), m_keys, &mut op, (d, dv)) };
        out.copy_from_slice(&op[..rows * dv]);
        return;
    }
    let bk = BLOCK_K.min(m_keys.next_multiple_of(NR));
    let lds = bk + NR;
    let mut s = [0f32; MOST_TILE_ROWS * (BLOCK_K + NR)];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    out.fill(0.0);
    for k0 in (0..m_keys).step_by(bk) {
        let kb = bk.min(m_keys - k0);
        // (Whole tiles are all `t.rows` rows: the block was padded to a multiple.)
        for (r0, n) in super::microkernel::balanced_parts(rows, t.rows) {
            let tile = r0..r0 + n;
            let mut best = [0f32; MOST_TILE_ROWS];
            let best = &mut best[..tile.len()];
            let acc = &mut out[tile.start * dv..tile.end * dv];
            // SAFETY (both): as the caller promises.
            unsafe { (t.scores)(&q[r0 * d..], d, &kt[k0 * d..], kb, &mut s, lds, best) };
            update_rows(
                &mut s,
                (lds, kb),
                best,
                (&mut m[tile.clone()], &mut l[tile]),
                acc,
            );
            unsafe { (t.add_values)(&s, lds, kb, &v[k0 * NR..], m_keys * NR, acc, dv) };
        }
    }
    for (row, l) in out.chunks_exact_mut(dv).zip(&l) {
        let inv = 1.0 / l;
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

/// The scores of one key block for the online softmax: `s = q · k_blockᵀ` (the keys packed
/// scaled, so in [`SOFTMAX_UNIT`]s) for `rows` query rows (`kt`: the packed keys from the
/// block's first, `k0`; rows of `s` `lds` apart), and with `causal` (the index of the first
/// row) the keys after each row's own position set to −∞. Every row sees key 0 in the first
/// block, so no row's running maximum stays −∞.
fn block_scores(
    q: &[f32],
    kt: &[f32],
    s: &mut [f32],
    (rows, d, lds): (usize, usize, usize),
    (k0, kb): (usize, usize),
    causal: Option<usize>,
    bf16: bool,
) {
    let scores = Gemm {
        m: rows,
        n: kb,
        k: d,
        lda: d,
        b: B::packed(d),
        rs_c: lds,
        cs_c: 1,
        accumulate: false,
        bias_per_col: false,
        bf16,
    };
    scores.run(q, kt, s, None);
    if let Some(r0) = causal {
        for (r, row) in s.chunks_exact_mut(lds).take(rows).enumerate() {
            let visible = (r0 + r + 1).saturating_sub(k0).min(kb);
            row[visible..kb].fill(f32::NEG_INFINITY);
        }
    }
}

/// Packs every head on every core: `pack(i, dst)` writes every one of head `i`'s `dst_len`
/// values of `out`.
fn pack_heads(out: &mut [f32], dst_len: usize, pack: impl Fn(usize, &mut [f32]) + Sync) {
    if dst_len > 0 {
        out.par_chunks_mut(dst_len)
            .enumerate()
            .for_each(|(i, dst)| pack(i, dst));
    }
}

thread_local! {
    // The packed keys and values of one call, overwritten in full on every call
    // ([`with_kept_buffer`]): a fresh buffer per call was 23 MiB to zero per 4096-token
    // attention.
    static PACKED_KV: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest [`PACKED_KV`] kept between calls (32 MiB): SD's largest is 23 MiB.
const PACKED_KV_MAX: usize = 8 << 20;

/// `softmax(scale · x)` over the last dimension: the attention softmax with the score scale
/// folded in, one pass in the input's dtype. The CUDA attention path runs it between its two
/// cuBLAS products; the CPU copy states the same maths for tests (the CPU attention is the
/// flash kernel above).
pub struct ScaledSoftmax {
    pub scale: f64,
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_input(s, l, "softmax input")?;
        let cols = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let scale = self.scale as f32;
        let mut out: Vec<f32> = x.iter().map(|v| v * scale).collect();
        out.par_chunks_mut(cols).for_each(|row| {
            let m = max(row);
            row.iter_mut().for_each(|v| *v = exp(*v - m));
            let inv = 1.0 / row.iter().sum::<f32>();
            row.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((f32_output(out, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::scaled_softmax(s, l, self.scale)
    }
}

/// The largest head size of the CUDA flash-attention kernel (f16/bf16, no causal mask).
pub(crate) const CUDA_FLASH_MAX_HEAD: usize = 128;

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle_core::CudaStorage,
        lq: &Layout,
        sk: &candle_core::CudaStorage,
        lk: &Layout,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.causal {
            candle_core::bail!("the CUDA flash attention has no causal mask");
        }
        super::cuda::flash_attention((sq, lq), (sk, lk), (sv, lv), self.heads, self.scale)
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, cq) = lq.shape().dims3()?;
        let (b_k, m, ck) = lk.shape().dims3()?;
        let (b_v, m_v, cv) = lv.shape().dims3()?;
        let h = self.heads;
        if b_k != b || b_v != b || ck != cq || m_v != m || h == 0 || cq % h != 0 || cv % h != 0 {
            candle_core::bail!(
                "attention: shapes q {:?}, k {:?}, v {:?} do not match ({h} heads)",
                lq.shape(),
                lk.shape(),
                lv.shape()
            )
        }
        let (d, dv) = (cq / h, cv / h);
        // bf16 products for bf16 inputs, and for f32 ones under autocast (f32 out).
        let bf16 = match sq.dtype() {
            candle_core::DType::BF16 => true,
            dtype => dtype == candle_core::DType::F32 && super::autocast(),
        };
        let q = f32_input(sq, lq, "attention q")?;
        let k = f32_input(sk, lk, "attention k")?;
        let v = f32_input(sv, lv, "attention v")?;
        // Every element is written: every (head, query block) task writes all of its rows.
        let mut out = output_buffer(b * n * cv);
        if n * cv > 0 {
            let scale = self.scale as f32;
            // Keys packed once per (batch, head), shared by all of its query blocks; values too
            // (packing each key block's values for every query block cost about 4% of the op).
            // Head `i` of batch `j` starts `i·d` (`i·dv`) into the rows of batch `j`.
            let per_head = m.div_ceil(NR) * NR * d;
            let v_per_head = dv.div_ceil(NR) * NR * m;
            let len = b * h * (per_head + v_per_head);
            with_kept_buffer(&PACKED_KV, len, PACKED_KV_MAX, |kv| {
                let (kt, vp) = kv.split_at_mut(b * h * per_head);
                pack_heads(kt, per_head, |i, kt| {
                    let at = i / h * m * ck + i % h * d;
                    pack_kt(&k[at..], (m, d, ck), scale * SOFTMAX_UNIT, kt)
                });
                pack_heads(vp, v_per_head, |i, vp| {
                    let at = i / h * m * cv + i % h * dv;
                    pack_rows(&v[at..], cv, m, dv, vp)
                });
                let (kt, vp) = (&*kt, &*vp);
                // Tasks: every (batch·head, query block) pair, so that both cores stay busy even
                // for one head, and consecutive tasks share a head's keys and values. A task
                // gathers its query rows and writes its output rows through contiguous buffers:
                // the kernel ran 15% slower on rows a whole `heads·d` apart.
                let blocks = n.div_ceil(BLOCK_Q);
                let out_ptr = SendPtr(out.as_mut_ptr());
                (0..b * h * blocks).into_par_iter().for_each(|t| {
                    let (head, blk) = (t / blocks, t % blocks);
                    let (j, i) = (head / h, head % h);
                    let (t0, rows) = (blk * BLOCK_Q, BLOCK_Q.min(n - blk * BLOCK_Q));
                    let mut ob = vec![f32::NAN; rows * dv];
                    // torch gives NaN (0/0) for attention over no keys.
                    if m > 0 {
                        let mut qb = Vec::with_capacity(rows * d);
                        for r in 0..rows {
                            let at = (j * n + t0 + r) * cq + i * d;
                            qb.extend_from_slice(&q[at..at + d]);
                        }
                        let kv = (
                            &kt[head * per_head..(head + 1) * per_head],
                            &vp[head * v_per_head..(head + 1) * v_per_head],
                        );
                        let fused = fused_fits(self.causal, bf16, d);
                        #[cfg(x86_simd)]
                        if fused {
                            attend_block_fused(&qb, kv, m, &mut ob, (d, dv));
                        }
                        if !fused {
                            let causal = self.causal.then_some(t0);
                            attend_block(&qb, kv, m, &mut ob, (d, dv), causal, bf16);
                        }
                    }
                    for (r, row) in ob.chunks_exact(dv).enumerate() {
                        let at = (j * n + t0 + r) * cv + i * dv;
                        // SAFETY: `at..at + dv` lies in `out` (row `t0 + r` of batch `j`, head
                        // `i`'s columns), and no other task writes it.
                        unsafe {
                            std::ptr::copy_nonoverlapping(row.as_ptr(), out_ptr.get().add(at), dv)
                        };
                    }
                });
            });
        }
        Ok((f32_output(out, sq.dtype())?, Shape::from((b, n, cv))))
    }

    /// The standard attention gradients, from the recomputed probabilities: with
    /// `p = softmax(s)`, `o = p·v`, `dv = pᵀ·do`, `ds = p ⊙ (do·vᵀ − rowsum(do ⊙ o))`,
    /// `dq = ds·k·scale`, `dk = dsᵀ·q·scale`. On the CPU without the score matrix
    /// ([`small_head_grads`], [`flash_grads`]); on other devices by batched matmuls over it.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::profile::timed_backward(self.name(), grad_o, || {
            if self.heads != 1 {
                candle_core::bail!("attention: no backward pass with the heads side by side")
            }
            let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
            let (qf, kf, vf, of, gof) = (f32(q)?, f32(k)?, f32(v)?, f32(o)?, f32(grad_o)?);
            let (n, d) = (q.dim(D::Minus2)?, q.dim(D::Minus1)?);
            let (m, dv) = (v.dim(D::Minus2)?, v.dim(D::Minus1)?);
            if q.device().is_cpu() {
                let operands = [&qf, &kf, &vf, &of, &gof];
                let [dq, dk, dv] = match n * m * (d + dv) <= SMALL_HEAD_WORK || d * dv == 0 {
                    true => small_head_grads(operands, (n, m, d, dv), self)?,
                    false => flash_grads(operands, (n, m, d, dv), self)?,
                };
                return Ok((
                    Some(dq.reshape(q.shape())?.to_dtype(q.dtype())?),
                    Some(dk.reshape(k.shape())?.to_dtype(k.dtype())?),
                    Some(dv.reshape(v.shape())?.to_dtype(v.dtype())?),
                ));
            }
            // Transposes are made contiguous: candle's CPU matmul mishandles some transposed batches.
            let mut scores = (qf.matmul(&kf.t()?.contiguous()?)? * self.scale)?;
            if self.causal {
                scores = scores.broadcast_add(&causal_mask(
                    scores.dim(1)?,
                    scores.dim(2)?,
                    q.device(),
                )?)?;
            }
            let p = candle_nn::ops::softmax_last_dim(&scores)?;
            let grad_v = p.t()?.contiguous()?.matmul(&gof)?;
            let dp = gof.matmul(&vf.t()?.contiguous()?)?;
            let delta = (&gof * &of)?.sum_keepdim(D::Minus1)?;
            let ds = (&p * dp.broadcast_sub(&delta)?)?;
            let grad_q = (ds.matmul(&kf)? * self.scale)?;
            let grad_k = (ds.t()?.contiguous()?.matmul(&qf)? * self.scale)?;
            Ok((
                Some(grad_q.to_dtype(q.dtype())?),
                Some(grad_k.to_dtype(k.dtype())?),
                Some(grad_v.to_dtype(v.dtype())?),
            ))
        })
    }
}

/// Most `N·M·(d + dv)` per head for [`small_head_grads`]: the small heads of pixel-space UNets
/// (64 tokens of width 8 at the bundled model's 8×8 level), where batched matmuls ran at ten
/// times the forward's time. Bigger heads (Stable Diffusion's) take [`flash_grads`].
const SMALL_HEAD_WORK: usize = 1 << 20;

/// Queries per block of [`flash_grads`] (the columns of its transposed score tiles).
const BWD_BLOCK_Q: usize = 128;
/// Keys per block of [`flash_grads`] (the rows of its tiles): the tile of `sᵀ` and of `dpᵀ`
/// (32 KiB each) and the block's `dk`, `dv` rows stay in L2 while the queries stream by.
const BWD_BLOCK_K: usize = 64;
const _: () = assert!(BWD_BLOCK_Q.is_multiple_of(NR) && BLOCK_Q.is_multiple_of(NR));

/// One head's operands of [`flash_grads`], each laid out once for the product that reads it.
struct HeadOperands {
    /// `scale · q` as [`pack_kt`] panels: the `b` of `sᵀ = k · (scale · q)ᵀ`.
    q_t: Vec<f32>,
    /// `do` as [`pack_kt`] panels: the `b` of `dpᵀ = v · doᵀ`.
    do_t: Vec<f32>,
    /// `q` as [`pack_rows`] panels (N rows each): the `b` of `dk += dsᵀ · q`.
    q_rows: Vec<f32>,
    /// `do` as [`pack_rows`] panels: the `b` of `dv += pᵀ · do`.
    do_rows: Vec<f32>,
    /// `kᵀ` (d × M, row-major): the `a` of `dqᵀ += kᵀ · dsᵀ`.
    k_t: Vec<f32>,
    /// `log Σⱼ exp(scale · q·kⱼ)` per query: `p = exp(scale · q·kᵀ − lse)`.
    lse: Vec<f32>,
    /// `rowsum(do ⊙ o)` per query.
    delta: Vec<f32>,
}

/// The attention gradients without the `N × M` score matrix (FlashAttention-2's backward
/// pass): per head, the softmax's log-sum-exp per query from a pass like the forward's, then
/// per block of keys and block of queries `sᵀ`, `pᵀ = exp(sᵀ − lse)`, `dpᵀ = v·doᵀ`,
/// `dsᵀ = pᵀ ⊙ (dpᵀ − rowsum(do ⊙ o))`, and `dv += pᵀ·do`, `dk += dsᵀ·q`, `dqᵀ += kᵀ·dsᵀ`:
/// five products of tiles that stay in cache, where the matmul path wrote and read several
/// score-sized matrices per head (8 × 4096² values, 512 MiB each, at SD 1.5's 512² level).
/// The tiles are transposed (keys as rows) so that every product reads row-major operands.
/// Tasks own runs of one head's keys (their `dk`, `dv` rows) and add into a `dqᵀ` of their own,
/// summed per head at the end.
fn flash_grads(
    operands: [&Tensor; 5],
    (n, m, d, dv): (usize, usize, usize, usize),
    op: &FlashAttention,
) -> Result<[Tensor; 3]> {
    let ([q, k, v, o, go], heads) = flat_operands(operands, n * d)?;
    let scale = op.scale as f32;
    // Under autocast the five products of tiles run in bf16, as the forward's two do (read
    // here: the tasks run on other threads). The log-sum-exp pass stays f32.
    let bf16 = super::autocast();
    let packed: Vec<HeadOperands> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let (qh, kh) = (head(&q, h, n * d), head(&k, h, m * d));
            let (oh, goh) = (head(&o, h, n * dv), head(&go, h, n * dv));
            let np = n.div_ceil(NR) * NR;
            let mut ops = HeadOperands {
                q_t: vec![0f32; np * d],
                do_t: vec![0f32; np * dv],
                q_rows: vec![0f32; d.div_ceil(NR) * NR * n],
                do_rows: vec![0f32; dv.div_ceil(NR) * NR * n],
                k_t: vec![0f32; d * m],
                lse: vec![0f32; n],
                delta: oh
                    .chunks_exact(dv.max(1))
                    .zip(goh.chunks_exact(dv.max(1)))
                    .map(|(o, g)| super::dot(o, g))
                    .collect(),
            };
            pack_kt(qh, (n, d, d), scale, &mut ops.q_t);
            pack_kt(goh, (n, dv, dv), 1.0, &mut ops.do_t);
            pack_rows(qh, d, n, d, &mut ops.q_rows);
            pack_rows(goh, dv, n, dv, &mut ops.do_rows);
            super::microkernel::transpose(kh, (m, d, d), &mut ops.k_t);
            row_logsumexp(qh, kh, (n, m, d), scale, op.causal, &mut ops.lse);
            ops
        })
        .collect();
    // Runs of keys per head: enough tasks for every core even with one head.
    let threads = rayon::current_num_threads();
    let runs = (2 * threads)
        .div_ceil(heads.max(1))
        .min(m.div_ceil(BWD_BLOCK_K))
        .max(1);
    let run_len = m.div_ceil(runs).next_multiple_of(BWD_BLOCK_K);
    let runs = m.div_ceil(run_len).max(1);
    let mut dk = vec![0f32; heads * m * d];
    let mut dv_out = vec![0f32; heads * m * dv];
    let (dk_ptr, dv_ptr) = (SendPtr(dk.as_mut_ptr()), SendPtr(dv_out.as_mut_ptr()));
    let dq_parts: Vec<Vec<f32>> = (0..heads * runs)
        .into_par_iter()
        .map(|t| {
            let (h, r) = (t / runs, t % runs);
            let keys = r * run_len..((r + 1) * run_len).min(m);
            let mut dq_t = vec![0f32; d * n];
            let (kh, vh) = (head(&k, h, m * d), head(&v, h, m * dv));
            // SAFETY: the task's keys are its own: rows `keys` of head `h` of `dk` and `dv`
            // are written by this task alone, and lie in the buffers.
            let (dk_run, dv_run) = unsafe {
                (
                    std::slice::from_raw_parts_mut(
                        dk_ptr.get().add((h * m + keys.start) * d),
                        keys.len() * d,
                    ),
                    std::slice::from_raw_parts_mut(
                        dv_ptr.get().add((h * m + keys.start) * dv),
                        keys.len() * dv,
                    ),
                )
            };
            key_run_grads(
                &packed[h],
                (kh, vh),
                keys,
                (dk_run, dv_run, &mut dq_t),
                (n, m, d, dv),
                (op.causal, bf16),
            );
            dq_t
        })
        .collect();
    let mut dq = vec![0f32; heads * n * d];
    dq.par_chunks_mut((n * d).max(1))
        .enumerate()
        .for_each(|(h, dq)| {
            let parts = &dq_parts[h * runs..(h + 1) * runs];
            let mut sum = parts[0].clone();
            for p in &parts[1..] {
                sum.iter_mut().zip(p).for_each(|(s, x)| *s += x);
            }
            super::microkernel::transpose(&sum, (d, n, n), dq);
            dq.iter_mut().for_each(|x| *x *= scale);
        });
    dk.iter_mut().for_each(|x| *x *= scale);
    head_grads_tensors([dq, dk, dv_out], heads, (n, m, d, dv))
}

/// A backward pass's operands `[q, k, v, o, do]` as f32 values, and how many heads of
/// `n_d = N·d` query values they hold.
fn flat_operands(ts: [&Tensor; 5], n_d: usize) -> Result<([Vec<f32>; 5], usize)> {
    let [q, k, v, o, go] = ts.map(|t| t.flatten_all()?.to_vec1::<f32>());
    let q = q?;
    let heads = q.len().checked_div(n_d).unwrap_or(0);
    Ok(([q, k?, v?, o?, go?], heads))
}

/// Head `h` of flat values, `len` per head, borrowed.
fn head(x: &[f32], h: usize, len: usize) -> &[f32] {
    &x[h * len..(h + 1) * len]
}

/// `[dq, dk, dv]` as `(heads, N|M, d|dv)` tensors.
fn head_grads_tensors(
    [dq, dk, dv]: [Vec<f32>; 3],
    heads: usize,
    (n, m, d, dv_width): (usize, usize, usize, usize),
) -> Result<[Tensor; 3]> {
    let dev = &candle_core::Device::Cpu;
    Ok([
        Tensor::from_vec(dq, (heads, n, d), dev)?,
        Tensor::from_vec(dk, (heads, m, d), dev)?,
        Tensor::from_vec(dv, (heads, m, dv_width), dev)?,
    ])
}

/// `lse[i] = log Σⱼ exp(scale · qᵢ·kⱼ)` over the keys query `i` sees, by the forward pass's
/// online softmax over blocks of keys (scores of [`BLOCK_Q`] queries at a time).
fn row_logsumexp(
    q: &[f32],
    k: &[f32],
    (n, m, d): (usize, usize, usize),
    scale: f32,
    causal: bool,
    lse: &mut [f32],
) {
    let mut kt = vec![0f32; m.div_ceil(NR) * NR * d];
    pack_kt(k, (m, d, d), scale * SOFTMAX_UNIT, &mut kt);
    let bk = BLOCK_K.min(m.next_multiple_of(NR));
    let lds = bk + NR;
    let mut s = vec![0f32; BLOCK_Q * lds];
    for r0 in (0..n).step_by(BLOCK_Q) {
        let rows = BLOCK_Q.min(n - r0);
        let mut mx = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let keys = if causal { m.min(r0 + rows) } else { m };
        for k0 in (0..keys).step_by(bk) {
            let kb = bk.min(keys - k0);
            let (q, kt) = (&q[r0 * d..], &kt[k0 * d..]);
            let causal = causal.then_some(r0);
            block_scores(q, kt, &mut s, (rows, d, lds), (k0, kb), causal, false);
            softmax_step(&mut s[..rows * lds], lds, kb, &mut mx, &mut l, &mut [], 0);
        }
        for (i, (mx, l)) in mx.iter().zip(&l).enumerate() {
            // (The maxima are in SOFTMAX_UNITs.)
            lse[r0 + i] = mx / SOFTMAX_UNIT + l.ln();
        }
    }
}

/// The gradients from one head's keys `keys` (see [`flash_grads`]): their rows of `dk`
/// (unscaled) and `dv`, and their part of `dqᵀ` (d × N, unscaled), added.
fn key_run_grads(
    ops: &HeadOperands,
    (k, v): (&[f32], &[f32]),
    keys: std::ops::Range<usize>,
    (dk, dv_out, dq_t): (&mut [f32], &mut [f32], &mut [f32]),
    (n, m, d, dv): (usize, usize, usize, usize),
    (causal, bf16): (bool, bool),
) {
    let lds = BWD_BLOCK_Q + NR;
    let mut st = vec![0f32; BWD_BLOCK_K * lds];
    let mut dpt = vec![0f32; BWD_BLOCK_K * lds];
    let gemm = |m, n, k, lda, b, rs_c, accumulate| Gemm {
        m,
        n,
        k,
        lda,
        b,
        rs_c,
        cs_c: 1,
        accumulate,
        bias_per_col: false,
        bf16,
    };
    for k0 in keys.clone().step_by(BWD_BLOCK_K) {
        let kb = BWD_BLOCK_K.min(keys.end - k0);
        let at = k0 - keys.start;
        let (dk_blk, dv_blk) = (
            &mut dk[at * d..(at + kb) * d],
            &mut dv_out[at * dv..(at + kb) * dv],
        );
        // With a causal mask, queries before the block's first key see none of it.
        let first = if causal {
            k0 / BWD_BLOCK_Q * BWD_BLOCK_Q
        } else {
            0
        };
        for r0 in (first..n).step_by(BWD_BLOCK_Q) {
            let rows = BWD_BLOCK_Q.min(n - r0);
            // sᵀ = k · (scale · q)ᵀ and dpᵀ = v · doᵀ, kb × rows.
            gemm(kb, rows, d, d, B::packed(d), lds, false).run(
                &k[k0 * d..],
                &ops.q_t[r0 * d..],
                &mut st,
                None,
            );
            gemm(kb, rows, dv, dv, B::packed(dv), lds, false).run(
                &v[k0 * dv..],
                &ops.do_t[r0 * dv..],
                &mut dpt,
                None,
            );
            let cols = (&ops.lse[r0..r0 + rows], &ops.delta[r0..r0 + rows]);
            probs_and_score_grads(
                &mut st,
                &mut dpt,
                (lds, kb, rows),
                cols,
                causal.then_some((k0, r0)),
            );
            // dv += pᵀ · do, dk += dsᵀ · q (over these queries).
            let rows_b = |len: usize| B::Packed {
                panel_stride: len * NR,
            };
            gemm(kb, dv, rows, lds, rows_b(n), dv, true).run(
                &st,
                &ops.do_rows[r0 * NR..],
                dv_blk,
                None,
            );
            gemm(kb, d, rows, lds, rows_b(n), d, true).run(
                &dpt,
                &ops.q_rows[r0 * NR..],
                dk_blk,
                None,
            );
            // dqᵀ[:, r0..] += kᵀ[:, k0..] · dsᵀ.
            gemm(d, rows, kb, m, B::Rows { ld: lds }, n, true).run(
                &ops.k_t[k0..],
                &dpt,
                &mut dq_t[r0..],
                None,
            );
        }
    }
}

simd_fn! {
    /// Turns the tiles `sᵀ` and `dpᵀ` (`kb` keys × `cols` queries, rows `lds` apart) into
    /// `pᵀ = exp(sᵀ − lse)` and `dsᵀ = pᵀ ⊙ (dpᵀ − delta)`, with `lse` and `delta` per query
    /// (column). `causal`: the block's first key and query; `p` is 0 for keys after the query.
    fn probs_and_score_grads(
        st: &mut [f32],
        dpt: &mut [f32],
        dims: (usize, usize, usize),
        per_query: (&[f32], &[f32]),
        causal: Option<(usize, usize)>,
    ) {
        let ((lds, kb, cols), (lse, delta)) = (dims, per_query);
        for j in 0..kb {
            let (s, dp) = (&mut st[j * lds..j * lds + cols], &mut dpt[j * lds..j * lds + cols]);
            for i in 0..cols {
                let p = super::exp(s[i] - lse[i]);
                s[i] = p;
                dp[i] = p * (dp[i] - delta[i]);
            }
            if let Some((k0, r0)) = causal {
                // Key k0 + j is seen by queries from k0 + j on.
                let hidden = (k0 + j).saturating_sub(r0).min(cols);
                s[..hidden].fill(0.0);
                dp[..hidden].fill(0.0);
            }
        }
    }
}

/// The backward pass's formulas for each head in plain loops over its rows, the heads in
/// parallel: `(dq, dk, dv)` from `[q, k, v, o, do]` (f32, `(heads, N|M, d|dv)`).
fn small_head_grads(
    operands: [&Tensor; 5],
    (n, m, d, dv): (usize, usize, usize, usize),
    op: &FlashAttention,
) -> Result<[Tensor; 3]> {
    let ([q, k, v, o, go], heads) = flat_operands(operands, n * d)?;
    let scale = op.scale as f32;
    let per_head: Vec<[Vec<f32>; 3]> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let (q, k, v) = (head(&q, h, n * d), head(&k, h, m * d), head(&v, h, m * dv));
            let (o, go) = (head(&o, h, n * dv), head(&go, h, n * dv));
            let (mut dq, mut dk, mut dvv) =
                (vec![0f32; n * d], vec![0f32; m * d], vec![0f32; m * dv]);
            let operands = [q, k, v, o, go];
            let grads = [&mut dq[..], &mut dk[..], &mut dvv[..]];
            head_grads(operands, grads, [n, m, d, dv], scale, op.causal);
            [dq, dk, dvv]
        })
        .collect();
    let joined = |i: usize| per_head.iter().flat_map(|g| g[i].iter().copied()).collect();
    head_grads_tensors([joined(0), joined(1), joined(2)], heads, (n, m, d, dv))
}

simd_fn! {
    /// One head's `[dq, dk, dv]` (zeroed on entry) from `[q, k, v, o, do]`, query row by query
    /// row with every inner loop running over the keys: `kᵀ` and `vᵀ` are copied once, so the
    /// scores, `do·vᵀ` and the `dk`/`dv` updates are `d` (or `dv`) scaled additions of rows of
    /// `m` values, where a loop over keys of width-8 dot products ran at a third of the speed.
    fn head_grads(x: [&[f32]; 5], grads: [&mut [f32]; 3], dims: [usize; 4], scale: f32, causal: bool) {
        let [q, k, v, o, go] = x;
        let [dq, dk, dv_out] = grads;
        let [n, m, d, dv] = dims;
        let transposed = |x: &[f32], w: usize| -> Vec<f32> {
            let mut t = vec![0f32; w * m];
            for (j, row) in x.chunks_exact(w).enumerate() {
                row.iter().enumerate().for_each(|(c, &e)| t[c * m + j] = e);
            }
            t
        };
        let (kt, vt) = (transposed(k, d), transposed(v, dv));
        let (mut dkt, mut dvt) = (vec![0f32; d * m], vec![0f32; dv * m]);
        let (mut p, mut ds) = (vec![0f32; m], vec![0f32; m]);
        // row += a · x
        fn axpy(row: &mut [f32], a: f32, x: &[f32]) {
            row.iter_mut().zip(x).for_each(|(r, &e)| *r += a * e);
        }
        for i in 0..n {
            // Keys past `i` are masked out when causal.
            let keys = if causal { (i + 1).min(m) } else { m };
            let (qi, goi) = (&q[i * d..(i + 1) * d], &go[i * dv..(i + 1) * dv]);
            let (p, ds) = (&mut p[..keys], &mut ds[..keys]);
            p.fill(0.0);
            for (c, &x) in qi.iter().enumerate() {
                axpy(p, x, &kt[c * m..c * m + keys]);
            }
            p.iter_mut().for_each(|s| *s *= scale * SOFTMAX_UNIT);
            let top = max(p);
            let total = exp_shifted_sum(p, top);
            let inv = 1.0 / total;
            p.iter_mut().for_each(|e| *e *= inv);
            // ds = p ⊙ (do·vᵀ − rowsum(do ⊙ o))
            let delta = super::dot(goi, &o[i * dv..(i + 1) * dv]);
            ds.fill(0.0);
            for (c, &g) in goi.iter().enumerate() {
                axpy(ds, g, &vt[c * m..c * m + keys]);
            }
            ds.iter_mut().zip(p.iter()).for_each(|(s, &pj)| *s = pj * (*s - delta));
            // dv += pᵀ·do, dk += dsᵀ·q, dq = ds·k
            for (c, &g) in goi.iter().enumerate() {
                axpy(&mut dvt[c * m..c * m + keys], g, p);
            }
            for (c, &x) in qi.iter().enumerate() {
                axpy(&mut dkt[c * m..c * m + keys], x, ds);
                dq[i * d + c] = super::dot(ds, &kt[c * m..c * m + keys]) * scale;
            }
        }
        for (c, row) in dkt.chunks_exact(m).enumerate() {
            row.iter().enumerate().for_each(|(j, &e)| dk[j * d + c] = e * scale);
        }
        for (c, row) in dvt.chunks_exact(m).enumerate() {
            row.iter().enumerate().for_each(|(j, &e)| dv_out[j * dv + c] = e);
        }
    }
}

/// `(n, m)` additive mask: 0 where key `j ≤` query `i`, −∞ after.
pub(crate) fn causal_mask(n: usize, m: usize, device: &candle_core::Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..m).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (n, m), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `softmax_exp(x − m)` row kernel against f64, over the whole range softmax feeds
    /// them (scores in SOFTMAX_UNITs, down past the clamp at −1000), with a tail that is not
    /// a multiple of 8: relative error 1.2e-7 (`scripts/exp_poly.py` replays 1.12e-7), and
    /// 2^−125 below the clamp. The vector kernels give the portable one's values bit for bit
    /// (the same steps: a tail lane or a row on another CPU weighs the same).
    #[test]
    fn exp_shifted_sum_matches_f64() {
        let xs: Vec<f32> = (0..1003).map(|i| -1100.0 + i as f32 * 1.0997).collect();
        let m = 2.5f32;
        let want: Vec<f64> = xs.iter().map(|&x| ((x - m) as f64 / 8.0).exp2()).collect();
        let want_sum: f64 = want.iter().sum();
        type Kernel = fn(&mut [f32], f32) -> f32;
        #[allow(unused_mut)] // (one kernel without the x86 code)
        let mut kernels: Vec<(&str, Kernel)> = vec![("portable", exp_shifted_sum_portable)];
        #[cfg(x86_simd)]
        if super::super::has_avx2_fma() {
            // SAFETY: checked just above.
            kernels.push(("avx2", |r, m| unsafe {
                super::super::microkernel::avx2::exp_shifted_sum(r, m)
            }));
        }
        #[cfg(x86_simd)]
        if super::super::kernels() >= super::super::Kernels::Avx512 {
            // SAFETY: checked just above.
            kernels.push(("avx512", |r, m| unsafe {
                super::super::microkernel::avx512::exp_shifted_sum(r, m)
            }));
        }
        let mut portable = xs.clone();
        exp_shifted_sum_portable(&mut portable, m);
        for (name, f) in kernels {
            let mut row = xs.clone();
            let sum = f(&mut row, m);
            for (i, (x, (&got, &want))) in xs.iter().zip(row.iter().zip(&want)).enumerate() {
                let err = (got as f64 - want).abs();
                assert!(
                    err <= 1.2e-7 * want + 3e-38,
                    "{name} softmax_exp({x} - {m}): {got} vs {want}"
                );
                assert_eq!(got.to_bits(), portable[i].to_bits(), "{name} at {x}");
            }
            assert!(
                (sum as f64 - want_sum).abs() <= 1e-6 * want_sum,
                "{name} sum"
            );
        }
        // NaN stays NaN; the table's entries are 2^(j/8) rounded.
        assert!(softmax_exp(f32::NAN).is_nan());
        for j in 0..8 {
            let got = softmax_exp(-(j as f32));
            assert_eq!(got, (-(j as f64) / 8.0).exp2() as f32, "2^(-{j}/8)");
        }
    }

    /// The AVX-512 row kernel gives the AVX2 one's values and sum bit for bit (so attention's
    /// output does not depend on which of the two the CPU runs), at every length's mix of
    /// 16-wide chunks, a last 8 and a scalar tail.
    #[cfg(x86_simd)]
    #[test]
    fn avx512_exp_rows_equal_avx2_bits() {
        use super::super::microkernel::{avx2, avx512};
        if super::super::kernels() < super::super::Kernels::Avx512 {
            eprintln!("no AVX-512 on this CPU: nothing to compare");
            return;
        }
        for len in (0..=48).chain([129, 1003]) {
            let xs: Vec<f32> = (0..len)
                .map(|i| ((i * 7919 % 1000) as f32 - 900.0) * 0.1)
                .collect();
            let (mut a, mut b) = (xs.clone(), xs.clone());
            // SAFETY: the CPU has AVX-512 (checked above), hence AVX2 and FMA too.
            let (sa, sb) = unsafe {
                (
                    avx2::exp_shifted_sum(&mut a, 1.5),
                    avx512::exp_shifted_sum(&mut b, 1.5),
                )
            };
            assert_eq!(sa.to_bits(), sb.to_bits(), "sum of {len}");
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(x.to_bits(), y.to_bits(), "element {i} of {len}: {x} vs {y}");
            }
        }
    }

    /// The fused blocks, on the AVX2 tiles and (where the CPU has it) the AVX-512 ones, give
    /// the GEMM path's bits: scores, maxima, exponentials, sums and values, over head widths
    /// of every column-group shape (whole panels, a last 8 or fewer, a part panel over 8),
    /// key counts with part panels and a part last block, and rows that leave a part tile
    /// of either size; scores large enough to move the maxima often.
    #[cfg(x86_simd)]
    #[test]
    fn fused_block_equals_gemm_block_bits() {
        type Block = fn(&[f32], (&[f32], &[f32]), usize, &mut [f32], (usize, usize));
        let mut tiles: Vec<(&str, Block)> = Vec::new();
        if super::super::kernels() >= super::super::Kernels::Avx2 {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            tiles.push(("avx2", |q, kv, m, o, dims| unsafe {
                fused_tiles(&AVX2_TILES, q, kv, m, o, dims)
            }));
        }
        if super::super::kernels() >= super::super::Kernels::Avx512 {
            // SAFETY: the CPU has AVX-512 (checked just above).
            tiles.push(("avx512", |q, kv, m, o, dims| unsafe {
                fused_tiles(&AVX512_TILES, q, kv, m, o, dims)
            }));
        }
        if tiles.is_empty() {
            // As the other instruction-set tests: the CPU cannot run what they compare.
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let value =
            |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 2003) as f32 / 2003.0 - 0.5;
        for &(rows, m, d, dv) in &[
            (128, 300, 40, 40),
            (16, 77, 64, 64),
            (13, 129, 80, 80),
            (8, 17, 8, 24),
            (24, 260, 160, 160),
            (8, 33, 16, 5),
            (9, 48, 32, 60),
            (8, 1, 40, 12),
            (5, 40, 24, 8),
        ] {
            let q: Vec<f32> = (0..rows * d).map(|i| 8.0 * value(i, 1)).collect();
            let k: Vec<f32> = (0..m * d).map(|i| value(i, 2)).collect();
            let v: Vec<f32> = (0..m * dv).map(|i| value(i, 3)).collect();
            let mut kt = vec![0f32; m.div_ceil(NR) * NR * d];
            pack_kt(&k, (m, d, d), 0.3, &mut kt);
            let mut vp = vec![0f32; dv.div_ceil(NR) * NR * m];
            pack_rows(&v, dv, m, dv, &mut vp);
            assert!(fused_fits(false, false, d));
            let mut gemm = vec![0f32; rows * dv];
            attend_block(&q, (&kt, &vp), m, &mut gemm, (d, dv), None, false);
            for &(name, block) in &tiles {
                let mut fused = vec![0f32; rows * dv];
                block(&q, (&kt, &vp), m, &mut fused, (d, dv));
                for (i, (a, b)) in fused.iter().zip(&gemm).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{name} {rows}x{m}x{d}x{dv} element {i}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
