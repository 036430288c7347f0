//! Flash-attention style CPU kernel: `softmax(q·kᵀ·scale)·v` over `(B*heads, N, d)` without the
//! `N × M` score matrix. Each task owns one block of query rows, streams the keys/values in
//! blocks, and keeps a running max and sum per row (online softmax), so memory is
//! `O(block_q × (block_k + d))` per thread. The two block products go through `gemm`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::{exp, f32_input, f32_output, max, simd_fn};

/// Query rows per task: enough rows to amortise `gemm`'s packing of the key block, few enough
/// that a 4096-token head splits into many tasks for both cores.
const BLOCK_Q: usize = 128;
/// Keys per step: the `BLOCK_Q × BLOCK_K` score tile (256 KiB) stays in L2; 512 measured a
/// little faster than 256 and 1024 on the SD shapes (16 heads × 4096 × 40, 16 × 1024 × 80).
const BLOCK_K: usize = 512;

/// The fused attention op; see [`super::attention`] module docs.
pub(crate) struct FlashAttention {
    pub scale: f64,
}

simd_fn! {
    /// One key block of the online softmax: turns the scores `s` (rows × `kb`) into
    /// probabilities relative to the updated running maxima, and rescales the running sums
    /// and output rows by how much each maximum moved.
    fn softmax_step(s: &mut [f32], kb: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) {
        for (r, row) in s.chunks_exact_mut(kb).enumerate() {
            let m_new = m[r].max(max(row));
            let corr = exp(m[r] - m_new);
            let mut sums = [0f32; super::LANES];
            let mut chunks = row.chunks_exact_mut(super::LANES);
            for c in &mut chunks {
                for i in 0..super::LANES {
                    c[i] = exp(c[i] - m_new);
                    sums[i] += c[i];
                }
            }
            let mut sum: f32 = sums.iter().sum();
            for x in chunks.into_remainder() {
                *x = exp(*x - m_new);
                sum += *x;
            }
            l[r] = l[r] * corr + sum;
            m[r] = m_new;
            if corr != 1.0 {
                acc[r * dv..(r + 1) * dv].iter_mut().for_each(|o| *o *= corr);
            }
        }
    }
}

/// `dst (m×n) = alpha·dst + beta·lhs (m×k) · rhs`, row-major `lhs`/`dst`; `rhs` given by its
/// row and column strides so that `kᵀ` needs no copy. Single-threaded: the callers are the
/// parallel tasks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    alpha: f32,
    beta: f32,
) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k);
    assert!(k == 0 || n == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the asserts bound every index gemm touches.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            alpha != 0.0,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            alpha,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Attention of one block of query rows `q` (rows × d) over all of `k` (M × d), `v` (M × dv),
/// written to `out` (rows × dv).
fn attend_block(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], d: usize, dv: usize, scale: f32) {
    let rows = q.len() / d;
    let m_keys = k.len() / d;
    let bk = BLOCK_K.min(m_keys);
    let mut s = vec![0f32; rows * bk];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    out.fill(0.0);
    for k0 in (0..m_keys).step_by(bk) {
        let kb = bk.min(m_keys - k0);
        let s = &mut s[..rows * kb];
        // s = scale · q · k_blockᵀ: kᵀ read through strides (row stride 1, column stride d).
        gemm_rows(rows, kb, d, s, q, &k[k0 * d..], 1, d, 0.0, scale);
        softmax_step(s, kb, &mut m, &mut l, out, dv);
        // out += p · v_block
        gemm_rows(rows, dv, kb, out, s, &v[k0 * dv..], dv, 1, 1.0, 1.0);
    }
    for (row, l) in out.chunks_exact_mut(dv).zip(&l) {
        let inv = 1.0 / l;
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
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
        let (bh, n, d) = lq.shape().dims3()?;
        let (bh_k, m, d_k) = lk.shape().dims3()?;
        let (bh_v, m_v, dv) = lv.shape().dims3()?;
        if bh_k != bh || bh_v != bh || d_k != d || m_v != m {
            candle_core::bail!(
                "attention: shapes q {:?}, k {:?}, v {:?} do not match",
                lq.shape(),
                lk.shape(),
                lv.shape()
            )
        }
        let q = f32_input(sq, lq, "attention q")?;
        let k = f32_input(sk, lk, "attention k")?;
        let v = f32_input(sv, lv, "attention v")?;
        let mut out = vec![0f32; bh * n * dv];
        if n * dv > 0 {
            let scale = self.scale as f32;
            // Tasks: every (batch·head, query block) pair, so both cores stay busy even for one head.
            out.par_chunks_mut(n * dv)
                .enumerate()
                .for_each(|(b, out_b)| {
                    let (kb, vb) = (
                        &k[b * m * d..(b + 1) * m * d],
                        &v[b * m * dv..(b + 1) * m * dv],
                    );
                    out_b
                        .par_chunks_mut(BLOCK_Q * dv)
                        .enumerate()
                        .for_each(|(i, out_blk)| {
                            let r0 = b * n + i * BLOCK_Q;
                            let rows = out_blk.len() / dv;
                            let qb = &q[r0 * d..(r0 + rows) * d];
                            if m == 0 {
                                // torch gives NaN (0/0) for attention over no keys.
                                out_blk.fill(f32::NAN);
                            } else {
                                attend_block(qb, kb, vb, out_blk, d, dv, scale);
                            }
                        })
                });
        }
        Ok((f32_output(out, sq.dtype())?, Shape::from((bh, n, dv))))
    }

    /// The standard attention gradients, from the recomputed probabilities (training runs at
    /// sizes where the score matrix fits): with `p = softmax(s)`, `o = p·v`,
    /// `dv = pᵀ·do`, `ds = p ⊙ (do·vᵀ − rowsum(do ⊙ o))`, `dq = ds·k·scale`, `dk = dsᵀ·q·scale`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad_o: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
        let (qf, kf, vf, of, gof) = (f32(q)?, f32(k)?, f32(v)?, f32(o)?, f32(grad_o)?);
        // Transposes are made contiguous: candle's CPU matmul mishandles some transposed batches.
        let p =
            candle_nn::ops::softmax_last_dim(&(qf.matmul(&kf.t()?.contiguous()?)? * self.scale)?)?;
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
    }
}
