//! Flash-attention style CPU kernel: `softmax(q·kᵀ·scale)·v` over `(B*heads, N, d)` without the
//! `N × M` score matrix. Each task owns one block of query rows, streams the keys/values in
//! blocks, and keeps a running max and sum per row (online softmax), so memory is
//! `O(block_q × (block_k + d))` per thread. The keys are packed (and scaled) once per head; the
//! two block products run on the register tiles of [`super::microkernel`] (the `gemm` crate on
//! CPUs without AVX2), and the exponentials on AVX2 too.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::microkernel::{pack_kt, pack_rows, Gemm, B, NR};
use super::{exp, f32_input, f32_output, max, output_buffer, simd_fn};

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
}

simd_fn! {
    /// One key block of the online softmax: turns the scores `s` (rows × `kb`, row stride
    /// `lds`) into probabilities relative to the updated running maxima, and rescales the
    /// running sums and output rows by how much each maximum moved.
    fn softmax_step(s: &mut [f32], lds: usize, kb: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) {
        for (r, row) in s.chunks_exact_mut(lds).enumerate() {
            let row = &mut row[..kb];
            let m_new = m[r].max(max(row));
            let corr = exp(m[r] - m_new);
            let sum = exp_shifted_sum(row, m_new);
            l[r] = l[r] * corr + sum;
            m[r] = m_new;
            if corr != 1.0 {
                acc[r * dv..(r + 1) * dv].iter_mut().for_each(|o| *o *= corr);
            }
        }
    }
}

/// `row[i] = exp(row[i] − m)`; returns their sum.
fn exp_shifted_sum(row: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the CPU has the features.
        return unsafe { super::microkernel::avx2::exp_shifted_sum(row, m) };
    }
    exp_shifted_sum_portable(row, m)
}

fn exp_shifted_sum_portable(row: &mut [f32], m: f32) -> f32 {
    let mut sums = [0f32; super::LANES];
    let mut chunks = row.chunks_exact_mut(super::LANES);
    for c in &mut chunks {
        for i in 0..super::LANES {
            c[i] = exp(c[i] - m);
            sums[i] += c[i];
        }
    }
    let tail: f32 = chunks
        .into_remainder()
        .iter_mut()
        .map(|x| {
            *x = exp(*x - m);
            *x
        })
        .sum();
    sums.iter().sum::<f32>() + tail
}

