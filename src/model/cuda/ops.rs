//! Safe launch wrappers for kernels/*.cu. Each takes candle tensors on one CUDA device,
//! checks their dtypes and shapes, and queues the kernel on the device's stream. The ones
//! marked "in place" write into storage of tensors they are given: only pass tensors the
//! caller owns outright (a KV cache, a fresh projection output).

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{DType, Tensor};
use half::f16;

use super::{check_dtype, cuda_device, dev_ptr, driver, func, shape_err, uninit, Result};

/// Threads per block for the row kernels (norm, rope, cache writes, argmax).
const ROW_THREADS: u32 = 256;
/// Grid y and z dimensions are limited to this.
const MAX_GRID_Y: usize = 65_535;
/// Positions per partition of the split-context attention.
pub const ATTENTION_PARTITION: usize = 512;
/// Above this many context positions the split-context attention is used.
pub const SPLIT_ABOVE: usize = 2 * ATTENTION_PARTITION;

fn launch_cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

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

/// Writes `key`/`value` rows `[tokens, kv_heads, head_dim]` into the paged caches
/// `[num_blocks, block_size, kv_heads, head_dim]` (in place) at `slot_mapping[t]`
/// (`block * block_size + offset`; `u32::MAX` skips a token). All fp16; slots are u32.
/// Slots are not checked against the cache here (that would read them back): callers build
/// them from validated block tables, as [`super::CudaKvCache`] does.
pub fn reshape_and_cache(
    key: &Tensor,
    value: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slot_mapping: &Tensor,
) -> Result<()> {
    const OP: &str = "reshape_and_cache";
    let dev = cuda_device(k_cache, OP, "k_cache")?;
    let (n, k_stride) = row_stride3(key, OP, "key")?;
    let (nv, v_stride) = row_stride3(value, OP, "value")?;
    let (_, _, kv_heads, head_dim) = k_cache
        .dims4()
        .map_err(|_| shape_err(OP, format!("k_cache must be 4-d, got {:?}", k_cache.dims())))?;
    let row = kv_heads * head_dim;
    if v_cache.dims() != k_cache.dims()
        || nv != n
        || key.dims()[1..] != [kv_heads, head_dim]
        || value.dims()[1..] != [kv_heads, head_dim]
        || slot_mapping.dims() != [n]
    {
        return Err(shape_err(
            OP,
            format!(
                "key {:?}, value {:?}, slots {:?} do not fit caches {:?} / {:?}",
                key.dims(),
                value.dims(),
                slot_mapping.dims(),
                k_cache.dims(),
                v_cache.dims()
            ),
        ));
    }
    contiguous(k_cache, OP, "k_cache")?;
    contiguous(v_cache, OP, "v_cache")?;
    contiguous(slot_mapping, OP, "slot_mapping")?;
    if n == 0 {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let f = func(dev, "cache", "wick_reshape_and_cache_f16")?;
    let kp = dev_ptr::<f16>(key, &stream, OP, "key")?;
    let vp = dev_ptr::<f16>(value, &stream, OP, "value")?;
    let kcp = dev_ptr::<f16>(k_cache, &stream, OP, "k_cache")?;
    let vcp = dev_ptr::<f16>(v_cache, &stream, OP, "v_cache")?;
    let sp = dev_ptr::<u32>(slot_mapping, &stream, OP, "slot_mapping")?;
    let row_len = i32_of(OP, "row", row)?;
    let (ks, vs) = (k_stride as i64, v_stride as i64);
    let mut b = stream.launch_builder(&f);
    b.arg(&kp)
        .arg(&vp)
        .arg(&kcp)
        .arg(&vcp)
        .arg(&sp)
        .arg(&row_len)
        .arg(&ks)
        .arg(&vs);
    let threads = (row as u32 / 2).clamp(32, ROW_THREADS);
    unsafe { b.launch(launch_cfg((u32_of(OP, "tokens", n)?, 1, 1), threads)) }.map_err(driver)?;
    Ok(())
}

/// Everything paged attention reads. Query row `i` of `q` (`[rows, heads, head_dim]`,
/// fp16) belongs to block-table row `query_seq[i]` and sees positions
/// `[query_ctx[i] - window, query_ctx[i])` of it. `block_tables`: `[seqs, max_blocks]` u32.
pub struct PagedAttention<'a> {
    pub q: &'a Tensor,
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    pub block_tables: &'a Tensor,
    pub query_seq: &'a Tensor,
    pub query_ctx: &'a Tensor,
    /// The largest `query_ctx` (the host knows it; sizes the split-context grid).
    pub max_context: usize,
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

/// Head sizes the attention kernel is built for.
pub const ATTENTION_HEAD_DIMS: [usize; 4] = [64, 96, 128, 256];

/// Paged attention for one query row per entry of `query_seq`; returns `[rows, heads,
/// head_dim]` fp16. Grouped-query heads: `heads` must be a multiple of the cache's kv_heads.
pub fn paged_attention(a: &PagedAttention) -> Result<Tensor> {
    const OP: &str = "paged_attention";
    let dev = cuda_device(a.q, OP, "q")?;
    let (rows, q_stride) = row_stride3(a.q, OP, "q")?;
    let (_, heads, head_dim) = a.q.dims3()?;
    let (_, block_size, kv_heads, cache_hd) = a.k_cache.dims4().map_err(|_| {
        shape_err(
            OP,
            format!("k_cache must be 4-d, got {:?}", a.k_cache.dims()),
        )
    })?;
    if a.v_cache.dims() != a.k_cache.dims() || cache_hd != head_dim {
        return Err(shape_err(
            OP,
            format!(
                "q {:?} does not fit caches {:?} / {:?}",
                a.q.dims(),
                a.k_cache.dims(),
                a.v_cache.dims()
            ),
        ));
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(shape_err(
            OP,
            format!("{heads} query heads are not a multiple of {kv_heads} kv heads"),
        ));
    }
    if !ATTENTION_HEAD_DIMS.contains(&head_dim) {
        return Err(shape_err(
            OP,
            format!("head_dim {head_dim} is not one of {ATTENTION_HEAD_DIMS:?}"),
        ));
    }
    let (_, max_blocks) = a.block_tables.dims2().map_err(|_| {
        shape_err(
            OP,
            format!("block_tables must be 2-d, got {:?}", a.block_tables.dims()),
        )
    })?;
    if a.query_seq.dims() != [rows] || a.query_ctx.dims() != [rows] {
        return Err(shape_err(
            OP,
            format!(
                "query_seq {:?} / query_ctx {:?} must have one entry per query row ({rows})",
                a.query_seq.dims(),
                a.query_ctx.dims()
            ),
        ));
    }
    if a.max_context > max_blocks * block_size {
        return Err(shape_err(
            OP,
            format!(
                "context {} exceeds the {max_blocks} blocks of {block_size} in block_tables",
                a.max_context
            ),
        ));
    }
    for (t, what) in [
        (a.k_cache, "k_cache"),
        (a.v_cache, "v_cache"),
        (a.block_tables, "block_tables"),
        (a.query_seq, "query_seq"),
        (a.query_ctx, "query_ctx"),
    ] {
        contiguous(t, OP, what)?;
    }
    check_dtype(a.q, DType::F16, OP, "q")?;
    if rows > MAX_GRID_Y {
        return Err(shape_err(
            OP,
            format!("{rows} query rows exceed the {MAX_GRID_Y} of one launch"),
        ));
    }
    // The kernel reads K/V rows in 8-byte pieces.
    for (t, what) in [(a.k_cache, "k_cache"), (a.v_cache, "v_cache")] {
        if !t.layout().start_offset().is_multiple_of(4) {
            return Err(shape_err(OP, format!("{what} must start 8-byte aligned")));
        }
    }
    let out = uninit(dev, DType::F16, &[rows, heads, head_dim])?;
    if rows == 0 {
        return Ok(out);
    }
    let partition = match a.split {
        Split::Partition(p) if p == 0 || !p.is_multiple_of(block_size) => {
            return Err(shape_err(
                OP,
                format!("partition size {p} is not a multiple of the block size {block_size}"),
            ))
        }
        Split::Partition(p) => p,
        Split::Auto if a.max_context > SPLIT_ABOVE => ATTENTION_PARTITION,
        Split::Auto | Split::Never => 0,
    };
    let partitions = if partition == 0 {
        1
    } else {
        a.max_context.div_ceil(partition).max(1)
    };
    let split = partition > 0;
    let (part_acc, part_ml) = if split {
        (
            Some(uninit(
                dev,
                DType::F32,
                &[rows, heads, partitions, head_dim],
            )?),
            Some(uninit(dev, DType::F32, &[rows, heads, partitions, 2])?),
        )
    } else {
        (None, None)
    };

    let stream = dev.cuda_stream();
    let name = format!("wick_paged_attention_d{head_dim}_f16");
    let f = func(dev, "attention", &name)?;
    let out_p = dev_ptr::<f16>(&out, &stream, OP, "out")?;
    let acc_p = match &part_acc {
        Some(t) => dev_ptr::<f32>(t, &stream, OP, "partials")?,
        None => 0u64,
    };
    let ml_p = match &part_ml {
        Some(t) => dev_ptr::<f32>(t, &stream, OP, "partials")?,
        None => 0u64,
    };
    let q_p = dev_ptr::<f16>(a.q, &stream, OP, "q")?;
    let kc_p = dev_ptr::<f16>(a.k_cache, &stream, OP, "k_cache")?;
    let vc_p = dev_ptr::<f16>(a.v_cache, &stream, OP, "v_cache")?;
    let bt_p = dev_ptr::<u32>(a.block_tables, &stream, OP, "block_tables")?;
    let qs_p = dev_ptr::<u32>(a.query_seq, &stream, OP, "query_seq")?;
    let qc_p = dev_ptr::<u32>(a.query_ctx, &stream, OP, "query_ctx")?;
    let q_stride = q_stride as i64;
    let max_blocks = i32_of(OP, "max_blocks", max_blocks)?;
    let (heads_i, kv_heads_i) = (
        i32_of(OP, "heads", heads)?,
        i32_of(OP, "kv_heads", kv_heads)?,
    );
    let block_size_i = i32_of(OP, "block_size", block_size)?;
    let window = i32_of(OP, "sliding window", a.sliding_window.unwrap_or(0))?;
    let partition_i = i32_of(OP, "partition", partition)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&out_p)
        .arg(&acc_p)
        .arg(&ml_p)
        .arg(&q_p)
        .arg(&q_stride)
        .arg(&kc_p)
        .arg(&vc_p)
        .arg(&bt_p)
        .arg(&max_blocks)
        .arg(&qs_p)
        .arg(&qc_p)
        .arg(&heads_i)
        .arg(&kv_heads_i)
        .arg(&block_size_i)
        .arg(&window)
        .arg(&a.scale)
        .arg(&partition_i);
    // Must match HEADS_PER_BLOCK and ATTN_WARPS in kernels/attention.cu.
    let chunks = (heads / kv_heads).div_ceil(8);
    let grid = (
        u32_of(OP, "kv heads", kv_heads * chunks)?,
        u32_of(OP, "rows", rows)?,
        u32_of(OP, "partitions", partitions)?,
    );
    unsafe { b.launch(launch_cfg(grid, 128)) }.map_err(driver)?;

    if split {
        let f = func(
            dev,
            "attention",
            &format!("wick_paged_attention_reduce_d{head_dim}_f16"),
        )?;
        let parts = i32_of(OP, "partitions", partitions)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&out_p).arg(&acc_p).arg(&ml_p).arg(&parts);
        let grid = (heads as u32, rows as u32, 1);
        unsafe { b.launch(launch_cfg(grid, head_dim.min(128) as u32)) }.map_err(driver)?;
    }
    // The partials must live until the kernels that read them are queued; candle frees
    // stream-ordered, so dropping them here is safe.
    drop((part_acc, part_ml));
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
    let dev = cuda_device(residual, OP, "residual")?;
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
    if let Some(d) = delta {
        contiguous(d, OP, "delta")?;
    }
    let out = uninit(dev, DType::F16, &[rows, hidden])?;
    if rows == 0 {
        return Ok(out);
    }
    let stream = dev.cuda_stream();
    let f = func(dev, "rms_norm", "wick_add_rms_norm_f16")?;
    let out_p = dev_ptr::<f16>(&out, &stream, OP, "out")?;
    let st_p = dev_ptr::<f16>(residual, &stream, OP, "residual")?;
    let d_p = match delta {
        Some(d) => dev_ptr::<f16>(d, &stream, OP, "delta")?,
        None => 0u64,
    };
    let w_p = dev_ptr::<f16>(weight, &stream, OP, "weight")?;
    let hidden_i = i32_of(OP, "hidden", hidden)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&out_p)
        .arg(&st_p)
        .arg(&d_p)
        .arg(&w_p)
        .arg(&hidden_i)
        .arg(&eps);
    let threads = if hidden >= 4096 { 1024 } else { ROW_THREADS };
    unsafe { b.launch(launch_cfg((u32_of(OP, "rows", rows)?, 1, 1), threads)) }.map_err(driver)?;
    Ok(out)
}

