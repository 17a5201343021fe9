//! The CUDA backend's own kernels (kernels/*.cu): loading their PTX onto a candle
//! `CudaDevice`, safe launch wrappers over candle tensors ([`ops`]), and the paged KV cache
//! that runs on them ([`CudaKvCache`]). Built only with `--features cuda`.
//!
//! build.rs compiles every kernels/*.cu to PTX for each architecture asked for (default
//! sm_75 and sm_86: T4 and A10); at run time the newest PTX the GPU can take is loaded once
//! per device and module, and the driver JIT-compiles it. Everything is fp16 in memory with
//! fp32 arithmetic, since T4 has no bf16.

mod kv_cache;
pub mod ops;

pub use kv_cache::CudaKvCache;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, DevicePtr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, DType, Device, Storage, Tensor};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/wick_kernels.rs"));
}

/// A kernel launch that cannot go ahead, or failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {what} is on {device:?}, not on a CUDA device")]
    NotCuda {
        op: &'static str,
        what: &'static str,
        device: candle_core::DeviceLocation,
    },
    #[error("{op}: {what} has dtype {got:?}, expected {want:?}")]
    DType {
        op: &'static str,
        what: &'static str,
        got: DType,
        want: DType,
    },
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error(
        "no PTX of kernel module '{module}' for compute capability {cc} \
         (this build has {built:?}; rebuild with WICK_CUDA_ARCHS)"
    )]
    NoPtx {
        module: &'static str,
        cc: u32,
        built: Vec<u32>,
    },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

fn driver(e: impl std::fmt::Display) -> KernelError {
    KernelError::Driver(e.to_string())
}

/// The compute capability of `dev` as major * 10 + minor (7.5 -> 75).
pub fn compute_capability(dev: &CudaDevice) -> Result<u32> {
    let (major, minor) = dev
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(driver)?;
    Ok((major * 10 + minor) as u32)
}

/// Free memory on `dev`'s GPU, in bytes.
pub fn free_memory(dev: &CudaDevice) -> Result<usize> {
    let (free, _total) = dev.cuda_stream().context().mem_get_info().map_err(driver)?;
    Ok(free)
}

/// The architectures this build carries PTX for.
pub fn built_archs() -> Vec<u32> {
    let mut a: Vec<u32> = ptx::PTX.iter().map(|&(_, cc, _)| cc).collect();
    a.sort_unstable();
    a.dedup();
    a
}

/// Loads (once per device) the newest PTX of `module` that `dev` can run and returns `name`.
fn func(dev: &CudaDevice, module: &'static str, name: &str) -> Result<CudaFunction> {
    let cc = compute_capability(dev)?;
    let (_, arch, src) = ptx::PTX
        .iter()
        .filter(|&&(m, a, _)| m == module && a <= cc)
        .max_by_key(|&&(_, a, _)| a)
        .ok_or_else(|| KernelError::NoPtx {
            module,
            cc,
            built: built_archs(),
        })?;
    Ok(dev
        .get_or_load_custom_func(name, &format!("wick_{module}_sm{arch}"), src)?
        .into_cuda_function())
}

/// The CUDA device `t` lives on.
fn cuda_device<'a>(t: &'a Tensor, op: &'static str, what: &'static str) -> Result<&'a CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d),
        other => Err(KernelError::NotCuda {
            op,
            what,
            device: other.location(),
        }),
    }
}

fn check_dtype(t: &Tensor, want: DType, op: &'static str, what: &'static str) -> Result<()> {
    if t.dtype() != want {
        return Err(KernelError::DType {
            op,
            what,
            got: t.dtype(),
            want,
        });
    }
    Ok(())
}

fn shape_err(op: &'static str, msg: String) -> KernelError {
    KernelError::Shape { op, msg }
}

/// The device address of `t`'s first element. `t` must be of dtype `T`; the caller checks
/// its layout (contiguity, strides) and keeps `t` alive until the launch is queued.
/// candle runs every op of a device on one stream, so stream order covers the rest.
fn dev_ptr<T: CudaDType + candle_core::WithDType>(
    t: &Tensor,
    stream: &CudaStream,
    op: &'static str,
    what: &'static str,
) -> Result<u64> {
    check_dtype(t, T::DTYPE, op, what)?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(KernelError::NotCuda {
            op,
            what,
            device: t.device().location(),
        });
    };
    let slice = cs.as_cuda_slice::<T>()?;
    let (base, _sync) = slice.device_ptr(stream);
    Ok(base + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
}

/// A fresh tensor on `dev` whose contents the next kernel writes in full (no memset).
fn uninit(dev: &CudaDevice, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    use candle_core::cuda_backend::CudaStorage;
    let n: usize = shape.iter().product();
    // SAFETY: every caller launches a kernel that writes all `n` elements before anything
    // reads them, on the device's one stream.
    let storage = unsafe {
        match dtype {
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<half::f16>(n)?, dev.clone()),
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc::<f32>(n)?, dev.clone()),
            DType::U32 => CudaStorage::wrap_cuda_slice(dev.alloc::<u32>(n)?, dev.clone()),
            other => {
                return Err(shape_err(
                    "alloc",
                    format!("no uninitialised allocation for {other:?}"),
                ))
            }
        }
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}
