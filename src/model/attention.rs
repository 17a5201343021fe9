//! Attention over a paged KV cache. A step's tokens from many sequences are packed into one
//! batch; each sequence brings its block table, and K/V rows live in fixed-size blocks that
//! the engine hands out. This file holds the batch description, the `KvCache` interface the
//! decoder calls, and the CPU implementation.

use candle_core::{Device, Tensor};
use std::ops::Range;
use std::sync::OnceLock;

use super::config::ArchConfig;
use half::f16;

use super::cpu_attention::{self, KvElem, Q8Block, Rows};
use super::cpu_rows::with_f32;
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
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Token ids; a row an image fills carries a placeholder id with [`IMAGE_ID`] set.
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
    /// Batch indices whose logits are needed (usually each sequence's last token).
    pub logits_indices: Vec<usize>,
    /// Runs of rows whose input is an image's embeddings rather than a token's.
    pub images: Vec<ImageRows>,
    /// Each row's multimodal rope positions (time, height, width) for a model with one
    /// (Qwen-VL), when an image's rows or the text after one are in the batch; empty
    /// otherwise, and then every row turns by its `positions` entry on every axis.
    pub rope: Vec<[u32; 3]>,
}

/// The bit that marks a token id as a placeholder for an image embedding: the rest of the
/// id is a hash of the image and the row, so prefix reuse tells images apart.
pub const IMAGE_ID: u32 = 1 << 31;

/// Rows `row..row + embeds.dims()[0]` of a batch take their input from `embeds`, f32,
/// unscaled: `[rows, hidden]`, or `[rows, hidden * (1 + d)]` where the image brings
/// DeepStack features (Qwen3-VL), the `i`-th added to its rows' residual stream after layer
/// `i`. The rows are one image's, all in one step.
#[derive(Clone, Debug)]
pub struct ImageRows {
    pub row: usize,
    pub embeds: Tensor,
    /// The rows attend to each other both ways (an image seen whole, as Gemma 3 reads it);
    /// otherwise causally, as text (Qwen-VL).
    pub bidirectional: bool,
}

/// Equal tokens mean equal images too (a placeholder id hashes its image), so image rows
/// compare by place.
impl PartialEq for Batch {
    fn eq(&self, other: &Self) -> bool {
        self.tokens == other.tokens
            && self.positions == other.positions
            && self.seqs == other.seqs
            && self.logits_indices == other.logits_indices
            && self.rope == other.rope
            && self
                .images
                .iter()
                .map(ImageRows::rows)
                .eq(other.images.iter().map(ImageRows::rows))
    }
}

impl Eq for Batch {}

impl ImageRows {
    pub fn rows(&self) -> Range<usize> {
        self.row..self.row + self.embeds.dims().first().copied().unwrap_or(0)
    }
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
        self.push_seq_rows(tokens, cached, block_table, usize::from(want_logits));
    }

    /// As [`Self::push_seq`], asking for the logits of the last `logit_rows` tokens (a
    /// speculative step checks each draft token against the row before it).
    pub fn push_seq_rows(
        &mut self,
        tokens: &[u32],
        cached: usize,
        block_table: Vec<u32>,
        logit_rows: usize,
    ) {
        let start = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        self.positions
            .extend((cached..cached + tokens.len()).map(|p| p as u32));
        let rows = logit_rows.min(tokens.len());
        self.logits_indices
            .extend(start + tokens.len() - rows..start + tokens.len());
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
        if !self.rope.is_empty() && self.rope.len() != self.tokens.len() {
            return bad("rope positions and tokens differ in length".into());
        }
        if self.logits_indices.iter().any(|&i| i >= self.tokens.len()) {
            return bad("logits index beyond the batch".into());
        }
        let mut filled = vec![false; self.tokens.len()];
        for img in &self.images {
            let rows = img.rows();
            if rows.end > self.tokens.len() || rows.is_empty() {
                return bad(format!("image rows {rows:?} beyond the batch"));
            }
            filled[rows].iter_mut().for_each(|f| *f = true);
        }
        if let Some(t) =
            (0..self.tokens.len()).find(|&t| (self.tokens[t] & IMAGE_ID != 0) != filled[t])
        {
            return bad(format!(
                "row {t}: image placeholders and image rows disagree"
            ));
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
    /// Whether this cache is the GPU fast path's (our kernels): the decoder then runs its
    /// other steps on our fused kernels too, all in fp16.
    fn runs_kernels(&self) -> bool {
        false
    }
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

/// The GPU caches' attention is causal only: image rows (which attend both ways) need the
/// CPU cache.
pub(crate) fn refuse_images(batch: &Batch) -> Result<()> {
    if batch.images.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(
            "image input runs on the CPU attention only".into(),
        ))
    }
}

