// The fused CUDA kernels of diffuse-models, compiled to PTX by build.rs when the `cuda`
// feature is on and launched from ops/cuda.rs. Each kernel exists for f32, f16 and bf16
// (`<name>_<dtype>`); arithmetic is in f32 whatever the storage type, as PyTorch does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) {
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, size_t i, float v) { p[i] = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float v) {
    p[i] = __float2bfloat16(v);
}

// Block-wide reductions; every thread gets the result. The block is whole warps (the launch
// code rounds to 32) and `shared` holds one float per warp.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ float block_sum(float v, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // `shared` may still be read from the previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? shared[lane] : 0.f);
}
__device__ float block_max(float v, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? shared[lane] : -INFINITY);
}

// The mean of `len` values and the sum of their squared deviations from it, block-wide: two
// passes, so no cancellation.
template <typename T>
__device__ float2 block_mean_m2(const T* x, uint32_t len, float* shared) {
    float s = 0.f;
    for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) s += load(x, i);
    const float mean = block_sum(s, shared) / (float)len;
    float v = 0.f;
    for (uint32_t i = threadIdx.x; i < len; i += blockDim.x) {
        const float d = load(x, i) - mean;
        v += d * d;
    }
    return make_float2(mean, block_sum(v, shared));
}

// GroupNorm (+ SiLU) over contiguous groups, one block per group: `x` is `groups_total`
// groups of `group_len` values; value `i` of group `g` belongs to channel
// `(g % groups) * channels_per_group + i / inner`, whose weight and bias are applied after
// normalising. NCHW GroupNorm: inner = H·W; a LayerNorm over rows of C: groups = 1,
// channels_per_group = C, inner = 1. Mean, then variance around it (two passes, no
// cancellation), then the output pass.
template <typename T>
__device__ void group_norm(const T* x, const T* w, const T* b, T* y, uint32_t group_len,
                           uint32_t groups, uint32_t channels_per_group, uint32_t inner, float eps,
                           int silu) {
    __shared__ float shared[32];
    const size_t g = blockIdx.x;
    const T* xg = x + g * group_len;
    T* yg = y + g * group_len;
    const float2 stats = block_mean_m2(xg, group_len, shared);
    const float mean = stats.x, rstd = rsqrtf(stats.y / (float)group_len + eps);
    const uint32_t ch0 = (uint32_t)(g % groups) * channels_per_group;
    for (uint32_t i = threadIdx.x; i < group_len; i += blockDim.x) {
        const uint32_t ch = ch0 + i / inner;
        float o = (load(xg, i) - mean) * rstd * load(w, ch) + load(b, ch);
        if (silu) o = o / (1.f + expf(-o));
        store(yg, i, o);
    }
}

// The same for large groups (the VAE's: 32 groups of a million values would leave most of the
// GPU idle, one block each), in three launches: each block takes the mean and the sum of
// squared deviations of one chunk of a group (two passes over the chunk); one thread per group
// merges its chunks (Chan et al.'s pairwise update) into mean and 1/std; then an element-wise
// pass over rows of `inner` values, one per (image, channel), applies them with the weight and
// bias (and SiLU). The grid of the last pass is as im2col's: x over a row, y over rows.
template <typename T>
__device__ void group_norm_partial(const T* x, float* stats, uint32_t group_len, uint32_t chunk) {
    __shared__ float shared[32];
    const uint32_t c = blockIdx.x, start = c * chunk, len = min(chunk, group_len - start);
    const size_t g = blockIdx.y;
    const float2 mean_m2 = block_mean_m2(x + g * group_len + start, len, shared);
    if (threadIdx.x == 0) {
        stats[(g * gridDim.x + c) * 2] = mean_m2.x;
        stats[(g * gridDim.x + c) * 2 + 1] = mean_m2.y;
    }
}

