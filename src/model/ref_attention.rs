//! The reference path's paged KV cache: attention made only of candle's own ops (scatter into
//! the cache, gathers of each sequence's rows, matmuls, a mask, softmax), on any device
//! candle runs on. Slow, but correct wherever candle is: on a GPU it is what wick serves on
//! when the boot self-check finds our kernels wrong, and what that check compares them with.

use candle_core::{DType, Device, Tensor};

use super::attention::{check_query, refuse_images, Batch, KvCache};
use super::config::ArchConfig;
use super::{Error, Result};

/// The step's gathers, built once and shared by every layer.
struct StepIndex {
    /// `[tokens, kv_heads, head_dim]` u32: each element's cache row (scatter index).
    write: Tensor,
    /// Per sequence: the cache rows of its context `[context_len]`, and per distinct window
    /// of the layers its additive mask `[len, context_len]` (0 where a query row may look,
    /// -inf elsewhere).
    seqs: Vec<(Tensor, Vec<Tensor>)>,
}

/// Per layer, K and V as `[num_blocks * block_size, kv_heads, head_dim]` in the model's
/// dtype, allocated once.
pub struct RefKvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    kv_heads: usize,
    heads: usize,
    head_dim: usize,
    /// The distinct sliding windows of the layers (Gemma 3: its local layers' and None), and
    /// each layer's index into them.
    windows: Vec<Option<usize>>,
    layer_window: Vec<usize>,
    device: Device,
    step: Option<(Batch, StepIndex)>,
}

