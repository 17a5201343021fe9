//! Attention over a paged KV cache. A step's tokens from many sequences are packed into one
//! batch; each sequence brings its block table, and K/V rows live in fixed-size blocks that
//! the engine hands out. This file holds the batch description, the `KvCache` interface the
//! decoder calls, and the CPU implementation.

use candle_core::{Device, Tensor};
use std::ops::Range;

use super::config::ArchConfig;
use super::{Error, Result};

/// One sequence's part of a packed step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSlice {
    /// Index of this sequence's first token in the packed batch.
    pub start: usize,
    /// Tokens of this sequence in the batch (a prefill chunk, or 1 for decode).
    pub len: usize,
    /// Tokens in the cache after this step, these included. The batch tokens sit at
    /// positions `context_len - len .. context_len`.
    pub context_len: usize,
    /// Physical block ids holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
}

/// A packed forward step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Batch indices whose logits are needed (usually each sequence's last token).
    pub logits_indices: Vec<usize>,
}

impl Batch {
    /// Appends `tokens` of a sequence that already has `cached` tokens in the cache.
    /// `want_logits` asks for the logits of the last of them.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        cached: usize,
        block_table: Vec<u32>,
        want_logits: bool,
    ) {
        let start = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        self.positions
            .extend((cached..cached + tokens.len()).map(|p| p as u32));
        if want_logits && !tokens.is_empty() {
            self.logits_indices.push(start + tokens.len() - 1);
        }
        self.seqs.push(SeqSlice {
            start,
            len: tokens.len(),
            context_len: cached + tokens.len(),
            block_table,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Checks that positions, slices and block tables agree; a bad batch is a bug in the
    /// caller, reported as an error rather than an out-of-bounds panic.
    pub fn validate(&self, block_size: usize, num_blocks: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("invalid batch: {m}")));
        if self.positions.len() != self.tokens.len() {
            return bad("positions and tokens differ in length".into());
        }
        let mut covered = 0;
        for s in &self.seqs {
            if s.start != covered || s.len > s.context_len {
                return bad(format!("sequence slice {s:?} out of order"));
            }
            covered += s.len;
            if s.block_table.len() * block_size < s.context_len {
                return bad(format!(
                    "{} blocks cannot hold {} tokens",
                    s.block_table.len(),
                    s.context_len
                ));
            }
            if s.block_table.iter().any(|&b| b as usize >= num_blocks) {
                return bad("block id beyond the cache".into());
            }
        }
        if covered != self.tokens.len() {
            return bad("sequence slices do not cover the batch".into());
        }
        if self.logits_indices.iter().any(|&i| i >= self.tokens.len()) {
            return bad("logits index beyond the batch".into());
        }
        Ok(())
    }
}

/// What the decoder needs from a KV cache: store this step's K/V for a layer and attend.
pub trait KvCache {
    /// `q`: [tokens, heads, head_dim], `k`/`v`: [tokens, kv_heads, head_dim] (rope applied).
    /// Returns [tokens, heads * head_dim].
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: &Batch,
    ) -> Result<Tensor>;
    fn block_size(&self) -> usize;
    fn num_blocks(&self) -> usize;
}

/// Checks an `attend` call against a cache of `layers` layers of `heads` query heads of
/// `head_dim`, and returns `q`'s `(tokens, heads, head_dim)`.
pub(crate) fn check_query(
    q: &Tensor,
    batch: &Batch,
    layer: usize,
    (layers, heads, head_dim): (usize, usize, usize),
) -> Result<(usize, usize, usize)> {
    let (n, h, hd) = q.dims3()?;
    if h != heads || hd != head_dim || n != batch.tokens.len() || layer >= layers {
        return Err(Error::Config(format!(
            "attention got q {:?} for {} tokens at layer {layer}, expected {heads} heads of \
             {head_dim} and fewer than {layers} layers",
            q.dims(),
            batch.tokens.len(),
        )));
    }
    Ok((n, h, hd))
}

/// The CPU paged cache: per layer, K and V as `[num_blocks, block_size, kv_heads, head_dim]`
/// f32, allocated once.
pub struct CpuKvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    block_size: usize,
    num_blocks: usize,
    kv_heads: usize,
    heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