extern "C" __global__ void group_norm_merge(const float* stats, float* mean_rstd,
                                            uint32_t groups_total, uint32_t chunks,
                                            uint32_t group_len, uint32_t chunk, float eps) {
    const uint32_t g = blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups_total) return;
    float n = 0.f, mean = 0.f, m2 = 0.f;
    for (uint32_t c = 0; c < chunks; ++c) {
        const float nb = (float)min(chunk, group_len - c * chunk);
        const float mb = stats[((size_t)g * chunks + c) * 2], m2b = stats[((size_t)g * chunks + c) * 2 + 1];
        const float total = n + nb, delta = mb - mean;
        mean += delta * nb / total;
        m2 += m2b + delta * delta * n * nb / total;
        n = total;
    }
    mean_rstd[2 * g] = mean;
    mean_rstd[2 * g + 1] = rsqrtf(m2 / n + eps);
}

template <typename T>
__device__ void group_norm_apply(const T* x, const T* w, const T* b, const float* mean_rstd, T* y,
                                 uint32_t rows, uint32_t inner, uint32_t channels,
                                 uint32_t channels_per_group, int silu) {
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= inner) return;
    for (uint32_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const uint32_t ch = r % channels, g = r / channels_per_group;
        const float scale = mean_rstd[2 * g + 1] * load(w, ch);
        const float shift = load(b, ch) - mean_rstd[2 * g] * scale;
        const size_t idx = (size_t)r * inner + i;
        float o = load(x, idx) * scale + shift;
        if (silu) o = o / (1.f + expf(-o));
        store(y, idx, o);
    }
}

// softmax(scale · x) over rows of `cols` values, one block per row.
template <typename T>
__device__ void scaled_softmax(const T* x, T* y, uint32_t cols, float scale) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    T* yr = y + row * cols;
    float m = -INFINITY;
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, load(xr, i) * scale);
    m = block_max(m, shared);
    float s = 0.f;
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) s += expf(load(xr, i) * scale - m);
    const float inv = 1.f / block_sum(s, shared);
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x)
        store(yr, i, expf(load(xr, i) * scale - m) * inv);
}

// The same for rows of at most 12288 values: the block keeps its row in shared memory (as f32,
// scaled), so the row is read from global memory once instead of three times. Each thread
// touches the same indices in every loop, so only the reductions synchronise.
template <typename T>
__device__ void scaled_softmax_cached(const T* x, T* y, uint32_t cols, float scale) {
    extern __shared__ float row[];
    __shared__ float shared[32];
    const size_t r = blockIdx.x;
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    float m = -INFINITY;
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) {
        const float v = load(xr, i) * scale;
        row[i] = v;
        m = fmaxf(m, v);
    }
    m = block_max(m, shared);
    float s = 0.f;
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) {
        const float e = expf(row[i] - m);
        row[i] = e;
        s += e;
    }
    const float inv = 1.f / block_sum(s, shared);
    for (uint32_t i = threadIdx.x; i < cols; i += blockDim.x) store(yr, i, row[i] * inv);
}

// GEGLU: rows of `2f` values `[a, g]` give rows of `f` values `a · gelu(g)` (exact erf GELU).
template <typename T>
__device__ void geglu(const T* h, T* y, uint32_t f, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / f, c = i - r * f;
        const float a = load(h, 2 * f * r + c), g = load(h, 2 * f * r + f + c);
        store(y, i, a * 0.5f * g * (1.f + erff(g * 0.70710678118654752f)));
    }
}