/// The element type of the CPU KV cache (`OLLAMA_KV_CACHE_TYPE`): f16 by default, as
/// Ollama and llama.cpp keep it; f32 on request (twice the memory, the reference tests use it);
/// q8_0 (llama.cpp's 8-bit blocks of 32, about half of f16) on request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    #[default]
    F16,
    F32,
    Q8_0,
}

impl KvType {
    /// Bytes of `elements` elements (a whole number of q8_0 blocks for q8_0).
    pub fn bytes(self, elements: usize) -> usize {
        match self {
            KvType::F16 => 2 * elements,
            KvType::F32 => 4 * elements,
            KvType::Q8_0 => elements / Q8Block::ELEMENTS * std::mem::size_of::<Q8Block>(),
        }
    }

    /// Whether a head of `head_dim` elements can be stored as this type (q8_0 rows are whole
    /// blocks).
    pub fn fits(self, head_dim: usize) -> bool {
        self != KvType::Q8_0 || head_dim.is_multiple_of(Q8Block::ELEMENTS)
    }

    /// As `OLLAMA_KV_CACHE_TYPE` spells it.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
            KvType::Q8_0 => "q8_0",
        }
    }
}

/// Per layer, K and V as `[num_blocks, kv_heads, block_size, head_dim]` of one element type
/// (q8_0: `head_dim / 32` blocks per head): a kv head's rows in a block are contiguous, so
/// attention, which reads one kv head at a time, streams them (with the heads interleaved
/// per position it read a row in every `kv_heads`, which the hardware prefetcher missed).
enum Planes {
    F16(Vec<Vec<f16>>, Vec<Vec<f16>>),
    F32(Vec<Vec<f32>>, Vec<Vec<f32>>),
    Q8_0(Vec<Vec<Q8Block>>, Vec<Vec<Q8Block>>),
}

impl Planes {
    fn layers(&self) -> usize {
        match self {
            Planes::F16(k, _) => k.len(),
            Planes::F32(k, _) => k.len(),
            Planes::Q8_0(k, _) => k.len(),
        }
    }

    fn ty(&self) -> KvType {
        match self {
            Planes::F16(..) => KvType::F16,
            Planes::F32(..) => KvType::F32,
            Planes::Q8_0(..) => KvType::Q8_0,
        }
    }
}

/// The CPU cache's shape.
struct Geometry {
    block_size: usize,
    num_blocks: usize,
    kv_heads: usize,
    heads: usize,
    head_dim: usize,
    /// Each layer's sliding window (Gemma 3 mixes sliding and global layers).
    windows: Vec<Option<usize>>,
}

/// The CPU paged cache, allocated once (zeroed pages: memory is touched as blocks are first
/// used).
pub struct CpuKvCache {
    planes: Planes,
    geo: Geometry,
}

impl CpuKvCache {
    /// An f16 cache.
    pub fn new(cfg: &ArchConfig, num_blocks: usize, block_size: usize) -> Self {
        Self::with_type(cfg, num_blocks, block_size, KvType::F16)
    }

    /// A cache of element type `ty`; q8_0 for a head size that is not whole blocks is f16
    /// (see [`KvType::fits`]).
    pub fn with_type(cfg: &ArchConfig, num_blocks: usize, block_size: usize, ty: KvType) -> Self {
        let per_layer = num_blocks * block_size * cfg.num_kv_heads * cfg.head_dim;
        fn zeros<E: KvElem>(layers: usize, n: usize) -> Vec<Vec<E>> {
            (0..layers).map(|_| E::zeroed(n / E::BLOCK)).collect()
        }
        let layers = cfg.num_layers;
        let planes = match ty {
            KvType::F32 => Planes::F32(zeros(layers, per_layer), zeros(layers, per_layer)),
            KvType::Q8_0 if ty.fits(cfg.head_dim) => {
                Planes::Q8_0(zeros(layers, per_layer), zeros(layers, per_layer))
            }
            _ => Planes::F16(zeros(layers, per_layer), zeros(layers, per_layer)),
        };
        Self {
            planes,
            geo: Geometry {
                block_size,
                num_blocks,
                kv_heads: cfg.num_kv_heads,
                heads: cfg.num_heads,
                head_dim: cfg.head_dim,
                windows: (0..layers).map(|l| cfg.layer_window(l)).collect(),
            },
        }
    }

