//! The Fréchet distance between two sets of feature vectors, each summarised by a Gaussian
//! (mean μ, covariance Σ):
//!
//! d² = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½
//!
//! (the FID formula; `tr (Σ₁ Σ₂)^½` equals the last trace, which is taken here on a symmetric
//! matrix so that symmetric eigen-decompositions suffice). Everything is f64.

use diffuse_core::{Error, Result};

/// The mean and (unbiased, N − 1) covariance of a set of `dim`-vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct Gaussian {
    pub dim: usize,
    pub mean: Vec<f64>,
    /// Row-major `dim × dim`.
    pub cov: Vec<f64>,
}

impl Gaussian {
    /// Fits row-major `(N, dim)` `features`; needs N ≥ 2.
    pub fn fit(features: &[f32], dim: usize) -> Result<Self> {
        if dim == 0 || !features.len().is_multiple_of(dim) {
            return Err(Error::invalid(format!(
                "{} feature values do not split into vectors of {dim}",
                features.len()
            )));
        }
        let n = features.len() / dim;
        if n < 2 {
            return Err(Error::invalid(
                "a covariance needs at least two feature vectors",
            ));
        }
        let mut mean = vec![0f64; dim];
        for row in features.chunks_exact(dim) {
            mean.iter_mut().zip(row).for_each(|(m, &x)| *m += x as f64);
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut cov = vec![0f64; dim * dim];
        let mut centred = vec![0f64; dim];
        for row in features.chunks_exact(dim) {
            centred
                .iter_mut()
                .zip(row.iter().zip(&mean))
                .for_each(|(c, (&x, m))| *c = x as f64 - m);
            for i in 0..dim {
                let ci = centred[i];
                // Upper triangle only; mirrored below.
                for j in i..dim {
                    cov[i * dim + j] += ci * centred[j];
                }
            }
        }
        for i in 0..dim {
            for j in i..dim {
                let v = cov[i * dim + j] / (n - 1) as f64;
                cov[i * dim + j] = v;
                cov[j * dim + i] = v;
            }
        }
        Ok(Self { dim, mean, cov })
    }
}

/// d² between two fitted Gaussians of the same dimension.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> Result<f64> {
    if a.dim != b.dim {
        return Err(Error::invalid(format!(
            "feature dimensions differ: {} and {}",
            a.dim, b.dim
        )));
    }
    let n = a.dim;
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let trace = |m: &[f64]| (0..n).map(|i| m[i * n + i]).sum::<f64>();
    let root_a = sqrt_psd(&a.cov, n);
    let middle = matmul(&matmul(&root_a, &b.cov, n), &root_a, n);
    let (eig, _) = symmetric_eigen(&symmetrise(middle, n), n);
    let cross: f64 = eig.iter().map(|&l| l.max(0.0).sqrt()).sum();
    Ok(mean_term + trace(&a.cov) + trace(&b.cov) - 2.0 * cross)
}

/// The symmetric PSD square root `V diag(√λ) Vᵀ` (negative rounding noise in λ clamped to 0).
fn sqrt_psd(m: &[f64], n: usize) -> Vec<f64> {
    let (eig, v) = symmetric_eigen(m, n);
    let roots: Vec<f64> = eig.iter().map(|&l| l.max(0.0).sqrt()).collect();
    let mut out = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            let s: f64 = (0..n).map(|k| v[i * n + k] * roots[k] * v[j * n + k]).sum();
            out[i * n + j] = s;
            out[j * n + i] = s;
        }
    }
    out
}

fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            let (row_b, row_o) = (&b[k * n..(k + 1) * n], &mut out[i * n..(i + 1) * n]);
            row_o
                .iter_mut()
                .zip(row_b)
                .for_each(|(o, &x)| *o += aik * x);
        }
    }
    out
}

/// Averages `m` with its transpose (removes the rounding asymmetry of a product).
fn symmetrise(mut m: Vec<f64>, n: usize) -> Vec<f64> {
    for i in 0..n {
        for j in i + 1..n {
            let v = 0.5 * (m[i * n + j] + m[j * n + i]);
            m[i * n + j] = v;
            m[j * n + i] = v;
        }
    }
    m
}

/// Eigenvalues and eigenvectors (columns of the row-major `V`, so `m = V diag(λ) Vᵀ`) of the
/// symmetric `n × n` matrix `m`, by cyclic Jacobi rotations: slow for large `n` but simple
/// and accurate, and the classifier features are only a few hundred wide.
pub fn symmetric_eigen(m: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = m.to_vec();
    let mut v = vec![0f64; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    let norm2: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off <= 1e-30 * norm2 || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                // The rotation J (c on the diagonal, s at (p, q), −s at (q, p)) with
                // (Jᵀ A J)_pq = 0, taking the smaller of the two angles.
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}