// im2col for a convolution as one GEMM per image: `col` holds, for the images from `x` (NCHW,
// `image_len` values apart), the `rows = images · C·KH·KW` rows of a band of `band` output
// pixels starting at output pixel `first` (row-major over the `wo`-wide output), so that
// `weight (Cout × C·KH·KW) · col (C·KH·KW × band)` is that band of the NCHW output. Row `k` of
// an image is channel `k / (KH·KW)`, kernel tap `k % (KH·KW)`, the weight's own order; taps
// outside the image read zero (the padding). The grid's x covers the band's pixels (consecutive
// threads write consecutive values) and its y the rows, in 32-bit index arithmetic (64-bit
// divisions per value made the kernel, not the GEMM, the cost).
struct ConvGeom {
    uint32_t c, h, w, kh, kw, stride, pad, dil, wo;
};
#define IM2COL_PIXELS 4  // ops/cuda.rs sizes the grid by it
template <typename T>
__device__ void im2col(const T* x, T* col, ConvGeom g, size_t image_len, uint32_t first,
                       uint32_t band, uint32_t rows) {
    // Each thread takes IM2COL_PIXELS pixels, blockDim.x apart, of every row it visits: the
    // row's channel and tap are worked out once for all of them.
    int y0[IM2COL_PIXELS], x0[IM2COL_PIXELS];
    const uint32_t p0 = blockIdx.x * blockDim.x * IM2COL_PIXELS + threadIdx.x;
    for (int j = 0; j < IM2COL_PIXELS; ++j) {
        const uint32_t o = first + p0 + j * blockDim.x, oy = o / g.wo, ox = o - oy * g.wo;
        y0[j] = (int)(oy * g.stride) - (int)g.pad;
        x0[j] = (int)(ox * g.stride) - (int)g.pad;
    }
    const uint32_t taps = g.kh * g.kw, k_len = g.c * taps;
    for (uint32_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const uint32_t image = row / k_len, k = row - image * k_len;
        const uint32_t c = k / taps, tap = k - c * taps, ky = tap / g.kw, kx = tap - ky * g.kw;
        const T* xc = x + image * image_len + (size_t)c * g.h * g.w;
        T* out = col + (size_t)row * band;
        for (int j = 0; j < IM2COL_PIXELS; ++j) {
            const uint32_t p = p0 + j * blockDim.x;
            if (p >= band) break;
            const int iy = y0[j] + (int)(ky * g.dil), ix = x0[j] + (int)(kx * g.dil);
            T v = T(0.f);
            if (iy >= 0 && iy < (int)g.h && ix >= 0 && ix < (int)g.w) v = xc[(size_t)iy * g.w + ix];
            out[p] = v;
        }
    }
}

// A convolution with at most CONV_DIRECT_COUT output channels (the models' last layers: 320 → 4,
// 128 → 3), directly: one thread per output pixel keeps all its channels' sums (from the bias,
// in f32) and reads its receptive field once. As a GEMM such a layer is all im2col traffic for
// a product a few columns wide. Grid: x over an image's output pixels, y over images.
#define CONV_DIRECT_COUT 8  // ops/cuda.rs: DIRECT_MAX_COUT
template <typename T>
__device__ void conv_direct(const T* x, const T* w, const T* b, T* y, ConvGeom g, uint32_t cout,
                            uint32_t ho) {
    const uint32_t p = blockIdx.x * blockDim.x + threadIdx.x, pixels = ho * g.wo;
    if (p >= pixels) return;
    const uint32_t oy = p / g.wo, ox = p - oy * g.wo;
    float acc[CONV_DIRECT_COUT];
    for (int co = 0; co < CONV_DIRECT_COUT; ++co) acc[co] = co < (int)cout ? load(b, co) : 0.f;
    const T* xi = x + (size_t)blockIdx.y * g.c * g.h * g.w;
    const uint32_t taps = g.kh * g.kw;
    for (uint32_t c = 0; c < g.c; ++c) {
        for (uint32_t ky = 0; ky < g.kh; ++ky) {
            const int iy = (int)(oy * g.stride + ky * g.dil) - (int)g.pad;
            if (iy < 0 || iy >= (int)g.h) continue;
            for (uint32_t kx = 0; kx < g.kw; ++kx) {
                const int ix = (int)(ox * g.stride + kx * g.dil) - (int)g.pad;
                if (ix < 0 || ix >= (int)g.w) continue;
                const float v = load(xi, ((size_t)c * g.h + iy) * g.w + ix);
                const size_t tap = (size_t)c * taps + ky * g.kw + kx;
                for (int co = 0; co < CONV_DIRECT_COUT; ++co)
                    if (co < (int)cout) acc[co] += v * load(w, co * (size_t)g.c * taps + tap);
            }
        }
    }
    T* yi = y + (size_t)blockIdx.y * cout * pixels;
    for (int co = 0; co < CONV_DIRECT_COUT; ++co)
        if (co < (int)cout) store(yi, (size_t)co * pixels + p, acc[co]);
}