impl RefKvCache {
    pub fn new(
        cfg: &ArchConfig,
        num_blocks: usize,
        block_size: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        if cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            return Err(Error::Config(format!(
                "{} heads are not a multiple of {} kv heads",
                cfg.num_heads, cfg.num_kv_heads
            )));
        }
        let shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim);
        let alloc = || -> Result<Vec<Tensor>> {
            (0..cfg.num_layers)
                .map(|_| Ok(Tensor::zeros(shape, dtype, device)?))
                .collect()
        };
        let mut windows = Vec::new();
        let mut layer_window = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let w = cfg.layer_window(l);
            let i = match windows.iter().position(|&x| x == w) {
                Some(i) => i,
                None => {
                    windows.push(w);
                    windows.len() - 1
                }
            };
            layer_window.push(i);
        }
        Ok(Self {
            k: alloc()?,
            v: alloc()?,
            block_size,
            num_blocks,
            kv_heads: cfg.num_kv_heads,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim,
            windows,
            layer_window,
            device: device.clone(),
            step: None,
        })
    }

    fn step_index(&mut self, batch: &Batch) -> Result<&StepIndex> {
        if !matches!(&self.step, Some((b, _)) if b == batch) {
            batch.validate(self.block_size, self.num_blocks)?;
            let bs = self.block_size;
            let row = |table: &[u32], pos: usize| table[pos / bs] * bs as u32 + (pos % bs) as u32;
            let per_row = self.kv_heads * self.head_dim;
            let mut write = Vec::with_capacity(batch.tokens.len() * per_row);
            let mut seqs = Vec::with_capacity(batch.seqs.len());
            for s in &batch.seqs {
                let first = s.context_len - s.len;
                for pos in first..s.context_len {
                    let r = row(&s.block_table, pos);
                    write.extend(std::iter::repeat_n(r, per_row));
                }
                let ctx: Vec<u32> = (0..s.context_len).map(|p| row(&s.block_table, p)).collect();
                let masks = self
                    .windows
                    .iter()
                    .map(|&window| {
                        let mut mask = vec![f32::NEG_INFINITY; s.len * s.context_len];
                        for i in 0..s.len {
                            let pos = first + i;
                            let lo = match window {
                                Some(w) if pos + 1 > w => pos + 1 - w,
                                _ => 0,
                            };
                            mask[i * s.context_len + lo..i * s.context_len + pos + 1].fill(0.0);
                        }
                        Tensor::from_vec(mask, (s.len, s.context_len), &self.device)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                seqs.push((Tensor::from_vec(ctx, s.context_len, &self.device)?, masks));
            }
            let n = batch.tokens.len();
            let write = Tensor::from_vec(write, (n, self.kv_heads, self.head_dim), &self.device)?;
            self.step = Some((batch.clone(), StepIndex { write, seqs }));
        }
        match &self.step {
            Some((_, s)) => Ok(s),
            None => Err(Error::Config("reference KV step index missing".into())),
        }
    }
}

impl KvCache for RefKvCache {
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
        refuse_images(batch)?;
        let dtype = self.k[layer].dtype();
        if n == 0 {
            return Ok(Tensor::zeros((0, heads * hd), dtype, &self.device)?);
        }
        let (kc, vc) = (self.k[layer].clone(), self.v[layer].clone());
        let (kvh, g) = (self.kv_heads, heads / self.kv_heads);
        let scale = 1.0 / (hd as f64).sqrt();
        let wi = self.layer_window[layer];
        let idx = self.step_index(batch)?;
        kc.scatter_set(&idx.write, &k.to_dtype(dtype)?.contiguous()?, 0)?;
        vc.scatter_set(&idx.write, &v.to_dtype(dtype)?.contiguous()?, 0)?;
        let mut outs = Vec::with_capacity(batch.seqs.len());
        for (s, (rows, masks)) in batch.seqs.iter().zip(&idx.seqs) {
            let mask = &masks[wi];
            let ctx = s.context_len;
            // [kv_heads, ctx, d] in f32, each kv head repeated for its `g` query heads.
            let gather = |c: &Tensor| -> Result<Tensor> {
                Ok(c.index_select(rows, 0)?
                    .to_dtype(DType::F32)?
                    .transpose(0, 1)?
                    .unsqueeze(1)?
                    .expand((kvh, g, ctx, hd))?
                    .reshape((heads, ctx, hd))?)
            };
            let (keys, values) = (gather(&kc)?, gather(&vc)?);
            let qs = q
                .narrow(0, s.start, s.len)?
                .to_dtype(DType::F32)?
                .transpose(0, 1)?
                .contiguous()?; // [heads, len, d]
            let scores = (qs.matmul(&keys.t()?.contiguous()?)? * scale)?.broadcast_add(mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = probs.matmul(&values.contiguous()?)?; // [heads, len, d]
            outs.push(o.transpose(0, 1)?.reshape((s.len, heads * hd))?);
        }
        Ok(Tensor::cat(&outs, 0)?.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Activation, Family};
    use crate::model::{CpuKvCache, KvType};

    /// The reference cache against the CPU cache (its own kernels) in f32, with chunked
    /// prefill, decode rows, GQA and a sliding window.
    #[test]
    fn agrees_with_the_cpu_cache() {
        for window in [None, Some(20)] {
            let cfg = ArchConfig {
                family: Family::Qwen2,
                arch_name: "qwen2".into(),
                vocab_size: 10,
                hidden_size: 64,
                intermediate_size: 64,
                num_layers: 2,
                num_heads: 6,
                num_kv_heads: 2,
                head_dim: 32,
                rope_theta: 10000.0,
                rope_scaling: None,
                mrope: None,
                rms_norm_eps: 1e-6,
                tie_embeddings: true,
                qkv_bias: false,
                qk_norm: false,
                sliding_window: window,
                full_attention_layers: if window.is_some() {
                    vec![1]
                } else {
                    Vec::new()
                },
                sliding_rope_theta: None,
                activation: Activation::Silu,
                post_norms: false,
                scale_embeddings: false,
                norm_weights_offset: false,
                query_pre_attn_scalar: None,
                final_logit_softcap: None,
                max_position_embeddings: 512,
            };
            let (nb, bs) = (24, 8);
            let dev = Device::Cpu;
            let mut cpu = CpuKvCache::with_type(&cfg, nb, bs, KvType::F32);
            let mut re = RefKvCache::new(&cfg, nb, bs, &dev, DType::F32).expect("cache");
            let tables: Vec<Vec<u32>> = vec![(0..12).rev().collect(), (12..24).collect()];
            let mut cached = [0usize; 2];
            let mut seed = 1u32;
            for step in [[13usize, 4], [1, 30], [1, 1], [9, 0]] {
                let mut batch = Batch::default();
                for s in 0..2 {
                    if step[s] > 0 {
                        batch.push_seq(&vec![0; step[s]], cached[s], tables[s].clone(), true);
                        cached[s] += step[s];
                    }
                }
                let n = batch.tokens.len();
                for layer in 0..2 {
                    let mut rand = |heads: usize| {
                        let v: Vec<f32> = (0..n * heads * 32)
                            .map(|_| {
                                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                                (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
                            })
                            .collect();
                        Tensor::from_vec(v, (n, heads, 32), &dev).expect("tensor")
                    };
                    let (q, k, v) = (rand(6), rand(2), rand(2));
                    let a = cpu.attend(layer, &q, &k, &v, &batch).expect("cpu");
                    let b = re.attend(layer, &q, &k, &v, &batch).expect("ref");
                    let d = (a - b)
                        .expect("diff")
                        .abs()
                        .expect("abs")
                        .flatten_all()
                        .expect("flat")
                        .max(0)
                        .expect("max")
                        .to_scalar::<f32>()
                        .expect("scalar");
                    assert!(
                        d < 1e-5,
                        "window {window:?} step {step:?} layer {layer}: {d}"
                    );
                }
            }
        }
    }
}
