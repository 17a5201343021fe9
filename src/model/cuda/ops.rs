//! Checked launch wrappers for kernels/*.cu. Each takes candle tensors on one device (a GPU
//! with `--features cuda`, the CPU execution layer without), checks dtypes, shapes and
//! every index a kernel will follow, and launches. Indices reach the kernels only through
//! [`PagedMeta`] and [`RopePositions`], which can only be built by validating host-side
//! values against the cache or table they index, so no public function lets a kernel read
//! or write out of bounds. The ones marked "in place" write into tensors they are given:
//! pass only tensors the caller owns outright (a KV cache, a fresh projection output).

use candle_core::{DType, Device, Tensor};

use super::launch::Launch;
use super::{check_dtype, shape_err, uninit, KernelError, Result};

/// Threads per block for the row kernels (norm, rope, cache writes).
const ROW_THREADS: u32 = 256;
/// Threads per block of argmax.
const ARGMAX_THREADS: u32 = 1024;
/// Threads per block of the sampling kernel (kernels/sampling.cu SAMPLE_THREADS).
const SAMPLE_THREADS: u32 = 256;
/// Grid y and z dimensions are limited to this.
const MAX_GRID_Y: usize = 65_535;
/// Positions per partition of the split-context attention.
pub const ATTENTION_PARTITION: usize = 512;
/// Above this many context positions the split-context attention is used.
pub const SPLIT_ABOVE: usize = 2 * ATTENTION_PARTITION;
/// Threads of a decode-attention block: kernels/attention.cu's ATTN_WARPS warps.
const ATTN_THREADS: u32 = 4 * 32;
/// Query heads one decode-attention block takes (kernels/attention.cu's HEADS_PER_BLOCK).
const HEADS_PER_BLOCK: usize = 8;

fn u32_of(op: &'static str, what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| shape_err(op, format!("{what} {n} is too large")))
}

fn i32_of(op: &'static str, what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| shape_err(op, format!("{what} {n} is too large")))
}

/// The row stride (elements) of a tensor of rows `[n, a, b]` whose rows are each contiguous.
fn row_stride3(t: &Tensor, op: &'static str, what: &'static str) -> Result<(usize, usize)> {
    let (n, a, b) = t.dims3().map_err(|_| {
        shape_err(
            op,
            format!(
                "{what} must be [tokens, heads, head_dim], got {:?}",
                t.dims()
            ),
        )
    })?;
    let st = t.stride();
    if (a > 1 && st[1] != b) || (b > 1 && st[2] != 1) {
        return Err(shape_err(
            op,
            format!("{what} rows must be contiguous, got strides {st:?}"),
        ));
    }
    Ok((n, if n > 1 { st[0] } else { a * b }))
}

fn contiguous(t: &Tensor, op: &'static str, what: &'static str) -> Result<()> {
    if !t.is_contiguous() {
        return Err(shape_err(op, format!("{what} must be contiguous")));
    }
    Ok(())
}

/// `(num_blocks, block_size, kv_heads, head_dim)` of a paged cache pair.
fn cache_dims(
    k_cache: &Tensor,
    v_cache: &Tensor,
    op: &'static str,
) -> Result<(usize, usize, usize, usize)> {
    let d = k_cache.dims4().map_err(|_| {
        shape_err(
            op,
            format!(
                "k_cache must be [blocks, block_size, kv_heads, head_dim], got {:?}",
                k_cache.dims()
            ),
        )
    })?;
    if v_cache.dims() != k_cache.dims() {
        return Err(shape_err(
            op,
            format!(
                "k_cache {:?} and v_cache {:?} differ",
                k_cache.dims(),
                v_cache.dims()
            ),
        ));
    }
    for (t, what) in [(k_cache, "k_cache"), (v_cache, "v_cache")] {
        contiguous(t, op, what)?;
        check_dtype(t, DType::F16, op, what)?;
    }
    Ok(d)
}

/// One sequence's part of a paged attention step: `len` query rows (consecutive in the
/// packed batch, starting at `start`) at the last positions of a context of `context_len`
/// tokens held by the blocks of `block_table`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqQueries {
    pub start: usize,
    pub len: usize,
    pub context_len: usize,
    pub block_table: Vec<u32>,
}

/// The head layout attention runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Which attention kernel takes which sequences of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Sequences of at least [`PREFILL_MIN_ROWS`] rows to the tiled prefill kernel (when it
    /// is built for the head size), the others (decode rows, short chunks) to the decode
    /// kernel.
    Auto,
    /// Every row through the decode kernel.
    DecodeOnly,
    /// Every sequence through the prefill kernel (tests).
    PrefillOnly,
}