/// Attention of one block of query rows `q` (rows × d) over the `m_keys` keys of one head,
/// packed as `scale · kᵀ` by [`pack_kt`], with values `v` (M × dv) packed by [`pack_rows`],
/// written to `out` (rows × dv).
/// `causal`: the index of the block's first row in its head, whose row `i` sees keys `0..=i`.
fn attend_block(
    q: &[f32],
    kt: &[f32],
    m_keys: usize,
    v: &[f32],
    out: &mut [f32],
    (d, dv): (usize, usize),
    causal: Option<usize>,
) {
    let rows = q.len() / d;
    let bk = BLOCK_K.min(m_keys.next_multiple_of(NR));
    // Rows one panel longer than the block: 2 KiB-strided rows would share L1 sets.
    let lds = bk + NR;
    // SAFETY: the score GEMM writes columns 0..kb of every row, and only those are read.
    let mut s = unsafe { output_buffer(rows * lds) };
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f32; rows];
    out.fill(0.0);
    // The keys any row of the block may see.
    let all_keys = m_keys;
    let m_keys = causal.map_or(m_keys, |r0| m_keys.min(r0 + rows));
    for k0 in (0..m_keys).step_by(bk) {
        let kb = bk.min(m_keys - k0);
        // s = q · (scale · k_block)ᵀ
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
        };
        scores.run(q, &kt[k0 * d..], &mut s, None);
        if let Some(r0) = causal {
            // Keys after each row's own position. Every row sees key 0 in the first block,
            // so no row's running maximum stays −∞.
            for (r, row) in s.chunks_exact_mut(lds).enumerate() {
                let visible = (r0 + r + 1).saturating_sub(k0).min(kb);
                row[visible..kb].fill(f32::NEG_INFINITY);
            }
        }
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
        };
        values.run(&s, &v[k0 * NR..], out, None);
    }
    for (row, l) in out.chunks_exact_mut(dv).zip(&l) {
        let inv = 1.0 / l;
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

/// Packs every head: `pack(src, dst)` over the heads' `src_len`-value slices of `src`, into
/// `dst_len` values each of a new buffer (all zero when there is nothing to pack).
fn pack_heads(
    src: &[f32],
    src_len: usize,
    dst_len: usize,
    pack: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let heads = src.len().checked_div(src_len).unwrap_or(0);
    let mut out = vec![0f32; heads * dst_len];
    if dst_len > 0 {
        out.par_chunks_mut(dst_len)
            .zip(src.par_chunks(src_len))
            .for_each(|(dst, src)| pack(src, dst));
    }
    out
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
        // SAFETY: every query block is zeroed by `attend_block` or filled with NaN.
        let mut out = unsafe { output_buffer(bh * n * dv) };
        if n * dv > 0 {
            let scale = self.scale as f32;
            // Keys packed once per head, shared by all of its query blocks; values too
            // (packing each key block's values for every query block cost about 4% of the op).
            let per_head = m.div_ceil(NR) * NR * d;
            let kt = pack_heads(&k, m * d, per_head, |k, kt| pack_kt(k, m, d, scale, kt));
            let v_per_head = dv.div_ceil(NR) * NR * m;
            let v = &pack_heads(&v, m * dv, v_per_head, |v, vp| pack_rows(v, dv, m, dv, vp));
            // Tasks: every (batch·head, query block) pair, so both cores stay busy even for one head.
            out.par_chunks_mut(n * dv)
                .enumerate()
                .for_each(|(b, out_b)| {
                    let kt = &kt[b * per_head..(b + 1) * per_head];
                    let vb = &v[b * v_per_head..(b + 1) * v_per_head];
                    out_b
                        .par_chunks_mut(BLOCK_Q * dv)
                        .enumerate()
                        .for_each(|(i, out_blk)| {
                            let r0 = b * n + i * BLOCK_Q;
                            let rows = out_blk.len() / dv;
                            let qb = &q[r0 * d..(r0 + rows) * d];
                            let causal = self.causal.then_some(i * BLOCK_Q);
                            if m == 0 {
                                // torch gives NaN (0/0) for attention over no keys.
                                out_blk.fill(f32::NAN);
                            } else {
                                attend_block(qb, kt, m, vb, out_blk, (d, dv), causal);
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
        let mut scores = (qf.matmul(&kf.t()?.contiguous()?)? * self.scale)?;
        if self.causal {
            scores =
                scores.broadcast_add(&causal_mask(scores.dim(1)?, scores.dim(2)?, q.device())?)?;
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
    }
}

/// `(n, m)` additive mask: 0 where key `j ≤` query `i`, −∞ after.
pub(crate) fn causal_mask(n: usize, m: usize, device: &candle_core::Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..m).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (n, m), device)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Both `exp(x − m)` row kernels against f64, over the whole range softmax feeds them
    /// (down to the flush to zero), with a tail that is not a multiple of 8. Relative error
    /// 4e-7, growing with |x − m| because the portable range reduction `x·log2e` loses the
    /// low bits of large arguments (harmless: those probabilities are tiny), and below −87
    /// both give 0 or e^−87 (1e-37 absolute).
    #[test]
    fn exp_shifted_sum_matches_f64() {
        let xs: Vec<f32> = (0..1003).map(|i| -95.0 + i as f32 * 0.0973).collect();
        let m = 2.5f32;
        let want: Vec<f64> = xs.iter().map(|&x| (x as f64 - m as f64).exp()).collect();
        let want_sum: f64 = want.iter().sum();
        type Kernel = fn(&mut [f32], f32) -> f32;
        let mut kernels: Vec<(&str, Kernel)> = vec![("portable", exp_shifted_sum_portable)];
        if super::super::has_avx2_fma() {
            // SAFETY: checked just above.
            kernels.push(("avx2", |r, m| unsafe {
                super::super::microkernel::avx2::exp_shifted_sum(r, m)
            }));
        }
        for (name, f) in kernels {
            let mut row = xs.clone();
            let sum = f(&mut row, m);
            for (x, (&got, &want)) in xs.iter().zip(row.iter().zip(&want)) {
                let err = (got as f64 - want).abs();
                assert!(
                    err <= 1e-7 * (4.0 + (x - m).abs() as f64) * want + 1e-37,
                    "{name} exp({x} - {m}): {got} vs {want}"
                );
            }
            assert!(
                (sum as f64 - want_sum).abs() <= 1e-6 * want_sum,
                "{name} sum"
            );
        }
    }
}