/// Neox-style rotary embedding, in place on `q` `[tokens, heads, head_dim]` and `k`
/// `[tokens, kv_heads, head_dim]` (fp16, rows contiguous). `cos`/`sin`: `[positions,
/// head_dim / 2]` f32; `positions`: `[tokens]` u32, each below the table's length (the
/// caller checks; the decoder does before every step).
pub fn rope_neox_inplace(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
) -> Result<()> {
    const OP: &str = "rope_neox";
    let dev = cuda_device(q, OP, "q")?;
    let (n, q_stride) = row_stride3(q, OP, "q")?;
    let (nk, k_stride) = row_stride3(k, OP, "k")?;
    let (_, heads, head_dim) = q.dims3()?;
    let (_, kv_heads, k_hd) = k.dims3()?;
    let (_, half) = cos.dims2()?;
    if nk != n
        || k_hd != head_dim
        || !head_dim.is_multiple_of(2)
        || half * 2 != head_dim
        || sin.dims() != cos.dims()
        || positions.dims() != [n]
    {
        return Err(shape_err(
            OP,
            format!(
                "q {:?}, k {:?}, cos {:?}, sin {:?}, positions {:?} do not fit together",
                q.dims(),
                k.dims(),
                cos.dims(),
                sin.dims(),
                positions.dims()
            ),
        ));
    }
    for (t, what) in [(cos, "cos"), (sin, "sin"), (positions, "positions")] {
        contiguous(t, OP, what)?;
    }
    if n == 0 {
        return Ok(());
    }
    let stream = dev.cuda_stream();
    let f = func(dev, "rotary", "wick_rope_neox_f16")?;
    let q_p = dev_ptr::<f16>(q, &stream, OP, "q")?;
    let k_p = dev_ptr::<f16>(k, &stream, OP, "k")?;
    let c_p = dev_ptr::<f32>(cos, &stream, OP, "cos")?;
    let s_p = dev_ptr::<f32>(sin, &stream, OP, "sin")?;
    let p_p = dev_ptr::<u32>(positions, &stream, OP, "positions")?;
    let (h, kh, hd) = (
        i32_of(OP, "heads", heads)?,
        i32_of(OP, "kv_heads", kv_heads)?,
        i32_of(OP, "head_dim", head_dim)?,
    );
    let (qs, ks) = (q_stride as i64, k_stride as i64);
    let mut b = stream.launch_builder(&f);
    b.arg(&q_p)
        .arg(&k_p)
        .arg(&c_p)
        .arg(&s_p)
        .arg(&p_p)
        .arg(&h)
        .arg(&kh)
        .arg(&hd)
        .arg(&qs)
        .arg(&ks);
    unsafe { b.launch(launch_cfg((u32_of(OP, "tokens", n)?, 1, 1), ROW_THREADS)) }
        .map_err(driver)?;
    Ok(())
}

