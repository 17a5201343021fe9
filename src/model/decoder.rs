//! The one decoder: embedding, N pre-norm attention + gated-MLP blocks, final norm and
//! output projection, for every family `ArchConfig` describes (Gemma's extra norms, GELU
//! gate, embedding scale, per-layer windows and rope bases, and logit soft-capping
//! included). It runs a packed batch of tokens from many sequences at different positions;
//! attention goes through `KvCache`.
//!
//! Two ways through a layer, chosen by the cache: with our kernel cache (the GPU fast path)
//! the residual add and norm, rotary embedding and SwiGLU activation run on our fused fp16
//! kernels (model::cuda::ops); otherwise only candle's ops run (the CPU path, and the GPU
//! reference path that the boot self-check compares the fast path with).

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::attention::{Batch, ImageRows, KvCache, IMAGE_ID};
use super::config::{Activation, ArchConfig, RopeScaling};
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
    /// Gemma's norm of the attention output (`post_norms`).
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Gemma's norm of the feed-forward output (`post_norms`).
    post_ffn_norm: Option<Tensor>,
    /// Index into `Decoder::ropes`.
    rope: usize,
}

pub struct Decoder {
    cfg: ArchConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// Rope inverse frequencies `[1, head_dim / 2]` (f32), one per distinct rope of the
    /// layers (Gemma 3: the global layers' and the sliding ones').
    ropes: Vec<Tensor>,
    /// Factor on the queries that turns the attention's 1/sqrt(head_dim) into Gemma's
    /// 1/sqrt(query_pre_attn_scalar), when those differ.
    q_scale: Option<f64>,
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
        let norm_weight = |name: &str| -> Result<Tensor> {
            if cfg.norm_weights_offset {
                // Stored as w for a norm that scales by 1 + w; the sum in f32, as
                // transformers computes it, before any narrowing.
                Ok((src.tensor(name, device, DType::F32)? + 1.0)?.to_dtype(dtype)?)
            } else {
                src.tensor(name, device, dtype)
            }
        };
        let freq_factors = src.rope_freq_factors(device)?;
        let (ropes, sliding_rope) = ropes(&cfg, freq_factors.as_deref(), device)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let norm = |s: &str| norm_weight(&format!("blk.{i}.{s}.weight"));
            let optional = |on: bool, s: &str| on.then(|| norm(s)).transpose();
            layers.push(Layer {
                attn_norm: norm("attn_norm")?,
                q: src.linear(&p("attn_q"), device, dtype, &cfg, Some(cfg.num_heads))?,
                k: src.linear(&p("attn_k"), device, dtype, &cfg, Some(cfg.num_kv_heads))?,
                v: src.linear(&p("attn_v"), device, dtype, &cfg, None)?,
                o: src.linear(&p("attn_output"), device, dtype, &cfg, None)?,
                q_norm: optional(cfg.qk_norm, "attn_q_norm")?,
                k_norm: optional(cfg.qk_norm, "attn_k_norm")?,
                post_attn_norm: optional(cfg.post_norms, "post_attention_norm")?,
                ffn_norm: norm("ffn_norm")?,
                gate: src.linear(&p("ffn_gate"), device, dtype, &cfg, None)?,
                up: src.linear(&p("ffn_up"), device, dtype, &cfg, None)?,
                down: src.linear(&p("ffn_down"), device, dtype, &cfg, None)?,
                post_ffn_norm: optional(cfg.post_norms, "post_ffw_norm")?,
                rope: if cfg.layer_window(i).is_some() {
                    sliding_rope
                } else {
                    0
                },
            });
        }
        let norm = norm_weight("output_norm.weight")?;
        let lm_head = src.lm_head(&cfg, &embed, device, dtype)?;
        Ok(Self::assemble(
            cfg, embed, layers, norm, lm_head, ropes, device, dtype,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: ArchConfig,
        embed: Embedding,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Linear,
        ropes: Vec<Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Self {
        let q_scale = cfg
            .query_pre_attn_scalar
            .filter(|&s| s != cfg.head_dim as f64)
            .map(|s| (cfg.head_dim as f64 / s).sqrt());
        Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            ropes,
            q_scale,
            device: device.clone(),
            dtype,
        }
    }

    /// A decoder of `cfg`'s shapes with random dense weights (seeded), scaled so activations
    /// stay near unit size through the layers: what the GPU self-check runs. Gemma's extra
    /// norms, windows, rope bases and scales follow `cfg`.
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
        let (ropes, sliding_rope) = ropes(&cfg, None, device)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut post_norm = || -> Result<Option<Tensor>> {
                cfg.post_norms
                    .then(|| w.uniform(&[hidden], 0.2, 1.0))
                    .transpose()
            };
            let (post_attn_norm, post_ffn_norm) = (post_norm()?, post_norm()?);
            layers.push(Layer {
                attn_norm: w.uniform(&[hidden], 0.2, 1.0)?,
                q: w.dense(q_out, hidden, cfg.qkv_bias)?,
                k: w.dense(kv_out, hidden, cfg.qkv_bias)?,
                v: w.dense(kv_out, hidden, cfg.qkv_bias)?,
                o: w.dense(hidden, q_out, false)?,
                q_norm: None,
                k_norm: None,
                post_attn_norm,
                ffn_norm: w.uniform(&[hidden], 0.2, 1.0)?,
                gate: w.dense(inter, hidden, false)?,
                up: w.dense(inter, hidden, false)?,
                down: w.dense(hidden, inter, false)?,
                post_ffn_norm,
                rope: if cfg.layer_window(i).is_some() {
                    sliding_rope
                } else {
                    0
                },
            });
        }
        let table = w.uniform(&[cfg.vocab_size, hidden], 1.0, 0.0)?;
        let lm_head = Linear::dense(table.clone(), None)?;
        let norm = w.uniform(&[hidden], 0.2, 1.0)?;
        let mut cfg = cfg;
        cfg.tie_embeddings = true;
        cfg.qk_norm = false;
        Ok(Self::assemble(
            cfg,
            Embedding::Dense(table),
            layers,
            norm,
            lm_head,
            ropes,
            device,
            dtype,
        ))
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

    /// Bytes of weights one decode step reads: every layer's projections and norms, the
    /// final norm and the output head (the embedding table is read one row per token, left
    /// out). With the KV cache read, what bounds single-stream decode speed.
    pub fn step_weight_bytes(&self) -> usize {
        let t = super::weights::tensor_bytes;
        let o = |n: &Option<Tensor>| n.as_ref().map_or(0, t);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|w| w.weight_bytes())
                    .sum::<usize>()
                    + t(&l.attn_norm)
                    + t(&l.ffn_norm)
                    + o(&l.q_norm)
                    + o(&l.k_norm)
                    + o(&l.post_attn_norm)
                    + o(&l.post_ffn_norm)
            })
            .sum();
        layers + t(&self.norm) + self.lm_head.weight_bytes()
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
        let eps = self.cfg.rms_norm_eps as f32;
        // The kernel path's trunk ends with the final norm applied (fused with the last
        // residual add); candle's path leaves it to be applied to the rows wanted.
        let kernels = cache.runs_kernels();
        let x = if kernels {
            self.trunk_kernels(batch, cache)?
        } else {
            self.trunk(batch, cache)?
        };
        let final_norm = |x: &Tensor| -> Result<Tensor> {
            Ok(if kernels {
                x.clone()
            } else {
                candle_nn::ops::rms_norm(x, &self.norm, eps)?
            })
        };
        let mut pooled = Vec::with_capacity(sums.len());
        for r in sums {
            let rows = x.narrow(0, r.start, r.len())?;
            let h = final_norm(&rows)?.to_dtype(DType::F32)?;
            pooled.push(h.sum(0)?.to_vec1::<f32>()?);
        }
        if batch.logits_indices.is_empty() {
            // A prefill chunk that is not a prompt's last: only the KV cache was wanted.
            let none = Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?;
            return Ok((none, pooled));
        }
        let idx: Vec<u32> = batch.logits_indices.iter().map(|&i| i as u32).collect();
        let x = x.index_select(&Tensor::new(idx.as_slice(), &self.device)?, 0)?;
        let x = final_norm(&x)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        let logits = match self.cfg.final_logit_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        };
        Ok((logits, pooled))
    }

    fn check_batch(&self, batch: &Batch, cache: &dyn KvCache) -> Result<()> {
        batch.validate(cache.block_size(), cache.num_blocks())?;
        let max_pos = self.cfg.max_position_embeddings;
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= max_pos {
                return Err(Error::Config(format!(
                    "position {p} is beyond the model's context of {max_pos} tokens"
                )));
            }
        }
        Ok(())
    }

    /// Per rope of the layers, cos and sin of this step's tokens `[tokens, head_dim / 2]`
    /// (f32): positions times inverse frequencies as f32 products (as llama.cpp and candle's
    /// reference models compute them: quantized activations magnify even last-bit
    /// differences in the rotation).
    /// With a multimodal rope and `batch.rope` given, each frequency turns by its axis's
    /// position (the same f32 product, so a text row's angles equal plain rope's).
    fn rotations(&self, batch: &Batch) -> Result<Vec<(Tensor, Tensor)>> {
        let pos = Tensor::new(batch.positions.as_slice(), &self.device)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        self.ropes
            .iter()
            .map(|inv_freq| {
                let angles = match &self.cfg.mrope {
                    Some(m) if !batch.rope.is_empty() => {
                        let freqs = inv_freq.flatten_all()?.to_vec1::<f32>()?;
                        let axes: Vec<usize> = (0..freqs.len()).map(|j| m.axis(j)).collect();
                        let angles: Vec<f32> = batch
                            .rope
                            .iter()
                            .flat_map(|p| {
                                freqs.iter().zip(&axes).map(move |(f, &a)| p[a] as f32 * f)
                            })
                            .collect();
                        Tensor::from_vec(angles, (batch.rope.len(), freqs.len()), &self.device)?
                    }
                    _ => pos.broadcast_mul(inv_freq)?,
                };
                Ok((angles.cos()?, angles.sin()?))
            })
            .collect()
    }

    /// The token embeddings of the batch in the compute dtype (scaled for Gemma).
    /// Rows an image fills take its embeddings as they are (Gemma scales only the token
    /// embeddings).
    fn embed_tokens(&self, batch: &Batch) -> Result<Tensor> {
        let ids: Vec<u32> = batch
            .tokens
            .iter()
            .map(|&t| if t & IMAGE_ID != 0 { 0 } else { t })
            .collect();
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let x = self.embed.forward(&ids)?.to_dtype(self.dtype)?;
        let mut x = if self.cfg.scale_embeddings {
            (x * (self.cfg.hidden_size as f64).sqrt())?
        } else {
            x
        };
        for img in &batch.images {
            let rows = self.image_part(img, 0)?;
            x = x.slice_scatter0(&rows, img.row)?;
        }
        Ok(x)
    }

    /// Part `i` of an image's rows: 0 its input embeddings, `1 + l` the DeepStack feature
    /// added after layer `l` (`None` past the image's last).
    fn image_part(&self, img: &ImageRows, i: usize) -> Result<Tensor> {
        let h = self.cfg.hidden_size;
        Ok(img
            .embeds
            .narrow(1, i * h, h)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?)
    }

    /// Qwen3-VL's DeepStack: after layer `layer`, each image that has a feature for it adds
    /// that to its rows.
    fn deepstack(&self, x: Tensor, batch: &Batch, layer: usize) -> Result<Tensor> {
        let mut x = x;
        for img in &batch.images {
            if img.embeds.dim(1)? >= (layer + 2) * self.cfg.hidden_size {
                let feat = self.image_part(img, layer + 1)?;
                let rows = (x.narrow(0, img.row, feat.dim(0)?)? + feat)?;
                x = x.slice_scatter0(&rows, img.row)?;
            }
        }
        Ok(x)
    }

    /// The fast path: every block on our fused fp16 kernels and `cache` (our paged
    /// attention), returning the final-normed hidden states `[tokens, hidden]` (f16). The
    /// residual stream is one tensor updated in place: each `add_rms_norm` adds the previous
    /// block's output into it and normalizes for the next. Gemma's post-norms, GELU gate and
    /// query scale are candle ops between the kernels.
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
        // The rotary kernel reads table row `positions[t]`; the tables hold this step's
        // tokens' rows, so token t reads row t.
        let rows: Vec<u32> = (0..n as u32).collect();
        let positions = RopePositions::new(&rows, n, &self.device)?;
        let rotations = self.rotations(batch)?;
        let eps = self.cfg.rms_norm_eps as f32;
        // A fresh tensor of our own: the kernels update it in place.
        let residual = self.embed_tokens(batch)?.to_dtype(DType::F16)?.copy()?;
        let mut delta: Option<Tensor> = None;
        for (li, l) in self.layers.iter().enumerate() {
            let (cos, sin) = &rotations[l.rope];
            let h = ops::add_rms_norm(&residual, delta.as_ref(), &l.attn_norm, eps)?;
            let mut q = l.q.forward(&h)?.reshape((n, heads, hd))?;
            let mut k = l.k.forward(&h)?.reshape((n, kv_heads, hd))?;
            let v = l.v.forward(&h)?.reshape((n, kv_heads, hd))?;
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                q = candle_nn::ops::rms_norm(&q, qn, eps)?;
                k = candle_nn::ops::rms_norm(&k, kn, eps)?;
            }
            // Projection outputs are fresh tensors: rotating them in place is ours to do.
            let (mut q, k) = (q.contiguous()?, k.contiguous()?);
            ops::rope_neox_inplace(&q, &k, cos, sin, &positions)?;
            if let Some(f) = self.q_scale {
                q = (q * f)?;
            }
            let attn = cache.attend(li, &q, &k, &v, batch)?;
            let mut o = l.o.forward(&attn)?;
            if let Some(w) = &l.post_attn_norm {
                o = candle_nn::ops::rms_norm(&o, w, eps)?;
            }
            let h = ops::add_rms_norm(&residual, Some(&o.contiguous()?), &l.ffn_norm, eps)?;
            let (gate, up) = (
                l.gate.forward(&h)?.contiguous()?,
                l.up.forward(&h)?.contiguous()?,
            );
            let act = match self.cfg.activation {
                Activation::Silu => ops::silu_mul(&gate, &up)?,
                Activation::GeluTanh => (gate.gelu()? * up)?,
            };
            let mut out = l.down.forward(&act)?;
            if let Some(w) = &l.post_ffn_norm {
                out = candle_nn::ops::rms_norm(&out, w, eps)?;
            }
            delta = Some(out.contiguous()?);
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
        let rotations = self
            .rotations(batch)?
            .into_iter()
            .map(|(c, s)| Ok((c.to_dtype(self.dtype)?, s.to_dtype(self.dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        let eps = self.cfg.rms_norm_eps as f32;

        // `x + delta` and its norm by `w`: one pass on the CPU's f32 rows, else candle's ops.
        let add_norm = |x: &Tensor, delta: &Tensor, w: &Tensor| -> Result<(Tensor, Tensor)> {
            if let Some(r) = super::cpu_rows::add_rms_norm(x, delta, w, eps)? {
                return Ok(r);
            }
            let x = (x + delta)?;
            let h = candle_nn::ops::rms_norm(&x, w, eps)?;
            Ok((x, h))
        };
        let mut x = self.embed_tokens(batch)?;
        // The last block's output, added to `x` together with the next block's first norm.
        let mut pending: Option<Tensor> = None;
        for (li, l) in self.layers.iter().enumerate() {
            let (cos, sin) = &rotations[l.rope];
            let h = match pending.take() {
                Some(delta) => {
                    let (sum, h) = add_norm(&x, &delta, &l.attn_norm)?;
                    x = sum;
                    h
                }
                None => candle_nn::ops::rms_norm(&x, &l.attn_norm, eps)?,
            };
            let [q, k, v] = Linear::forward_many(&h, [&l.q, &l.k, &l.v])?;
            let mut q = q.reshape((n, heads, hd))?;
            let mut k = k.reshape((n, kv_heads, hd))?;
            let v = v.reshape((n, kv_heads, hd))?;
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                q = candle_nn::ops::rms_norm(&q, qn, eps)?;
                k = candle_nn::ops::rms_norm(&k, kn, eps)?;
            }
            let rotate = |x: &Tensor| -> Result<Tensor> {
                if let Some(r) = super::cpu_rows::rope(x, cos, sin)? {
                    return Ok(r);
                }
                // rope_thd wants [batch, tokens, heads, dim] with one cos/sin row per token.
                let x = x.unsqueeze(0)?.contiguous()?;
                Ok(candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0)?)
            };
            let (mut q, k) = (rotate(&q)?, rotate(&k)?);
            if let Some(f) = self.q_scale {
                q = (q * f)?;
            }
            let attn = cache.attend(li, &q, &k, &v, batch)?.to_dtype(self.dtype)?;
            let mut out = l.o.forward(&attn)?;
            if let Some(w) = &l.post_attn_norm {
                out = candle_nn::ops::rms_norm(&out, w, eps)?;
            }
            let (sum, h) = add_norm(&x, &out, &l.ffn_norm)?;
            x = sum;
            let [gate, up] = Linear::forward_many(&h, [&l.gate, &l.up])?;
            let act = match super::cpu_activation::gated(self.cfg.activation, &gate, &up)? {
                Some(act) => act,
                None => match self.cfg.activation {
                    Activation::Silu => (candle_nn::ops::silu(&gate)? * up)?,
                    Activation::GeluTanh => (gate.gelu()? * up)?,
                },
            };
            let mut out = l.down.forward(&act)?;
            if let Some(w) = &l.post_ffn_norm {
                out = candle_nn::ops::rms_norm(&out, w, eps)?;
            }
            if batch.images.is_empty() {
                pending = Some(out);
            } else {
                x = self.deepstack((x + out)?, batch, li)?;
            }
        }
        Ok(match pending {
            Some(delta) => (x + delta)?,
            None => x,
        })
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

/// The layers' ropes as `[1, head_dim / 2]` inverse frequencies (f32): the global one, and
/// the sliding layers' own base when they have one; with the index of the sliding layers'.
fn ropes(
    cfg: &ArchConfig,
    freq_factors: Option<&[f32]>,
    device: &Device,
) -> Result<(Vec<Tensor>, usize)> {
    let global = inv_freqs(cfg, cfg.rope_theta, cfg.rope_scaling.as_ref(), freq_factors)?;
    let mut ropes = vec![Tensor::new(global.as_slice(), device)?.unsqueeze(0)?];
    let sliding = match cfg.sliding_rope_theta {
        // The sliding layers' own base, unscaled (scaling is for the global layers).
        Some(theta) if cfg.sliding_window.is_some() => {
            ropes.push(
                Tensor::new(inv_freqs(cfg, theta, None, None)?.as_slice(), device)?.unsqueeze(0)?,
            );
            1
        }
        _ => 0,
    };
    Ok((ropes, sliding))
}

/// Rope inverse frequencies `1 / theta^(2i / head_dim)`, stretched by `scaling` or by a
/// GGUF's per-frequency divisors (`freq_factors`, Llama 3.1).
fn inv_freqs(
    cfg: &ArchConfig,
    theta: f64,
    scaling: Option<&RopeScaling>,
    freq_factors: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let half = cfg.head_dim / 2;
    // f32 throughout, as llama.cpp and candle's reference models compute it.
    let theta = theta as f32;
    let mut inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / cfg.head_dim as f32))
        .collect();
    match scaling {
        Some(RopeScaling::Llama3(s)) => {
            // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, smooth
            // between.
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
        }
        Some(RopeScaling::Linear { factor }) => {
            let factor = *factor as f32;
            for f in inv_freq.iter_mut() {
                *f /= factor;
            }
        }
        None => {
            if let Some(factors) = freq_factors {
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
        }
    }
    Ok(inv_freq)
}
