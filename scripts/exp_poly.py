"""Constants of the softmax exponential: EXP_POLY and EXP_TABLE in
crates/models/src/ops/microkernel.rs.

The attention kernels take their scores in eighths of an octave (the keys are packed times
scale * 8 * log2(e)), so the softmax needs 2^(t/8) for t <= 0, with no multiplication first.
The kernels round t to the nearest integer n (adding 1.5 * 2^23 rounds it, and leaves n in the
low mantissa bits), split t = n + g with g exact and |g| <= 1/2, and compute

    2^(t/8) = 2^floor(n/8) * 2^((n mod 8)/8) * 2^(g/8)

where 2^((n mod 8)/8) comes from a table of eight values (one permute of a register), the power
2^floor(n/8) is added to that value's exponent field, and 2^(g/8) ~ 1 + g*q(g) with q of degree
2, fitted here to the relative error by iteratively reweighted least squares (weights grow where
the error is largest, which pushes the fit towards equal ripples). Then the whole f32
evaluation the kernels run (the clamp at -1000, the table, the fused multiply-adds, exact in f64
for f32 operands and rounded once) is replayed over [-1000, 0] and its largest relative and
absolute errors printed. Needs numpy only:

    python3 scripts/exp_poly.py
"""

import numpy as np

SHIFT = np.float32(1.5 * 2**23)
EXP_MIN = np.float32(-1000.0)


def fit(degree=2, half_width=0.5, rounds=200):
    """q of 2^(g/8) ~ 1 + g*q(g) on |g| <= half_width, lowest coefficient first."""
    g = np.linspace(-half_width, half_width, 20001)
    want = np.exp2(g / 8)
    # columns g, g^2, ..., g^(degree+1): 2^(g/8) - 1 = sum c_k g^(k+1)
    basis = np.stack([g ** (k + 1) for k in range(degree + 1)], axis=1)
    weights = np.ones_like(g)
    for _ in range(rounds):
        scale = weights / want
        coef, *_ = np.linalg.lstsq(basis * scale[:, None], (want - 1) * scale, rcond=None)
        err = (1 + basis @ coef - want) / want
        weights *= 1 + 50 * np.abs(err) / np.abs(err).max()
        weights /= weights.mean()
    return coef, np.abs(err).max()


def f32_fma(a, b, c):
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def table():
    return np.float32(np.exp2(np.arange(8) / 8))


def replay(poly_high_first, t):
    t = np.maximum(EXP_MIN, np.float32(t))
    r = np.float32(t + SHIFT)
    bits = r.view(np.uint32)
    power = (bits << np.uint32(20)) & np.uint32(0xFF800000)
    scaled = (table()[bits & np.uint32(7)].view(np.uint32) + power).view(np.float32)
    g = np.float32(t - np.float32(r - SHIFT))
    q = np.full_like(g, poly_high_first[0])
    for c in poly_high_first[1:]:
        q = f32_fma(q, g, c)
    return f32_fma(np.float32(scaled * g), q, scaled)


if __name__ == "__main__":
    coef, err = fit()
    high_first = [np.float32(c) for c in coef[::-1]]
    print("relative error of the fit (f64):", err)
    shortest = [np.format_float_positional(c, unique=True) for c in high_first]
    print("EXP_POLY (highest first):", shortest)
    print("EXP_TABLE:", [np.format_float_positional(c, unique=True) for c in table()])
    t = np.float32(np.linspace(-1000.0, 0.0, 4_000_001))
    got = replay(high_first, t)
    want = np.exp2(t.astype(np.float64) / 8)
    err = np.abs(got - want)
    print("f32 evaluation over [-1000, 0]: largest relative error", (err / want).max())
    print("                                largest absolute error", err.max())