/// `silu(gate) * up`, elementwise; both contiguous fp16 of one shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const OP: &str = "silu_mul";
    let dev = cuda_device(gate, OP, "gate")?;
    if gate.dims() != up.dims() {
        return Err(shape_err(
            OP,
            format!("gate {:?} and up {:?} differ", gate.dims(), up.dims()),
        ));
    }
    contiguous(gate, OP, "gate")?;
    contiguous(up, OP, "up")?;
    let out = uninit(dev, DType::F16, gate.dims())?;
    let n = gate.elem_count();
    if n == 0 {
        return Ok(out);
    }
    let stream = dev.cuda_stream();
    let f = func(dev, "activation", "wick_silu_mul_f16")?;
    let o_p = dev_ptr::<f16>(&out, &stream, OP, "out")?;
    let g_p = dev_ptr::<f16>(gate, &stream, OP, "gate")?;
    let u_p = dev_ptr::<f16>(up, &stream, OP, "up")?;
    let n_i = n as i64;
    let mut b = stream.launch_builder(&f);
    b.arg(&o_p).arg(&g_p).arg(&u_p).arg(&n_i);
    let blocks = n.div_ceil(ROW_THREADS as usize).min(65_535) as u32;
    unsafe { b.launch(launch_cfg((blocks, 1, 1), ROW_THREADS)) }.map_err(driver)?;
    Ok(out)
}