/// Sequences with this many query rows or more take the tiled prefill kernel.
pub const PREFILL_MIN_ROWS: usize = 8;
/// Head sizes the prefill kernel is built for (kernels/prefill.cu).
pub const PREFILL_HEAD_DIMS: [usize; 3] = [64, 96, 128];
/// Query rows (tokens x query heads of one KV head) of one prefill block: PF_WARPS * 16.
const PREFILL_ROWS: usize = 64;
/// Threads of a prefill block.
const PREFILL_THREADS: u32 = 4 * 32;

/// A step's paged-attention metadata, validated against a cache of `num_blocks` blocks of
/// `block_size` and uploaded once to the device for every layer of the step.
///
/// For reshape_and_cache, the cache slot of every query row. For the decode kernel, its list
/// of rows: the batch row (`query_row`), its sequence's row in the block tables
/// (`query_seq`) and the positions it sees (`query_ctx`: its own position + 1, so attention
/// is causal). For the prefill kernel, its tiles (sequence, first token, tokens) and per
/// sequence (first row, rows, context length).
pub struct PagedMeta {
    pub(super) block_tables: Tensor,
    pub(super) slots: Tensor,
    pub(super) decode: Option<DecodeList>,
    pub(super) prefill: Option<PrefillTiles>,
    pub(super) rows: usize,
    pub(super) max_blocks: usize,
    pub(super) max_context: usize,
    pub(super) num_blocks: usize,
    pub(super) block_size: usize,
    pub(super) shape: HeadShape,
}

/// The decode kernel's rows.
pub(super) struct DecodeList {
    query_seq: Tensor,
    query_ctx: Tensor,
    query_row: Tensor,
    rows: usize,
    max_context: usize,
}

/// The prefill kernel's tiles.
pub(super) struct PrefillTiles {
    tiles: Tensor,
    seq_info: Tensor,
    count: usize,
}

