"""Coefficients of the vector softmax `exp` (EXP_POLY in crates/models/src/ops/microkernel.rs).

The kernels compute e^x = 2^t with t = x*log2(e) rounded once to f32, t = n + f (n the nearest
integer, f exact), and 2^f ~ 1 + f*p(f) on |f| <= 1/2 with p of degree 4, fitted here to the
relative error by iteratively reweighted least squares (weights grow where the error is
largest, which pushes the fit towards equal ripples). Then the whole f32 evaluation the
kernels run (the clamp, the rounding of t, the shifted 2^n) is replayed over [-87, 0] in f32
with fused multiply-adds (exact in f64 for f32 operands, rounded once), and its largest
relative and absolute errors printed. The rounding of t costs a relative error of about
|x|*6e-8 (5e-6 at -87) on values that small, which is under 3e-8 in absolute terms; the
largest absolute error, about 1.2e-7, is an ulp of 1 near x = 0. Needs numpy only:

    python3 scripts/exp_poly.py
"""

import numpy as np


def fit(degree=4, half_width=0.5, rounds=200):
    f = np.linspace(-half_width, half_width, 20001)
    want = np.exp2(f)
    # columns f, f^2, ..., f^(degree+1): 2^f - 1 = sum c_k f^(k+1)
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
    t = np.float32(x * np.float32(np.log2(np.e)))
    r = np.float32(t + shift)
    two_n = (r.view(np.int32) << 23).view(np.float32)
    n = np.float32(r - shift)
    f = np.float32(t - n)
    p = np.full_like(f, poly_high_first[0])
    for c in poly_high_first[1:]:
        p = f32_fma(p, f, c)
    got = f32_fma(np.float32(f * two_n), p, two_n)
    want = np.exp(x.astype(np.float64))
    return (np.abs(got - want) / want).max(), np.abs(got - want).max()


if __name__ == "__main__":
    coef, err = fit()
    high_first = [np.float32(c) for c in coef[::-1]]
    print("relative error of the fit (f64):", err)
    shortest = [np.format_float_positional(c, unique=True) for c in high_first]
    print("EXP_POLY (highest first):", shortest)
    rel, abs_ = replay(high_first)
    print("f32 evaluation over [-87, 0]: largest relative error", rel)
    print("                              largest absolute error", abs_)