// Fills a `rows × cols` output with biases, which a GEMM then accumulates onto (beta = 1):
// value (r, c) is `b[(r % channels) · row_step + c · col_step]`. An NCHW convolution output is
// rows of H·W pixels, one per (image, channel): row_step 1, col_step 0; a linear layer's is
// rows of features: channels 1, row_step 0, col_step 1. Grid as im2col's.
template <typename T>
__device__ void bias_fill(const T* b, T* y, uint32_t rows, uint32_t cols, uint32_t channels,
                          uint32_t row_step, uint32_t col_step) {
    const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (uint32_t r = blockIdx.y; r < rows; r += gridDim.y)
        y[(size_t)r * cols + c] = b[(r % channels) * row_step + c * col_step];
}

// Attention without the score matrix (flash attention), half precision, on tensor cores (WMMA):
// one block of four warps takes 64 query rows of one (batch, head), each warp 16 of them, and
// walks the keys 64 at a time: S = Q·Kᵀ into shared memory (f32), an online softmax per row
// (running max and sum, the output rescaled when the max grows; two lanes per row), P rounded
// to the input's dtype, O += P·V kept in shared memory (f32), O / sum at the end. The heads sit
// where the projections put them: row `i` of head `h` of batch `b` starts at
// `(b·rows + i)·row_stride + h·d` (`heads` = 1, row stride d, for split heads). `D` is the
// head size rounded up to 16 (the padding is zero); dynamic shared memory: flash_smem_bytes.
namespace wmma = nvcuda::wmma;
template <typename T, int D>
__device__ void flash_attention(const T* q, const T* k, const T* v, T* o, uint32_t n, uint32_t m,
                                uint32_t d, uint32_t heads, uint32_t q_row, uint32_t k_row,
                                uint32_t v_row, uint32_t o_row, float scale_log2) {
    constexpr int BR = 64, BC = 64, LD = D + 8, LDS = BC + 4, LDP = BC + 8, LDO = D + 4;
    extern __shared__ __align__(128) unsigned char smem[];
    T* s_q = reinterpret_cast<T*>(smem);
    T* s_k = s_q + BR * LD;
    T* s_v = s_k + BC * LD;
    float* s_s = reinterpret_cast<float*>(s_v + BC * LD);
    T* s_p = reinterpret_cast<T*>(s_s + 4 * 16 * LDS);
    float* s_o = reinterpret_cast<float*>(s_p + 4 * 16 * LDP);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint32_t b = blockIdx.y / heads, h = blockIdx.y - b * heads, q0 = blockIdx.x * BR;
    const T* qb = q + (size_t)b * n * q_row + (size_t)h * d;
    const T* kb = k + (size_t)b * m * k_row + (size_t)h * d;
    const T* vb = v + (size_t)b * m * v_row + (size_t)h * d;
    T* ob = o + (size_t)b * n * o_row + (size_t)h * d;
    const T zero = T(0.f);
    for (int i = threadIdx.x; i < BR * D; i += blockDim.x) {
        const int r = i / D, c = i - r * D;
        s_q[r * LD + c] = (q0 + r < n && c < (int)d) ? qb[(size_t)(q0 + r) * q_row + c] : zero;
    }
    float* s_sw = s_s + warp * 16 * LDS;
    T* s_pw = s_p + warp * 16 * LDP;
    float* s_ow = s_o + warp * 16 * LDO;
    for (int i = lane; i < 16 * LDO; i += 32) s_ow[i] = 0.f;
    const int r = lane >> 1, half_row = lane & 1;
    float row_max = -INFINITY, row_sum = 0.f;
    for (uint32_t k0 = 0; k0 < m; k0 += BC) {
        __syncthreads();  // every warp is done with the previous keys (and Q is loaded)
        for (int i = threadIdx.x; i < BC * D; i += blockDim.x) {
            const int j = i / D, c = i - j * D;
            const bool in = k0 + j < m && c < (int)d;
            s_k[j * LD + c] = in ? kb[(size_t)(k0 + j) * k_row + c] : zero;
            s_v[j * LD + c] = in ? vb[(size_t)(k0 + j) * v_row + c] : zero;
        }
        __syncthreads();
        for (int j = 0; j < BC / 16; ++j) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
            for (int kk = 0; kk < D / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
                wmma::load_matrix_sync(fa, s_q + warp * 16 * LD + kk * 16, LD);
                wmma::load_matrix_sync(fb, s_k + j * 16 * LD + kk * 16, LD);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(s_sw + j * 16, acc, LDS, wmma::mem_row_major);
        }
        __syncwarp();
        // Row r, columns half_row·32 … +31 (keys past m count as -inf); key k0 is always in.
        const float* s_row = s_sw + r * LDS + half_row * 32;
        const uint32_t first_key = k0 + half_row * 32;
        float mx = -INFINITY;
        for (int c = 0; c < 32; ++c)
            if (first_key + c < m) mx = fmaxf(mx, s_row[c] * scale_log2);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float new_max = fmaxf(row_max, mx);
        const float correction = exp2f(row_max - new_max);
        float sum = 0.f;
        T* p_row = s_pw + r * LDP + half_row * 32;
        for (int c = 0; c < 32; ++c) {
            const float p = first_key + c < m ? exp2f(s_row[c] * scale_log2 - new_max) : 0.f;
            sum += p;
            p_row[c] = T(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        row_sum = row_sum * correction + sum;
        row_max = new_max;
        float* o_row_s = s_ow + r * LDO + half_row * (D / 2);
        for (int c = 0; c < D / 2; ++c) o_row_s[c] *= correction;
        __syncwarp();
        for (int jn = 0; jn < D / 16; ++jn) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, s_ow + jn * 16, LDO, wmma::mem_row_major);
            for (int kk = 0; kk < BC / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
                wmma::load_matrix_sync(fa, s_pw + kk * 16, LDP);
                wmma::load_matrix_sync(fb, s_v + kk * 16 * LD + jn * 16, LD);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(s_ow + jn * 16, acc, LDO, wmma::mem_row_major);
        }
        __syncwarp();
    }
    const uint32_t row = q0 + warp * 16 + r;
    if (row < n) {
        const float inv = 1.f / row_sum;
        for (int c = half_row * (D / 2); c < (half_row + 1) * (D / 2) && c < (int)d; ++c)
            ob[(size_t)row * o_row + c] = T(s_ow[r * LDO + c] * inv);
    }
}

#define FOR_EACH_DTYPE(M) M(f32, float) M(f16, __half) M(bf16, __nv_bfloat16)

#define GROUP_NORM(NAME, T)                                                                    \
    extern "C" __global__ void group_norm_##NAME(const T* x, const T* w, const T* b, T* y,    \
                                                 uint32_t group_len, uint32_t groups,          \
                                                 uint32_t channels_per_group, uint32_t inner,  \
                                                 float eps, int silu) {                        \
        group_norm<T>(x, w, b, y, group_len, groups, channels_per_group, inner, eps, silu);    \
    }