impl PagedMeta {
    /// Validates `seqs` (rows in order, contexts covered by their tables, block ids inside
    /// the cache) for attention with `shape`, routes them to the kernels and uploads the
    /// tables to `device`.
    pub fn new(
        seqs: &[SeqQueries],
        num_blocks: usize,
        block_size: usize,
        shape: HeadShape,
        route: Route,
        device: &Device,
    ) -> Result<Self> {
        const OP: &str = "paged metadata";
        if block_size == 0 {
            return Err(shape_err(OP, "block size 0".into()));
        }
        if shape.kv_heads == 0 || !shape.heads.is_multiple_of(shape.kv_heads) {
            return Err(shape_err(
                OP,
                format!(
                    "{} query heads are not a multiple of {} kv heads",
                    shape.heads, shape.kv_heads
                ),
            ));
        }
        let group = shape.heads / shape.kv_heads;
        let prefill_ok = PREFILL_HEAD_DIMS.contains(&shape.head_dim) && group <= PREFILL_ROWS;
        if route == Route::PrefillOnly && !prefill_ok {
            return Err(shape_err(
                OP,
                format!(
                    "no prefill kernel for head_dim {} with {group} query heads per kv head",
                    shape.head_dim
                ),
            ));
        }
        let max_blocks = seqs
            .iter()
            .map(|s| s.context_len.div_ceil(block_size))
            .max()
            .unwrap_or(0)
            .max(1);
        let rows: usize = seqs.iter().map(|s| s.len).sum();
        if num_blocks * block_size >= u32::MAX as usize || rows >= u32::MAX as usize {
            return Err(shape_err(OP, "cache slots or rows beyond u32".into()));
        }
        let tokens_per_tile = (PREFILL_ROWS / group).max(1);
        let mut tables = vec![0u32; seqs.len() * max_blocks];
        let mut slots = Vec::with_capacity(rows);
        let (mut d_seq, mut d_ctx, mut d_row) = (Vec::new(), Vec::new(), Vec::new());
        let (mut tiles, mut seq_info) = (Vec::new(), Vec::with_capacity(seqs.len() * 4));
        let (mut max_context, mut d_max_context) = (0, 0);
        let mut next_row = 0;
        for (si, s) in seqs.iter().enumerate() {
            let used = s.context_len.div_ceil(block_size);
            if s.start != next_row || s.len > s.context_len {
                return Err(shape_err(
                    OP,
                    format!(
                        "sequence {si}: rows {}..+{} of context {} out of order",
                        s.start, s.len, s.context_len
                    ),
                ));
            }
            next_row += s.len;
            if s.block_table.len() < used {
                return Err(shape_err(
                    OP,
                    format!(
                        "sequence {si}: {} blocks cannot hold {} tokens",
                        s.block_table.len(),
                        s.context_len
                    ),
                ));
            }
            if let Some(b) = s.block_table[..used]
                .iter()
                .find(|&&b| b as usize >= num_blocks)
            {
                return Err(shape_err(
                    OP,
                    format!("sequence {si}: block {b} is beyond the cache's {num_blocks}"),
                ));
            }
            tables[si * max_blocks..si * max_blocks + used].copy_from_slice(&s.block_table[..used]);
            for pos in s.context_len - s.len..s.context_len {
                let block = s.block_table[pos / block_size] as usize;
                slots.push((block * block_size + pos % block_size) as u32);
            }
            let to_prefill = match route {
                Route::Auto => prefill_ok && s.len >= PREFILL_MIN_ROWS,
                Route::DecodeOnly => false,
                Route::PrefillOnly => true,
            };
            if to_prefill {
                for tok0 in (0..s.len).step_by(tokens_per_tile) {
                    let n = tokens_per_tile.min(s.len - tok0);
                    tiles.extend([si as u32, tok0 as u32, n as u32, 0]);
                }
            } else {
                for (i, pos) in (s.context_len - s.len..s.context_len).enumerate() {
                    d_seq.push(si as u32);
                    d_ctx.push((pos + 1) as u32);
                    d_row.push((s.start + i) as u32);
                }
                d_max_context = d_max_context.max(s.context_len);
            }
            seq_info.extend([s.start as u32, s.len as u32, s.context_len as u32, 0]);
            max_context = max_context.max(s.context_len);
        }
        if max_context > i32::MAX as usize || d_row.len() > MAX_GRID_Y {
            return Err(shape_err(
                OP,
                format!("{rows} rows of contexts up to {max_context} are too many for one step"),
            ));
        }
        let n = seqs.len();
        let decode = if d_row.is_empty() {
            None
        } else {
            let r = d_row.len();
            Some(DecodeList {
                query_seq: Tensor::from_vec(d_seq, r, device)?,
                query_ctx: Tensor::from_vec(d_ctx, r, device)?,
                query_row: Tensor::from_vec(d_row, r, device)?,
                rows: r,
                max_context: d_max_context,
            })
        };
        let prefill = if tiles.is_empty() {
            None
        } else {
            let count = tiles.len() / 4;
            Some(PrefillTiles {
                tiles: Tensor::from_vec(tiles, (count, 4), device)?,
                seq_info: Tensor::from_vec(seq_info, (n, 4), device)?,
                count,
            })
        };
        Ok(Self {
            block_tables: Tensor::from_vec(tables, (n.max(1), max_blocks), device)
                .or_else(|_| Tensor::zeros((1, max_blocks), DType::U32, device))?,
            slots: Tensor::from_vec(slots, rows, device)?,
            decode,
            prefill,
            rows,
            max_blocks,
            max_context,
            num_blocks,
            block_size,
            shape,
        })
    }

    /// Query rows (tokens) of the step.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The longest context of the step.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Rows the decode kernel takes, and tiles the prefill kernel takes.
    pub fn routed(&self) -> (usize, usize) {
        (
            self.decode.as_ref().map_or(0, |d| d.rows),
            self.prefill.as_ref().map_or(0, |p| p.count),
        )
    }

    fn check_cache(
        &self,
        k_cache: &Tensor,
        v_cache: &Tensor,
        op: &'static str,
    ) -> Result<(usize, usize)> {
        let (nb, bs, kv_heads, head_dim) = cache_dims(k_cache, v_cache, op)?;
        if nb != self.num_blocks || bs != self.block_size {
            return Err(shape_err(
                op,
                format!(
                    "metadata for {} blocks of {} used with a cache of {nb} blocks of {bs}",
                    self.num_blocks, self.block_size
                ),
            ));
        }
        if kv_heads != self.shape.kv_heads || head_dim != self.shape.head_dim {
            return Err(shape_err(
                op,
                format!(
                    "metadata for {:?} used with a cache of {kv_heads} kv heads of {head_dim}",
                    self.shape
                ),
            ));
        }
        if !self.slots.device().same_device(k_cache.device()) {
            return Err(shape_err(
                op,
                "metadata and cache on different devices".into(),
            ));
        }
        Ok((kv_heads, head_dim))
    }
}