    /// Bytes held by the cache.
    pub fn size_bytes(&self) -> usize {
        let g = &self.geo;
        let elements = g.num_blocks * g.block_size * g.kv_heads * g.head_dim;
        2 * self.planes.layers() * self.planes.ty().bytes(elements)
    }
}

impl Geometry {
    /// Units of `E` in one kv head's row.
    fn row_len<E: KvElem>(&self) -> usize {
        self.head_dim / E::BLOCK
    }

    /// The offset (in units of `E`) of kv head `kvh`'s row at `off` in cache block `block`.
    fn offset<E: KvElem>(&self, block: u32, kvh: usize, off: usize) -> usize {
        ((block as usize * self.kv_heads + kvh) * self.block_size + off) * self.row_len::<E>()
    }

    /// Kv head `kvh`'s cache rows (offsets in units of `E`) of positions `range`, in order:
    /// one division per block, not per row.
    fn rows<'a, E: KvElem>(
        &'a self,
        block_table: &'a [u32],
        kvh: usize,
        range: Range<usize>,
    ) -> impl Iterator<Item = usize> + 'a {
        let bs = self.block_size;
        let first = range.start / bs;
        let last = range.end.div_ceil(bs);
        block_table[first..last]
            .iter()
            .enumerate()
            .flat_map(move |(i, &block)| {
                let b = first + i;
                let lo = range.start.max(b * bs) - b * bs;
                let hi = range.end.min((b + 1) * bs) - b * bs;
                (lo..hi).map(move |off| self.offset::<E>(block, kvh, off))
            })
    }

    /// Kv head `kvh`'s row of position `pos`.
    fn row<E: KvElem>(&self, block_table: &[u32], kvh: usize, pos: usize) -> usize {
        let block = block_table[pos / self.block_size];
        self.offset::<E>(block, kvh, pos % self.block_size)
    }
}

/// Query rows (tokens x heads of one kv head) per prompt chunk of CPU attention: each cached
/// row is read once for all of them, and a chunk's probabilities at a 4k context stay 1 MiB.
const PROMPT_ROWS: usize = 64;

/// Rows at positions from here on attend in parts of this many positions (absolute: part k
/// is `k * SPLIT..(k + 1) * SPLIT`), merged after ([`cpu_attention::merge_parts`]): one
/// sequence's few kv heads then spread over every thread, and a row's arithmetic still
/// depends only on its own position and window, never on its batch, chunk or draft rows.
const SPLIT: usize = 512;

/// One CPU attention work item's context: a sequence and one of its kv heads in a layer.
struct Job<'a, E> {
    geo: &'a Geometry,
    k: &'a [E],
    v: &'a [E],
    layer: usize,
    seq: &'a SeqSlice,
    kvh: usize,
    group: usize,
    scale: f32,
    positions: &'a [u32],
    /// Per batch token, the end (exclusive) of the positions it attends to.
    ends: &'a [u32],
    q: &'a [f32],
}

