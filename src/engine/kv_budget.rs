//! Sizing and allocating a model's paged KV cache: bytes per block on its device, the
//! default budget when none is set, and the memory the system has available.

use crate::model::{CpuKvCache, KvCache, Model};

use super::EngineError;

/// Bytes of one KV block on the CPU cache (K and V, f32, every layer).
pub(super) fn block_bytes(model: &Model, block_size: usize) -> usize {
    #[cfg(feature = "cuda")]
    if model.decoder.device().is_cuda() {
        return crate::model::cuda::CudaKvCache::block_bytes(model.config(), block_size);
    }
    let c = model.config();
    2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * std::mem::size_of::<f32>()
}

/// The KV cache budget without `WICK_KV_CACHE_BYTES`: on a GPU, 90% of its free memory
/// after the weights (activations need the rest); on the CPU, `fraction` of what the
/// system has available.
pub(super) fn default_cache_bytes(model: &Model, fraction: f64) -> usize {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = model.decoder.device() {
        return match crate::model::cuda::free_memory(d) {
            Ok(free) => (free as f64 * 0.9) as usize,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read free GPU memory; 1 GiB KV cache");
                1 << 30
            }
        };
    }
    #[cfg(not(feature = "cuda"))]
    let _ = model;
    (available_memory() as f64 * fraction.clamp(0.0, 1.0)) as usize
}

/// The paged KV cache on the model's device.
pub(super) fn new_cache(
    model: &Model,
    num_blocks: usize,
    block_size: usize,
) -> Result<Box<dyn KvCache + Send>, EngineError> {
    #[cfg(feature = "cuda")]
    if model.decoder.device().is_cuda() {
        let c = crate::model::cuda::CudaKvCache::new(
            model.config(),
            num_blocks,
            block_size,
            model.decoder.device(),
        )
        .map_err(EngineError::Cache)?;
        return Ok(Box::new(c));
    }
    Ok(Box::new(CpuKvCache::new(
        model.config(),
        num_blocks,
        block_size,
    )))
}

/// Memory available now, from /proc/meminfo; a conservative guess elsewhere.
pub fn available_memory() -> usize {
    const FALLBACK: usize = 1 << 30;
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return FALLBACK;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(FALLBACK, |kb| kb * 1024)
}
