//! Launches the CUDA kernels (`cuda/kernels.cu`, compiled to PTX by build.rs) and cuBLAS behind
//! the `cuda_fwd` of the ops that have them: GroupNorm(+SiLU) and LayerNorm, the attention
//! softmax with its scale folded in, GEGLU, flash attention, convolutions (im2col + GEMM, or
//! direct) and linear layers (a GEMM onto the bias). The fused kernels make one pass over the
//! activation where candle chains generic kernels (the norms alone were a dozen full-tensor
//! passes in f32); the GEMM paths avoid cuDNN's per-call cost and candle-nn's separate bias
//! pass. Input's dtype (f32, f16 or bf16), f32 arithmetic. Inference only: with gradients
//! tracked the callers take the generic ops, whose backward candle knows.

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

/// Checks that an op's `inputs` (each with its name) are contiguous and all in the first one's
/// dtype.
fn contiguous_same_dtype(op: &str, inputs: &[((&CudaStorage, &Layout), &str)]) -> Result<()> {
    let dtype = inputs.first().map(|((s, _), _)| s.dtype());
    for ((s, l), what) in inputs {
        contiguous(l, what)?;
        if Some(s.dtype()) != dtype {
            bail!("{op}: the {what} must be in the {}'s dtype", inputs[0].1);
        }
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

/// The grid of the kernels that walk rows (im2col, bias_fill, group_norm_apply): x covers a row
/// of `row_len` values, `per_thread` each, in blocks of 256 threads; y covers the rows, at most
/// 65,535 blocks of them (the kernels loop over the rest).
fn row_grid(row_len: u32, per_thread: u32, rows: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (row_len.div_ceil(256 * per_thread), rows.clamp(1, 65_535), 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
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
    contiguous_same_dtype("group norm", &[(x, "input"), (w, "weight"), (b, "bias")])?;
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
        if n > 0 && group_len >= SPLIT_GROUP && inner >= 32 {
            return group_norm_split::<T>((x, lx), (w, lw), (b, lb), op, [dims[1], cpg, inner]);
        }
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

/// From this many values per group on, GroupNorm's statistics are taken in chunks of
/// [`GROUP_CHUNK`] by many blocks ([`group_norm_split`]) rather than one block per group.
const SPLIT_GROUP: usize = 32768;
const GROUP_CHUNK: usize = 8192;

/// GroupNorm over large groups in three launches (`group_norm_partial`, `_merge`, `_apply` in
/// kernels.cu): chunk statistics, merged per group, applied element-wise.
fn group_norm_split<T: CudaDType + DeviceRepr + WithDType>(
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    (b, lb): (&CudaStorage, &Layout),
    op: &GroupNormOp,
    [channels, cpg, inner]: [usize; 3],
) -> Result<CudaStorage> {
    let dev = x.device();
    let n = lx.shape().elem_count();
    let group_len = cpg * inner;
    let groups_total = n / group_len;
    let chunks = group_len.div_ceil(GROUP_CHUNK);
    let xs = x.as_cuda_slice::<T>()?.slice(lx.start_offset()..);
    let ws = w.as_cuda_slice::<T>()?.slice(lw.start_offset()..);
    let bs = b.as_cuda_slice::<T>()?.slice(lb.start_offset()..);
    // SAFETY: the partial kernel writes both values of every (group, chunk), the merge both
    // of every group, the apply pass every element.
    let stats = unsafe { dev.alloc::<f32>(groups_total * chunks * 2)? };
    let mean_rstd = unsafe { dev.alloc::<f32>(groups_total * 2)? };
    let out = unsafe { dev.alloc::<T>(n)? };
    let (len32, chunk32) = (u32_arg(group_len, "group size")?, GROUP_CHUNK as u32);
    let (groups32, chunks32) = (u32_arg(groups_total, "groups")?, u32_arg(chunks, "chunks")?);
    let dtype = T::DTYPE.as_str();
    let partial =
        dev.get_or_load_custom_func(&format!("group_norm_partial_{dtype}"), MODULE, PTX)?;
    let cfg = LaunchConfig {
        grid_dim: (chunks32, groups32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut builder = partial.builder();
    builder.arg(&xs).arg(&stats).arg(&len32).arg(&chunk32);
    // SAFETY: the argument list matches the kernel's signature; every chunk lies inside its
    // group, and the grid has one block per (chunk, group) of the statistics buffer.
    unsafe { builder.launch(cfg) }.w()?;
    let merge = dev.get_or_load_custom_func("group_norm_merge", MODULE, PTX)?;
    let mut builder = merge.builder();
    let eps = op.eps as f32;
    builder
        .arg(&stats)
        .arg(&mean_rstd)
        .arg(&groups32)
        .arg(&chunks32);
    builder.arg(&len32).arg(&chunk32).arg(&eps);
    // SAFETY: the argument list matches the kernel's signature; threads past the last group
    // return.
    unsafe { builder.launch(launch_config(groups_total.div_ceil(128), 128, "groups")?) }.w()?;
    let apply = dev.get_or_load_custom_func(&format!("group_norm_apply_{dtype}"), MODULE, PTX)?;
    let rows = u32_arg(n / inner, "rows")?;
    let (inner32, channels32, cpg32) = (
        u32_arg(inner, "spatial size")?,
        u32_arg(channels, "channels")?,
        u32_arg(cpg, "channels per group")?,
    );
    let silu = op.silu as i32;
    let cfg = row_grid(inner32, 1, rows);
    let mut builder = apply.builder();
    builder.arg(&xs).arg(&ws).arg(&bs).arg(&mean_rstd).arg(&out);
    builder
        .arg(&rows)
        .arg(&inner32)
        .arg(&channels32)
        .arg(&cpg32)
        .arg(&silu);
    // SAFETY: the argument list matches the kernel's signature; rows · inner = n, channels
    // index the weight and bias, and row / cpg the groups.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
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

/// Most output channels for the direct convolution kernel (its `CONV_DIRECT_COUT`).
const DIRECT_MAX_COUT: usize = 8;

/// Pixels per thread of the im2col kernel (its `IM2COL_PIXELS`).
const IM2COL_PIXELS: u32 = 4;

/// The `ConvGeom` argument of the im2col kernel: input channels and size, kernel size,
/// stride, padding, dilation and the output width.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvGeom {
    c: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    dil: u32,
    wo: u32,
}

// SAFETY: nine u32 fields, `repr(C)`, laid out as the kernel's struct of nine uint32_t.
unsafe impl DeviceRepr for ConvGeom {}

/// A convolution's stride, padding and dilation, and the most bytes its column buffer may take.
pub(crate) struct ConvSpec {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub max_col_bytes: usize,
}

/// The element types cuBLAS multiplies here, all with f32 accumulation.
trait GemmDType:
    CudaDType + DeviceRepr + WithDType + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
{
    const CUBLAS: candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType;
}
impl GemmDType for f32 {
    const CUBLAS: candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType =
        candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType::CUDA_R_32F;
}
impl GemmDType for half::f16 {
    const CUBLAS: candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType =
        candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType::CUDA_R_16F;
}
impl GemmDType for half::bf16 {
    const CUBLAS: candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType =
        candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType::CUDA_R_16BF;
}

/// `C = A · B + beta · C` for `batch` column-major problems (`A` m×k, stored transposed (k×m)
/// when `transpose_a`; `B` k×n; `C` m×n; strides between the problems in elements, 0 to share
/// one matrix) on the device's cuBLAS handle and stream, accumulating in f32 (TF32 only where
/// candle's f32 GEMMs allow it).
struct Gemm {
    transpose_a: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    stride: [usize; 3],
    batch: usize,
}

impl Gemm {
    /// SAFETY: `a`, `b` and `c` must point to device memory of `T` holding every element the
    /// problems address, on `dev`, and stay alive until the stream has run the GEMM.
    unsafe fn run<T: GemmDType>(
        &self,
        dev: &candle_core::CudaDevice,
        [a, b, c]: [u64; 3],
        beta: f32,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result, sys};
        let int = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} exceeds i32")))
        };
        let long = |v: usize| v as std::ffi::c_longlong;
        let compute =
            if T::DTYPE == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32() {
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            } else {
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            };
        let alpha = 1f32;
        let op = sys::cublasOperation_t::CUBLAS_OP_N;
        let op_a = match self.transpose_a {
            true => sys::cublasOperation_t::CUBLAS_OP_T,
            false => op,
        };
        let blas = dev.cublas_handle();
        result::gemm_strided_batched_ex(
            *blas.handle(),
            op_a,
            op,
            int(self.m, "GEMM rows")?,
            int(self.n, "GEMM columns")?,
            int(self.k, "GEMM depth")?,
            (&alpha as *const f32).cast(),
            a as *const std::ffi::c_void,
            T::CUBLAS,
            int(self.lda, "lda")?,
            long(self.stride[0]),
            b as *const std::ffi::c_void,
            T::CUBLAS,
            int(self.ldb, "ldb")?,
            long(self.stride[1]),
            (&beta as *const f32).cast(),
            c as *mut std::ffi::c_void,
            T::CUBLAS,
            int(self.ldc, "ldc")?,
            long(self.stride[2]),
            int(self.batch, "GEMM batch")?,
            compute,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
        .map_err(candle_core::Error::wrap)
    }
}

/// A 2-D convolution plus bias, NCHW, by GEMMs on cuBLAS: the output starts as the bias and
/// each image's `weight (Cout × C·KH·KW) · columns (C·KH·KW × pixels)` is added to it. The
/// columns are the input itself for a 1×1 stride-1 convolution, else im2col's, built for as
/// many whole images, or else output rows of one image, as fit `max_col_bytes`. cuDNN 9's
/// legacy convolution call costs about a millisecond of CPU per call whatever its size (SD
/// 1.5's UNet makes 95 of them per step); this costs two kernel launches per band.
pub(crate) fn conv2d_gemm(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    spec: &ConvSpec,
) -> Result<(CudaStorage, Shape)> {
    contiguous_same_dtype("convolution", &[(x, "input"), (w, "weight"), (b, "bias")])?;
    let (n, c, h, wd) = x.1.shape().dims4()?;
    let (cout, cin, kh, kw) = w.1.shape().dims4()?;
    if cin != c || b.1.shape().elem_count() != cout || spec.stride == 0 || spec.dilation == 0 {
        bail!(
            "convolution: input {:?}, weight {:?}, bias {:?}, stride {}, dilation {}",
            x.1.shape(),
            w.1.shape(),
            b.1.shape(),
            spec.stride,
            spec.dilation
        );
    }
    let extent = |size: usize, k: usize| {
        (size + 2 * spec.padding)
            .checked_sub(spec.dilation * (k - 1) + 1)
            .map(|v| v / spec.stride + 1)
    };
    let (Some(ho), Some(wo)) = (extent(h, kh), extent(wd, kw)) else {
        bail!("convolution: kernel {kh}×{kw} larger than the padded input {h}×{wd}");
    };
    fn run<T: GemmDType>(
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        spec: &ConvSpec,
        [n, c, h, wd, cout, kh, kw, ho, wo]: [usize; 9],
    ) -> Result<CudaStorage> {
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        let dev = x.0.device();
        let stream = dev.cuda_stream();
        let (pixels, k_len, image_len) = (ho * wo, c * kh * kw, c * h * wd);
        let total = n * cout * pixels;
        // SAFETY: bias_fill writes every element below `total`.
        let mut out = unsafe { dev.alloc::<T>(total)? };
        if total == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        let xs = x.0.as_cuda_slice::<T>()?.slice(x.1.start_offset()..);
        let ws = w.0.as_cuda_slice::<T>()?.slice(w.1.start_offset()..);
        let bs = b.0.as_cuda_slice::<T>()?.slice(b.1.start_offset()..);
        let geom = ConvGeom {
            c: u32_arg(c, "channels")?,
            h: u32_arg(h, "input height")?,
            w: u32_arg(wd, "input width")?,
            kh: u32_arg(kh, "kernel height")?,
            kw: u32_arg(kw, "kernel width")?,
            stride: u32_arg(spec.stride, "stride")?,
            pad: u32_arg(spec.padding, "padding")?,
            dil: u32_arg(spec.dilation, "dilation")?,
            wo: u32_arg(wo, "output width")?,
        };
        if cout <= DIRECT_MAX_COUT {
            let func = dev.get_or_load_custom_func(
                &format!("conv_direct_{}", T::DTYPE.as_str()),
                MODULE,
                PTX,
            )?;
            let (cout32, ho32) = (u32_arg(cout, "channels")?, u32_arg(ho, "output height")?);
            let cfg = LaunchConfig {
                grid_dim: (
                    u32_arg(pixels, "output size")?.div_ceil(128),
                    u32_arg(n, "images")?,
                    1,
                ),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut builder = func.builder();
            builder.arg(&xs).arg(&ws).arg(&bs).arg(&mut out);
            builder.arg(&geom).arg(&cout32).arg(&ho32);
            // SAFETY: the argument list matches the kernel's signature; each thread writes its
            // pixel's `cout` channels of its image and reads inside the input and weight.
            unsafe { builder.launch(cfg) }.w()?;
            return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        let rows = u32_arg(n * cout, "output channels")?;
        let pixels32 = u32_arg(pixels, "output size")?;
        let channels = u32_arg(cout, "channels")?;
        fill_bias(dev, &bs, &mut out, [rows, pixels32], [channels, 1, 0])?;
        if k_len == 0 {
            // No input channels: the output is the bias alone.
            return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        let size = std::mem::size_of::<T>();
        let (out_ptr, out_guard) = out.device_ptr_mut(&stream);
        let (w_ptr, _w_guard) = ws.device_ptr(&stream);
        let (x_ptr, _x_guard) = xs.device_ptr(&stream);
        if (kh, kw, spec.stride, spec.padding) == (1, 1, 1, 0) {
            let gemm = Gemm {
                transpose_a: false,
                m: pixels,
                n: cout,
                k: c,
                lda: pixels,
                ldb: c,
                ldc: pixels,
                stride: [image_len, 0, cout * pixels],
                batch: n,
            };
            // SAFETY: the input holds `n` images of `c × pixels`, the weight `cout × c`, the
            // output `n × cout × pixels`; all three outlive the stream's use (candle frees
            // device memory stream-ordered).
            unsafe { gemm.run::<T>(dev, [x_ptr, w_ptr, out_ptr], 1.0)? };
        } else {
            let budget = (spec.max_col_bytes / size).max(1);
            let (images, band) = match budget / (k_len * pixels) {
                0 => (1, ((budget / (k_len * wo)).max(1) * wo).min(pixels)),
                fit => (fit.min(n), pixels),
            };
            // SAFETY: im2col writes every element of the columns a GEMM reads.
            let mut col = unsafe { dev.alloc::<T>(images * k_len * band)? };
            let (col_ptr, _col_guard) = col.device_ptr_mut(&stream);
            let func =
                dev.get_or_load_custom_func(&format!("im2col_{}", T::DTYPE.as_str()), MODULE, PTX)?;
            for first_image in (0..n).step_by(images) {
                let count = images.min(n - first_image);
                for first in (0..pixels).step_by(band) {
                    let len = band.min(pixels - first);
                    let rows = u32_arg(count * k_len, "im2col rows")?;
                    let x_img = x_ptr + (first_image * image_len * size) as u64;
                    let (first32, len32) = (u32_arg(first, "pixel")?, u32_arg(len, "band")?);
                    let cfg = row_grid(len32, IM2COL_PIXELS, rows);
                    let mut builder = func.builder();
                    builder.arg(&x_img).arg(&col_ptr).arg(&geom).arg(&image_len);
                    builder.arg(&first32).arg(&len32).arg(&rows);
                    // SAFETY: the argument list matches the kernel's signature; the kernel
                    // reads inside `count` images from `x_img` and writes `rows × len` values,
                    // no more than the buffer holds.
                    unsafe { builder.launch(cfg) }.w()?;
                    let gemm = Gemm {
                        transpose_a: false,
                        m: len,
                        n: cout,
                        k: k_len,
                        lda: len,
                        ldb: k_len,
                        ldc: pixels,
                        stride: [k_len * len, 0, cout * pixels],
                        batch: count,
                    };
                    let out_band = out_ptr + ((first_image * cout * pixels + first) * size) as u64;
                    // SAFETY: the columns hold `count` blocks of `k_len × len`, the weight
                    // `cout × k_len`, and the band's rows lie inside the output; the stream
                    // runs this GEMM before the next im2col overwrites the columns.
                    unsafe { gemm.run::<T>(dev, [col_ptr, w_ptr, out_band], 1.0)? };
                }
            }
        }
        drop(out_guard);
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let dims = [n, c, h, wd, cout, kh, kw, ho, wo];
    let out = with_dtype!(x.0.dtype(), run(x, w, b, spec, dims))?;
    Ok((out, Shape::from((n, cout, ho, wo))))
}

/// The `bias_fill` kernel over `out` (on `dev`) as `rows × cols`: value (r, c) is
/// `bias[(r % channels) · row_step + c · col_step]`.
fn fill_bias<T: GemmDType>(
    dev: &candle_core::CudaDevice,
    bias: &candle_core::cuda_backend::cudarc::driver::CudaView<T>,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    [rows, cols]: [u32; 2],
    [channels, row_step, col_step]: [u32; 3],
) -> Result<()> {
    let func =
        dev.get_or_load_custom_func(&format!("bias_fill_{}", T::DTYPE.as_str()), MODULE, PTX)?;
    let cfg = row_grid(cols, 1, rows);
    let mut builder = func.builder();
    builder.arg(bias).arg(out).arg(&rows).arg(&cols);
    builder.arg(&channels).arg(&row_step).arg(&col_step);
    // SAFETY: the argument list matches the kernel's signature; the callers size `out` as
    // `rows × cols` and index the bias below its length (`channels` values per row, or `cols`).
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

/// A linear layer on cuBLAS: `x (rows × k) · wᵀ + bias`, the output filled with the bias first
/// and the GEMM accumulated onto it (candle-nn adds the bias in a separate broadcast kernel,
/// which took longer than the product on SD's layers), or without a bias, the GEMM alone.
pub(crate) fn linear_gemm(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
) -> Result<(CudaStorage, Shape)> {
    let mut inputs = vec![(x, "input"), (w, "weight")];
    inputs.extend(b.map(|b| (b, "bias")));
    contiguous_same_dtype("linear", &inputs)?;
    let (n, k) = w.1.shape().dims2()?;
    let dims = x.1.shape().dims();
    if dims.last() != Some(&k) || b.is_some_and(|b| b.1.shape().elem_count() != n) {
        bail!(
            "linear: input {:?}, weight {:?}, bias {:?}",
            x.1.shape(),
            w.1.shape(),
            b.map(|b| b.1.shape())
        );
    }
    let rows = x.1.shape().elem_count() / k.max(1);
    fn run<T: GemmDType>(
        x: (&CudaStorage, &Layout),
        w: (&CudaStorage, &Layout),
        b: Option<(&CudaStorage, &Layout)>,
        [rows, n, k]: [usize; 3],
    ) -> Result<CudaStorage> {
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        let dev = x.0.device();
        let stream = dev.cuda_stream();
        let total = rows * n;
        let mut out = match b {
            // SAFETY: the bias fill writes every element.
            Some(_) => unsafe { dev.alloc::<T>(total)? },
            // beta = 0: cuBLAS does not read C, but zeros keep an empty product (k = 0) right.
            None => dev.alloc_zeros::<T>(total)?,
        };
        if total == 0 {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        if let Some((bs, lb)) = b {
            let bs = bs.as_cuda_slice::<T>()?.slice(lb.start_offset()..);
            let shape = [u32_arg(rows, "rows")?, u32_arg(n, "features")?];
            fill_bias(dev, &bs, &mut out, shape, [1, 0, 1])?;
        }
        if k > 0 {
            let xs = x.0.as_cuda_slice::<T>()?.slice(x.1.start_offset()..);
            let ws = w.0.as_cuda_slice::<T>()?.slice(w.1.start_offset()..);
            let (out_ptr, _out_guard) = out.device_ptr_mut(&stream);
            let (w_ptr, _w_guard) = ws.device_ptr(&stream);
            let (x_ptr, _x_guard) = xs.device_ptr(&stream);
            // Column-major: outᵀ (n × rows) = w (n × k, stored k × n: transposed) · xᵀ.
            let gemm = Gemm {
                transpose_a: true,
                m: n,
                n: rows,
                k,
                lda: k,
                ldb: k,
                ldc: n,
                stride: [0, 0, 0],
                batch: 1,
            };
            let beta = if b.is_some() { 1.0 } else { 0.0 };
            // SAFETY: x holds `rows × k` values, w `n × k`, out `rows × n`; all outlive the
            // stream's use (candle frees device memory stream-ordered).
            unsafe { gemm.run::<T>(dev, [w_ptr, x_ptr, out_ptr], beta)? };
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let out = with_dtype!(x.0.dtype(), run(x, w, b, [rows, n, k]))?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank ≥ 1") = n;
    Ok((out, Shape::from(out_dims)))
}

/// Attention without the score matrix, f16/bf16 (`flash_attention` in kernels.cu): `q`
/// `(B, N, heads·d)`, `k` and `v` `(B, M, heads·d)`, all contiguous, give `(B, N, heads·d)` with
/// the heads where they came in; `scale` multiplies the scores before the softmax.
pub(crate) fn flash_attention(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    heads: usize,
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    contiguous_same_dtype("flash attention", &[(q, "query"), (k, "key"), (v, "value")])?;
    let (b, n, c) = q.1.shape().dims3()?;
    let (bk, m, ck) = k.1.shape().dims3()?;
    if heads == 0
        || !c.is_multiple_of(heads)
        || (bk, ck) != (b, c)
        || v.1.shape().dims() != [b, m, c]
    {
        bail!(
            "flash attention: query {:?}, key {:?}, value {:?}, {heads} heads",
            q.1.shape(),
            k.1.shape(),
            v.1.shape()
        );
    }
    let d = c / heads;
    let padded = d.div_ceil(16) * 16;
    let max = super::attention::CUDA_FLASH_MAX_HEAD;
    if padded == 0 || padded > max || m == 0 {
        bail!("flash attention: head size {d} (1 to {max}) over {m} keys");
    }
    fn run<T: GemmDType>(
        [q, k, v]: [(&CudaStorage, &Layout); 3],
        [b, n, m, c, heads, padded]: [usize; 6],
        scale: f64,
    ) -> Result<CudaStorage> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
        let dev = q.0.device();
        // SAFETY: the kernel writes every value of every row below n, each head's d columns.
        let out = unsafe { dev.alloc::<T>(b * n * c)? };
        if out.is_empty() {
            return Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        }
        let name = format!("flash_attention_{}_{padded}", T::DTYPE.as_str());
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        // Q, K and V tiles (64 rows each, padded to D + 8), the scores (four warps × 16 rows of
        // 64 + 4 floats), P (16 × 72 per warp) and the output (16 × (D + 4) floats per warp).
        let half = std::mem::size_of::<T>();
        let smem = 192 * (padded + 8) * half + 64 * 68 * 4 + 64 * 72 * half + 64 * (padded + 4) * 4;
        let smem = u32_arg(smem, "shared memory")?;
        let func = func.into_cuda_function();
        func.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(candle_core::Error::wrap)?;
        let qs = q.0.as_cuda_slice::<T>()?.slice(q.1.start_offset()..);
        let ks = k.0.as_cuda_slice::<T>()?.slice(k.1.start_offset()..);
        let vs = v.0.as_cuda_slice::<T>()?.slice(v.1.start_offset()..);
        let (n32, m32) = (u32_arg(n, "queries")?, u32_arg(m, "keys")?);
        let (d32, heads32, row) = (
            u32_arg(c / heads, "head size")?,
            u32_arg(heads, "heads")?,
            u32_arg(c, "row")?,
        );
        let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
        let cfg = LaunchConfig {
            grid_dim: (n32.div_ceil(64), u32_arg(b * heads, "batch × heads")?, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem,
        };
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&qs).arg(&ks).arg(&vs).arg(&out);
        builder.arg(&n32).arg(&m32).arg(&d32).arg(&heads32);
        builder
            .arg(&row)
            .arg(&row)
            .arg(&row)
            .arg(&row)
            .arg(&scale_log2);
        // SAFETY: the argument list matches the kernel's signature; every row the kernel
        // reads or writes is below n (queries, output) or m (keys, values) of its batch, and
        // each head's d columns lie inside a row of `c`.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let dims = [b, n, m, c, heads, padded];
    let out = match q.0.dtype() {
        DType::F16 => run::<half::f16>([q, k, v], dims, scale)?,
        DType::BF16 => run::<half::bf16>([q, k, v], dims, scale)?,
        d => bail!("flash attention takes f16 or bf16, not {d:?}"),
    };
    Ok((out, Shape::from((b, n, c))))
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
