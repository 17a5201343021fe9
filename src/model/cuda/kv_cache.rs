//! The paged KV cache on a CUDA device: per layer, K and V as fp16
//! `[num_blocks, block_size, kv_heads, head_dim]` tensors allocated once, written by
//! `reshape_and_cache` and read by the paged attention kernel.

use candle_core::{DType, Device, Tensor};

use super::ops::{self, PagedAttention, Split};
use crate::model::attention::{check_query, Batch, KvCache};
use crate::model::config::ArchConfig;
use crate::model::{Error, Result};

/// A step's metadata on the device, shared by every layer of that step.
struct StepMeta {
    /// Cache slot of each batch token.
    slots: Tensor,
    /// `[seqs, max_blocks]`, each sequence's blocks padded with 0.
    block_tables: Tensor,
    /// Per batch token: its sequence's row in `block_tables`, and positions it sees.
    query_seq: Tensor,
    query_ctx: Tensor,
    max_context: usize,
}

/// The paged KV cache on a CUDA device. Every batch token is attended as its own query row
/// (context = its position + 1), so prefill chunks get causal attention from the same
/// decode kernel; a dedicated prefill kernel is future work.
pub struct CudaKvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    kv_heads: usize,
    heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
    device: Device,
    /// The batch the metadata below was built for (layers after the first reuse it).
    step: Option<(Batch, StepMeta)>,
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
        if !device.is_cuda() {
            return Err(Error::Config(format!(
                "CudaKvCache needs a CUDA device, got {:?}",
                device.location()
            )));
        }
        if !ops::ATTENTION_HEAD_DIMS.contains(&cfg.head_dim) {
            return Err(Error::Config(format!(
                "the CUDA attention kernel has no head_dim {} (built for {:?})",
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
            sliding_window: cfg.sliding_window,
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
    fn step_meta(&mut self, batch: &Batch) -> Result<&StepMeta> {
        let fresh = !matches!(&self.step, Some((b, _)) if b == batch);
        if fresh {
            let n = batch.tokens.len();
            let bs = self.block_size;
            let max_blocks = batch
                .seqs
                .iter()
                .map(|s| s.context_len.div_ceil(bs))
                .max()
                .unwrap_or(0)
                .max(1);
            let mut tables = vec![0u32; batch.seqs.len() * max_blocks];
            let mut slots = Vec::with_capacity(n);
            let mut query_seq = Vec::with_capacity(n);
            let mut query_ctx = Vec::with_capacity(n);
            let mut max_context = 0;
            for (si, s) in batch.seqs.iter().enumerate() {
                let used = s.context_len.div_ceil(bs);
                tables[si * max_blocks..si * max_blocks + used]
                    .copy_from_slice(&s.block_table[..used]);
                let first = s.context_len - s.len;
                for pos in first..s.context_len {
                    let block = s.block_table[pos / bs] as usize;
                    slots.push(u32::try_from(block * bs + pos % bs).map_err(|_| {
                        Error::Config(format!("cache slot of block {block} beyond u32"))
                    })?);
                    query_seq.push(si as u32);
                    query_ctx.push((pos + 1) as u32);
                }
                max_context = max_context.max(s.context_len);
            }
            let dev = &self.device;
            let meta = StepMeta {
                slots: Tensor::from_vec(slots, n, dev)?,
                block_tables: Tensor::from_vec(tables, (batch.seqs.len(), max_blocks), dev)?,
                query_seq: Tensor::from_vec(query_seq, n, dev)?,
                query_ctx: Tensor::from_vec(query_ctx, n, dev)?,
                max_context,
            };
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
        if n == 0 {
            return Ok(Tensor::zeros((0, heads * hd), DType::F16, &self.device)?);
        }
        // Every layer's batch is checked by the decoder; validate again only when new, so
        // that block ids are known to be inside the cache before slots are written.
        if !matches!(&self.step, Some((b, _)) if b == batch) {
            batch.validate(self.block_size, self.num_blocks)?;
        }
        let f16 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F16)?.contiguous()?) };
        let (q, k, v) = (f16(q)?, f16(k)?, f16(v)?);
        let window = self.sliding_window;
        let scale = 1.0 / (hd as f32).sqrt();
        let (k_cache, v_cache) = (self.k[layer].clone(), self.v[layer].clone());
        let meta = self.step_meta(batch)?;
        ops::reshape_and_cache(&k, &v, &k_cache, &v_cache, &meta.slots)?;
        let out = ops::paged_attention(&PagedAttention {
            q: &q,
            k_cache: &k_cache,
            v_cache: &v_cache,
            block_tables: &meta.block_tables,
            query_seq: &meta.query_seq,
            query_ctx: &meta.query_ctx,
            max_context: meta.max_context,
            sliding_window: window,
            scale,
            split: Split::Auto,
        })?;
        Ok(out.reshape((n, heads * hd))?)
    }
}
