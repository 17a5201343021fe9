//! Sizing and allocating a model's paged KV cache: bytes per block on its device, the
//! default budget when none is set, and the memory the system has available.

use crate::model::{KvCache, Model};

use super::EngineError;

/// Bytes of one KV block of the model's cache (K and V, every layer).
pub(super) fn block_bytes(model: &Model, block_size: usize) -> usize {
    model.kv_block_bytes(block_size)
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

/// The paged KV cache on the model's device (on a GPU, of the path it serves on).
pub(super) fn new_cache(
    model: &Model,
    num_blocks: usize,
    block_size: usize,
) -> Result<Box<dyn KvCache + Send>, EngineError> {
    model
        .new_kv_cache(num_blocks, block_size)
        .map_err(EngineError::Cache)
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