/// Writes this step's `key`/`value` rows `[rows, kv_heads, head_dim]` (fp16, rows
/// contiguous, any row stride) into the paged caches `[num_blocks, block_size, kv_heads,
/// head_dim]` (in place) at the slots `meta` validated.
pub fn reshape_and_cache(
    key: &Tensor,
    value: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &PagedMeta,
) -> Result<()> {
    const OP: &str = "reshape_and_cache";
    let (kv_heads, head_dim) = meta.check_cache(k_cache, v_cache, OP)?;
    let (n, k_stride) = row_stride3(key, OP, "key")?;
    let (nv, v_stride) = row_stride3(value, OP, "value")?;
    let row = kv_heads * head_dim;
    if nv != n
        || n != meta.rows
        || key.dims()[1..] != [kv_heads, head_dim]
        || value.dims()[1..] != [kv_heads, head_dim]
    {
        return Err(shape_err(
            OP,
            format!(
                "key {:?}, value {:?} for {} rows do not fit caches {:?}",
                key.dims(),
                value.dims(),
                meta.rows,
                k_cache.dims(),
            ),
        ));
    }
    check_dtype(key, DType::F16, OP, "key")?;
    check_dtype(value, DType::F16, OP, "value")?;
    if n == 0 {
        return Ok(());
    }
    let threads = ((row as u32 / 2).div_ceil(32) * 32).clamp(32, ROW_THREADS);
    Launch::new(
        OP,
        "cache",
        "wick_reshape_and_cache_f16",
        (u32_of(OP, "rows", n)?, 1, 1),
        threads,
    )
    .input(key, "key")
    .input(value, "value")
    .output(k_cache, "k_cache")
    .output(v_cache, "v_cache")
    .input(&meta.slots, "slot_mapping")
    .i32(i32_of(OP, "row", row)?)
    .i64(k_stride as i64)
    .i64(v_stride as i64)
    .run()
}

/// Everything paged attention reads: query rows `q` `[rows, heads, head_dim]` (fp16), the
/// caches, and the step's metadata.
pub struct PagedAttention<'a> {
    pub q: &'a Tensor,
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    pub meta: &'a PagedMeta,
    pub sliding_window: Option<usize>,
    /// Softmax scale, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    pub split: Split,
}

/// Whether paged attention splits each context into partitions (and reduces them after).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// One partition up to [`SPLIT_ABOVE`] positions, [`ATTENTION_PARTITION`] above.
    Auto,
    /// One partition, whatever the context.
    Never,
    /// Partitions of this many positions (a multiple of the block size).
    Partition(usize),
}

/// Head sizes the attention kernels are built for.
pub const ATTENTION_HEAD_DIMS: [usize; 4] = [64, 96, 128, 256];

/// Checks `q` against the caches; returns `(q_stride, heads, head_dim, kv_heads)`.
fn check_attention(a: &PagedAttention, op: &'static str) -> Result<(usize, usize, usize, usize)> {
    let (kv_heads, cache_hd) = a.meta.check_cache(a.k_cache, a.v_cache, op)?;
    let (rows, q_stride) = row_stride3(a.q, op, "q")?;
    let (_, heads, head_dim) = a.q.dims3()?;
    check_dtype(a.q, DType::F16, op, "q")?;
    if cache_hd != head_dim || rows != a.meta.rows || heads != a.meta.shape.heads {
        return Err(shape_err(
            op,
            format!(
                "q {:?} does not fit caches {:?} and {} query rows of {:?}",
                a.q.dims(),
                a.k_cache.dims(),
                a.meta.rows,
                a.meta.shape
            ),
        ));
    }
    if !ATTENTION_HEAD_DIMS.contains(&head_dim) {
        return Err(shape_err(
            op,
            format!("head_dim {head_dim} is not one of {ATTENTION_HEAD_DIMS:?}"),
        ));
    }
    // The decode kernel reads q and K/V rows in 8-byte pieces.
    for (t, what) in [(a.q, "q"), (a.k_cache, "k_cache"), (a.v_cache, "v_cache")] {
        if !t.layout().start_offset().is_multiple_of(4) {
            return Err(shape_err(op, format!("{what} must start 8-byte aligned")));
        }
    }
    if !q_stride.is_multiple_of(4) {
        return Err(shape_err(op, "q rows must be 8-byte aligned".into()));
    }
    Ok((q_stride, heads, head_dim, kv_heads))
}