#define SCALED_SOFTMAX(NAME, T)                                                                \
    extern "C" __global__ void scaled_softmax_##NAME(const T* x, T* y, uint32_t cols,         \
                                                     float scale) {                            \
        scaled_softmax<T>(x, y, cols, scale);                                                  \
    }
#define SCALED_SOFTMAX_CACHED(NAME, T)                                                         \
    extern "C" __global__ void scaled_softmax_cached_##NAME(const T* x, T* y, uint32_t cols,  \
                                                            float scale) {                     \
        scaled_softmax_cached<T>(x, y, cols, scale);                                           \
    }
#define GEGLU(NAME, T)                                                                         \
    extern "C" __global__ void geglu_##NAME(const T* h, T* y, uint32_t f, size_t n) {         \
        geglu<T>(h, y, f, n);                                                                  \
    }
FOR_EACH_DTYPE(GROUP_NORM)
FOR_EACH_DTYPE(SCALED_SOFTMAX)
FOR_EACH_DTYPE(SCALED_SOFTMAX_CACHED)
FOR_EACH_DTYPE(GEGLU)
#define IM2COL(NAME, T)                                                                        \
    extern "C" __global__ void im2col_##NAME(const T* x, T* col, ConvGeom g, size_t image_len, \
                                             uint32_t first, uint32_t band, uint32_t rows) {   \
        im2col<T>(x, col, g, image_len, first, band, rows);                                    \
    }
