//! Launching kernels/*.cu on a real GPU through candle's cudarc: the fat binaries build.rs
//! embeds (SASS for each architecture built, plus PTX of the newest for later GPUs), device
//! pointers of candle tensors, and the launch itself. Built only with `--features cuda`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaStorage, DeviceId};
use candle_core::{CudaDevice, DType, Storage, Tensor};
use half::f16;

use super::launch::{Arg, Launch};
use super::{shape_err, KernelError, Result};

mod images {
    include!(concat!(env!("OUT_DIR"), "/wick_kernels.rs"));
}

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

/// The architectures this build carries SASS for (PTX of the newest runs on later GPUs).
pub fn built_archs() -> Vec<u32> {
    images::ARCHS.to_vec()
}

type FuncCache = HashMap<(DeviceId, &'static str, String), CudaFunction>;
type ModuleCache = HashMap<(DeviceId, &'static str), Arc<CudaModule>>;

fn poisoned<T>(_: T) -> KernelError {
    KernelError::Driver("kernel cache lock poisoned".into())
}

/// `name` from module `module`, loaded once per device. The module is a fat binary: the
/// driver takes the SASS built for this GPU's architecture when there is one (nothing to
/// JIT-compile at start, as on T4 and A10), else JIT-compiles the PTX once.
fn func(dev: &CudaDevice, module: &'static str, name: &str) -> Result<CudaFunction> {
    static MODULES: OnceLock<Mutex<ModuleCache>> = OnceLock::new();
    static FUNCS: OnceLock<Mutex<FuncCache>> = OnceLock::new();
    let fkey = (dev.id(), module, name.to_string());
    if let Some(f) = FUNCS
        .get_or_init(Default::default)
        .lock()
        .map_err(poisoned)?
        .get(&fkey)
    {
        return Ok(f.clone());
    }
    let cc = compute_capability(dev)?;
    if images::ARCHS.iter().all(|&a| a > cc) {
        return Err(KernelError::NoPtx {
            module,
            cc,
            built: built_archs(),
        });
    }
    let m = {
        let mut ms = MODULES
            .get_or_init(Default::default)
            .lock()
            .map_err(poisoned)?;
        match ms.get(&(dev.id(), module)) {
            Some(m) => m.clone(),
            None => {
                let (_, image) = images::FATBINS
                    .iter()
                    .find(|(m, _)| *m == module)
                    .ok_or_else(|| driver(format!("no kernel module {module} in this build")))?;
                let m = dev
                    .cuda_stream()
                    .context()
                    .load_module(Ptx::from_binary(image.to_vec()))
                    .map_err(|e| driver(format!("loading kernel module {module}: {e}")))?;
                ms.insert((dev.id(), module), m.clone());
                m
            }
        }
    };
    let f = m
        .load_function(name)
        .map_err(|e| driver(format!("{module}.{name}: {e}")))?;
    FUNCS
        .get_or_init(Default::default)
        .lock()
        .map_err(poisoned)?
        .insert(fkey, f.clone());
    Ok(f)
}

/// The device address of `t`'s first element. The caller keeps `t` alive until the launch is
/// queued; candle runs every op of a device on one stream, so stream order covers the rest.
fn dev_ptr_of<T: CudaDType + candle_core::WithDType>(
    t: &Tensor,
    stream: &CudaStream,
    op: &'static str,
    what: &'static str,
) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(KernelError::Device {
            op,
            what,
            device: t.device().location(),
            why: "not a CUDA tensor",
        });
    };
    let slice = cs.as_cuda_slice::<T>()?;
    let (base, _sync) = slice.device_ptr(stream);
    Ok(base + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
}

fn dev_ptr(t: &Tensor, stream: &CudaStream, op: &'static str, what: &'static str) -> Result<u64> {
    match t.dtype() {
        DType::F16 => dev_ptr_of::<f16>(t, stream, op, what),
        DType::F32 => dev_ptr_of::<f32>(t, stream, op, what),
        DType::U32 => dev_ptr_of::<u32>(t, stream, op, what),
        DType::U8 => dev_ptr_of::<u8>(t, stream, op, what),
        other => Err(shape_err(op, format!("{what}: no kernel takes {other:?}"))),
    }
}

/// A fresh tensor on `dev` whose contents the next kernel writes in full (no memset).
pub(super) fn uninit(dev: &CudaDevice, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    // SAFETY: every caller hands the tensor to a kernel that writes all `n` elements before
    // anything reads them, on the device's one stream (the wrappers in ops.rs say which).
    let storage = unsafe {
        match dtype {
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc::<f16>(n)?, dev.clone()),
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

/// A launch argument as the driver takes it.
enum Raw {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Queues `l` on the stream of `dev`.
pub(super) fn launch(dev: &CudaDevice, l: &Launch) -> Result<()> {
    let stream = dev.cuda_stream();
    let f = func(dev, l.module, &l.kernel)?;
    let mut raw = Vec::with_capacity(l.args.len());
    for a in &l.args {
        raw.push(match *a {
            Arg::In(t, what) | Arg::Out(t, what) => Raw::Ptr(dev_ptr(t, &stream, l.op, what)?),
            Arg::Null(_) => Raw::Ptr(0),
            Arg::I32(v) => Raw::I32(v),
            Arg::I64(v) => Raw::I64(v),
            Arg::F32(v) => Raw::F32(v),
        });
    }
    let mut b = stream.launch_builder(&f);
    for r in &raw {
        match r {
            Raw::Ptr(v) => b.arg(v),
            Raw::I32(v) => b.arg(v),
            Raw::I64(v) => b.arg(v),
            Raw::F32(v) => b.arg(v),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: l.grid,
        block_dim: (l.block, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the argument list matches the kernel's C++ signature in count, kinds, widths,
    // element sizes and constness: `Launch` is the same code that the CPU execution layer
    // checks against the compiled kernel's parameter types in `cargo test`, for every
    // wrapper in ops.rs. Every pointer is the device address of a live candle tensor of the
    // dtype the kernel expects, whose extent the wrapper validated against the indices the
    // kernel derives from the other arguments (see each wrapper's checks); the tensors
    // outlive the queued launch through candle's stream-ordered frees.
    unsafe { b.launch(cfg) }.map_err(driver)?;
    Ok(())
}