/// Paged attention for every query row of the step; returns `[rows, heads, head_dim]` fp16.
/// Rows the metadata routed to the decode kernel are attended one at a time (split into
/// context partitions per `split`); sequences routed to the prefill kernel are attended in
/// tiles. Grouped-query heads: `heads` must be a multiple of the cache's kv_heads.
pub fn paged_attention(a: &PagedAttention) -> Result<Tensor> {
    const OP: &str = "paged_attention";
    let (q_stride, heads, head_dim, kv_heads) = check_attention(a, OP)?;
    let dev = a.q.device();
    let rows = a.meta.rows;
    let out = uninit(dev, DType::F16, &[rows, heads, head_dim])?;
    let block_size = a.meta.block_size;
    let window = i32_of(OP, "sliding window", a.sliding_window.unwrap_or(0))?;
    if let Some(d) = &a.meta.decode {
        let partition = match a.split {
            Split::Partition(p) if p == 0 || !p.is_multiple_of(block_size) => {
                return Err(shape_err(
                    OP,
                    format!("partition size {p} is not a multiple of the block size {block_size}"),
                ))
            }
            Split::Partition(p) => p,
            Split::Auto if d.max_context > SPLIT_ABOVE => ATTENTION_PARTITION,
            Split::Auto | Split::Never => 0,
        };
        let partitions = if partition == 0 {
            1
        } else {
            d.max_context.div_ceil(partition).max(1)
        };
        if partitions > MAX_GRID_Y {
            return Err(shape_err(
                OP,
                format!("{partitions} partitions are too many"),
            ));
        }
        let (part_acc, part_ml) = if partition > 0 {
            (
                Some(uninit(
                    dev,
                    DType::F32,
                    &[d.rows, heads, partitions, head_dim],
                )?),
                Some(uninit(dev, DType::F32, &[d.rows, heads, partitions, 2])?),
            )
        } else {
            (None, None)
        };
        let chunks = (heads / kv_heads).div_ceil(HEADS_PER_BLOCK);
        let grid = (
            u32_of(OP, "kv heads", kv_heads * chunks)?,
            u32_of(OP, "rows", d.rows)?,
            u32_of(OP, "partitions", partitions)?,
        );
        Launch::new(
            OP,
            "attention",
            format!("wick_paged_attention_d{head_dim}_f16"),
            grid,
            ATTN_THREADS,
        )
        .output(&out, "out")
        .output_opt(part_acc.as_ref(), "part_acc")
        .output_opt(part_ml.as_ref(), "part_ml")
        .input(a.q, "q")
        .i64(q_stride as i64)
        .input(a.k_cache, "k_cache")
        .input(a.v_cache, "v_cache")
        .input(&a.meta.block_tables, "block_tables")
        .i32(i32_of(OP, "max_blocks", a.meta.max_blocks)?)
        .input(&d.query_seq, "query_seq")
        .input(&d.query_ctx, "query_ctx")
        .input(&d.query_row, "query_row")
        .i32(i32_of(OP, "heads", heads)?)
        .i32(i32_of(OP, "kv_heads", kv_heads)?)
        .i32(i32_of(OP, "block_size", block_size)?)
        .i32(window)
        .f32(a.scale)
        .i32(i32_of(OP, "partition", partition)?)
        .run()?;
        if let (Some(acc), Some(ml)) = (&part_acc, &part_ml) {
            Launch::new(
                OP,
                "attention",
                format!("wick_paged_attention_reduce_d{head_dim}_f16"),
                (u32_of(OP, "heads", heads)?, u32_of(OP, "rows", d.rows)?, 1),
                head_dim.min(128) as u32,
            )
            .output(&out, "out")
            .input(acc, "part_acc")
            .input(ml, "part_ml")
            .input(&d.query_row, "query_row")
            .i32(i32_of(OP, "partitions", partitions)?)
            .run()?;
        }
    }
    if let Some(p) = &a.meta.prefill {
        Launch::new(
            OP,
            "prefill",
            format!("wick_prefill_attention_d{head_dim}_f16"),
            (
                u32_of(OP, "tiles", p.count)?,
                u32_of(OP, "kv heads", kv_heads)?,
                1,
            ),
            PREFILL_THREADS,
        )
        .output(&out, "out")
        .input(a.q, "q")
        .i64(q_stride as i64)
        .input(a.k_cache, "k_cache")
        .input(a.v_cache, "v_cache")
        .input(&a.meta.block_tables, "block_tables")
        .i32(i32_of(OP, "max_blocks", a.meta.max_blocks)?)
        .input(&p.tiles, "tiles")
        .input(&p.seq_info, "seq_info")
        .i32(i32_of(OP, "heads", heads)?)
        .i32(i32_of(OP, "kv_heads", kv_heads)?)
        .i32(i32_of(OP, "block_size", block_size)?)
        .i32(window)
        .f32(a.scale)
        .run()?;
    }
    Ok(out)
}