impl CpuKvCache {
    pub fn new(cfg: &ArchConfig, num_blocks: usize, block_size: usize) -> Self {
        let per_layer = num_blocks * block_size * cfg.num_kv_heads * cfg.head_dim;
        Self {
            k: (0..cfg.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..cfg.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            block_size,
            num_blocks,
            kv_heads: cfg.num_kv_heads,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim,
            sliding_window: cfg.sliding_window,
        }
    }

    /// Bytes held by the cache.
    pub fn size_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|l| l.len() * 4).sum()
    }

    /// The cache rows of positions `range`, in order: one division per block, not per row.
    fn rows<'a>(
        &self,
        block_table: &'a [u32],
        range: Range<usize>,
    ) -> impl Iterator<Item = usize> + 'a {
        let (bs, row_len) = (self.block_size, self.kv_heads * self.head_dim);
        let first = range.start / bs;
        let last = range.end.div_ceil(bs);
        block_table[first..last]
            .iter()
            .enumerate()
            .flat_map(move |(i, &block)| {
                let b = first + i;
                let lo = range.start.max(b * bs) - b * bs;
                let hi = range.end.min((b + 1) * bs) - b * bs;
                (lo..hi).map(move |off| (block as usize * bs + off) * row_len)
            })
    }

    fn row(&self, block_table: &[u32], pos: usize) -> usize {
        let block = block_table[pos / self.block_size] as usize;
        (block * self.block_size + pos % self.block_size) * self.kv_heads * self.head_dim
    }
}

/// A dot product: AVX2/FMA where the CPU has it (the compiler keeps a portable loop scalar
/// here, since it may not reorder float additions), else eight independent partial sums.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        static FMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *FMA.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }) {
            // SAFETY: the features were just checked.
            return unsafe { dot_fma(a, b) };
        }
    }
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc0,
        );
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i + 8)),
            _mm256_loadu_ps(b.as_ptr().add(i + 8)),
            acc1,
        );
        i += 16;
    }
    let v = _mm256_add_ps(acc0, acc1);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    let mut sum = _mm_cvtss_f32(s);
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

impl KvCache for CpuKvCache {
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
        let kv_row = self.kv_heads * hd;
        let k_new = to_f32_vec(k)?;
        let v_new = to_f32_vec(v)?;
        let q = to_f32_vec(q)?;

        // Write this step's keys and values into their slots first, so each query sees its
        // own token and everything before it in one uniform loop.
        for s in &batch.seqs {
            let first_pos = s.context_len - s.len;
            for i in 0..s.len {
                let row = self.row(&s.block_table, first_pos + i);
                let src = (s.start + i) * kv_row;
                self.k[layer][row..row + kv_row].copy_from_slice(&k_new[src..src + kv_row]);
                self.v[layer][row..row + kv_row].copy_from_slice(&v_new[src..src + kv_row]);
            }
        }

        let group = heads / self.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let k_cache = &self.k[layer];
        let v_cache = &self.v[layer];
        let this = &*self;
        let kv_heads = self.kv_heads;
        // One work item per (token, kv head): independent, so they parallelize cleanly even
        // for a single decode token, and each cached key/value row is read once for all the
        // query heads that share it (GQA). Its heads' outputs are one contiguous run.
        let mut out = vec![0f32; n * heads * hd];
        let seq_of: Vec<&SeqSlice> = batch
            .seqs
            .iter()
            .flat_map(|s| std::iter::repeat_n(s, s.len))
            .collect();
        super::parallel::par_rows(&mut out, group * hd, |item, out_grp| {
            let (t, kvh) = (item / kv_heads, item % kv_heads);
            let s = seq_of[t];
            let pos = batch.positions[t] as usize;
            let lo = match this.sliding_window {
                Some(w) if pos + 1 > w => pos + 1 - w,
                _ => 0,
            };
            let span = pos + 1 - lo;
            let q_grp = &q[(t * heads + kvh * group) * hd..(t * heads + (kvh + 1) * group) * hd];
            let mut scores = vec![0f32; group * span];
            for (j, r) in this.rows(&s.block_table, lo..pos + 1).enumerate() {
                let kv = &k_cache[r + kvh * hd..r + (kvh + 1) * hd];
                for (g, qv) in q_grp.chunks_exact(hd).enumerate() {
                    scores[g * span + j] = dot(qv, kv) * scale;
                }
            }
            for sc in scores.chunks_exact_mut(span) {
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut denom = 0f32;
                for v in sc.iter_mut() {
                    *v = (*v - max).exp();
                    denom += *v;
                }
                for v in sc.iter_mut() {
                    *v /= denom;
                }
            }
            out_grp.fill(0.0);
            for (j, r) in this.rows(&s.block_table, lo..pos + 1).enumerate() {
                let vv = &v_cache[r + kvh * hd..r + (kvh + 1) * hd];
                for (g, o) in out_grp.chunks_exact_mut(hd).enumerate() {
                    let w = scores[g * span + j];
                    for (oi, vi) in o.iter_mut().zip(vv) {
                        *oi += w * vi;
                    }
                }
            }
        });
        Ok(Tensor::from_vec(out, (n, heads * hd), &Device::Cpu)?)
    }
}
