"""Coefficients of the vector softmax `exp` (EXP_POLY in crates/models/src/ops/microkernel.rs).

e^f ~ 1 + f*p(f) on |f| <= ln2/2, p of degree 4, fitted to the relative error by iteratively
reweighted least squares (weights grow where the error is largest, which pushes the fit
towards equal ripples). Then the whole f32 evaluation the kernels run (the clamp, the
reduction with ln2 in two parts, the shifted 2^n) is replayed over [-87, 0] in f32 with fused
multiply-adds (exact in f64 for f32 operands, rounded once) and its largest relative error
printed. Needs numpy only:

    python3 scripts/exp_poly.py
"""

import numpy as np


def fit(degree=4, half_width=np.log(2) / 2, rounds=200):
    f = np.linspace(-half_width, half_width, 20001)
    want = np.exp(f)
    # columns f, f^2, ..., f^(degree+1): e^f - 1 = sum c_k f^(k+1)
    basis = np.stack([f ** (k + 1) for k in range(degree + 1)], axis=1)
    weights = np.ones_like(f)
    for _ in range(rounds):
        scale = weights / want
        coef, *_ = np.linalg.lstsq(basis * scale[:, None], (want - 1) * scale, rcond=None)
        err = (1 + basis @ coef - want) / want
        weights *= 1 + 50 * np.abs(err) / np.abs(err).max()
        weights /= weights.mean()
    return coef, np.abs(err).max()


def f32_fma(a, b, c):
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def replay(poly_high_first):
    x = np.float32(np.linspace(-87.0, 0.0, 2_000_001))
    shift = np.float32(1.5 * 2**23 + 127)
    r = f32_fma(x, np.float32(np.log2(np.e)), shift)
    two_n = (r.view(np.int32) << 23).view(np.float32)
    n = np.float32(r - shift)
    f = f32_fma(-n, np.float32(0.693_145_75), x)
    f = f32_fma(-n, np.float32(1.428_606_8e-6), f)
    p = np.full_like(f, poly_high_first[0])
    for c in poly_high_first[1:]:
        p = f32_fma(p, f, c)
    got = f32_fma(np.float32(f * two_n), p, two_n)
    want = np.exp(x.astype(np.float64))
    return (np.abs(got - want) / want).max()


if __name__ == "__main__":
    coef, err = fit()
    high_first = [np.float32(c) for c in coef[::-1]]
    print("relative error of the fit (f64):", err)
    shortest = [np.format_float_positional(c, unique=True) for c in high_first]
    print("EXP_POLY (highest first):", shortest)
    print("largest relative error of the f32 evaluation over [-87, 0]:", replay(high_first))