/// RMSNorm with a fused residual add: with `delta`, `residual += delta` in place first; returns
/// `rms_norm(residual) * weight`. `residual`, `delta`: `[rows, hidden]` contiguous fp16,
/// `weight`: `[hidden]` fp16.
pub fn add_rms_norm(
    residual: &Tensor,
    delta: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "add_rms_norm";
    let (rows, hidden) = residual.dims2().map_err(|_| {
        shape_err(
            OP,
            format!("expected [rows, hidden], got {:?}", residual.dims()),
        )
    })?;
    if weight.dims() != [hidden] || delta.is_some_and(|d| d.dims() != residual.dims()) {
        return Err(shape_err(
            OP,
            format!(
                "weight {:?} / delta {:?} do not fit {:?}",
                weight.dims(),
                delta.map(|d| d.dims().to_vec()),
                residual.dims()
            ),
        ));
    }
    contiguous(residual, OP, "residual")?;
    contiguous(weight, OP, "weight")?;
    check_dtype(residual, DType::F16, OP, "residual")?;
    check_dtype(weight, DType::F16, OP, "weight")?;
    if let Some(d) = delta {
        contiguous(d, OP, "delta")?;
        check_dtype(d, DType::F16, OP, "delta")?;
    }
    let out = uninit(residual.device(), DType::F16, &[rows, hidden])?;
    if rows == 0 {
        return Ok(out);
    }
    let threads = if hidden >= 4096 { 1024 } else { ROW_THREADS };
    Launch::new(
        OP,
        "rms_norm",
        "wick_add_rms_norm_f16",
        (u32_of(OP, "rows", rows)?, 1, 1),
        threads,
    )
    .output(&out, "out")
    .output(residual, "residual")
    .input_opt(delta, "delta")
    .input(weight, "weight")
    .i32(i32_of(OP, "hidden", hidden)?)
    .f32(eps)
    .run()?;
    Ok(out)
}

/// A step's token positions for the rotary kernel, checked against the tables' length.
pub struct RopePositions {
    positions: Tensor,
    table_len: usize,
}

impl RopePositions {
    /// `positions` must each be below `table_len` (the rows of the cos/sin tables).
    pub fn new(positions: &[u32], table_len: usize, device: &Device) -> Result<Self> {
        if let Some(p) = positions.iter().find(|&&p| p as usize >= table_len) {
            return Err(shape_err(
                "rope_neox",
                format!("position {p} is beyond the {table_len} rows of the rotary tables"),
            ));
        }
        Ok(Self {
            positions: Tensor::from_slice(positions, positions.len(), device)?,
            table_len,
        })
    }
}

/// Neox-style rotary embedding, in place on `q` `[tokens, heads, head_dim]` and `k`
/// `[tokens, kv_heads, head_dim]` (fp16, rows contiguous). `cos`/`sin`: `[positions,
/// head_dim / 2]` f32.
pub fn rope_neox_inplace(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &RopePositions,
) -> Result<()> {
    const OP: &str = "rope_neox";
    let (n, q_stride) = row_stride3(q, OP, "q")?;
    let (nk, k_stride) = row_stride3(k, OP, "k")?;
    let (_, heads, head_dim) = q.dims3()?;
    let (_, kv_heads, k_hd) = k.dims3()?;
    let (table_len, half) = cos.dims2()?;
    if nk != n
        || k_hd != head_dim
        || !head_dim.is_multiple_of(2)
        || half * 2 != head_dim
        || sin.dims() != cos.dims()
        || positions.positions.dims() != [n]
        || table_len != positions.table_len
    {
        return Err(shape_err(
            OP,
            format!(
                "q {:?}, k {:?}, cos {:?}, sin {:?}, {} positions for a table of {} do not fit",
                q.dims(),
                k.dims(),
                cos.dims(),
                sin.dims(),
                positions.positions.dims()[0],
                positions.table_len
            ),
        ));
    }
    for (t, what) in [(cos, "cos"), (sin, "sin")] {
        contiguous(t, OP, what)?;
        check_dtype(t, DType::F32, OP, what)?;
    }
    check_dtype(q, DType::F16, OP, "q")?;
    check_dtype(k, DType::F16, OP, "k")?;
    if n == 0 {
        return Ok(());
    }
    Launch::new(
        OP,
        "rotary",
        "wick_rope_neox_f16",
        (u32_of(OP, "tokens", n)?, 1, 1),
        ROW_THREADS,
    )
    .output(q, "q")
    .output(k, "k")
    .input(cos, "cos")
    .input(sin, "sin")
    .input(&positions.positions, "positions")
    .i32(i32_of(OP, "heads", heads)?)
    .i32(i32_of(OP, "kv_heads", kv_heads)?)
    .i32(i32_of(OP, "head_dim", head_dim)?)
    .i64(q_stride as i64)
    .i64(k_stride as i64)
    .run()
}