/// Greedy sampling: the argmax of each row of `logits` `[rows, vocab]` (f32 or f16, rows
/// contiguous) as `[rows]` u32. Ties go to the lowest id; NaN never wins.
pub fn argmax(logits: &Tensor) -> Result<Tensor> {
    const OP: &str = "argmax";
    let dev = cuda_device(logits, OP, "logits")?;
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
    let out = uninit(dev, DType::U32, &[rows])?;
    if rows == 0 {
        return Ok(out);
    }
    let stream = dev.cuda_stream();
    let (name, l_p) = match logits.dtype() {
        DType::F32 => (
            "wick_argmax_f32",
            dev_ptr::<f32>(logits, &stream, OP, "logits")?,
        ),
        DType::F16 => (
            "wick_argmax_f16",
            dev_ptr::<f16>(logits, &stream, OP, "logits")?,
        ),
        other => {
            return Err(super::KernelError::DType {
                op: OP,
                what: "logits",
                got: other,
                want: DType::F32,
            })
        }
    };
    let f = func(dev, "sampling", name)?;
    let o_p = dev_ptr::<u32>(&out, &stream, OP, "out")?;
    let vocab_i = i32_of(OP, "vocab", vocab)?;
    let stride = st[0] as i64;
    let mut b = stream.launch_builder(&f);
    b.arg(&o_p).arg(&l_p).arg(&vocab_i).arg(&stride);
    unsafe { b.launch(launch_cfg((u32_of(OP, "rows", rows)?, 1, 1), 1024)) }.map_err(driver)?;
    Ok(out)
}
