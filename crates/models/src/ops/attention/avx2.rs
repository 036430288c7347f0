//! The AVX2 register tiles of [`super::attend_block_fused`]: for up to 6 query rows at a
//! time, the scores of a key block with their row maxima taken from the registers, and the
//! probabilities times the values added into the output rows, 16 or 8 columns held in
//! registers over the whole block.
//!
//! The same products as the `Gemm` path's AVX2 tiles (6 rows × 16 columns, the K loop in
//! order, the epilogue's additions), so the bits are the same; what changes is what the
//! tiles skip: the driver's per-tile dispatch, reading every score back for the maxima, and
//! the value product's zero columns (a head of 40 values is two 16-column groups and one of
//! 8, where the `Gemm` runs three whole panels).

use std::arch::x86_64::*;

use super::NR;
use crate::ops::{unrolled, with_rows};

/// Most query rows per tile (as the AVX2 GEMM's tiles): 12 accumulators, two key vectors and
/// a broadcast fill 15 of the 16 ymm registers.
pub(super) const ROWS: usize = 6;

/// `s[r][j] = q[r] · kt[j]` for the `best.len() ≤` [`ROWS`] rows of `q` (`d` values each,
/// contiguous) and the `kb` keys of a block, packed as `pack_kt` lays them (panels of [`NR`]
/// keys, each `d × NR`); the rows of `s` are `lds` apart and get whole panels (the columns
/// past `kb` hold the zero keys' scores). `best[r]`: row `r`'s largest score among its first
/// `kb` (a NaN score is passed over, as `ops::max` does).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn scores(
    q: &[f32],
    d: usize,
    kt: &[f32],
    kb: usize,
    s: &mut [f32],
    lds: usize,
    best: &mut [f32],
) {
    let (rows, panels) = (best.len(), kb.div_ceil(NR));
    assert!(rows > 0 && rows <= ROWS && q.len() >= rows * d && kt.len() >= panels * NR * d);
    assert!(lds >= panels * NR && s.len() >= (rows - 1) * lds + panels * NR);
    let (q, kt, s) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
    // SAFETY: the rows, panels and their columns of `s` are in bounds (asserted above).
    unsafe {
        with_rows!(rows, [1, 2, 3, 4, 5] or ROWS: score_rows::<R>(q, d, kt, kb, s, lds, best))
    }
}

/// [`scores`] of `R` rows.
///
/// # Safety
/// As [`scores`], with its bounds.
#[inline(always)]
unsafe fn score_rows<const R: usize>(
    q: *const f32,
    d: usize,
    kt: *const f32,
    kb: usize,
    s: *mut f32,
    lds: usize,
    best: &mut [f32],
) {
    let mut most = [_mm256_set1_ps(f32::NEG_INFINITY); R];
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for p in 0..kb.div_ceil(NR) {
        // SAFETY (all): panel `p` of `kt` and its columns of `s` are in bounds.
        let (kt, s) = unsafe { (kt.add(p * NR * d), s.add(p * NR)) };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        unrolled!(d, k => {
            let b = unsafe {
                [
                    _mm256_loadu_ps(kt.add(k * NR)),
                    _mm256_loadu_ps(kt.add(k * NR + 8)),
                ]
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = unsafe { _mm256_broadcast_ss(&*q.add(r * d + k)) };
                acc[0] = _mm256_fmadd_ps(a, b[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(a, b[1], acc[1]);
            }
        });
        let valid = kb - p * NR;
        for h in 0..2 {
            // The lanes of keys in the block (all but in a last part panel).
            let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32 - 8 * h as i32), lanes);
            for (r, acc) in acc.iter().enumerate() {
                // `+ 0` as the GEMM's epilogue adds its (absent) bias.
                let x = _mm256_add_ps(acc[h], _mm256_setzero_ps());
                unsafe { _mm256_storeu_ps(s.add(r * lds + 8 * h), x) };
                let x = match valid >= NR {
                    true => x,
                    false => _mm256_blendv_ps(
                        _mm256_set1_ps(f32::NEG_INFINITY),
                        x,
                        _mm256_castsi256_ps(keep),
                    ),
                };
                // `x` first: a NaN score leaves the maximum as it was.
                most[r] = _mm256_max_ps(x, most[r]);
            }
        }
    }
    for (b, most) in best.iter_mut().zip(most) {
        let mut lanes = [0f32; 8];
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), most) };
        *b = lanes.into_iter().fold(f32::NEG_INFINITY, f32::max);
    }
}

