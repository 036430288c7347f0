//! The register tiles of [`super::attend_block_fused`]: for 8 query rows at a time, the
//! scores of a key block with their row maxima taken from the registers, and the
//! probabilities times the values added into the output rows, up to 48 columns held in
//! registers over the whole block.
//!
//! The generic path runs the same products as `Gemm` calls over the 128 rows of a block,
//! whose tiles pay the driver's per-tile dispatch and epilogue (a K of 40 is only 320 FMAs
//! per tile), and then reads every score back once more for the maxima. Every element gets
//! the same FMAs in the same order as there, and the same final additions, so both paths
//! give the same bits.

use std::arch::x86_64::*;

use super::avx2::add_row as add_row8;
use super::NR;
use crate::ops::unrolled;

/// Query rows per tile.
pub(super) const ROWS: usize = 8;

/// `s[r][j] = q[r] · kt[j]` for the [`ROWS`] rows of `q` (`d` values each, contiguous) and
/// the `kb` keys of a block, packed as `pack_kt` lays them (panels of [`NR`] keys, each
/// `d × NR`); the rows of `s` are `lds` apart and get whole panels (the columns past `kb`
/// hold the zero keys' scores). `best[r]` (`best.len() ==` [`ROWS`]): row `r`'s largest score
/// among its first `kb` (a NaN score is passed over, as `ops::max` does).
///
/// # Safety
/// The CPU has AVX-512F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn scores(
    q: &[f32],
    d: usize,
    kt: &[f32],
    kb: usize,
    s: &mut [f32],
    lds: usize,
    best_out: &mut [f32],
) {
    let panels = kb.div_ceil(NR);
    assert_eq!(best_out.len(), ROWS);
    assert!(q.len() >= ROWS * d && kt.len() >= panels * NR * d);
    assert!(lds >= panels * NR && s.len() >= (ROWS - 1) * lds + panels * NR);
    let mut best = [_mm512_set1_ps(f32::NEG_INFINITY); ROWS];
    let (q, kt, s) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
    // Two panels at a time: each broadcast query value feeds two FMAs.
    let mut p = 0;
    while p < panels {
        // SAFETY (all): panel `p` (and `p + 1` when taken) of `kt` and its columns of `s` are
        // in bounds (asserted above).
        let (kt, s, valid) = unsafe { (kt.add(p * NR * d), s.add(p * NR), kb - p * NR) };
        p += if p + 2 <= panels {
            unsafe { score_panels::<2>(q, d, kt, s, lds, valid, &mut best) };
            2
        } else {
            unsafe { score_panels::<1>(q, d, kt, s, lds, valid, &mut best) };
            1
        };
    }
    for (o, b) in best_out.iter_mut().zip(best) {
        *o = _mm512_reduce_max_ps(b);
    }
}

