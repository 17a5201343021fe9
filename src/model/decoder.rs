//! The one decoder: embedding, N pre-norm attention + SwiGLU blocks, final norm and output
//! projection, for every family `ArchConfig` describes. It runs a packed batch of tokens
//! from many sequences at different positions; attention goes through `KvCache`.
//!
//! Two ways through a layer, chosen by the cache: with our kernel cache (the GPU fast path)
//! the residual add and norm, rotary embedding and SwiGLU activation run on our fused fp16
//! kernels (model::cuda::ops); otherwise only candle's ops run (the CPU path, and the GPU
//! reference path that the boot self-check compares the fast path with).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::attention::{Batch, KvCache};
use super::config::ArchConfig;
use super::cuda::ops::{self, RopePositions};
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
    /// Rope tables, [max positions, head_dim / 2], in the compute dtype (candle's rope) and
    /// in f32 (our rotary kernel).
    cos: Tensor,
    sin: Tensor,
    cos32: Tensor,
    sin32: Tensor,
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
        Self::assemble(
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            factors.as_deref(),
            device,
            dtype,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: ArchConfig,
        embed: Embedding,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Linear,
        rope_factors: Option<&[f32]>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let (cos32, sin32) = rope_tables(&cfg, rope_factors, device)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos: cos32.to_dtype(dtype)?,
            sin: sin32.to_dtype(dtype)?,
            cos32,
            sin32,
            device: device.clone(),
            dtype,
        })
    }

    /// A decoder of `cfg`'s shapes with random dense weights (seeded), scaled so activations
    /// stay near unit size through the layers: what the GPU self-check runs.
    pub fn random(cfg: ArchConfig, device: &Device, dtype: DType, seed: u64) -> Result<Self> {
        let mut w = RandomInit {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            device,
            dtype,
        };
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let (q_out, kv_out) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            layers.push(Layer {
                attn_norm: w.uniform(&[hidden], 0.2, 1.0)?,
                q: w.dense(q_out, hidden, cfg.qkv_bias)?,
                k: w.dense(kv_out, hidden, cfg.qkv_bias)?,
                v: w.dense(kv_out, hidden, cfg.qkv_bias)?,
                o: w.dense(hidden, q_out, false)?,
                q_norm: None,
                k_norm: None,
                ffn_norm: w.uniform(&[hidden], 0.2, 1.0)?,
                gate: w.dense(inter, hidden, false)?,
                up: w.dense(inter, hidden, false)?,
                down: w.dense(hidden, inter, false)?,
            });
        }
        let table = w.uniform(&[cfg.vocab_size, hidden], 1.0, 0.0)?;
        let lm_head = Linear::dense(table.clone(), None)?;
        let norm = w.uniform(&[hidden], 0.2, 1.0)?;
        let mut cfg = cfg;
        cfg.tie_embeddings = true;
        cfg.qk_norm = false;
        Self::assemble(
            cfg,
            Embedding::Dense(table),
            layers,
            norm,
            lm_head,
            None,
            device,
            dtype,
        )
    }

    pub fn config(&self) -> &ArchConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs one packed step and returns logits `[batch.logits_indices.len(), vocab]` (f32).
    pub fn forward(&self, batch: &Batch, cache: &mut dyn KvCache) -> Result<Tensor> {
        if cache.runs_kernels() {
            let x = self.trunk_kernels(batch, cache)?;
            if batch.logits_indices.is_empty() {
                return Ok(Tensor::zeros(
                    (0, self.cfg.vocab_size),
                    DType::F32,
                    &self.device,
                )?);
            }
            let idx: Vec<u32> = batch.logits_indices.iter().map(|&i| i as u32).collect();
            let x = x.index_select(&Tensor::new(idx.as_slice(), &self.device)?, 0)?;
            return Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?);
        }
        let x = self.trunk(batch, cache)?;
        if batch.logits_indices.is_empty() {
            // A prefill chunk that is not a prompt's last: only the KV cache was wanted.
            return Ok(Tensor::zeros(
                (0, self.cfg.vocab_size),
                DType::F32,
                &self.device,
            )?);
        }
        let idx: Vec<u32> = batch.logits_indices.iter().map(|&i| i as u32).collect();
        let x = x.index_select(&Tensor::new(idx.as_slice(), &self.device)?, 0)?;
        let eps = self.cfg.rms_norm_eps as f32;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// The final hidden state of every token of the batch, after the last norm,
    /// `[tokens, hidden]` (f32): what embeddings pool.
    pub fn hidden_states(&self, batch: &Batch, cache: &mut dyn KvCache) -> Result<Tensor> {
        if cache.runs_kernels() {
            return Ok(self.trunk_kernels(batch, cache)?.to_dtype(DType::F32)?);
        }
        let x = self.trunk(batch, cache)?;
        let eps = self.cfg.rms_norm_eps as f32;
        Ok(candle_nn::ops::rms_norm(&x, &self.norm, eps)?.to_dtype(DType::F32)?)
    }

    fn check_batch(&self, batch: &Batch, cache: &dyn KvCache) -> Result<()> {
        batch.validate(cache.block_size(), cache.num_blocks())?;
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= self.cos.dim(0)? {
                return Err(Error::Config(format!(
                    "position {p} is beyond the model's context of {} tokens",
                    self.cos.dim(0)?
                )));
            }
        }
        Ok(())
    }

    /// The fast path: every block on our fused fp16 kernels and `cache` (our paged
    /// attention), returning the final-normed hidden states `[tokens, hidden]` (f16). The
    /// residual stream is one tensor updated in place: each `add_rms_norm` adds the previous
    /// block's output into it and normalizes for the next.
    fn trunk_kernels(&self, batch: &Batch, cache: &mut dyn KvCache) -> Result<Tensor> {
        self.check_batch(batch, cache)?;
        if self.dtype != DType::F16 {
            return Err(Error::Config(format!(
                "the kernel path runs fp16 models, this one computes in {:?}",
                self.dtype
            )));
        }
        let n = batch.tokens.len();
        let (heads, kv_heads, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let ids = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let positions = RopePositions::new(&batch.positions, self.cos32.dim(0)?, &self.device)?;
        let eps = self.cfg.rms_norm_eps as f32;
        // A fresh tensor of our own: the kernels update it in place.
        let residual = self.embed.forward(&ids)?.to_dtype(DType::F16)?.copy()?;
        let mut delta: Option<Tensor> = None;
        for (li, l) in self.layers.iter().enumerate() {
            let h = ops::add_rms_norm(&residual, delta.as_ref(), &l.attn_norm, eps)?;
            let mut q = l.q.forward(&h)?.reshape((n, heads, hd))?;
            let mut k = l.k.forward(&h)?.reshape((n, kv_heads, hd))?;
            let v = l.v.forward(&h)?.reshape((n, kv_heads, hd))?;
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                q = candle_nn::ops::rms_norm(&q, qn, eps)?;
                k = candle_nn::ops::rms_norm(&k, kn, eps)?;
            }
            // Projection outputs are fresh tensors: rotating them in place is ours to do.
            let (q, k) = (q.contiguous()?, k.contiguous()?);
            ops::rope_neox_inplace(&q, &k, &self.cos32, &self.sin32, &positions)?;
            let attn = cache.attend(li, &q, &k, &v, batch)?;
            let o = l.o.forward(&attn)?.contiguous()?;
            let h = ops::add_rms_norm(&residual, Some(&o), &l.ffn_norm, eps)?;
            let act = ops::silu_mul(
                &l.gate.forward(&h)?.contiguous()?,
                &l.up.forward(&h)?.contiguous()?,
            )?;
            delta = Some(l.down.forward(&act)?.contiguous()?);
        }
        Ok(ops::add_rms_norm(
            &residual,
            delta.as_ref(),
            &self.norm,
            eps,
        )?)
    }

    /// Embedding and every block: the residual stream `[tokens, hidden]` before the final
    /// norm.
    fn trunk(&self, batch: &Batch, cache: &mut dyn KvCache) -> Result<Tensor> {
        self.check_batch(batch, cache)?;
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

/// Seeded random weights for [`Decoder::random`], made on the CPU and stored in `dtype`.
struct RandomInit<'a> {
    rng: rand::rngs::StdRng,
    device: &'a Device,
    dtype: DType,
}

impl RandomInit<'_> {
    /// Uniform in `offset +- scale`.
    fn uniform(&mut self, shape: &[usize], scale: f32, offset: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| offset + scale * self.rng.random_range(-1.0f32..1.0))
            .collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(self.device)?)
    }

    /// An `[out, inp]` projection uniform in `+-sqrt(3 / inp)`: unit variance out of it.
    fn dense(&mut self, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let w = self.uniform(&[out, inp], (3.0 / inp as f32).sqrt(), 0.0)?;
        let b = if bias {
            Some(self.uniform(&[out], 0.1, 0.0)?)
        } else {
            None
        };
        Linear::dense(w, b)
    }
}

/// cos/sin of `position * inv_freq` for every position up to the trained context (f32).
fn rope_tables(
    cfg: &ArchConfig,
    freq_factors: Option<&[f32]>,
    device: &Device,
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
    Ok((angles.cos()?, angles.sin()?))
}
