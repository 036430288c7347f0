//! Launches the fused CUDA kernels (`cuda/kernels.cu`, compiled to PTX by build.rs) behind the
//! `cuda_fwd` of the ops that have them: GroupNorm(+SiLU) and LayerNorm, the attention softmax
//! with its scale folded in, and GEGLU. One pass each over the activation, in the input's dtype
//! (f32, f16 or bf16) with f32 arithmetic, instead of candle's chains of generic kernels (the
//! norms alone were a dozen full-tensor passes in f32). Inference only: with gradients tracked
//! the callers take the generic ops, whose backward candle knows.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, WithDType};

use super::group_norm::GroupNormOp;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "diffuse_models";

/// Runs `f` with the element type of `dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F16 => $f::<half::f16>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            d => bail!("no fused CUDA kernel for {d:?}"),
        }
    };
}

fn contiguous(l: &Layout, what: &str) -> Result<()> {
    if !l.is_contiguous() {
        bail!("{what}: the fused CUDA kernels take contiguous tensors");
    }
    Ok(())
}

fn u32_arg(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} exceeds u32")))
}

/// Threads per block for a per-row (per-group) kernel over `len` values: whole warps, enough
/// to keep a row's loads in flight without idling most of a block on short rows.
fn row_threads(len: usize) -> u32 {
    match len {
        0..=128 => 32,
        129..=1024 => 128,
        1025..=16384 => 256,
        _ => 1024,
    }
}

fn launch_config(blocks: usize, threads: u32, what: &str) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (u32_arg(blocks, what)?, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// [`GroupNormOp`] over `x` `(B, C, *)`: GroupNorm (a LayerNorm over rows of `C` is `x`
/// `(rows, C, 1)` with one group), then `w`/`b` per channel and SiLU when the op says so.
pub(crate) fn group_norm(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    op: &GroupNormOp,
) -> Result<(CudaStorage, Shape)> {
    for ((s, l), what) in [(x, "group norm input"), (w, "weight"), (b, "bias")] {
        contiguous(l, what)?;
        if s.dtype() != x.0.dtype() {
            bail!("group norm: the {what} must be in the input's dtype");
        }
    }
    let dims = x.1.shape().dims();
    let groups = op.num_groups;
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        bail!("group norm: {groups} groups for input {dims:?}");
    }
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        (x, lx): (&CudaStorage, &Layout),
        (w, lw): (&CudaStorage, &Layout),
        (b, lb): (&CudaStorage, &Layout),
        op: &GroupNormOp,
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let dims = lx.shape().dims();
        let inner: usize = dims[2..].iter().product();
        let cpg = dims[1] / op.num_groups;
        let (n, group_len) = (lx.shape().elem_count(), cpg * inner);
        // SAFETY: the kernel writes every element (each block its whole group).
        let out = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            let func = dev.get_or_load_custom_func(
                &format!("group_norm_{}", T::DTYPE.as_str()),
                MODULE,
                PTX,
            )?;
            let xs = x.as_cuda_slice::<T>()?.slice(lx.start_offset()..);
            let ws = w.as_cuda_slice::<T>()?.slice(lw.start_offset()..);
            let bs = b.as_cuda_slice::<T>()?.slice(lb.start_offset()..);
            let (len, g) = (u32_arg(group_len, "group size")?, op.num_groups as u32);
            let (cpg, inner) = (cpg as u32, u32_arg(inner, "spatial size")?);
            let (eps, silu) = (op.eps as f32, op.silu as i32);
            let cfg = launch_config(n / group_len, row_threads(group_len), "groups")?;
            let mut builder = func.builder();
            builder.arg(&xs).arg(&ws).arg(&bs).arg(&out);
            builder.arg(&len).arg(&g).arg(&cpg).arg(&inner);
            builder.arg(&eps).arg(&silu);
            // SAFETY: the argument list matches the kernel's signature; every index the kernel
            // reads is below `n` (input) or `C` (weight, bias), checked above.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let out = with_dtype!(x.0.dtype(), run(x, w, b, op))?;
    Ok((out, x.1.shape().clone()))
}

/// The longest softmax row kept in shared memory (48 KiB of f32).
const CACHED_ROW: usize = 12288;