/// `P` panels of [`scores`], whose first `valid` columns (or all) are keys of the block.
///
/// # Safety
/// As [`scores`]; the panels and their columns of `s` are in bounds.
#[inline(always)]
unsafe fn score_panels<const P: usize>(
    q: *const f32,
    d: usize,
    kt: *const f32,
    s: *mut f32,
    lds: usize,
    valid: usize,
    best: &mut [__m512; ROWS],
) {
    let mut acc = [[_mm512_setzero_ps(); P]; ROWS];
    unrolled!(d, k => {
        let mut b = [_mm512_setzero_ps(); P];
        for (j, b) in b.iter_mut().enumerate() {
            *b = unsafe { _mm512_loadu_ps(kt.add(j * NR * d + k * NR)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = _mm512_set1_ps(unsafe { *q.add(r * d + k) });
            for (acc, b) in acc.iter_mut().zip(b) {
                *acc = _mm512_fmadd_ps(a, b, *acc);
            }
        }
    });
    for j in 0..P {
        let cols = valid.saturating_sub(j * NR).min(NR);
        let mask = column_mask(cols);
        for (r, acc) in acc.iter().enumerate() {
            // `+ 0` as the GEMM's epilogue adds its (absent) bias.
            let x = _mm512_add_ps(acc[j], _mm512_setzero_ps());
            unsafe { _mm512_storeu_ps(s.add(r * lds + j * NR), x) };
            // `x` first: a NaN score leaves the maximum as it was.
            best[r] = _mm512_mask_max_ps(best[r], mask, x, best[r]);
        }
    }
}

/// The first `cols ≤ 16` lanes.
#[inline(always)]
fn column_mask(cols: usize) -> __mmask16 {
    if cols >= NR {
        !0
    } else {
        ((1u32 << cols) - 1) as __mmask16
    }
}

/// `out[r] += p[r] · v` for the [`ROWS`] rows of probabilities `p` (in `s`, `lds` apart, `kb`
/// each) and the block's `kb` values `v`, packed as `pack_rows` lays them (panels of [`NR`]
/// columns, `panel_stride` apart, a row of each `NR` values); the rows of `out` are `dv`
/// values, contiguous. Columns in groups: up to three zmm panels, or up to two and a last
/// 8 columns on a ymm register.
///
/// # Safety
/// The CPU has AVX-512F, AVX2 and FMA.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn add_values(
    s: &[f32],
    lds: usize,
    kb: usize,
    v: &[f32],
    panel_stride: usize,
    out: &mut [f32],
    dv: usize,
) {
    let panels = dv.div_ceil(NR);
    assert!(kb > 0 && kb <= lds && s.len() >= (ROWS - 1) * lds + kb);
    assert!(v.len() >= (panels - 1) * panel_stride + kb * NR && out.len() >= ROWS * dv);
    let (s, v, out) = (s.as_ptr(), v.as_ptr(), out.as_mut_ptr());
    let mut c0 = 0;
    while c0 < dv {
        let rest = dv - c0;
        let (full, part) = (rest / NR, rest % NR);
        // (zmm panels, a ymm tail, columns of the last register, columns of the group)
        let (z, y, last, width) = match (full, part) {
            (3.., _) => (3, false, NR, 3 * NR),
            (f, 0) => (f, false, NR, f * NR),
            (f, 1..=8) => (f, true, part, f * NR + part),
            (f, _) => (f + 1, false, part, f * NR + part),
        };
        // SAFETY (all): the group's panels and columns are in bounds (asserted above).
        let (vg, og) = unsafe { (v.add(c0 / NR * panel_stride), out.add(c0)) };
        let args = (s, lds, kb, vg, panel_stride, og, dv, last);
        unsafe {
            match (z, y) {
                (3, false) => value_group::<3, false>(args),
                (2, false) => value_group::<2, false>(args),
                (2, true) => value_group::<2, true>(args),
                (1, false) => value_group::<1, false>(args),
                (1, true) => value_group::<1, true>(args),
                (0, true) => value_group::<0, true>(args),
                _ => unreachable!("column group ({z}, {y})"),
            }
        }
        c0 += width;
    }
}

/// One column group of [`add_values`]: `Z` zmm panels and, with `Y`, 8 columns on a ymm
/// register; the last register's first `last` columns are the group's.
#[inline(always)]
unsafe fn value_group<const Z: usize, const Y: bool>(
    (s, lds, kb, v, panel_stride, out, ldo, last): (
        *const f32,
        usize,
        usize,
        *const f32,
        usize,
        *mut f32,
        usize,
        usize,
    ),
) {
    let mut acc = [[_mm512_setzero_ps(); Z]; ROWS];
    let mut tail = [_mm256_setzero_ps(); ROWS];
    unrolled!(kb, k => {
        let mut b = [_mm512_setzero_ps(); Z];
        for (z, b) in b.iter_mut().enumerate() {
            *b = unsafe { _mm512_loadu_ps(v.add(z * panel_stride + k * NR)) };
        }
        let bt = match Y {
            true => unsafe { _mm256_loadu_ps(v.add(Z * panel_stride + k * NR)) },
            false => _mm256_setzero_ps(),
        };
        for r in 0..ROWS {
            let p = unsafe { *s.add(r * lds + k) };
            let a = _mm512_set1_ps(p);
            for (acc, b) in acc[r].iter_mut().zip(b) {
                *acc = _mm512_fmadd_ps(a, b, *acc);
            }
            if Y {
                tail[r] = _mm256_fmadd_ps(_mm256_set1_ps(p), bt, tail[r]);
            }
        }
    });
    for r in 0..ROWS {
        let row = unsafe { out.add(r * ldo) };
        for (z, &acc) in acc[r].iter().enumerate() {
            let cols = if z + 1 == Z && !Y { last } else { NR };
            unsafe { add_row(row.add(z * NR), acc, cols) };
        }
        if Y {
            unsafe { add_row8(row.add(Z * NR), tail[r], last) };
        }
    }
}

/// `dst[..cols] += acc`, with the GEMM epilogue's order of additions: `(acc + 0) + c` for a
/// whole register, `(c + acc) + 0` for part of one.
#[inline(always)]
unsafe fn add_row(dst: *mut f32, acc: __m512, cols: usize) {
    let mask = column_mask(cols);
    let (zero, c) = (_mm512_setzero_ps(), unsafe {
        _mm512_maskz_loadu_ps(mask, dst)
    });
    let x = match cols == NR {
        true => _mm512_add_ps(_mm512_add_ps(acc, zero), c),
        false => _mm512_add_ps(_mm512_add_ps(c, acc), zero),
    };
    unsafe { _mm512_mask_storeu_ps(dst, mask, x) };
}
