//! The paged KV cache on the kernels' device (a GPU; the CPU execution layer in tests): per layer, K and V as fp16
//! `[num_blocks, block_size, kv_heads, head_dim]` tensors allocated once, written by
//! `reshape_and_cache` and read by the paged attention kernel.

use candle_core::{DType, Device, Tensor};

use super::ops::{self, HeadShape, PagedAttention, PagedMeta, Route, SeqQueries, Split};
use crate::model::attention::{check_query, refuse_images, Batch, KvCache};
use crate::model::config::ArchConfig;
use crate::model::{Error, Result};

/// The paged KV cache on the kernels' device (a GPU, or the CPU execution layer in tests).
/// Every batch token is a query row that sees its own position and those before it (causal
/// prefill chunks); long chunks take the tiled prefill kernel, decode rows and short chunks
/// the decode kernel, in one attention call per layer.
pub struct CudaKvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    kv_heads: usize,
    heads: usize,
    head_dim: usize,
    /// Each layer's sliding window (Gemma 3 mixes sliding and global layers).
    windows: Vec<Option<usize>>,
    device: Device,
    /// The batch the metadata below was built for (layers after the first reuse it).
    step: Option<(Batch, PagedMeta)>,
}

impl CudaKvCache {
    /// Allocates `num_blocks` blocks of `block_size` tokens for every layer on `device`
    /// (zeroed, so unwritten slots never hold NaN).
    pub fn new(
        cfg: &ArchConfig,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        if !super::runs_on(device) {
            return Err(Error::Config(format!(
                "the kernel KV cache cannot run on {:?} in this build",
                device.location()
            )));
        }
        if !ops::ATTENTION_HEAD_DIMS.contains(&cfg.head_dim) {
            return Err(Error::Config(format!(
                "the attention kernels have no head_dim {} (built for {:?})",
                cfg.head_dim,
                ops::ATTENTION_HEAD_DIMS
            )));
        }
        if cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            return Err(Error::Config(format!(
                "{} heads are not a multiple of {} kv heads",
                cfg.num_heads, cfg.num_kv_heads
            )));
        }
        let shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim);
        let alloc = || -> Result<Vec<Tensor>> {
            (0..cfg.num_layers)
                .map(|_| Ok(Tensor::zeros(shape, DType::F16, device)?))
                .collect()
        };
        Ok(Self {
            k: alloc()?,
            v: alloc()?,
            block_size,
            num_blocks,
            kv_heads: cfg.num_kv_heads,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim,
            windows: (0..cfg.num_layers).map(|l| cfg.layer_window(l)).collect(),
            device: device.clone(),
            step: None,
        })
    }

    /// Bytes of one block over all layers (K and V, fp16).
    pub fn block_bytes(cfg: &ArchConfig, block_size: usize) -> usize {
        2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * 2
    }

    /// Bytes held by the cache.
    pub fn size_bytes(&self) -> usize {
        2 * self.k.len() * self.num_blocks * self.block_size * self.kv_heads * self.head_dim * 2
    }

    /// Builds (or reuses) the device metadata of `batch`.
    fn step_meta(&mut self, batch: &Batch) -> Result<&PagedMeta> {
        if !matches!(&self.step, Some((b, _)) if b == batch) {
            let seqs: Vec<SeqQueries> = batch
                .seqs
                .iter()
                .map(|s| SeqQueries {
                    start: s.start,
                    len: s.len,
                    context_len: s.context_len,
                    block_table: s.block_table.clone(),
                })
                .collect();
            let shape = HeadShape {
                heads: self.heads,
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
            };
            let meta = PagedMeta::new(
                &seqs,
                self.num_blocks,
                self.block_size,
                shape,
                Route::Auto,
                &self.device,
            )?;
            self.step = Some((batch.clone(), meta));
        }
        match &self.step {
            Some((_, meta)) => Ok(meta),
            None => Err(Error::Config("KV step metadata missing".into())),
        }
    }
}

impl KvCache for CudaKvCache {
    fn block_size(&self) -> usize {
        self.block_size
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn runs_kernels(&self) -> bool {
        true
    }

    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: &Batch,
    ) -> Result<Tensor> {
        let (n, heads, hd) =
            check_query(q, batch, layer, (self.k.len(), self.heads, self.head_dim))?;
        refuse_images(batch)?;
        if n == 0 {
            return Ok(Tensor::zeros((0, heads * hd), DType::F16, &self.device)?);
        }
        let f16 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F16)?.contiguous()?) };
        let (q, k, v) = (f16(q)?, f16(k)?, f16(v)?);
        let window = self.windows[layer];
        let scale = 1.0 / (hd as f32).sqrt();
        let (k_cache, v_cache) = (self.k[layer].clone(), self.v[layer].clone());
        let meta = self.step_meta(batch)?;
        ops::reshape_and_cache(&k, &v, &k_cache, &v_cache, meta)?;
        let out = ops::paged_attention(&PagedAttention {
            q: &q,
            k_cache: &k_cache,
            v_cache: &v_cache,
            meta,
            sliding_window: window,
            scale,
            split: Split::Auto,
        })?;
        Ok(out.reshape((n, heads * hd))?)
    }
}