/// `softmax(scale · x)` over the last dimension.
pub(crate) fn scaled_softmax(
    x: &CudaStorage,
    lx: &Layout,
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    contiguous(lx, "softmax input")?;
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        lx: &Layout,
        scale: f64,
    ) -> Result<CudaStorage> {
        let dev = x.device();
        let n = lx.shape().elem_count();
        let cols = lx.shape().dims().last().copied().unwrap_or(1);
        // SAFETY: the kernel writes every element (each block its whole row).
        let out = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            // Rows that fit the default 48 KiB of shared memory as f32 are read once.
            let cached = cols <= CACHED_ROW;
            let kind = if cached {
                "scaled_softmax_cached"
            } else {
                "scaled_softmax"
            };
            let func =
                dev.get_or_load_custom_func(&format!("{kind}_{}", T::DTYPE.as_str()), MODULE, PTX)?;
            let xs = x.as_cuda_slice::<T>()?.slice(lx.start_offset()..);
            let (c, scale) = (u32_arg(cols, "softmax row")?, scale as f32);
            let mut cfg = launch_config(n / cols, row_threads(cols), "softmax rows")?;
            if cached {
                cfg.shared_mem_bytes = (cols * std::mem::size_of::<f32>()) as u32;
            }
            let mut builder = func.builder();
            builder.arg(&xs).arg(&out).arg(&c).arg(&scale);
            // SAFETY: the argument list matches the kernel's signature; rows · cols = n.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let out = with_dtype!(x.dtype(), run(x, lx, scale))?;
    Ok((out, lx.shape().clone()))
}

/// GEGLU over rows of `2f` values: `(…, 2f)` → `(…, f)`.
pub(crate) fn geglu(h: &CudaStorage, lh: &Layout) -> Result<(CudaStorage, Shape)> {
    contiguous(lh, "geglu input")?;
    let dims = lh.shape().dims();
    let last = dims.last().copied().unwrap_or(0);
    if !last.is_multiple_of(2) {
        bail!("geglu: the last dimension ({last}) must be even");
    }
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        h: &CudaStorage,
        lh: &Layout,
    ) -> Result<CudaStorage> {
        let dev = h.device();
        let n = lh.shape().elem_count() / 2;
        let f = lh.shape().dims().last().copied().unwrap_or(0) / 2;
        // SAFETY: the grid-stride loop writes every element below `n`.
        let out = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            let func =
                dev.get_or_load_custom_func(&format!("geglu_{}", T::DTYPE.as_str()), MODULE, PTX)?;
            let hs = h.as_cuda_slice::<T>()?.slice(lh.start_offset()..);
            let (f, count) = (u32_arg(f, "geglu width")?, n);
            let cfg = launch_config(n.div_ceil(256).min(65_535), 256, "geglu")?;
            let mut builder = func.builder();
            builder.arg(&hs).arg(&out).arg(&f).arg(&count);
            // SAFETY: the argument list matches the kernel's signature; the input has 2n values.
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let out = with_dtype!(h.dtype(), run(h, lh))?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank ≥ 1") = last / 2;
    Ok((out, Shape::from(out_dims)))
}

/// The default memory pool of `dev`'s GPU (the one candle's stream-ordered allocations use),
/// with `dev`'s context made current on this thread.
fn default_pool(
    dev: &candle_core::CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(candle_core::Error::wrap)?;
    let mut pool = std::ptr::null_mut();
    // SAFETY: a driver call with a valid out-pointer, on the context made current above.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(candle_core::Error::wrap)?;
    Ok(pool)
}

/// Keeps memory freed on `dev` in CUDA's stream-ordered pool for the next allocations, instead
/// of handing it back to the driver at every synchronisation (the pool's default release
/// threshold is zero). A denoising loop frees and allocates the same activations every step;
/// like PyTorch's caching allocator, the memory then stays with the process.
pub(crate) fn keep_freed_memory(dev: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_pool(dev)?;
    let mut threshold = u64::MAX;
    // SAFETY: the attribute takes a pointer to a u64.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .map_err(candle_core::Error::wrap)
}

/// Hands the memory the pool of `dev` keeps back to the driver, once the device is idle
/// (PyTorch's `empty_cache`).
pub(crate) fn release_freed_memory(dev: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::backend::BackendDevice;
    dev.synchronize()?;
    let pool = default_pool(dev)?;
    // SAFETY: trims only memory no allocation holds.
    unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuMemPoolTrimTo(pool, 0) }
        .result()
        .map_err(candle_core::Error::wrap)
}
