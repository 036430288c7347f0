//! A random generator that reproduces PyTorch's CPU generator bit for bit.
//!
//! Users expect `--seed 42` to give the image diffusers gives with
//! `torch.Generator("cpu").manual_seed(42)`. That requires the same engine (MT19937), the same
//! uniform → normal transforms, and — for tensors of 16 or more elements — the same float
//! approximations of `log`/`sin`/`cos` that torch's vectorised Box–Muller kernel uses
//! (Cephes polynomials from `avx_mathfun.h`, evaluated with the FMA contractions the compiler
//! applies there). With libm functions instead, about one value in seven differs by an ulp.

use candle_core::{Device, Result, Shape, Tensor};

const MT_N: usize = 624;
const MT_M: usize = 397;

/// Torch-compatible CPU random generator (`torch.Generator("cpu")`).
#[derive(Clone, Debug, PartialEq)]
pub struct Generator {
    mt: [u32; MT_N],
    index: usize,
    /// torch caches the second value of its scalar Box–Muller pair between calls.
    cached_normal: Option<f64>,
    /// The part of the batch the per-image draws are for ([`Generator::randn_batch`]).
    shard: Option<BatchShard>,
}

/// Images `start..start + len` of a batch of `batch`: what one of several processes makes of
/// a batch they share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShard {
    pub batch: usize,
    pub start: usize,
    pub len: usize,
}

/// Serializable snapshot of a [`Generator`] (for training checkpoints).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GeneratorState {
    pub mt: Vec<u32>,
    pub index: usize,
    pub cached_normal: Option<f64>,
}