impl<E: KvElem> Job<'_, E> {
    /// The first position that batch token `t` attends to (its sliding window).
    fn window_start(&self, t: usize) -> usize {
        let pos = self.positions[t] as usize;
        match self.geo.windows[self.layer] {
            Some(w) if pos + 1 > w => pos + 1 - w,
            _ => 0,
        }
    }

    /// The `group` query heads of token `t`, one after another.
    fn queries(&self, t: usize) -> &[f32] {
        let (heads, hd) = (self.geo.heads, self.geo.head_dim);
        let first = t * heads + self.kvh * self.group;
        &self.q[first * hd..(first + self.group) * hd]
    }

    /// The positions tokens `ts` attend to, together.
    fn span(&self, ts: &Range<usize>) -> Range<usize> {
        let end = ts.clone().map(|t| self.ends[t]).max().unwrap_or(0) as usize;
        self.window_start(ts.start)..end
    }

    /// Tokens `ts`' query rows over the keys and values at positions `span`, each row seeing
    /// its own window's share of it.
    fn rows(&self, ts: &Range<usize>, span: &Range<usize>) -> (Rows, Vec<&[E]>, Vec<&[E]>) {
        let (hd, group) = (self.geo.head_dim, self.group);
        let lo = span.start;
        let mut rows = Rows::new(ts.len() * group, hd, span.len());
        let n = rows.rows;
        for (i, t) in ts.clone().enumerate() {
            let from = self.window_start(t).clamp(lo, span.end);
            let to = (self.ends[t] as usize).clamp(from, span.end);
            let window = ((from - lo) as u32, (to - lo) as u32);
            for (g, q) in self.queries(t).chunks_exact(hd).enumerate() {
                let r = i * group + g;
                rows.window[r] = window;
                for (d, &v) in q.iter().enumerate() {
                    rows.qt[d * n + r] = v * self.scale;
                }
            }
        }
        let units = hd / E::BLOCK;
        let (k, v) = (self.k, self.v);
        // Sized up front: growing them row by row was a tenth of a decode item's time.
        let (mut keys, mut values) = (
            Vec::with_capacity(span.len()),
            Vec::with_capacity(span.len()),
        );
        for r in self
            .geo
            .rows::<E>(&self.seq.block_table, self.kvh, span.clone())
        {
            keys.push(&k[r..r + units]);
            values.push(&v[r..r + units]);
        }
        (rows, keys, values)
    }

    /// Tokens `ts`' rows over part `part` of the context (see [`SPLIT`]), unnormalised.
    fn attend_part(&self, ts: &Range<usize>, part: usize) -> cpu_attention::Partial {
        let span = self.span(ts);
        let span = span.start.max(part * SPLIT)..span.end.min((part + 1) * SPLIT);
        let (rows, keys, values) = self.rows(ts, &span);
        cpu_attention::attend_partial(&rows, self.geo.head_dim, &keys, &values)
    }

    /// Tokens `ts` of the sequence (consecutive positions), see [`cpu_attention`].
    fn attend<'o>(&self, ts: Range<usize>, mut out_of: impl FnMut(usize) -> &'o mut [f32]) {
        let (hd, group) = (self.geo.head_dim, self.group);
        let (rows, keys, values) = self.rows(&ts, &self.span(&ts));
        let out = cpu_attention::attend(&rows, hd, &keys, &values);
        for (i, t) in ts.enumerate() {
            for (g, o) in out_of(t).chunks_exact_mut(hd).enumerate() {
                let r = i * group + g;
                o.copy_from_slice(&out[r * hd..(r + 1) * hd]);
            }
        }
    }
}

/// Per batch token, the end (exclusive) of the positions it attends to: itself and what
/// comes before, and for an image's rows the whole image.
fn attention_ends(batch: &Batch) -> Vec<u32> {
    let mut ends: Vec<u32> = batch.positions.iter().map(|p| p + 1).collect();
    for img in batch.images.iter().filter(|i| i.bidirectional) {
        let rows = img.rows();
        if let Some(&last) = rows.clone().last().and_then(|t| batch.positions.get(t)) {
            ends[rows].iter_mut().for_each(|e| *e = last + 1);
        }
    }
    ends
}

impl KvCache for CpuKvCache {
    fn block_size(&self) -> usize {
        self.geo.block_size
    }

    fn num_blocks(&self) -> usize {
        self.geo.num_blocks
    }

    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: &Batch,
    ) -> Result<Tensor> {
        let g = &self.geo;
        let layers = self.planes.layers();
        let (n, heads, hd) = check_query(q, batch, layer, (layers, g.heads, g.head_dim))?;
        let planes = &mut self.planes;
        // The step's keys, values and queries, read where they lie.
        let out = with_f32(k, |k_new| {
            with_f32(v, |v_new| {
                with_f32(q, |q| {
                    let step = Step {
                        layer,
                        batch,
                        k_new,
                        v_new,
                        q,
                        n,
                    };
                    Ok(match planes {
                        Planes::F16(k, v) => step.run(g, &mut k[layer], &mut v[layer]),
                        Planes::F32(k, v) => step.run(g, &mut k[layer], &mut v[layer]),
                        Planes::Q8_0(k, v) => step.run(g, &mut k[layer], &mut v[layer]),
                    })
                })
            })
        })?;
        Ok(Tensor::from_vec(out, (n, heads * hd), &Device::Cpu)?)
    }
}