/// `out[r] += p[r] · v` for the `out.len() / dv ≤` [`ROWS`] rows of probabilities `p` (in `s`,
/// `lds` apart, `kb` each) and the block's `kb` values `v`, packed as `pack_rows` lays them
/// (panels of [`NR`] columns, `panel_stride` apart, a row of each `NR` values, zero past
/// `dv`); the rows of `out` are `dv` values, contiguous. Columns in groups of 16 (one panel,
/// two registers a row), a last 8 or fewer on one register.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn add_values(
    s: &[f32],
    lds: usize,
    kb: usize,
    v: &[f32],
    panel_stride: usize,
    out: &mut [f32],
    dv: usize,
) {
    let (rows, panels) = (out.len() / dv, dv.div_ceil(NR));
    assert!(rows > 0 && rows <= ROWS && out.len() == rows * dv);
    assert!(kb > 0 && kb <= lds && s.len() >= (rows - 1) * lds + kb);
    assert!(v.len() >= (panels - 1) * panel_stride + kb * NR);
    let (s, v, out) = (s.as_ptr(), v.as_ptr(), out.as_mut_ptr());
    for p in 0..panels {
        let cols = NR.min(dv - p * NR);
        // SAFETY (all): panel `p` and its columns of `out` are in bounds (asserted above).
        let (v, out) = unsafe { (v.add(p * panel_stride), out.add(p * NR)) };
        let args = (s, lds, kb, v, out, dv, cols);
        unsafe {
            match cols > 8 {
                true => with_rows!(rows, [1, 2, 3, 4, 5] or ROWS: value_group::<R, 2>(args)),
                false => with_rows!(rows, [1, 2, 3, 4, 5] or ROWS: value_group::<R, 1>(args)),
            }
        }
    }
}

/// One column group of [`add_values`]: `V` registers a row, of which the first `cols`
/// columns are the group's.
///
/// # Safety
/// As [`add_values`], with its bounds.
#[inline(always)]
#[allow(clippy::type_complexity)]
unsafe fn value_group<const R: usize, const V: usize>(
    (s, lds, kb, v, out, ldo, cols): (*const f32, usize, usize, *const f32, *mut f32, usize, usize),
) {
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    unrolled!(kb, k => {
        let mut b = [_mm256_setzero_ps(); V];
        for (j, b) in b.iter_mut().enumerate() {
            // Whole registers: the panel's columns past `dv` are zeros.
            *b = unsafe { _mm256_loadu_ps(v.add(k * NR + 8 * j)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = unsafe { _mm256_broadcast_ss(&*s.add(r * lds + k)) };
            for (acc, b) in acc.iter_mut().zip(b) {
                *acc = _mm256_fmadd_ps(a, b, *acc);
            }
        }
    });
    for (r, acc) in acc.iter().enumerate() {
        for (j, &acc) in acc.iter().enumerate() {
            let dst = unsafe { out.add(r * ldo + 8 * j) };
            unsafe { add_row(dst, acc, cols.saturating_sub(8 * j).min(8)) };
        }
    }
}

/// `dst[..cols] += acc` (`cols ≤ 8`), with the GEMM epilogue's order of additions:
/// `(acc + 0) + c` for a whole register, `(c + acc) + 0` for part of one. (Also the AVX-512
/// tiles' ymm tail.)
#[inline(always)]
pub(super) unsafe fn add_row(dst: *mut f32, acc: __m256, cols: usize) {
    if cols == 8 {
        let c = unsafe { _mm256_loadu_ps(dst) };
        let x = _mm256_add_ps(_mm256_add_ps(acc, _mm256_setzero_ps()), c);
        unsafe { _mm256_storeu_ps(dst, x) };
    } else {
        let mut lanes = [0f32; 8];
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        for (i, &a) in lanes.iter().enumerate().take(cols) {
            unsafe { *dst.add(i) = (*dst.add(i) + a) + 0.0 };
        }
    }
}