/// `silu(gate) * up`, elementwise; both contiguous fp16 of one shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "silu_mul";
    if gate.dims() != up.dims() {
        return Err(shape_err(
            OP,
            format!("gate {:?} and up {:?} differ", gate.dims(), up.dims()),
        ));
    }
    contiguous(gate, OP, "gate")?;
    contiguous(up, OP, "up")?;
    check_dtype(gate, DType::F16, OP, "gate")?;
    check_dtype(up, DType::F16, OP, "up")?;
    let out = uninit(gate.device(), DType::F16, gate.dims())?;
    let n = gate.elem_count();
    if n == 0 {
        return Ok(out);
    }
    let blocks = n.div_ceil(ROW_THREADS as usize).min(65_535) as u32;
    Launch::new(
        OP,
        "activation",
        "wick_silu_mul_f16",
        (blocks, 1, 1),
        ROW_THREADS,
    )
    .output(&out, "out")
    .input(gate, "gate")
    .input(up, "up")
    .i64(n as i64)
    .run()?;
    Ok(out)
}

/// Greedy sampling: the argmax of each row of `logits` `[rows, vocab]` (f32 or f16, rows
/// contiguous) as `[rows]` u32. Ties go to the lowest id; NaN never wins.
pub fn argmax(logits: &Tensor) -> Result<Tensor> {
    const OP: &str = "argmax";
    let (rows, vocab) = logits.dims2().map_err(|_| {
        shape_err(
            OP,
            format!("expected [rows, vocab], got {:?}", logits.dims()),
        )
    })?;
    let st = logits.stride();
    if vocab > 1 && st[1] != 1 {
        return Err(shape_err(OP, "logits rows must be contiguous".into()));
    }
    let name = match logits.dtype() {
        DType::F32 => "wick_argmax_f32",
        DType::F16 => "wick_argmax_f16",
        other => {
            return Err(KernelError::DType {
                op: OP,
                what: "logits",
                got: other,
                want: DType::F32,
            })
        }
    };
    let out = uninit(logits.device(), DType::U32, &[rows])?;
    if rows == 0 {
        return Ok(out);
    }
    Launch::new(
        OP,
        "sampling",
        name,
        (u32_of(OP, "rows", rows)?, 1, 1),
        ARGMAX_THREADS,
    )
    .output(&out, "out")
    .input(logits, "logits")
    .i32(i32_of(OP, "vocab", vocab)?)
    .i64(if rows > 1 { st[0] as i64 } else { vocab as i64 })
    .run()?;
    Ok(out)
}

/// One row's sampling options (the engine's `SamplingParams`, resolved): what the device
/// sampling kernel applies, in the CPU sampler's order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleSpec {
    /// 0 (or less): greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    pub repeat_penalty: f32,
    /// How many of the last tokens the penalties look at: 0 off, -1 all.
    pub repeat_last_n: i64,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// The row's RNG seed; with `step` (the count of tokens drawn so far) it fixes the draw.
    pub seed: u64,
    pub step: u64,
}

/// The rows of a sampling launch on the device: options and penalty windows, validated
/// (token ids inside the vocabulary, options in range) and uploaded.
pub struct SampleBatch {
    fparams: Tensor,
    iparams: Tensor,
    pen_ids: Tensor,
    pen_counts: Tensor,
    rows: usize,
    vocab: usize,
}