impl Generator {
    /// Same as `torch.Generator("cpu").manual_seed(seed)`: only the low 32 bits count.
    pub fn manual_seed(seed: u64) -> Self {
        let mut mt = [0u32; MT_N];
        mt[0] = seed as u32;
        for i in 1..MT_N {
            mt[i] = 1812433253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Self {
            mt,
            index: MT_N,
            cached_normal: None,
            shard: None,
        }
    }

    /// This generator drawing per-image noise ([`Generator::randn_batch`]) for a shard of a
    /// larger batch; `None` for the whole batch.
    pub fn with_shard(mut self, shard: Option<BatchShard>) -> Self {
        self.shard = shard;
        self
    }

    pub fn state(&self) -> GeneratorState {
        GeneratorState {
            mt: self.mt.to_vec(),
            index: self.index,
            cached_normal: self.cached_normal,
        }
    }

    pub fn from_state(state: &GeneratorState) -> std::result::Result<Self, String> {
        let mt: [u32; MT_N] = state.mt.as_slice().try_into().map_err(|_| {
            format!(
                "generator state has {} words, expected {MT_N}",
                state.mt.len()
            )
        })?;
        if state.index > MT_N {
            return Err(format!(
                "generator state index {} out of range",
                state.index
            ));
        }
        Ok(Self {
            mt,
            index: state.index,
            cached_normal: state.cached_normal,
            shard: None,
        })
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..MT_N {
            let y = (self.mt[i] & UPPER) | (self.mt[(i + 1) % MT_N] & LOWER);
            let mut v = self.mt[(i + MT_M) % MT_N] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.mt[i] = v;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// One float uniform in [0, 1) as torch draws it: 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0xFF_FFFF) as f32 * (1.0 / 16_777_216.0)
    }

    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `at::normal_distribution<double>`: scalar Box–Muller with a cached second value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.rand(n)`: uniform floats in [0, 1).
    pub fn rand_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// `torch.randn(n)`: standard normal floats, the exact values torch gives.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data = self.rand_vec(n);
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            // torch redraws the whole last block of 16 and transforms it again.
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    /// `torch.randn(shape, generator=g)` as a tensor on `device`.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let v = self.randn_vec(shape.elem_count());
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)
    }

    /// Per-image noise for a batch along the first dimension: [`Generator::randn`], except
    /// that a generator with a [`BatchShard`] draws the whole batch (so its state moves as
    /// an unsharded generator's does) and returns the shard's images, the same values they
    /// get in the whole batch. A first dimension of `k` times the shard's images is `k`
    /// stacked copies of the batch (DiT steps `[x; x]` when guided): the whole `k` copies
    /// are drawn and the shard's rows of each kept. Draws shared by all images (one encoded
    /// init image) use [`Generator::randn`].
    pub fn randn_batch<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let Some(shard) = self.shard else {
            return self.randn(shape, device);
        };
        let dims = shape.dims();
        let rows = dims.first().copied().unwrap_or(0);
        if shard.len == 0
            || rows == 0
            || rows % shard.len != 0
            || shard.start + shard.len > shard.batch
        {
            candle_core::bail!(
                "noise of shape {dims:?} for images {}..{} of a batch of {}",
                shard.start,
                shard.start + shard.len,
                shard.batch
            );
        }
        let copies = rows / shard.len;
        let per_image = shape.elem_count() / rows;
        let all = self.randn_vec(copies * shard.batch * per_image);
        let mut mine = Vec::with_capacity(rows * per_image);
        for k in 0..copies {
            let first = k * shard.batch + shard.start;
            mine.extend_from_slice(&all[first * per_image..(first + shard.len) * per_image]);
        }
        Tensor::from_vec(mine, shape, &Device::Cpu)?.to_device(device)
    }

    /// `torch.rand(shape, generator=g)` as a tensor on `device`.
    pub fn rand<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let v = self.rand_vec(shape.elem_count());
        Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)
    }
}

/// Box–Muller over 16 uniforms: pairs (j, j+8), as torch's `normal_fill_16_AVX2`.
fn box_muller_16(d: &mut [f32]) {
    const TWO_PI: f32 = 2.0 * std::f32::consts::PI;
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * cephes_logf(u1)).sqrt();
        let (s, c) = cephes_sincosf(TWO_PI * u2);
        d[j] = radius * c;
        d[j + 8] = radius * s;
    }
}

#[inline]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

// Constants are spelled as in the C source: rounding them to f32 is part of the algorithm.

/// `log256_ps` from `avx_mathfun.h`, one lane, with GCC's FMA contractions.
#[allow(clippy::excessive_precision)]
fn cephes_logf(x: f32) -> f32 {
    if x <= 0.0 {
        return f32::NAN;
    }
    let x = x.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = x < std::f32::consts::FRAC_1_SQRT_2;
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    if below {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    const P: [f32; 9] = [
        7.0376836292E-2,
        -1.1514610310E-1,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ];
    let mut y = P[0];
    for &p in &P[1..] {
        y = fma(y, x, p);
    }
    let y = fma(y * x, z, e * -2.12194440e-4);
    let y = fma(-z, 0.5, y);
    fma(e, 0.693359375, x + y)
}

/// `sincos256_ps` from `avx_mathfun.h`, one lane, with GCC's FMA contractions.
#[allow(clippy::excessive_precision)]
fn cephes_sincosf(x: f32) -> (f32, f32) {
    let sign_in = x.to_bits() & 0x8000_0000;
    let mut x = f32::from_bits(x.to_bits() & 0x7fff_ffff);
    let mut j = (x * 1.27323954473516) as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let poly_mask = (j & 2) == 0;
    x = fma(y, -0.78515625, x);
    x = fma(y, -2.4187564849853515625e-4, x);
    x = fma(y, -3.77489497744594108e-8, x);
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_in ^ swap_sign_sin;
    let z = x * x;
    // Cosine polynomial.
    let mut yc = 2.443315711809948E-005f32;
    yc = fma(yc, z, -1.388731625493765E-003);
    yc = fma(yc, z, 4.166664568298827E-002);
    let yc = fma(yc * z, z, -(z * 0.5)) + 1.0;
    // Sine polynomial.
    let mut ys = -1.9515295891E-4f32;
    ys = fma(ys, z, 8.3321608736E-3);
    ys = fma(ys, z, -1.6666654611E-1);
    let ys = fma(ys * z, x, x);
    let (s, c) = if poly_mask { (ys, yc) } else { (yc, ys) };
    (
        f32::from_bits(s.to_bits() ^ sign_sin),
        f32::from_bits(c.to_bits() ^ sign_cos),
    )
}

/// Where stochastic schedulers and pipelines get their Gaussian noise.
///
/// [`Generator`] is the normal source; tests inject recorded noise instead.
pub trait NoiseSource {
    fn randn_like(&mut self, t: &Tensor) -> Result<Tensor>;
}

impl NoiseSource for Generator {
    /// Schedulers draw noise like the latents: per image ([`Generator::randn_batch`]).
    fn randn_like(&mut self, t: &Tensor) -> Result<Tensor> {
        self.randn_batch(t.shape().clone(), t.device())?
            .to_dtype(t.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_gets_its_images_of_the_whole_batch() {
        let dev = Device::Cpu;
        // 5 images of 7 values: 35, not a multiple of torch's blocks of 16.
        let mut whole = Generator::manual_seed(3);
        let all = whole.randn_batch((5, 7), &dev).unwrap();
        let next = whole.randn_batch((5, 7), &dev).unwrap();
        // Two stacked copies of the batch (DiT's guided [x; x]).
        let doubled = whole.randn_batch((10, 7), &dev).unwrap();
        let shard = Some(BatchShard {
            batch: 5,
            start: 2,
            len: 2,
        });
        let mut part = Generator::manual_seed(3).with_shard(shard);
        let mine = part.randn_batch((2, 7), &dev).unwrap();
        assert_eq!(
            mine.to_vec2::<f32>().unwrap(),
            all.narrow(0, 2, 2).unwrap().to_vec2::<f32>().unwrap()
        );
        let again = part.randn_like(&Tensor::zeros((2, 7), candle_core::DType::F32, &dev).unwrap());
        assert_eq!(
            again.unwrap().to_vec2::<f32>().unwrap(),
            next.narrow(0, 2, 2).unwrap().to_vec2::<f32>().unwrap()
        );
        let both = part.randn_batch((4, 7), &dev).unwrap();
        let want = Tensor::cat(
            &[
                doubled.narrow(0, 2, 2).unwrap(),
                doubled.narrow(0, 7, 2).unwrap(),
            ],
            0,
        )
        .unwrap();
        assert_eq!(
            both.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        assert!(part.randn_batch((3, 7), &dev).is_err());
    }

    #[test]
    fn mt19937_matches_reference_sequence() {
        // The 10000th output of std::mt19937 seeded with 5489 is 4123659995 (C++11 standard).
        let mut g = Generator::manual_seed(5489);
        let mut v = 0;
        for _ in 0..10000 {
            v = g.next_u32();
        }
        assert_eq!(v, 4_123_659_995);
    }

    #[test]
    fn state_round_trips() {
        let mut g = Generator::manual_seed(7);
        g.randn_vec(3);
        let s = g.state();
        let mut h = Generator::from_state(&s).unwrap();
        assert_eq!(g.randn_vec(40), h.randn_vec(40));
        let bad = GeneratorState {
            mt: vec![1],
            index: 0,
            cached_normal: None,
        };
        assert!(Generator::from_state(&bad).is_err());
    }
}