#define BIAS_FILL(NAME, T)                                                                     \
    extern "C" __global__ void bias_fill_##NAME(const T* b, T* y, uint32_t rows, uint32_t cols, \
                                                uint32_t channels, uint32_t row_step,          \
                                                uint32_t col_step) {                           \
        bias_fill<T>(b, y, rows, cols, channels, row_step, col_step);                          \
    }
FOR_EACH_DTYPE(IM2COL)
FOR_EACH_DTYPE(BIAS_FILL)
#define FLASH(NAME, T, D)                                                                      \
    extern "C" __global__ void flash_attention_##NAME##_##D(                                  \
        const T* q, const T* k, const T* v, T* o, uint32_t n, uint32_t m, uint32_t d,         \
        uint32_t heads, uint32_t q_row, uint32_t k_row, uint32_t v_row, uint32_t o_row,       \
        float scale_log2) {                                                                    \
        flash_attention<T, D>(q, k, v, o, n, m, d, heads, q_row, k_row, v_row, o_row,          \
                              scale_log2);                                                     \
    }
#define FLASH_SIZES(NAME, T)                                                                   \
    FLASH(NAME, T, 16) FLASH(NAME, T, 32) FLASH(NAME, T, 48) FLASH(NAME, T, 64)               \
    FLASH(NAME, T, 80) FLASH(NAME, T, 96) FLASH(NAME, T, 112) FLASH(NAME, T, 128)
FLASH_SIZES(f16, __half)
FLASH_SIZES(bf16, __nv_bfloat16)
#define GROUP_NORM_SPLIT(NAME, T)                                                              \
    extern "C" __global__ void group_norm_partial_##NAME(const T* x, float* stats,            \
                                                         uint32_t group_len, uint32_t chunk) { \
        group_norm_partial<T>(x, stats, group_len, chunk);                                     \
    }                                                                                          \
    extern "C" __global__ void group_norm_apply_##NAME(                                        \
        const T* x, const T* w, const T* b, const float* mean_rstd, T* y, uint32_t rows,       \
        uint32_t inner, uint32_t channels, uint32_t channels_per_group, int silu) {            \
        group_norm_apply<T>(x, w, b, mean_rstd, y, rows, inner, channels, channels_per_group,  \
                            silu);                                                             \
    }
FOR_EACH_DTYPE(GROUP_NORM_SPLIT)
#define CONV_DIRECT(NAME, T)                                                                   \
    extern "C" __global__ void conv_direct_##NAME(const T* x, const T* w, const T* b, T* y,    \
                                                  ConvGeom g, uint32_t cout, uint32_t ho) {    \
        conv_direct<T>(x, w, b, y, g, cout, ho);                                               \
    }
FOR_EACH_DTYPE(CONV_DIRECT)
