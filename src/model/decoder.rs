//! The one decoder: embedding, N pre-norm attention + SwiGLU blocks, final norm and output
//! projection, for every family `ArchConfig` describes. It runs a packed batch of tokens
//! from many sequences at different positions; attention goes through `KvCache`.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::attention::{Batch, KvCache};
use super::config::ArchConfig;
use super::weights::{Embedding, Linear, WeightSource};
use super::{Error, Result};

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Decoder {
    cfg: ArchConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// Rope tables, [max positions, head_dim / 2].
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
}

impl Decoder {
    /// Loads every tensor the config needs; a missing or malformed one is an error that
    /// names the file and the tensor.
    pub fn load(
        src: &WeightSource,
        cfg: ArchConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let embed = src.embedding(device, dtype, cfg.tie_embeddings)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let norm = |s: &str| src.tensor(&format!("blk.{i}.{s}.weight"), device, dtype);
            layers.push(Layer {
                attn_norm: norm("attn_norm")?,
                q: src.linear(&p("attn_q"), device, dtype, &cfg, Some(cfg.num_heads))?,
                k: src.linear(&p("attn_k"), device, dtype, &cfg, Some(cfg.num_kv_heads))?,
                v: src.linear(&p("attn_v"), device, dtype, &cfg, None)?,
                o: src.linear(&p("attn_output"), device, dtype, &cfg, None)?,
                q_norm: if cfg.qk_norm {
                    Some(norm("attn_q_norm")?)
                } else {
                    None
                },
                k_norm: if cfg.qk_norm {
                    Some(norm("attn_k_norm")?)
                } else {
                    None
                },
                ffn_norm: norm("ffn_norm")?,
                gate: src.linear(&p("ffn_gate"), device, dtype, &cfg, None)?,
                up: src.linear(&p("ffn_up"), device, dtype, &cfg, None)?,
                down: src.linear(&p("ffn_down"), device, dtype, &cfg, None)?,
            });
        }
        let norm = src.tensor("output_norm.weight", device, dtype)?;
        let lm_head = src.lm_head(&cfg, &embed, device, dtype)?;
        let factors = src.rope_freq_factors(device)?;
        let (cos, sin) = rope_tables(&cfg, factors.as_deref(), device, dtype)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            device: device.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &ArchConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one packed step and returns logits `[batch.logits_indices.len(), vocab]` (f32).
    pub fn forward(&self, batch: &Batch, cache: &mut dyn KvCache) -> Result<Tensor> {
        Ok(self.forward_with_sums(batch, cache, &[])?.0)
    }

    /// [`Self::forward`], and for each range of batch rows in `sums` the sum of those rows'
    /// final hidden states (after the last norm, f32): what an embedding pools, one prefill
    /// chunk at a time.
    pub fn forward_with_sums(
        &self,
        batch: &Batch,
        cache: &mut dyn KvCache,
        sums: &[Range<usize>],
    ) -> Result<(Tensor, Vec<Vec<f32>>)> {
        let x = self.trunk(batch, cache)?;
        let eps = self.cfg.rms_norm_eps as f32;
        let mut pooled = Vec::with_capacity(sums.len());
        for r in sums {
            let rows = x.narrow(0, r.start, r.len())?;
            let h = candle_nn::ops::rms_norm(&rows, &self.norm, eps)?.to_dtype(DType::F32)?;
            pooled.push(h.sum(0)?.to_vec1::<f32>()?);
        }
        if batch.logits_indices.is_empty() {
            // A prefill chunk that is not a prompt's last: only the KV cache was wanted.
            let none = Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?;
            return Ok((none, pooled));
        }
        let idx: Vec<u32> = batch.logits_indices.iter().map(|&i| i as u32).collect();
        let x = x.index_select(&Tensor::new(idx.as_slice(), &self.device)?, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        Ok((self.lm_head.forward(&x)?.to_dtype(DType::F32)?, pooled))
    }

    /// Embedding and every block: the residual stream `[tokens, hidden]` before the final
    /// norm.
    fn trunk(&self, batch: &Batch, cache: &mut dyn KvCache) -> Result<Tensor> {
        batch.validate(cache.block_size(), cache.num_blocks())?;
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= self.cos.dim(0)? {
                return Err(Error::Config(format!(
                    "position {p} is beyond the model's context of {} tokens",
                    self.cos.dim(0)?
                )));
            }
        }
        let n = batch.tokens.len();
        let (heads, kv_heads, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let ids = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let pos = Tensor::new(batch.positions.as_slice(), &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let eps = self.cfg.rms_norm_eps as f32;

        let mut x = self.embed.forward(&ids)?.to_dtype(self.dtype)?;
        for (li, l) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &l.attn_norm, eps)?;
            let mut q = l.q.forward(&h)?.reshape((n, heads, hd))?;
            let mut k = l.k.forward(&h)?.reshape((n, kv_heads, hd))?;
            let v = l.v.forward(&h)?.reshape((n, kv_heads, hd))?;
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                q = candle_nn::ops::rms_norm(&q, qn, eps)?;
                k = candle_nn::ops::rms_norm(&k, kn, eps)?;
            }
            // rope_thd wants [batch, tokens, heads, dim] with one cos/sin row per token.
            let q = candle_nn::rotary_emb::rope_thd(&q.unsqueeze(0)?.contiguous()?, &cos, &sin)?
                .squeeze(0)?;
            let k = candle_nn::rotary_emb::rope_thd(&k.unsqueeze(0)?.contiguous()?, &cos, &sin)?
                .squeeze(0)?;
            let attn = cache.attend(li, &q, &k, &v, batch)?.to_dtype(self.dtype)?;
            x = (x + l.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &l.ffn_norm, eps)?;
            let act = (candle_nn::ops::silu(&l.gate.forward(&h)?)? * l.up.forward(&h)?)?;
            x = (x + l.down.forward(&act)?)?;
        }
        Ok(x)
    }
}

/// cos/sin of `position * inv_freq` for every position up to the trained context.
fn rope_tables(
    cfg: &ArchConfig,
    freq_factors: Option<&[f32]>,
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    // f32 throughout, as llama.cpp and candle's reference models compute it: quantized
    // activations magnify even last-bit differences in the rotation.
    let theta = cfg.rope_theta as f32;
    let mut inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
        .collect();
    if let Some(s) = &cfg.rope_scaling {
        // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, smooth between.
        let (factor, low, high) = (
            s.factor as f32,
            s.low_freq_factor as f32,
            s.high_freq_factor as f32,
        );
        let old = s.original_max_position_embeddings as f32;
        let (low_wavelen, high_wavelen) = (old / low, old / high);
        for f in inv_freq.iter_mut() {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= factor;
            } else if wavelen >= high_wavelen {
                let smooth = (old / wavelen - low) / (high - low);
                *f = (1.0 - smooth) * *f / factor + smooth * *f;
            }
        }
    } else if let Some(factors) = freq_factors {
        if factors.len() != half {
            return Err(Error::Config(format!(
                "rope_freqs has {} entries, expected {half}",
                factors.len()
            )));
        }
        for (f, d) in inv_freq.iter_mut().zip(factors) {
            *f /= *d;
        }
    }
    let max_pos = cfg.max_position_embeddings;
    let mut angles = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        angles.extend(inv_freq.iter().map(|f| p as f32 * f));
    }
    let angles = Tensor::from_vec(angles, (max_pos, half), device)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}