impl SampleBatch {
    /// `rows[i]`: the options of logits row i and the sequence's tokens so far (what the
    /// penalties look at; ids outside the vocabulary are ignored, as on the CPU).
    pub fn new(rows: &[(SampleSpec, &[u32])], vocab: usize, device: &Device) -> Result<Self> {
        const OP: &str = "sample";
        if vocab == 0 || vocab >= i32::MAX as usize {
            return Err(shape_err(OP, format!("vocabulary of {vocab}")));
        }
        let mut fparams = Vec::with_capacity(rows.len() * 8);
        let mut iparams = Vec::with_capacity(rows.len() * 8);
        let (mut ids, mut counts) = (Vec::new(), Vec::new());
        for (i, (s, history)) in rows.iter().enumerate() {
            let bad = !(s.temperature.is_finite()
                && (s.top_p > 0.0 && s.top_p <= 1.0)
                && (0.0..=1.0).contains(&s.min_p)
                && s.repeat_penalty.is_finite()
                && s.repeat_penalty > 0.0
                && s.presence_penalty.is_finite()
                && s.frequency_penalty.is_finite()
                && s.repeat_last_n >= -1);
            if bad {
                return Err(shape_err(
                    OP,
                    format!("row {i}: options out of range: {s:?}"),
                ));
            }
            let offset = ids.len();
            let active = s.repeat_last_n != 0
                && (s.repeat_penalty != 1.0
                    || s.presence_penalty != 0.0
                    || s.frequency_penalty != 0.0);
            if active {
                let window = if s.repeat_last_n < 0 {
                    &history[..]
                } else {
                    let n = usize::try_from(s.repeat_last_n).unwrap_or(usize::MAX);
                    &history[history.len().saturating_sub(n)..]
                };
                let mut w: Vec<u32> = window
                    .iter()
                    .copied()
                    .filter(|&t| (t as usize) < vocab)
                    .collect();
                w.sort_unstable();
                for run in w.chunk_by(|a, b| a == b) {
                    ids.push(run[0]);
                    counts.push(run.len() as u32);
                }
            }
            fparams.extend([
                s.temperature,
                s.top_p,
                s.min_p,
                s.repeat_penalty,
                s.presence_penalty,
                s.frequency_penalty,
                0.0,
                0.0,
            ]);
            iparams.extend([
                u32::try_from(s.top_k.min(vocab)).unwrap_or(u32::MAX),
                offset as u32,
                (ids.len() - offset) as u32,
                s.seed as u32,
                (s.seed >> 32) as u32,
                s.step as u32,
                (s.step >> 32) as u32,
                0,
            ]);
        }
        // Never an empty upload (a zero-sized device allocation); no row points at the pad.
        if ids.is_empty() {
            ids.push(0);
            counts.push(0);
        }
        let n = rows.len();
        let (np, nc) = (ids.len(), counts.len());
        Ok(Self {
            fparams: Tensor::from_vec(fparams, (n.max(1), 8), device)
                .or_else(|_| Tensor::zeros((1, 8), DType::F32, device))?,
            iparams: Tensor::from_vec(iparams, (n.max(1), 8), device)
                .or_else(|_| Tensor::zeros((1, 8), DType::U32, device))?,
            pen_ids: Tensor::from_vec(ids, np, device)?,
            pen_counts: Tensor::from_vec(counts, nc, device)?,
            rows: n,
            vocab,
        })
    }
}

/// The next token of every row of `logits` `[rows, vocab]` (f32, rows contiguous, penalized
/// in place: pass the step's own logits), as `[rows]` u32: the CPU sampler's chain on the
/// device, so only token ids need to cross to the host.
pub fn sample(logits: &Tensor, batch: &SampleBatch) -> Result<Tensor> {
    const OP: &str = "sample";
    let (rows, vocab) = logits.dims2().map_err(|_| {
        shape_err(
            OP,
            format!("expected [rows, vocab], got {:?}", logits.dims()),
        )
    })?;
    check_dtype(logits, DType::F32, OP, "logits")?;
    if rows != batch.rows || vocab != batch.vocab {
        return Err(shape_err(
            OP,
            format!(
                "logits {:?} for {} rows of a {}-token vocabulary",
                logits.dims(),
                batch.rows,
                batch.vocab
            ),
        ));
    }
    let st = logits.stride();
    if vocab > 1 && st[1] != 1 {
        return Err(shape_err(OP, "logits rows must be contiguous".into()));
    }
    let out = uninit(logits.device(), DType::U32, &[rows])?;
    if rows == 0 {
        return Ok(out);
    }
    Launch::new(
        OP,
        "sampling",
        "wick_sample_f32",
        (u32_of(OP, "rows", rows)?, 1, 1),
        SAMPLE_THREADS,
    )
    .output(&out, "out")
    .output(logits, "logits")
    .i32(i32_of(OP, "vocab", vocab)?)
    .i64(if rows > 1 { st[0] as i64 } else { vocab as i64 })
    .input(&batch.fparams, "fparams")
    .input(&batch.iparams, "iparams")
    .input(&batch.pen_ids, "penalty ids")
    .input(&batch.pen_counts, "penalty counts")
    .run()?;
    Ok(out)
}