/// One layer's attention step on the CPU cache: the step's keys, values and queries (f32).
struct Step<'a> {
    layer: usize,
    batch: &'a Batch,
    k_new: &'a [f32],
    v_new: &'a [f32],
    q: &'a [f32],
    n: usize,
}

impl Step<'_> {
    /// Stores the step's K/V in the layer's planes `k`/`v`, then attends: `[n][heads * hd]`.
    fn run<E: KvElem>(&self, g: &Geometry, k: &mut [E], v: &mut [E]) -> Vec<f32> {
        let (heads, hd, batch) = (g.heads, g.head_dim, self.batch);
        let units = g.row_len::<E>();
        // Write this step's keys and values into their slots first, so each query sees its
        // own token and everything before it in one uniform loop.
        for s in &batch.seqs {
            let first_pos = s.context_len - s.len;
            for i in 0..s.len {
                for kvh in 0..g.kv_heads {
                    let row = g.row::<E>(&s.block_table, kvh, first_pos + i);
                    let src = ((s.start + i) * g.kv_heads + kvh) * hd..;
                    E::store(&mut k[row..row + units], &self.k_new[src.clone()][..hd]);
                    E::store(&mut v[row..row + units], &self.v_new[src][..hd]);
                }
            }
        }
        let (k, v) = (&*k, &*v);

        let group = heads / g.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // Work items: a sequence's tokens in chunks, times its kv heads. Each item reads a
        // cached key/value row once for all its query rows (its tokens, and the query heads
        // that share the kv head) and writes only its own (token, kv head) outputs.
        let ends = attention_ends(batch);
        let chunk = (PROMPT_ROWS / group).max(1);
        // A sequence's tokens in chunks, none holding rows on both sides of SPLIT.
        let chunks: Vec<(&SeqSlice, Range<usize>)> = batch
            .seqs
            .iter()
            .flat_map(|s| {
                let all = s.start..s.start + s.len;
                let first_split = all
                    .clone()
                    .find(|&t| batch.positions[t] as usize >= SPLIT)
                    .unwrap_or(all.end);
                let short = (all.start..first_split).step_by(chunk);
                let long = (first_split..all.end).step_by(chunk);
                short
                    .map(move |t0| t0..(t0 + chunk).min(first_split))
                    .chain(long.map(move |t0| t0..(t0 + chunk).min(all.end)))
                    .map(move |ts| (s, ts))
            })
            .collect();
        let job = |c: usize, kvh: usize| Job {
            geo: g,
            k,
            v,
            layer: self.layer,
            seq: chunks[c].0,
            kvh,
            group,
            scale,
            positions: &batch.positions,
            ends: &ends,
            q: self.q,
        };
        // Work items: a chunk times a kv head, and for chunks past SPLIT also times a part of
        // the context. Each item reads a cached key/value row once for all its query rows
        // (its tokens, and the query heads that share the kv head).
        let mut items: Vec<(usize, usize, Option<usize>)> = Vec::new();
        for (c, (_, ts)) in chunks.iter().enumerate() {
            for kvh in 0..g.kv_heads {
                if batch.positions[ts.start] as usize >= SPLIT {
                    let span = job(c, kvh).span(ts);
                    let parts = span.start / SPLIT..span.end.div_ceil(SPLIT);
                    items.extend(parts.map(|p| (c, kvh, Some(p))));
                } else {
                    items.push((c, kvh, None));
                }
            }
        }
        let mut out = vec![0f32; self.n * heads * hd];
        let mut partials: Vec<OnceLock<cpu_attention::Partial>> = Vec::new();
        partials.resize_with(items.len(), OnceLock::new);
        let out_ptr = super::parallel::SharedOut(out.as_mut_ptr());
        let (out_ptr, partials) = (&out_ptr, &partials);
        super::parallel::par_for(items.len(), |range| {
            for i in range {
                let (c, kvh, part) = items[i];
                let ts = &chunks[c].1;
                let job = job(c, kvh);
                if let Some(p) = part {
                    let _ = partials[i].set(job.attend_part(ts, p));
                    continue;
                }
                // SAFETY: items are disjoint in (token, kv head), and each writes only the
                // `group * hd` outputs of its own pairs, inside `out` (n tokens x heads).
                let out_of = |t: usize| unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.0.add((t * heads + kvh * group) * hd),
                        group * hd,
                    )
                };
                job.attend(ts.clone(), out_of);
            }
        });
        // The parts of each (chunk, kv head) are consecutive items: merge them, in order.
        let mut i = 0;
        while i < items.len() {
            let (c, kvh, _) = items[i];
            let n = items[i..]
                .iter()
                .take_while(|&&(c2, kvh2, p)| (c2, kvh2) == (c, kvh) && p.is_some())
                .count();
            if n == 0 {
                i += 1;
                continue;
            }
            let parts: Vec<&cpu_attention::Partial> = partials[i..i + n]
                .iter()
                .filter_map(OnceLock::get)
                .collect();
            for (j, t) in chunks[c].1.clone().enumerate() {
                for gi in 0..group {
                    let at = (t * heads + kvh * group + gi) * hd;
                    cpu_attention::merge_parts(&parts, j * group + gi, hd, &mut out[at..at + hd]);
                }
            }
            i += n;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence's random queries, keys and values (`[len][heads or kv_heads][hd]`, uniform
    /// in `-scale..scale` from a linear congruential generator), fed to a cache step by step.
    struct Qkv {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        heads: usize,
        kv_heads: usize,
        hd: usize,
    }

    impl Qkv {
        fn new(
            seed: u32,
            len: usize,
            (heads, kv_heads, hd): (usize, usize, usize),
            scale: f32,
        ) -> Self {
            let mut seed = seed;
            let mut rand = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| {
                        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                        ((seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
                    })
                    .collect()
            };
            let (q, k, v) = (
                rand(len * heads * hd),
                rand(len * kv_heads * hd),
                rand(len * kv_heads * hd),
            );
            Self {
                q,
                k,
                v,
                heads,
                kv_heads,
                hd,
            }
        }

        /// Tokens `r` through layer 0 of `cache` as `batch`: their outputs, flattened.
        fn step(&self, cache: &mut CpuKvCache, batch: &Batch, r: Range<usize>) -> Vec<f32> {
            let rows = |data: &[f32], w: usize| {
                let hd = self.hd;
                Tensor::from_slice(
                    &data[r.start * w * hd..r.end * w * hd],
                    (r.len(), w, hd),
                    &Device::Cpu,
                )
                .unwrap()
            };
            let (q, k, v) = (
                rows(&self.q, self.heads),
                rows(&self.k, self.kv_heads),
                rows(&self.v, self.kv_heads),
            );
            let out = cache.attend(0, &q, &k, &v, batch).unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        }
    }

    /// An image's rows attend to the whole image (and what precedes it), text rows
    /// causally: against a plain softmax over exactly those keys, in one step and with the
    /// text before the image cached by an earlier step.
    #[test]
    fn image_rows_attend_both_ways() {
        let (heads, kv_heads, hd) = (4, 2, 32);
        let cfg = ArchConfig {
            num_layers: 1,
            ..crate::model::selfcheck::case_config(heads, kv_heads, hd, 64)
        };
        // Text 0..3, an image 3..7, text 7..10.
        let (len, image) = (10usize, 3..7usize);
        let data = Qkv::new(7, len, (heads, kv_heads, hd), 1.0);
        let (q, k, v) = (&data.q, &data.k, &data.v);
        let end = |t: usize| if image.contains(&t) { image.end } else { t + 1 };
        let mut want = vec![0f32; len * heads * hd];
        for t in 0..len {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let qv = &q[(t * heads + h) * hd..][..hd];
                let scores: Vec<f32> = (0..end(t))
                    .map(|j| {
                        let kj = &k[(j * kv_heads + kvh) * hd..][..hd];
                        qv.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    let vj = &v[(j * kv_heads + kvh) * hd..][..hd];
                    for d in 0..hd {
                        want[(t * heads + h) * hd + d] += w / sum * vj[d];
                    }
                }
            }
        }
        // All at once, then the leading text first and the rest in a second step.
        for split in [0, 3] {
            let mut cache = CpuKvCache::with_type(&cfg, 4, 4, KvType::F32);
            let mut got = Vec::new();
            for r in [0..split, split..len] {
                if r.is_empty() {
                    continue;
                }
                let mut batch = Batch::default();
                let tokens: Vec<u32> = r
                    .clone()
                    .map(|t| {
                        if image.contains(&t) {
                            IMAGE_ID | t as u32
                        } else {
                            1
                        }
                    })
                    .collect();
                batch.push_seq(&tokens, r.start, vec![0, 1, 2], true);
                let lo = image.start.max(r.start);
                if lo < image.end.min(r.end) {
                    let n = image.end.min(r.end) - lo;
                    batch.images.push(ImageRows {
                        row: lo - r.start,
                        embeds: Tensor::zeros((n, 64), candle_core::DType::F32, &Device::Cpu)
                            .unwrap(),
                        bidirectional: true,
                    });
                }
                batch.validate(4, 4).unwrap();
                got.extend(data.step(&mut cache, &batch, r));
            }
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "split {split}: {worst}");
        }
    }

    /// Past SPLIT, rows attend in parts merged after: against an f64 softmax over every
    /// position, with prompt steps crossing SPLIT and a part boundary; and each late row is
    /// bit for bit the same decoded alone as inside a multi-token step (as a speculative
    /// step's draft rows are), so neither batching nor drafting changes a greedy output.
    #[test]
    fn long_contexts_attend_in_parts_like_one_softmax() {
        let (heads, kv_heads, hd, bs) = (4, 2, 32, 16);
        let cfg = ArchConfig {
            num_layers: 1,
            ..crate::model::selfcheck::case_config(heads, kv_heads, hd, 64)
        };
        let len = 2 * SPLIT + 276;
        // Scores of a few units: the largest weights land in different parts.
        let data = Qkv::new(11, len, (heads, kv_heads, hd), 2.0);
        let (q, k, v) = (&data.q, &data.k, &data.v);
        let run = |steps: &[Range<usize>]| -> Vec<f32> {
            let blocks = len.div_ceil(bs);
            let mut cache = CpuKvCache::with_type(&cfg, blocks, bs, KvType::F32);
            let mut got = Vec::new();
            for r in steps {
                let mut batch = Batch::default();
                batch.push_seq(
                    &vec![1; r.len()],
                    r.start,
                    (0..blocks as u32).collect(),
                    true,
                );
                batch.validate(bs, blocks).unwrap();
                got.extend(data.step(&mut cache, &batch, r.clone()));
            }
            got
        };
        let tail = len - 40..len;
        let prompt = run(&[0..300, 300..SPLIT + 200, SPLIT + 200..len]);
        let mut steps = vec![0..300, 300..SPLIT + 200, SPLIT + 200..tail.start];
        steps.extend(tail.clone().map(|t| t..t + 1));
        let decoded = run(&steps);
        let row = heads * hd;
        assert!(
            prompt[tail.start * row..] == decoded[tail.start * row..],
            "a row decoded alone differs from the same row in a prompt step"
        );
        let mut worst = 0f64;
        for t in 0..len {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let qv = &q[(t * heads + h) * hd..][..hd];
                let scores: Vec<f64> = (0..=t)
                    .map(|j| {
                        let kj = &k[(j * kv_heads + kvh) * hd..][..hd];
                        qv.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(j, w)| w / sum * v[(j * kv_heads + kvh) * hd + d] as f64)
                        .sum();
                    let got = prompt[(t * heads + h) * hd + d] as f64;
                    worst = worst.max((got - want).abs());
                }
            }
        }
        assert!(worst < 1e-5, "worst {worst}");
    }

    #[test]
    fn placeholders_need_image_rows() {
        let mut batch = Batch::default();
        batch.push_seq(&[1, IMAGE_ID | 5, 2], 0, vec![0], true);
        assert!(
            batch.validate(4, 1).is_err(),
            "a placeholder without its embedding"
        );
        batch.images.push(ImageRows {
            row: 1,
            embeds: Tensor::zeros((1, 8), candle_core::DType::F32, &Device::Cpu).unwrap(),
            bidirectional: true,
        });
        batch.validate(4, 1).unwrap();
        batch.images[0].row = 2;
        assert!(batch.validate(4, 1).is_err(), "an embedding over a token");
    }
}
