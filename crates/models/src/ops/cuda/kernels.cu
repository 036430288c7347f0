// The fused CUDA kernels of diffuse-models, compiled to PTX by build.rs when the `cuda`
// feature is on and launched from ops/cuda.rs. Each kernel exists for f32, f16 and bf16
// (`<name>_<dtype>`); arithmetic is in f32 whatever the storage type, as PyTorch does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
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
    float s = 0.f;
    for (uint32_t i = threadIdx.x; i < group_len; i += blockDim.x) s += load(xg, i);
    const float mean = block_sum(s, shared) / (float)group_len;
    float v = 0.f;
    for (uint32_t i = threadIdx.x; i < group_len; i += blockDim.x) {
        const float d = load(xg, i) - mean;
        v += d * d;
    }
    const float rstd = rsqrtf(block_sum(v, shared) / (float)group_len + eps);
    const uint32_t ch0 = (uint32_t)(g % groups) * channels_per_group;
    for (uint32_t i = threadIdx.x; i < group_len; i += blockDim.x) {
        const uint32_t ch = ch0 + i / inner;
        float o = (load(xg, i) - mean) * rstd * load(w, ch) + load(b, ch);
        if (silu) o = o / (1.f + expf(-o));
        store(yg, i, o);
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
