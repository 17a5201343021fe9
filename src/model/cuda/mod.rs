//! Our GPU kernels (kernels/*.cu) and what runs on them: checked launch wrappers over candle
//! tensors ([`ops`]) and the paged KV cache built on them ([`CudaKvCache`]).
//!
//! The same wrappers run in two places. With `--features cuda`, build.rs compiles every
//! kernels/*.cu to PTX with nvcc and the wrappers launch it on a candle `CudaDevice`.
//! Without it, build.rs compiles the very same sources with the system C++ compiler against
//! the CPU execution layer (kernels/sim/), and the wrappers run them on CPU tensors with CUDA's
//! semantics (blocks, barriers, warp shuffles, fp16 rounding; [`sim`]): that is how `cargo
//! test` executes every kernel without a GPU ([`check`]). Everything is fp16 in memory with
//! fp32 arithmetic, since T4 has no bf16.

pub mod check;
#[cfg(feature = "cuda")]
mod driver;
mod kv_cache;
mod launch;
pub mod ops;
#[cfg(not(feature = "cuda"))]
pub mod sim;

#[cfg(feature = "cuda")]
pub use driver::{built_archs, compute_capability, free_memory};
pub use kv_cache::CudaKvCache;

use candle_core::{DType, Device, Tensor};

/// A kernel launch that cannot go ahead, or failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {what} is on {device:?}, which cannot run the kernels ({why})")]
    Device {
        op: &'static str,
        what: &'static str,
        device: candle_core::DeviceLocation,
        why: &'static str,
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
    /// The CPU execution layer refused the launch or the kernel failed in it (a memory fault,
    /// a divergent barrier, a race between thread orders...).
    #[error("kernel on the CPU execution layer: {0}")]
    Sim(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Whether kernels can run on `device` in this build: CUDA devices with `--features cuda`,
/// the CPU (through the execution layer) without.
pub fn runs_on(device: &Device) -> bool {
    match device {
        Device::Cuda(_) => cfg!(feature = "cuda"),
        Device::Cpu => cfg!(not(feature = "cuda")),
        _ => false,
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

/// A fresh tensor on `dev` whose contents the next kernel writes in full. On a GPU it is
/// not cleared; on the CPU layer it is filled with NaN bit patterns (all ones), so output a
/// kernel forgets to write shows up in the tests.
fn uninit(dev: &Device, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => driver::uninit(d, dtype, shape),
        #[cfg(not(feature = "cuda"))]
        Device::Cpu => sim::poisoned(dtype, shape),
        other => Err(KernelError::Device {
            op: "alloc",
            what: "output",
            device: other.location(),
            why: unsupported_why(),
        }),
    }
}

fn unsupported_why() -> &'static str {
    if cfg!(feature = "cuda") {
        "this build runs them on CUDA devices; the CPU execution layer is in builds without \
         the cuda feature"
    } else {
        "this build has no CUDA support; it runs them on the CPU execution layer"
    }
}
