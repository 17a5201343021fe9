//! Our CPU kernels for GGUF block types that candle multiplies with scalar code: Q4_1
//! (SmolLM2's files) and Q5_0 (most of Qwen2.5's Q4_K_M mix). Activations are quantized to
//! 8 bits per 32-value block and dotted with AVX2, as llama.cpp does. The weights are wrapped
//! as a candle `QuantizedType`, so `QMatMul` and embeddings call into them unchanged.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QuantizedType};
use candle_core::CpuStorage;
use half::f16;
use memmap2::Mmap;

use super::huge_pages::HugeBytes;

const QK: usize = 32;

#[cfg(target_arch = "x86_64")]
mod amx;

/// Discriminants as the kernels' `KIND` parameters spell them (`x86::Q4_1` and so on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// d: f16, m: f16, 16 bytes of nibbles; x = d * q + m.
    Q4_1,
    /// d: f16, 32 high bits, 16 bytes of nibbles; x = d * (q - 16).
    Q5_0,
    /// d: f16, 32 signed bytes; x = d * q.
    Q8_0,
    /// Q4_K: per 256 values of a row, f16 scales d and dmin; per 32, 6-bit integer scales
    /// s and t and 16 bytes of nibbles q: x = (d * s) * q - dmin * t (see [`pack_k`]).
    Q4K,
    /// Q6_K: per 256 values of a row, an f16 scale d; per 32, two signed 8-bit scales s
    /// (values 0..16 and 16..32) and q in 0..64 as nibbles and 2-bit highs:
    /// x = (d * s) * (q - 32).
    Q6K,
}

impl Kind {
    /// Bytes per 32 values of a row, in our layout (the GGUF layout for the 32-value types),
    /// not counting the k-quants' superblock heads.
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_1 => 20,
            Kind::Q5_0 => 22,
            Kind::Q8_0 => 34,
            Kind::Q4K => 18,
            Kind::Q6K => 26,
        }
    }

    /// Bytes per row of each 256-value superblock's head (the k-quants' f16 scales).
    fn head_bytes(self) -> usize {
        #[cfg(target_arch = "x86_64")]
        return x86::head_bytes(self as u8);
        #[cfg(not(target_arch = "x86_64"))]
        0
    }

    /// Bytes per row of `row_blocks` 32-value blocks in our layout: GGUF's for Q6_K, 4 more
    /// per 256 values (2.8%) for Q4_K.
    fn row_bytes(self, row_blocks: usize) -> usize {
        row_blocks * self.block_bytes() + row_blocks / K_BLOCKS * self.head_bytes()
    }

    /// Rows of `row_len` values in `len` bytes of GGUF blocks of this type.
    fn gguf_rows(self, len: usize, row_len: usize) -> usize {
        let (values, bytes) = self.gguf_block();
        len / (row_len / values * bytes).max(1)
    }

    /// Values and bytes of one GGUF block of this type.
    fn gguf_block(self) -> (usize, usize) {
        match self {
            Kind::Q4K => (256, 144),
            Kind::Q6K => (256, 210),
            k => (QK, k.block_bytes()),
        }
    }

    /// The k-quants, which only our packed (tile kernel) layout holds.
    fn is_k(self) -> bool {
        matches!(self, Kind::Q4K | Kind::Q6K)
    }

    fn dtype(self) -> GgmlDType {
        match self {
            Kind::Q4_1 => GgmlDType::Q4_1,
            Kind::Q5_0 => GgmlDType::Q5_0,
            Kind::Q8_0 => GgmlDType::Q8_0,
            Kind::Q4K => GgmlDType::Q4K,
            Kind::Q6K => GgmlDType::Q6K,
        }
    }
}

/// One block of quantized activations: 32 int8 values with scale `d` and `s = d * sum(q)`.
/// `repr(C)`: the AMX kernel loads `q` of 16 rows at a fixed stride.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Act {
    d: f32,
    s: f32,
    /// sum(q), and the sum of its first 16 values: for the integer offset correction of
    /// Q5_0, Q8_0 and (per half) Q6_K in the tile kernels.
    sum: i32,
    sum_lo: i32,
    q: [i8; QK],
}

/// Where the blocks live: in the model file's memory map (shared with the page cache and with
/// every other process serving the same file) or, when they had to be rearranged, owned.
enum Data {
    Owned(HugeBytes),
    Mapped(Arc<Mmap>, Range<usize>),
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Data::Owned(v) => v,
            Data::Mapped(m, r) => &m[r.clone()],
        }
    }
}

/// Quantized weights, multiplied by our kernels: in GGUF block layout, or with rows
/// interleaved in groups of [`GROUP`] (see [`pack`]) where the CPU has a tile kernel for that.
/// Projections call [`FastQuant::forward`] directly: candle's own CPU matmul picks repacked
/// kernels by dtype and would read our packed bytes as GGUF blocks.
pub struct FastQuant {
    kind: Kind,
    data: Data,
    /// Blocks per row.
    row_blocks: usize,
    packed: bool,
}

impl std::fmt::Debug for FastQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastQuant")
            .field("kind", &self.kind)
            .field("row_blocks", &self.row_blocks)
            .field("packed", &self.packed)
            .finish()
    }
}

impl FastQuant {
    /// The kind when we have a faster kernel than candle for `dtype` on this CPU. For Q8_0,
    /// candle's repacked VNNI kernels win where they apply (rows of a multiple of 256
    /// values), so only other row lengths come here, except on AVX2 alone, where candle
    /// has no repacked Q8_0 kernel.
    /// Q4_K and Q6_K come here where the CPU has a tile kernel (their activations are then
    /// quantized once per matmul, not once per row part as in candle's kernels, and held
    /// once, not in candle's two extra repacked copies).
    fn kind_for(dtype: GgmlDType, row_len: usize, len: usize) -> Option<Kind> {
        let kind = match dtype {
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q5_0 => Kind::Q5_0,
            GgmlDType::Q8_0
                if !row_len.is_multiple_of(256) || tile_kernel() == Some(Tile::Avx2) =>
            {
                Kind::Q8_0
            }
            GgmlDType::Q4K if tile_kernel().is_some() => Kind::Q4K,
            GgmlDType::Q6K if tile_kernel().is_some() => Kind::Q6K,
            _ => return None,
        };
        let (values, bytes) = kind.gguf_block();
        let whole = row_len.is_multiple_of(values) && len.is_multiple_of(bytes);
        // The k-quants need whole groups of rows for the packed layout.
        let packable = !kind.is_k() || kind.gguf_rows(len, row_len).is_multiple_of(GROUP);
        (has_avx2() && whole && packable).then_some(kind)
    }

    /// Whether tensors of `dtype` with rows of `row_len` values get our kernels (which are
    /// parallel inside) rather than candle's.
    pub fn handles(dtype: GgmlDType, row_len: usize) -> bool {
        Self::kind_for(dtype, row_len, 0).is_some()
    }

    /// Wraps owned GGUF tensor bytes, or gives them back to be left to candle.
    pub fn owned(dtype: GgmlDType, row_len: usize, bytes: Vec<u8>) -> Result<Self, Vec<u8>> {
        match Self::kind_for(dtype, row_len, bytes.len()).filter(|k| !bytes.is_empty() || !k.is_k())
        {
            Some(kind) => Ok(Self::new(kind, row_len, Data::Owned(bytes.into()), true)),
            None => Err(bytes),
        }
    }

    /// Wraps a tensor of the model file's memory map: in place, without copying it, unless
    /// `for_matmul` and it is repacked for the tile kernel (then its file pages are dropped
    /// as they are packed). A table only gathered from (an untied token embedding) stays
    /// mapped, so only the rows in use are ever read.
    pub fn mapped(
        dtype: GgmlDType,
        row_len: usize,
        map: &Arc<Mmap>,
        range: Range<usize>,
        for_matmul: bool,
    ) -> Option<Self> {
        let kind = Self::kind_for(dtype, row_len, range.len())?;
        // k-quant tables only gathered from stay with candle (they need no repacking).
        if kind.is_k() && (!for_matmul || range.is_empty()) {
            return None;
        }
        (range.end <= map.len())
            .then(|| Self::new(kind, row_len, Data::Mapped(map.clone(), range), for_matmul))
    }

    fn new(kind: Kind, row_len: usize, data: Data, for_matmul: bool) -> Self {
        let row_blocks = row_len / QK;
        let rows = kind.gguf_rows(data.len(), row_len);
        // kind_for made sure the k-quants can always be packed.
        let packed = kind.is_k()
            || for_matmul
                && row_blocks > 0
                && rows.is_multiple_of(GROUP)
                && tile_kernel().is_some();
        let data = match data {
            Data::Mapped(map, range) if packed => {
                Data::Owned(pack_mapped(kind, &map, range, rows, row_blocks))
            }
            data if packed => Data::Owned(pack(kind, &data, row_blocks)),
            data => data,
        };
        Self {
            kind,
            data,
            row_blocks,
            packed,
        }
    }

    /// `x @ W^T` for activations `[.., k]` (any float dtype, on the CPU): `[.., n]` in f32.
    pub fn forward(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        let (k, n) = (self.row_blocks * QK, self.out_rows());
        let out = self.with_input(x, |xs, m| {
            let mut out = vec![0f32; m * n];
            self.matmul_t((m, k, n), xs, &mut out)?;
            Ok(out)
        })?;
        output(out, x, n)
    }

    /// Output values per input row: the weight's rows.
    fn out_rows(&self) -> usize {
        self.data.len() / self.kind.row_bytes(self.row_blocks).max(1)
    }

    /// `f(values, rows)` on the activations `[.., k]` as f32: borrowed from a contiguous f32
    /// CPU tensor (the decoder's case: copying them was 3% of a 16-row decode step), else
    /// converted.
    fn with_input<R>(
        &self,
        x: &candle_core::Tensor,
        f: impl FnOnce(&[f32], usize) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let k = self.row_blocks * QK;
        if x.dims().last() != Some(&k) {
            candle_core::bail!(
                "{:?} matmul: input {:?} does not end in {k}",
                self.kind,
                x.dims()
            );
        }
        super::cpu_rows::with_f32(x, |xs| f(xs, xs.len() / k.max(1)))
    }

    /// `x @ W^T` for each of `ws` (projections of one input, such as q, k and v): the
    /// activations are quantized once and every weight's column groups run as one parallel
    /// job, so a step pays one quantization and one dispatch instead of one per weight. Each
    /// output is computed exactly as [`Self::forward`] computes it (the same tile calls), so
    /// rows stay batch-invariant. `None` when the weights are not all packed for the tile
    /// kernel with the same input width: then call [`Self::forward`] on each.
    pub fn forward_many(
        ws: &[&FastQuant],
        x: &candle_core::Tensor,
    ) -> candle_core::Result<Option<Vec<candle_core::Tensor>>> {
        let (Some(t), Some(first)) = (tile_kernel(), ws.first()) else {
            return Ok(None);
        };
        let nb = first.row_blocks;
        if nb == 0 || ws.iter().any(|w| !w.packed || w.row_blocks != nb) {
            return Ok(None);
        }
        let ns: Vec<usize> = ws.iter().map(|w| w.out_rows()).collect();
        let outs = first.with_input(x, |xs, m| {
            let mut acts = Vec::with_capacity(m * nb);
            quantize_act(xs, &mut acts);
            let mut outs: Vec<Vec<f32>> = ns.iter().map(|n| vec![0f32; m * n]).collect();
            let ptrs: Vec<super::parallel::SharedOut> = outs
                .iter_mut()
                .map(|o| super::parallel::SharedOut(o.as_mut_ptr()))
                .collect();
            // SAFETY: output i holds m rows of weight i's out_rows() values; every weight is
            // packed with nb blocks per row (checked above); acts hold m rows of nb blocks.
            unsafe { packed_job(t, ws, nb, &mut acts, m, &ptrs) };
            Ok(outs)
        })?;
        outs.into_iter()
            .zip(ns)
            .map(|(out, n)| output(out, x, n))
            .collect::<candle_core::Result<Vec<_>>>()
            .map(Some)
    }

    fn blocks(&self) -> usize {
        self.out_rows() * self.row_blocks
    }

    fn dequantize_blocks(&self, first: usize, count: usize, out: &mut [f32]) {
        if self.kind.is_k() {
            for (i, o) in out.chunks_exact_mut(QK).take(count).enumerate() {
                let b = unpack_k(self.kind, &self.data, self.row_blocks, first + i);
                for (j, (o, &q)) in o.iter_mut().zip(&b.q).enumerate() {
                    *o = match self.kind {
                        Kind::Q4K => b.d[0] * q as f32 + b.m,
                        _ => b.d[j / 16] * (q as f32 - 32.0),
                    };
                }
            }
            return;
        }
        let bb = self.kind.block_bytes();
        let mut tmp = [0u8; 34];
        for (i, o) in out.chunks_exact_mut(QK).take(count).enumerate() {
            let b = if self.packed {
                unpack_block(
                    self.kind,
                    &self.data,
                    self.row_blocks,
                    first + i,
                    &mut tmp[..bb],
                );
                &tmp[..bb]
            } else {
                &self.data[(first + i) * bb..(first + i + 1) * bb]
            };
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            match self.kind {
                Kind::Q4_1 => {
                    let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                    for (j, &q) in b[4..20].iter().enumerate() {
                        o[j] = d * (q & 0x0f) as f32 + m;
                        o[j + 16] = d * (q >> 4) as f32 + m;
                    }
                }
                Kind::Q8_0 => {
                    for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                        *o = d * (q as i8) as f32;
                    }
                }
                Kind::Q4K | Kind::Q6K => unreachable!("k-quants returned above"),
                Kind::Q5_0 => {
                    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                    for (j, &q) in b[6..22].iter().enumerate() {
                        let lo = (q & 0x0f) as u32 | ((qh >> j) & 1) << 4;
                        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                        o[j] = d * (lo as f32 - 16.0);
                        o[j + 16] = d * (hi as f32 - 16.0);
                    }
                }
            }
        }
    }

    fn quantize_into(&mut self, xs: &[f32]) {
        if self.kind.is_k() {
            self.data = Data::Owned(pack(self.kind, &k_quantize(self.kind, xs), self.row_blocks));
            return;
        }
        let bb = self.kind.block_bytes();
        let mut data = vec![0u8; self.data.len()];
        for (i, x) in xs.chunks_exact(QK).enumerate() {
            let b = &mut data[i * bb..(i + 1) * bb];
            match self.kind {
                Kind::Q4_1 => {
                    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                    b[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
                    for j in 0..16 {
                        let lo = (((x[j] - min) * id).round() as u8).min(15);
                        let hi = (((x[j + 16] - min) * id).round() as u8).min(15);
                        b[4 + j] = lo | hi << 4;
                    }
                }
                Kind::Q8_0 => {
                    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                    for (q, &v) in b[2..34].iter_mut().zip(x) {
                        *q = ((v * id).round() as i8) as u8;
                    }
                }
                Kind::Q4K | Kind::Q6K => unreachable!("k-quants returned above"),
                Kind::Q5_0 => {
                    let amax = x
                        .iter()
                        .copied()
                        .fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
                    let d = amax / -16.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    b[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                    let mut qh = 0u32;
                    for j in 0..16 {
                        let lo = ((x[j] * id + 16.5) as i32).clamp(0, 31) as u32;
                        let hi = ((x[j + 16] * id + 16.5) as i32).clamp(0, 31) as u32;
                        b[6 + j] = ((lo & 0x0f) | (hi & 0x0f) << 4) as u8;
                        qh |= ((lo >> 4) & 1) << j | ((hi >> 4) & 1) << (j + 16);
                    }
                    b[2..6].copy_from_slice(&qh.to_le_bytes());
                }
            }
        }
        self.data = Data::Owned(if self.packed {
            pack(self.kind, &data, self.row_blocks)
        } else {
            data.into()
        });
    }
}

/// A matmul's `[m * n]` values shaped as the input `x` with its last dimension `n`.
fn output(
    out: Vec<f32>,
    x: &candle_core::Tensor,
    n: usize,
) -> candle_core::Result<candle_core::Tensor> {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    candle_core::Tensor::from_vec(out, dims, x.device())
}

/// Rows per interleaved group of the packed layout.
const GROUP: usize = 8;

/// Activation rows from which a matmul goes to AMX where the CPU has it. One AMX tile is
/// 16 rows (fewer are padded), yet from 8 rows it beats the VNNI tile kernel: a batch of 16
/// streams decays to 12-15 as replies end, and those steps ran on VNNI at 16 (Qwen 0.5B at
/// 16 streams: 209 tok/s with 16 here, 261 with 8).
#[cfg(target_arch = "x86_64")]
const AMX_MIN_ROWS: usize = 8;

/// The tile kernels' instruction sets: `vpdpbusd` on 256-bit registers, as AVX-VNNI or as
/// AVX-512 VNNI with VL, or its AVX2 equivalent (`vpmaddubsw` + `vpmaddwd`, exact: see
/// `part_avx2`). Without a tile kernel, weights stay in GGUF layout for the row kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tile {
    AvxVnni,
    Avx512Vnni,
    Avx2,
}

/// What packed Q8_0 bytes hold, XORed with the signed values: 0x80 (q + 128, unsigned, for
/// `vpdpbusd` and AMX) or, for the AVX2 kernel, 0 (signed: it moves each weight's sign onto
/// the activation, as a pair of unsigned q + 128 products can overflow `vpmaddubsw`'s i16).
fn q8_flip() -> u8 {
    if tile_kernel() == Some(Tile::Avx2) {
        0
    } else {
        0x80
    }
}

fn tile_kernel() -> Option<Tile> {
    #[cfg(target_arch = "x86_64")]
    {
        static TILE: std::sync::OnceLock<Option<Tile>> = std::sync::OnceLock::new();
        *TILE.get_or_init(|| {
            use std::arch::is_x86_feature_detected as has;
            // AVX-512 VNNI first where a CPU has both: its EVEX encoding reaches 32 vector
            // registers, where the VEX AVX-VNNI kernel spills its accumulators (16) in a
            // build for the portable floor. Same results either way.
            if !(has!("avx2") && has!("fma") && has!("f16c")) {
                None
            } else if has!("avx512vnni") && has!("avx512vl") && has!("avx512f") {
                Some(Tile::Avx512Vnni)
            } else if has!("avxvnni") {
                Some(Tile::AvxVnni)
            } else {
                Some(Tile::Avx2)
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Repacks row-major GGUF blocks into groups of [`GROUP`] rows. For each group and block
/// index, one part of `GROUP * block_bytes` bytes holds:
/// - the 8 rows' f16 scales `d`, then for Q4_1 their f16 mins `m`;
/// - Q5_0: 32 bytes of high bits, bits 2c and 2c+1 of byte 4r+v = row r's high bits of
///   values 4c+v and 16+4c+v (so one shift and mask gives a chunk's high bits, in place);
/// - Q4_1 / Q5_0: 4 chunks of 32 bytes, bytes 4r..4r+4 of chunk c = row r's nibble bytes
///   4c..4c+4 (low nibbles: values 4c.., high nibbles: values 16+4c..);
/// - Q8_0: 8 chunks of 32 bytes, bytes 4r..4r+4 of chunk c = row r's values 4c..4c+4,
///   plus 128 (as unsigned bytes) except for the AVX2 kernel (see [`q8_flip`]).
///
/// So one 32-byte load gives four consecutive values of each of 8 rows: one `vpdpbusd`
/// against four broadcast activation bytes then yields the 8 rows' partial dot products in
/// its 8 lanes, and the kernel never needs a horizontal sum. Same size as the input.
fn pack(kind: Kind, src: &[u8], row_blocks: usize) -> HugeBytes {
    let mut out = HugeBytes::zeroed(packed_len(kind, src.len(), row_blocks));
    pack_into(kind, src, row_blocks, &mut out);
    out
}

/// The bytes [`pack`] makes of `src_len` GGUF bytes.
fn packed_len(kind: Kind, src_len: usize, row_blocks: usize) -> usize {
    kind.gguf_rows(src_len, row_blocks * QK) * kind.row_bytes(row_blocks)
}

/// [`pack`] into `out` (zeroed, of [`packed_len`]).
fn pack_into(kind: Kind, src: &[u8], row_blocks: usize, out: &mut [u8]) {
    if kind.is_k() {
        return pack_k(kind, src, row_blocks, out);
    }
    let (bb, flip) = (kind.block_bytes(), q8_flip());
    for (i, blk) in src.chunks_exact(bb).enumerate() {
        let (row, b) = (i / row_blocks, i % row_blocks);
        let sb = (row / GROUP * row_blocks + b) * GROUP * bb;
        let sb = &mut out[sb..sb + GROUP * bb];
        let r = row % GROUP;
        sb[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
        match kind {
            Kind::Q4_1 => {
                sb[16 + 2 * r..18 + 2 * r].copy_from_slice(&blk[2..4]);
                for c in 0..4 {
                    sb[32 + 32 * c + 4 * r..][..4].copy_from_slice(&blk[4 + 4 * c..8 + 4 * c]);
                }
            }
            Kind::Q5_0 => {
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                for c in 0..4 {
                    for v in 0..4 {
                        let (lo, hi) = (qh >> (4 * c + v) & 1, qh >> (16 + 4 * c + v) & 1);
                        sb[16 + 4 * r + v] |= (lo << (2 * c) | hi << (2 * c + 1)) as u8;
                    }
                    sb[48 + 32 * c + 4 * r..][..4].copy_from_slice(&blk[6 + 4 * c..10 + 4 * c]);
                }
            }
            Kind::Q4K | Kind::Q6K => unreachable!("k-quants went to pack_k"),
            Kind::Q8_0 => {
                for c in 0..8 {
                    for j in 0..4 {
                        sb[16 + 32 * c + 4 * r + j] = blk[2 + 4 * c + j] ^ flip;
                    }
                }
            }
        }
    }
}

/// [`pack`] of the `rows` rows in the file map's `range`, a few megabytes of
/// rows at a time, dropping the file pages of each part once packed: a large table (a tied
/// 150k-token embedding) then never holds its packed and its mapped copy at once.
fn pack_mapped(
    kind: Kind,
    map: &Mmap,
    range: Range<usize>,
    rows: usize,
    row_blocks: usize,
) -> HugeBytes {
    let row_bytes = range.len() / rows.max(1);
    let part_rows = ((8 << 20) / row_bytes.max(1)).next_multiple_of(GROUP);
    let packed_row = kind.row_bytes(row_blocks);
    let mut out = HugeBytes::zeroed(rows * packed_row);
    for first in (0..rows).step_by(part_rows) {
        let last = (first + part_rows).min(rows);
        let part = range.start + first * row_bytes..range.start + last * row_bytes;
        let to = &mut out[first * packed_row..last * packed_row];
        pack_into(kind, &map[part.clone()], row_blocks, to);
        super::weights::drop_pages(map, part);
    }
    out
}

/// The GGUF bytes of block `i` (row-major block index) of a packed tensor: the inverse of
/// [`pack`] for one block.
fn unpack_block(kind: Kind, data: &[u8], row_blocks: usize, i: usize, blk: &mut [u8]) {
    let bb = kind.block_bytes();
    let (row, b) = (i / row_blocks, i % row_blocks);
    let sb = (row / GROUP * row_blocks + b) * GROUP * bb;
    let sb = &data[sb..sb + GROUP * bb];
    let r = row % GROUP;
    blk[0..2].copy_from_slice(&sb[2 * r..2 * r + 2]);
    match kind {
        Kind::Q4_1 => {
            blk[2..4].copy_from_slice(&sb[16 + 2 * r..18 + 2 * r]);
            for c in 0..4 {
                blk[4 + 4 * c..8 + 4 * c].copy_from_slice(&sb[32 + 32 * c + 4 * r..][..4]);
            }
        }
        Kind::Q5_0 => {
            let mut qh = 0u32;
            for c in 0..4 {
                for v in 0..4 {
                    let h = sb[16 + 4 * r + v] as u32 >> (2 * c);
                    qh |= (h & 1) << (4 * c + v) | (h >> 1 & 1) << (16 + 4 * c + v);
                }
                blk[6 + 4 * c..10 + 4 * c].copy_from_slice(&sb[48 + 32 * c + 4 * r..][..4]);
            }
            blk[2..6].copy_from_slice(&qh.to_le_bytes());
        }
        Kind::Q4K | Kind::Q6K => unreachable!("k-quant blocks are read with unpack_k"),
        Kind::Q8_0 => {
            let flip = q8_flip();
            for c in 0..8 {
                for j in 0..4 {
                    blk[2 + 4 * c + j] = sb[16 + 32 * c + 4 * r + j] ^ flip;
                }
            }
        }
    }
}

/// 32-value blocks per k-quant superblock.
const K_BLOCKS: usize = 8;

/// 32 values of a k-quant row: scales (`d[1]` only for Q6_K's second 16), Q4_K's offset
/// `m`, and q (Q4_K: 0..16, x = d q + m; Q6_K: 0..64, x = d (q - 32)).
#[derive(Default)]
struct KBlock {
    d: [f32; 2],
    m: f32,
    q: [u8; QK],
}

/// One GGUF Q4_K or Q6_K superblock of 256 values (llama.cpp's layouts), unpacked.
struct KSuper {
    /// The f16 scale's bits, and Q4_K's f16 `dmin`.
    d: [u8; 2],
    dmin: [u8; 2],
    /// Per 32-value block j: Q4_K's 6-bit scale `sc[j]` and min `sc[8 + j]`; Q6_K's signed
    /// scales of values 0..16 (`sc[2j]`) and 16..32 (`sc[2j + 1]`).
    sc: [u8; 16],
    /// Q4_K: 0..16, x = d sc q - dmin min; Q6_K: 0..64, x = d sc (q - 32).
    q: [[u8; QK]; K_BLOCKS],
}

fn decode_k(kind: Kind, b: &[u8]) -> KSuper {
    let mut out = KSuper {
        d: [0; 2],
        dmin: [0; 2],
        sc: [0; 16],
        q: [[0; QK]; K_BLOCKS],
    };
    if kind == Kind::Q4K {
        let (sc, qs) = (&b[4..16], &b[16..144]);
        (out.d, out.dmin) = ([b[0], b[1]], [b[2], b[3]]);
        for j in 0..K_BLOCKS {
            (out.sc[j], out.sc[8 + j]) = if j < 4 {
                (sc[j] & 63, sc[j + 4] & 63)
            } else {
                (
                    (sc[j + 4] & 0x0f) | (sc[j - 4] >> 6) << 4,
                    (sc[j + 4] >> 4) | (sc[j] >> 6) << 4,
                )
            };
            // Bytes 32c..32c+32 hold values 64c.. (low nibbles) and 64c+32.. (high).
            let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            for (q, &byte) in out.q[j].iter_mut().zip(bytes) {
                *q = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            }
        }
    } else {
        let (ql, qh) = (&b[..128], &b[128..192]);
        out.sc.copy_from_slice(&b[192..208]);
        out.d = [b[208], b[209]];
        for half in 0..2 {
            let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
            let q = &mut out.q[4 * half..];
            for l in 0..32 {
                q[0][l] = (ql[l] & 0x0f) | (qh[l] & 3) << 4;
                q[1][l] = (ql[l + 32] & 0x0f) | (qh[l] >> 2 & 3) << 4;
                q[2][l] = (ql[l] >> 4) | (qh[l] >> 4 & 3) << 4;
                q[3][l] = (ql[l + 32] >> 4) | (qh[l] >> 6 & 3) << 4;
            }
        }
    }
    out
}

/// Where k-quant block `bi` of a row starts within its packed group of [`GROUP`] rows, and
/// where its superblock's head does.
fn k_offsets(kind: Kind, bi: usize) -> (usize, usize) {
    block_at(kind.block_bytes(), kind.head_bytes(), bi)
}

/// [`k_offsets`] for blocks of `bb` bytes per row with heads of `head` bytes per row; with
/// no heads (the 32-value types), block `bi` is simply the `bi`th.
fn block_at(bb: usize, head: usize, bi: usize) -> (usize, usize) {
    let head_at = bi / K_BLOCKS * GROUP * (head + K_BLOCKS * bb);
    (head_at + GROUP * head + bi % K_BLOCKS * GROUP * bb, head_at)
}

/// Where a packed k-quant block's nibble chunks start (see [`pack_k`]).
const K_NIBBLES: usize = 16;
/// Where a packed Q6_K block's two chunks of top bits start.
const Q6K_TOPS: usize = K_NIBBLES + 4 * 32;

/// Packs GGUF Q4_K/Q6_K rows of `row_blocks` 32-value blocks into groups of [`GROUP`]
/// rows. Per group and superblock, a head holds the 8 rows' f16 `d` (then Q4_K's `dmin`),
/// followed by one part of `GROUP * block_bytes` bytes per 32-value block:
/// - bytes 0..8: the rows' scales (Q4_K: 6-bit, Q6_K: signed, values 0..16); 8..16: Q4_K's
///   mins or Q6_K's signed scales of values 16..32;
/// - 16..144: nibble chunks as for Q4_1 (see [`pack`]): byte 4r+j of chunk c holds row r's
///   q of value 4c+j (low nibble) and 16+4c+j (high nibble);
/// - Q6_K, 144..208: q's top two bits, two chunks of 32 bytes: bits 2c, 2c+1 of byte 4r+j of
///   chunk h are those of row r's value 16h+4c+j.
///
/// The kernels multiply the integer scales out (exact in f32), so Q6_K is held in GGUF's
/// 6.56 bits per value and Q4_K in 4.63 (GGUF's 4.5 plus the heads repeated per group).
fn pack_k(kind: Kind, src: &[u8], row_blocks: usize, out: &mut [u8]) {
    let (_, gguf_bytes) = kind.gguf_block();
    let (supers, row_bytes, bb) = (
        row_blocks / K_BLOCKS,
        kind.row_bytes(row_blocks),
        kind.block_bytes(),
    );
    for (i, blk) in src.chunks_exact(gguf_bytes).enumerate() {
        let (row, s) = (i / supers, i % supers);
        let k = decode_k(kind, blk);
        let (group, r) = (&mut out[row / GROUP * GROUP * row_bytes..], row % GROUP);
        let (_, head) = k_offsets(kind, s * K_BLOCKS);
        group[head + 2 * r..][..2].copy_from_slice(&k.d);
        if kind == Kind::Q4K {
            group[head + 16 + 2 * r..][..2].copy_from_slice(&k.dmin);
        }
        for (j, q) in k.q.iter().enumerate() {
            let (at, _) = k_offsets(kind, s * K_BLOCKS + j);
            let part = &mut group[at..at + GROUP * bb];
            (part[r], part[8 + r]) = match kind {
                Kind::Q4K => (k.sc[j], k.sc[8 + j]),
                _ => (k.sc[2 * j], k.sc[2 * j + 1]),
            };
            for c in 0..4 {
                for jj in 0..4 {
                    let v = 4 * c + jj;
                    part[K_NIBBLES + 32 * c + 4 * r + jj] = (q[v] & 0x0f) | (q[v + 16] & 0x0f) << 4;
                    if kind == Kind::Q6K {
                        part[Q6K_TOPS + 4 * r + jj] |= (q[v] >> 4) << (2 * c);
                        part[Q6K_TOPS + 32 + 4 * r + jj] |= (q[v + 16] >> 4) << (2 * c);
                    }
                }
            }
        }
    }
}

/// Block `i` (row-major 32-value block index) of a packed k-quant tensor.
fn unpack_k(kind: Kind, data: &[u8], row_blocks: usize, i: usize) -> KBlock {
    let (row, bi) = (i / row_blocks, i % row_blocks);
    let group = &data[row / GROUP * GROUP * kind.row_bytes(row_blocks)..];
    let r = row % GROUP;
    let (at, head) = k_offsets(kind, bi);
    let f16_at = |o: usize| f16::from_le_bytes([group[o], group[o + 1]]).to_f32();
    let (part, d) = (
        &group[at..at + GROUP * kind.block_bytes()],
        f16_at(head + 2 * r),
    );
    let mut b = KBlock::default();
    for c in 0..4 {
        for jj in 0..4 {
            let v = 4 * c + jj;
            let byte = part[K_NIBBLES + 32 * c + 4 * r + jj];
            (b.q[v], b.q[v + 16]) = (byte & 0x0f, byte >> 4);
            if kind == Kind::Q6K {
                b.q[v] |= (part[Q6K_TOPS + 4 * r + jj] >> (2 * c) & 3) << 4;
                b.q[v + 16] |= (part[Q6K_TOPS + 32 + 4 * r + jj] >> (2 * c) & 3) << 4;
            }
        }
    }
    if kind == Kind::Q4K {
        b.d[0] = d * part[r] as f32;
        b.m = -(f16_at(head + 16 + 2 * r) * part[8 + r] as f32);
    } else {
        b.d = [d * part[r] as i8 as f32, d * part[8 + r] as i8 as f32];
    }
    b
}

/// `xs` quantized to GGUF Q4_K/Q6_K bytes by candle's own quantizer.
fn k_quantize(kind: Kind, xs: &[f32]) -> Vec<u8> {
    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, GgmlType};
    fn bytes<T: GgmlType>(xs: &[f32]) -> Vec<u8> {
        let mut blocks = vec![T::zeros(); xs.len() / T::BLCK_SIZE];
        T::from_float(xs, &mut blocks);
        let len = std::mem::size_of_val(blocks.as_slice());
        // SAFETY: candle's block types are repr(C) plain bytes (GGUF's layout).
        unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, len) }.to_vec()
    }
    match kind {
        Kind::Q4K => bytes::<BlockQ4K>(xs),
        _ => bytes::<BlockQ6K>(xs),
    }
}

/// Asks for the 64-byte cache lines of the `bytes` bytes at `p` to be brought into L1
/// ahead of their use, where the hardware prefetcher does not keep up (our kernels' weight
/// and KV reads).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch_lines(p: *const u8, bytes: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for off in (0..bytes).step_by(64) {
        // SAFETY: a prefetch is a hint: it reads nothing and cannot fault, and
        // `wrapping_add` makes no claim about the address (SSE is part of x86-64).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast()) };
    }
}

/// AVX2 with FMA: what every x86 kernel of ours needs (std caches the detection).
pub(super) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn quantize_act(xs: &[f32], out: &mut Vec<Act>) {
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        out.reserve(xs.len() / QK);
        for x in xs.chunks_exact(QK) {
            // SAFETY: AVX2 and FMA were checked; `x` holds QK values.
            out.push(unsafe { x86::quantize_block(x) });
        }
        return;
    }
    for x in xs.chunks_exact(QK) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0i8; QK];
        let mut sum = 0i32;
        for (qi, &v) in q.iter_mut().zip(x) {
            *qi = (v * id).round() as i8;
            sum += *qi as i32;
        }
        out.push(Act {
            d,
            s: d * sum as f32,
            sum,
            sum_lo: q[..16].iter().map(|&v| v as i32).sum(),
            q,
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Act;
    use half::f16;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX2.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// The 32 values of a block's 16 nibble bytes: low nibbles first, then high nibbles.
    ///
    /// # Safety
    /// `p` must point to 16 readable bytes and the CPU must have AVX2.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let q = _mm_loadu_si128(p as *const __m128i);
            let m = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(q, m);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m);
            _mm256_set_m128i(hi, lo)
        }
    }

    /// Byte j is 0x10 where bit j of `bits` is set.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[inline(always)]
    unsafe fn high_bits(bits: u32) -> __m256i {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let spread = _mm256_setr_epi64x(
                0,
                0x0101010101010101,
                0x0202020202020202,
                0x0303030303030303,
            );
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
            let select = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        }
    }

    /// Sums of u8 x i8 products in groups of four, as eight i32 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[inline(always)]
    unsafe fn mul_sum_avx2(x: __m256i, y: __m256i) -> __m256i {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            // maddubs saturates at i16: x < 32 never gets there; Q8_0's |x| <= 128 can only at
            // -128 * -128 pairs, which its quantizer (|q| <= 127) does not produce.
            _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
        }
    }

    /// # Safety
    /// The CPU must have AVX-VNNI.
    #[inline(always)]
    unsafe fn mul_sum_vnni(x: __m256i, y: __m256i) -> __m256i {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe { _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), x, y) }
    }

    /// # Safety
    /// `p` must point to 2 readable bytes.
    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe { f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32() }
    }

    /// One block's integer dot product and its scalar correction, for a weight block at `b`.
    ///
    /// # Safety
    /// `b` must point to one weight block of type `KIND`, `a` to one activation block, and the CPU must have AVX2 (and AVX-VNNI when `VNNI`).
    #[inline(always)]
    unsafe fn block<const KIND: u8, const VNNI: bool>(
        b: *const u8,
        a: *const Act,
    ) -> (__m256i, f32) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let mul_sum = |x, y| {
                if VNNI {
                    mul_sum_vnni(x, y)
                } else {
                    mul_sum_avx2(x, y)
                }
            };
            let y = _mm256_loadu_si256((*a).q.as_ptr() as *const __m256i);
            match KIND {
                Q4_1 => (mul_sum(nibbles(b.add(4)), y), f16_at(b.add(2)) * (*a).s),
                Q5_0 => {
                    let qh = (b.add(2) as *const u32).read_unaligned();
                    let x = _mm256_or_si256(nibbles(b.add(6)), high_bits(u32::from_le(qh)));
                    // Values are stored offset by 16: sum(x*y) - 16*sum(y) = sum(x*y) - 16*s/d.
                    (mul_sum(x, y), -16.0 * f16_at(b) * (*a).s)
                }
                _ => {
                    // Q8_0, u8 x i8 products: move the weight's sign onto the activation.
                    let x = _mm256_loadu_si256(b.add(2) as *const __m256i);
                    (mul_sum(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)), 0.0)
                }
            }
        }
    }

    pub const Q4_1: u8 = super::Kind::Q4_1 as u8;
    pub const Q5_0: u8 = super::Kind::Q5_0 as u8;
    pub const Q8_0: u8 = super::Kind::Q8_0 as u8;
    pub const Q4K: u8 = super::Kind::Q4K as u8;
    pub const Q6K: u8 = super::Kind::Q6K as u8;

    /// Bytes per row of a k-quant superblock's head (see `pack_k`); none for the others.
    pub const fn head_bytes(kind: u8) -> usize {
        match kind {
            Q4K => 4,
            Q6K => 2,
            _ => 0,
        }
    }

    /// The 8 rows' scales of a packed k-quant block at `sb`, from their superblock head at
    /// `head`: d times the block's integer scales, and Q4_K's offsets (-dmin times its
    /// mins) or Q6_K's second-half scales. Exact in f32 (an f16 times an 8-bit integer), so
    /// the same as scales multiplied out at load.
    ///
    /// # Safety
    /// `sb` and `head` must point at a packed k-quant block and its head (see `pack_k`),
    /// and the CPU must have AVX2 and F16C.
    #[inline(always)]
    pub(super) unsafe fn k_scales<const KIND: u8>(
        sb: *const u8,
        head: *const u8,
    ) -> (__m256, __m256) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let h = head as *const __m128i;
            let kd = _mm256_cvtph_ps(_mm_loadu_si128(h));
            let ints = |at: usize| {
                let v = _mm_loadl_epi64(sb.add(at) as *const __m128i);
                _mm256_cvtepi32_ps(if KIND == Q4K {
                    _mm256_cvtepu8_epi32(v)
                } else {
                    _mm256_cvtepi8_epi32(v)
                })
            };
            let second = if KIND == Q4K {
                let kmin = _mm256_cvtph_ps(_mm_loadu_si128(h.add(1)));
                _mm256_xor_ps(_mm256_mul_ps(kmin, ints(8)), _mm256_set1_ps(-0.0))
            } else {
                _mm256_mul_ps(kd, ints(8))
            };
            (_mm256_mul_ps(kd, ints(0)), second)
        }
    }

    macro_rules! dot_fn {
        ($name:ident, $features:literal, $vnni:literal) => {
            /// Dot product of one weight row (`nb` blocks of `BB` bytes at `row`) with `nb`
            /// blocks of quantized activations; two blocks per iteration in independent
            /// accumulators, one kernel per block type so the loop has no branches.
            ///
            /// # Safety
            /// `row` must hold `nb` blocks and `acts` `nb` activations, and the CPU must
            /// have the enabled features.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const KIND: u8, const BB: usize>(
                row: *const u8,
                acts: *const Act,
                nb: usize,
            ) -> f32 {
                // SAFETY: the caller upholds the contract in `# Safety` above.
                unsafe {
                    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    let mut extra = 0f32;
                    let mut i = 0;
                    while i + 1 < nb {
                        let (b0, b1) = (row.add(i * BB), row.add((i + 1) * BB));
                        let (a0, a1) = (acts.add(i), acts.add(i + 1));
                        let (s0, e0) = block::<KIND, $vnni>(b0, a0);
                        let (s1, e1) = block::<KIND, $vnni>(b1, a1);
                        acc0 = _mm256_fmadd_ps(
                            _mm256_set1_ps(f16_at(b0) * (*a0).d),
                            _mm256_cvtepi32_ps(s0),
                            acc0,
                        );
                        acc1 = _mm256_fmadd_ps(
                            _mm256_set1_ps(f16_at(b1) * (*a1).d),
                            _mm256_cvtepi32_ps(s1),
                            acc1,
                        );
                        extra += e0 + e1;
                        i += 2;
                    }
                    if i < nb {
                        let (b0, a0) = (row.add(i * BB), acts.add(i));
                        let (s0, e0) = block::<KIND, $vnni>(b0, a0);
                        acc0 = _mm256_fmadd_ps(
                            _mm256_set1_ps(f16_at(b0) * (*a0).d),
                            _mm256_cvtepi32_ps(s0),
                            acc0,
                        );
                        extra += e0;
                    }
                    hsum(_mm256_add_ps(acc0, acc1)) + extra
                }
            }
        };
    }

    dot_fn!(dot_avx2, "avx2,fma", false);
    dot_fn!(dot_vnni, "avx2,fma,avxvnni", true);

    /// [`super::quantize_act`] for one block of 32 values, vectorized (same rounding: half
    /// away from zero).
    ///
    /// # Safety
    /// `x` must hold at least 32 values and the CPU must have AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_block(x: &[f32]) -> Act {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let p = x.as_ptr();
            let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(p.add(i)));
            let sign = _mm256_set1_ps(-0.0);
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_movehdup_ps(m));
            let amax = _mm_cvtss_f32(m);
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let half = _mm256_set1_ps(0.5);
            // round(v * id) half away from zero: truncate(v * id + copysign(0.5, v)).
            let q = v.map(|v| {
                let s = _mm256_mul_ps(v, id);
                let r = _mm256_add_ps(s, _mm256_or_ps(_mm256_and_ps(s, sign), half));
                _mm256_cvttps_epi32(r)
            });
            let hsum = |v: __m256i| {
                let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)))
            };
            let lo = _mm256_add_epi32(q[0], q[1]);
            let (sum_lo, sum) = (
                hsum(lo),
                hsum(_mm256_add_epi32(lo, _mm256_add_epi32(q[2], q[3]))),
            );
            // i32 -> i16 -> i8 with saturation; packs work per 128-bit lane, so restore order.
            let w01 = _mm256_packs_epi32(q[0], q[1]);
            let w23 = _mm256_packs_epi32(q[2], q[3]);
            let b = _mm256_packs_epi16(w01, w23);
            let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            let mut out = Act {
                d,
                s: d * sum as f32,
                sum,
                sum_lo,
                q: [0; 32],
            };
            _mm256_storeu_si256(out.q.as_mut_ptr() as *mut __m256i, b);
            out
        }
    }

    /// How far ahead of the block in use the tile kernel asks for weight bytes. With the
    /// weights on huge pages, 3 KiB was the best of 1 to 4 KiB on the Intel AMX host: single
    /// stream 5-9% faster than 1 KiB (Qwen 0.5B 64-66 against 60-62 tok/s).
    const PREFETCH: usize = 3072;

    /// Four activation bytes at `p`, broadcast to every 32-bit lane.
    ///
    /// # Safety
    /// `p` must point to 4 readable bytes and the CPU must have AVX2.
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m256i {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe { _mm256_set1_epi32((p as *const i32).read_unaligned()) }
    }

    /// Chunk `c` (of 4) of a packed block at `sb` of any type but Q8_0 (see `pack` and
    /// `pack_k`): values 4c..4c+4 (first) and 16+4c..16+4c+4 (second) of its 8 rows, as
    /// unsigned bytes.
    ///
    /// # Safety
    /// `sb` must point to one packed block of type `KIND`, `c < 4`, and the CPU must have AVX2.
    #[inline(always)]
    pub(super) unsafe fn nibble_chunk<const KIND: u8>(
        sb: *const u8,
        c: usize,
    ) -> (__m256i, __m256i) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let offset = match KIND {
                Q4_1 => 32,
                Q4K | Q6K => super::K_NIBBLES,
                _ => 48,
            };
            let q = _mm256_loadu_si256(sb.add(offset + 32 * c) as *const __m256i);
            let low = _mm256_set1_epi8(0x0f);
            let lo = _mm256_and_si256(q, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
            if KIND == Q6K {
                // Bits 2c and 2c+1 of the high-bit chunks moved to bits 4 and 5 (16-bit
                // shifts: what crosses into the next byte is masked off).
                let at4 = |h: __m256i| match c {
                    0 => _mm256_slli_epi16(h, 4),
                    1 => _mm256_slli_epi16(h, 2),
                    2 => h,
                    _ => _mm256_srli_epi16(h, 2),
                };
                let top = _mm256_set1_epi8(0x30);
                let h = |at: usize| _mm256_loadu_si256(sb.add(at) as *const __m256i);
                return (
                    _mm256_or_si256(lo, _mm256_and_si256(at4(h(super::Q6K_TOPS)), top)),
                    _mm256_or_si256(hi, _mm256_and_si256(at4(h(super::Q6K_TOPS + 32)), top)),
                );
            }
            if KIND != Q5_0 {
                return (lo, hi);
            }
            // Bits 2c and 2c+1 of each byte moved to bit 4 (16-bit shifts: what crosses
            // into the next byte lands below bit 4 and is masked off).
            let h = _mm256_loadu_si256(sb.add(16) as *const __m256i);
            let at4 = |bit: usize| match bit {
                0 => _mm256_slli_epi16(h, 4),
                1 => _mm256_slli_epi16(h, 3),
                2 => _mm256_slli_epi16(h, 2),
                3 => _mm256_slli_epi16(h, 1),
                4 => h,
                5 => _mm256_srli_epi16(h, 1),
                6 => _mm256_srli_epi16(h, 2),
                _ => _mm256_srli_epi16(h, 3),
            };
            let bit = _mm256_set1_epi8(0x10);
            let (hl, hh) = (
                _mm256_and_si256(at4(2 * c), bit),
                _mm256_and_si256(at4(2 * c + 1), bit),
            );
            (_mm256_or_si256(lo, hl), _mm256_or_si256(hi, hh))
        }
    }

    macro_rules! tile_fn {
        ($name:ident, $features:literal, $part:ident, $widen:ident, $wide:literal) => {
            /// `M` activation rows (`nb` blocks each, consecutive at `acts`) times one packed
            /// group of 8 weight rows at `w` (see `pack`): writes `M` runs of 8 outputs,
            /// `out_stride` apart.
            ///
            /// # Safety
            /// `w` must hold a packed group of `nb` blocks per row, `acts` `M * nb`
            /// activations, `out` room for `(M - 1) * out_stride + 8` values, and the CPU the
            /// enabled features.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const KIND: u8, const BB: usize, const M: usize>(
                w: *const u8,
                nb: usize,
                acts: *const Act,
                out: *mut f32,
                out_stride: usize,
            ) {
                // SAFETY: the caller upholds the contract in `# Safety` above.
                unsafe {
                    let mut acc = [_mm256_setzero_ps(); M];
                    // Each row's activations, stepped one block per iteration (pointer
                    // steps, so no index arithmetic or overflow checks in the loop).
                    let mut rows: [*const Act; M] = std::array::from_fn(|i| acts.add(i * nb));
                    let mut sb = w;
                    let k_quant = KIND == Q4K || KIND == Q6K;
                    // The k-quants' superblock head in use.
                    let mut head = w;
                    for bi in 0..nb {
                        if k_quant && bi % super::K_BLOCKS == 0 {
                            head = sb;
                            sb = sb.add(8 * head_bytes(KIND));
                        }
                        // A decode row (M = 1) stalled on these loads: the threads walk
                        // their chunks of small groups and the hardware prefetcher fell
                        // behind. Asking ahead made single-stream decode 15-27% faster.
                        super::prefetch_lines(sb.wrapping_add(PREFETCH), 8 * BB);
                        // Scales (f16 for the GGUF 32-value types) and Q4_1's and Q4_K's
                        // offsets or Q6_K's second-half scales.
                        let (ws, wm) = if k_quant {
                            k_scales::<KIND>(sb, head)
                        } else {
                            let h = sb as *const __m128i;
                            (
                                _mm256_cvtph_ps(_mm_loadu_si128(h)),
                                _mm256_cvtph_ps(_mm_loadu_si128(h.add(1))),
                            )
                        };
                        // Q6_K: values 16..32 have their own scale, so their own sums.
                        let (mut isum, mut isum2) =
                            ([_mm256_setzero_si256(); M], [_mm256_setzero_si256(); M]);
                        // Products gather in `part` (Q6_K's second half in `part2`) and are
                        // added to the i32 sums every `flush` chunks: once per block where
                        // `part` is i32 already (VNNI), else as many chunks as its i16 lanes
                        // hold without overflow (see `part_avx2`).
                        let q8 = KIND == Q8_0;
                        let chunks = if q8 { 8 } else { 4 };
                        let flush = match KIND {
                            _ if $wide => chunks,
                            Q4_1 | Q4K => 4,
                            Q5_0 | Q6K => 2,
                            _ => 1,
                        };
                        for f in 0..chunks / flush {
                            let mut part = [_mm256_setzero_si256(); M];
                            let mut part2 = [_mm256_setzero_si256(); M];
                            for c in f * flush..(f + 1) * flush {
                                if q8 {
                                    let q =
                                        _mm256_loadu_si256(sb.add(16 + 32 * c) as *const __m256i);
                                    // Signed Q8_0 (see `q8_flip`): |q| times the activation
                                    // with q's sign.
                                    let signed = !$wide;
                                    let u = if signed { _mm256_sign_epi8(q, q) } else { q };
                                    for (p, a) in part.iter_mut().zip(&rows) {
                                        let a = bcast4((**a).q.as_ptr().add(4 * c));
                                        let a = if signed { _mm256_sign_epi8(a, q) } else { a };
                                        *p = $part(*p, u, a);
                                    }
                                } else {
                                    let (lo, hi) = nibble_chunk::<KIND>(sb, c);
                                    for ((p, p2), a) in part.iter_mut().zip(&mut part2).zip(&rows) {
                                        let aq = (**a).q.as_ptr();
                                        *p = $part(*p, lo, bcast4(aq.add(4 * c)));
                                        let a_hi = bcast4(aq.add(16 + 4 * c));
                                        if KIND == Q6K {
                                            *p2 = $part(*p2, hi, a_hi);
                                        } else {
                                            *p = $part(*p, hi, a_hi);
                                        }
                                    }
                                }
                            }
                            for i in 0..M {
                                isum[i] = _mm256_add_epi32(isum[i], $widen(part[i]));
                                if KIND == Q6K {
                                    isum2[i] = _mm256_add_epi32(isum2[i], $widen(part2[i]));
                                }
                            }
                        }
                        // The same float operations per output as the AMX kernel (amx.rs), so a
                        // row's result does not depend on how many rows run with it.
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let (a, s, s2) = (&*rows[i], &isum[i], &isum2[i]);
                            // Stored unsigned, q + K with K = 16 (Q5_0), 128 (Q8_0 but on
                            // AVX2), 32 (Q6_K):
                            // subtract K * sum(qa) for the exact signed sum.
                            let k = |s: __m256i, k: i32, sum: i32| {
                                _mm256_sub_epi32(s, _mm256_set1_epi32(k.wrapping_mul(sum)))
                            };
                            let s = match KIND {
                                Q5_0 => k(*s, 16, a.sum),
                                Q8_0 if $wide => k(*s, 128, a.sum),
                                Q6K => k(*s, 32, a.sum_lo),
                                _ => *s,
                            };
                            let t = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(a.d));
                            *acc = _mm256_fmadd_ps(t, ws, *acc);
                            if KIND == Q4_1 || KIND == Q4K {
                                // x = d * q + m: sum(x * a) = d * da * sum(q * qa) + m * s.
                                *acc = _mm256_fmadd_ps(wm, _mm256_set1_ps(a.s), *acc);
                            }
                            if KIND == Q6K {
                                let s2 = k(*s2, 32, a.sum.wrapping_sub(a.sum_lo));
                                let t = _mm256_mul_ps(_mm256_cvtepi32_ps(s2), _mm256_set1_ps(a.d));
                                *acc = _mm256_fmadd_ps(t, wm, *acc);
                            }
                        }
                        sb = sb.add(8 * BB);
                        for a in &mut rows {
                            *a = a.add(1);
                        }
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        _mm256_storeu_ps(out.add(i * out_stride), *acc);
                    }
                }
            }
        };
    }

    tile_fn!(
        tile_avxvnni,
        "avx2,fma,f16c,avxvnni",
        _mm256_dpbusd_avx_epi32,
        same,
        true
    );
    tile_fn!(
        tile_avx512vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        _mm256_dpbusd_epi32,
        same,
        true
    );
    tile_fn!(tile_avx2, "avx2,fma,f16c", part_avx2, widen_avx2, false);

    /// VNNI's sums are i32 already.
    #[inline(always)]
    fn same(v: __m256i) -> __m256i {
        v
    }

    /// `acc` plus the products of unsigned `u` and signed `s` bytes summed in pairs, as
    /// sixteen i16 lanes (each 32-bit lane keeps one row's four products, in two halves).
    /// Without VNNI, pair sums are added as i16 and widened once per several chunks (one
    /// `vpmaddwd` instead of one per chunk): exact while no i16 overflows. With activations
    /// in -127..=127, a pair reaches 2 * 127 * w_max: 3810 for 4-bit weights (8 pairs fit
    /// in an i16), 7874 for 5-bit (4 fit), 16002 for Q6_K's 6-bit (2 fit); the tile kernel
    /// widens after that many. Q8_0 runs as |q| times the activation with q's sign: a pair
    /// reaches 2 * 128 * 127 = 32512 (for q = -128), so it widens after each.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[inline(always)]
    unsafe fn part_avx2(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe { _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s)) }
    }

    /// [`part_avx2`]'s i16 pairs summed into the i32 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[inline(always)]
    unsafe fn widen_avx2(v: __m256i) -> __m256i {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe { _mm256_madd_epi16(v, _mm256_set1_epi16(1)) }
    }
}

/// The row kernel for this CPU, chosen once.
fn dot(kind: Kind, row: &[u8], acts: &[Act]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use x86::{dot_avx2, dot_vnni, Q4_1, Q5_0, Q8_0};
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let vnni = *VNNI.get_or_init(|| std::arch::is_x86_feature_detected!("avxvnni"));
        let (r, a, nb) = (row.as_ptr(), acts.as_ptr(), acts.len());
        debug_assert!(row.len() >= nb * kind.block_bytes());
        // SAFETY: FastQuant is only built when AVX2 and FMA are present (`kind_for`), VNNI is
        // checked above, and matmul_t checked that every row holds `acts.len()` blocks.
        unsafe {
            match (kind, vnni) {
                (Kind::Q4_1, true) => dot_vnni::<Q4_1, 20>(r, a, nb),
                (Kind::Q5_0, true) => dot_vnni::<Q5_0, 22>(r, a, nb),
                (Kind::Q8_0, true) => dot_vnni::<Q8_0, 34>(r, a, nb),
                (Kind::Q4_1, false) => dot_avx2::<Q4_1, 20>(r, a, nb),
                (Kind::Q5_0, false) => dot_avx2::<Q5_0, 22>(r, a, nb),
                (Kind::Q8_0, false) => dot_avx2::<Q8_0, 34>(r, a, nb),
                (Kind::Q4K | Kind::Q6K, _) => unreachable!("k-quants are always packed"),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kind, row, acts);
        unreachable!("FastQuant is x86_64 only")
    }
}

/// The packed weights `ws` times the activations `acts` (`m` rows of `nb` blocks) as one
/// parallel job over every weight's groups of 8 rows: weight i writes `outs[i]`, `m` rows
/// of its `out_rows()` values. One job for several weights of one input (q, k and v) costs
/// one dispatch instead of one each.
///
/// # Safety
/// Every weight must be packed with `nb` blocks per row, and `outs[i]` must point to room
/// for `m * ws[i].out_rows()` values that nothing else writes meanwhile.
unsafe fn tile_job(
    t: Tile,
    ws: &[&FastQuant],
    nb: usize,
    acts: &[Act],
    outs: &[super::parallel::SharedOut],
) {
    let ns: Vec<usize> = ws.iter().map(|w| w.out_rows()).collect();
    // Weight i's groups are items starts[i]..starts[i + 1] of the one job.
    let mut starts = vec![0];
    for n in &ns {
        starts.push(starts[starts.len() - 1] + n / GROUP);
    }
    let (starts, ns) = (&starts, &ns);
    super::parallel::par_for(starts[ws.len()], |items| {
        for item in items {
            let i = starts.partition_point(|&s| s <= item) - 1;
            let (w, g) = (ws[i], item - starts[i]);
            let group_bytes = GROUP * w.kind.row_bytes(nb);
            let data = &w.data[g * group_bytes..(g + 1) * group_bytes];
            // SAFETY: output i has room for m rows of ns[i] values (the caller's contract),
            // and group g writes only its own 8 columns of each; data is one whole group of
            // weight i, packed with nb blocks per row.
            unsafe { tile(t, w.kind, data, nb, acts, outs[i].0.add(g * GROUP), ns[i]) };
        }
    });
}

/// `acts` (`m` rows of `nb` blocks) times each packed weight of `ws` into its output: on AMX
/// from [`AMX_MIN_ROWS`] rows where the CPU has it ([`amx_job`], `acts` padded to whole
/// tiles), else on the tile kernel `t` ([`tile_job`]).
///
/// # Safety
/// `acts` must hold `m` rows of `nb` blocks; each weight must be packed with `nb` blocks per
/// row; output i must have room for `m` rows of `ws[i].out_rows()` values.
unsafe fn packed_job(
    t: Tile,
    ws: &[&FastQuant],
    nb: usize,
    acts: &mut Vec<Act>,
    m: usize,
    outs: &[super::parallel::SharedOut],
) {
    // SAFETY: the caller upholds the contract in `# Safety` above; AMX is checked and the
    // activations padded before `amx_job`.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if m >= AMX_MIN_ROWS && amx::available() {
            acts.resize(m.next_multiple_of(amx::ROWS) * nb, Act::default());
            return amx_job(t, ws, nb, acts, m, outs);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = m;
        tile_job(t, ws, nb, acts, outs)
    }
}

/// [`tile_job`] on AMX: item p of weight i is its p-th pair of 8-row groups (16 output
/// columns), or its odd last group (8, on the tile kernel `t`).
///
/// # Safety
/// AMX must be available; `acts` must hold `m.next_multiple_of(amx::ROWS)` rows of `nb`
/// blocks; each weight packed with `nb` blocks per row; output i room for `m` rows of
/// `ws[i].out_rows()` values.
#[cfg(target_arch = "x86_64")]
unsafe fn amx_job(
    t: Tile,
    ws: &[&FastQuant],
    nb: usize,
    acts: &[Act],
    m: usize,
    outs: &[super::parallel::SharedOut],
) {
    let ns: Vec<usize> = ws.iter().map(|w| w.out_rows()).collect();
    // Weight i's items are starts[i]..starts[i + 1] of the one job.
    let mut starts = vec![0];
    for n in &ns {
        starts.push(starts[starts.len() - 1] + n / amx::COLS + n / GROUP % 2);
    }
    let (starts, ns) = (&starts, &ns);
    super::parallel::par_for(starts[ws.len()], |items| {
        // SAFETY: AMX is available (the caller's contract).
        unsafe {
            amx::session(|scratch| {
                for item in items {
                    let i = starts.partition_point(|&s| s <= item) - 1;
                    let (w, p, n) = (ws[i], item - starts[i], ns[i]);
                    let group_bytes = GROUP * w.kind.row_bytes(nb);
                    let at = p * 2 * group_bytes;
                    // SAFETY: inside a session; output i holds m rows of n values (the
                    // caller's contract) and item p writes only its own 16 (or, for an odd
                    // last group, 8) columns; acts were padded to whole tiles; `at` starts a
                    // whole group of the weight.
                    if p < n / amx::COLS {
                        let g = w.data[at..].as_ptr();
                        let pair = amx::Pair {
                            g0: g,
                            g1: g.add(group_bytes),
                            nb,
                            acts: acts.as_ptr(),
                            m,
                            out: outs[i].0.add(p * amx::COLS),
                            out_stride: n,
                        };
                        amx::run(w.kind, &pair, scratch)
                    } else {
                        let g = &w.data[at..at + group_bytes];
                        tile(t, w.kind, g, nb, &acts[..m * nb], outs[i].0.add(p * 16), n)
                    }
                }
            })
        }
    });
}

/// `acts` (`m` rows of `nb` blocks) times one packed group of 8 weight rows `w`, into
/// `out[i * n .. i * n + 8]` for each activation row i, four activation rows at a time.
///
/// # Safety
/// `out` must have room for `m` rows of `n >= 8` values; `w` must hold a packed group of `nb` blocks per row.
unsafe fn tile(t: Tile, kind: Kind, w: &[u8], nb: usize, acts: &[Act], out: *mut f32, n: usize) {
    // SAFETY: the caller upholds the contract in `# Safety` above.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        {
            use x86::{tile_avx2, tile_avx512vnni, tile_avxvnni, Q4K, Q4_1, Q5_0, Q6K, Q8_0};
            debug_assert!(w.len() >= GROUP * kind.row_bytes(nb));
            macro_rules! run {
                ($f:ident, $m:literal, $a:expr, $o:expr) => {
                    match kind {
                        Kind::Q4_1 => $f::<Q4_1, 20, $m>(w.as_ptr(), nb, $a, $o, n),
                        Kind::Q5_0 => $f::<Q5_0, 22, $m>(w.as_ptr(), nb, $a, $o, n),
                        Kind::Q8_0 => $f::<Q8_0, 34, $m>(w.as_ptr(), nb, $a, $o, n),
                        Kind::Q4K => $f::<Q4K, 18, $m>(w.as_ptr(), nb, $a, $o, n),
                        Kind::Q6K => $f::<Q6K, 26, $m>(w.as_ptr(), nb, $a, $o, n),
                    }
                };
            }
            macro_rules! rows {
                ($f:ident) => {
                    for (i, chunk) in acts.chunks(4 * nb).enumerate() {
                        let (a, o) = (chunk.as_ptr(), out.add(i * 4 * n));
                        match chunk.len() / nb {
                            4 => run!($f, 4, a, o),
                            3 => run!($f, 3, a, o),
                            2 => run!($f, 2, a, o),
                            _ => run!($f, 1, a, o),
                        }
                    }
                };
            }
            match t {
                Tile::AvxVnni => rows!(tile_avxvnni),
                Tile::Avx512Vnni => rows!(tile_avx512vnni),
                Tile::Avx2 => rows!(tile_avx2),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (t, kind, w, nb, acts, out, n);
            unreachable!("tile kernels are x86_64 only")
        }
    }
}

impl QuantizedType for FastQuant {
    fn dtype(&self) -> GgmlDType {
        self.kind.dtype()
    }

    fn matmul_t(
        &self,
        (m, k, n): (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
    ) -> candle_core::Result<()> {
        let nb = k / QK;
        let row_bytes = self.kind.row_bytes(nb);
        if !k.is_multiple_of(QK)
            || lhs.len() != m * k
            || dst.len() < m * n
            || self.data.len() != n * row_bytes
        {
            candle_core::bail!(
                "{:?} matmul: shapes do not fit (m {m}, k {k}, n {n}, {} bytes)",
                self.kind,
                self.data.len()
            );
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let mut acts = Vec::with_capacity(m * nb);
        quantize_act(lhs, &mut acts);
        if let (true, Some(t)) = (self.packed, tile_kernel()) {
            let out = [super::parallel::SharedOut(dst.as_mut_ptr())];
            // SAFETY: dst holds m rows of n = out_rows() values (checked above); the weight
            // is packed with nb blocks per row; acts hold m rows of nb blocks.
            unsafe { packed_job(t, &[self], nb, &mut acts, m, &out) };
            return Ok(());
        }
        // Work on the transposed output [n, m] so each task owns a contiguous slice, with
        // one weight row reused for every activation row while it is in cache.
        let mut out_t = vec![0f32; n * m];
        super::parallel::par_rows(&mut out_t, m, |j, out_row| {
            let w = &self.data[j * row_bytes..(j + 1) * row_bytes];
            for (i, o) in out_row.iter_mut().enumerate() {
                *o = dot(self.kind, w, &acts[i * nb..(i + 1) * nb]);
            }
        });
        for (j, col) in out_t.chunks(m).enumerate() {
            for (i, v) in col.iter().enumerate() {
                dst[i * n + j] = *v;
            }
        }
        Ok(())
    }

    fn matmul_t_f16(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f16],
        dst: &mut [f16],
    ) -> candle_core::Result<()> {
        let lhs: Vec<f32> = lhs.iter().map(|v| v.to_f32()).collect();
        let mut out = vec![0f32; dst.len()];
        self.matmul_t(mkn, &lhs, &mut out)?;
        for (d, v) in dst.iter_mut().zip(out) {
            *d = f16::from_f32(v);
        }
        Ok(())
    }

    fn embedding(
        &self,
        ids: &[u32],
        rows: usize,
        hidden: usize,
    ) -> candle_core::Result<CpuStorage> {
        let per_row = hidden / QK;
        if !hidden.is_multiple_of(QK) || rows * per_row != self.blocks() {
            candle_core::bail!(
                "{:?} embedding of {rows}x{hidden} does not fit the tensor",
                self.kind
            );
        }
        let mut out = vec![0f32; ids.len() * hidden];
        for (o, &id) in out.chunks_exact_mut(hidden).zip(ids) {
            if id as usize >= rows {
                candle_core::bail!("token id {id} is out of range for {rows} rows");
            }
            self.dequantize_blocks(id as usize * per_row, per_row, o);
        }
        Ok(CpuStorage::F32(out))
    }

    fn dequantize(&self, elem_count: usize) -> candle_core::Result<CpuStorage> {
        if elem_count != self.blocks() * QK {
            candle_core::bail!(
                "dequantize {elem_count} values from {} blocks",
                self.blocks()
            );
        }
        let mut out = vec![0f32; elem_count];
        self.dequantize_blocks(0, self.blocks(), &mut out);
        Ok(CpuStorage::F32(out))
    }

    fn storage_size_in_bytes(&self) -> usize {
        self.data.len()
    }

    fn as_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }

    fn block_size(&self) -> usize {
        QK
    }

    fn from_float(&mut self, xs: &[f32]) {
        self.quantize_into(xs)
    }

    fn from_float_imatrix(&mut self, xs: &[f32], _imatrix_weights: &[f32], _n_per_row: usize) {
        // Importance weights only steer rounding choices; plain rounding is a valid encoding.
        self.quantize_into(xs)
    }

    fn size(&self) -> usize {
        self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pseudo_random;
    use candle_core::quantized::{QStorage, QTensor};
    use candle_core::{Device, Tensor};

    /// Our kernels against candle's own scalar implementation of the same block type, on the
    /// same quantized bytes.
    #[test]
    fn matches_candle_on_the_same_blocks() {
        if !has_avx2() {
            return;
        }
        // m is not a multiple of the tile kernel's 4 activation rows.
        // m = 37 runs on AMX where the CPU has it (three tiles of 16 rows, the last padded,
        // each block expanded once), m = 12 on one padded tile (blocks expanded as they are
        // multiplied), m = 7 on the VNNI kernel; n = 40 is two 16-row AMX pairs plus one
        // 8-row group for the VNNI kernel.
        for (k, kinds) in kinds_by_width() {
            let kinds = &kinds[..];
            let (w, x) = (pseudo_random(40 * k, 1), pseudo_random(37 * k, 2));
            let many = same_blocks(kinds, &w, &x, k);
            for rows in [7, 12] {
                let few = same_blocks(kinds, &w, &x[..rows * k], k);
                // A row's result does not depend on how many rows run with it (AMX or VNNI).
                for (dtype, (few, many)) in kinds.iter().zip(few.iter().zip(&many)) {
                    assert_eq!(few[..], many[..few.len()], "{dtype:?}: {rows} rows vs 37");
                }
            }
        }
    }

    /// Weights where, per 32-value block, one value sets the range and the other 31 sit at
    /// its far end (so they quantize to the largest stored value, 15, 31 or 63, in some
    /// rows), and activations of +-127 in every block: rows of +1, of -1, and of both signs
    /// by block. The AVX2 tile kernel sums products as i16 for several chunks before
    /// widening them (see `part_avx2`), and must not overflow even here.
    fn extreme(k: usize) -> (Vec<f32>, Vec<f32>) {
        let patterns = [[0.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-0.5, 1.0]];
        let w = (0..16 * k)
            .map(|i| patterns[i / k % 4][usize::from(i % QK != 0)])
            .collect();
        let x = (0..3 * k)
            .map(|i| match i / k {
                0 => 1.0,
                1 => -1.0,
                _ if (i / QK).is_multiple_of(2) => 1.0,
                _ => -1.0,
            })
            .collect();
        (w, x)
    }

    #[test]
    fn extreme_blocks_do_not_overflow() {
        if !has_avx2() {
            return;
        }
        for (k, kinds) in kinds_by_width() {
            let (w, x) = extreme(k);
            same_blocks(&kinds, &w, &x, k);
        }
    }

    /// Every tile kernel this CPU has gives, bit for bit, what the chosen one gives: a
    /// machine with the newest (AVX-512 VNNI) also runs the AVX-VNNI and AVX2 kernels that
    /// other CPUs use, on random and on [`extreme`] blocks, with 1 to 4 rows at a time.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_tile_kernel_gives_the_same_bits() {
        use std::arch::is_x86_feature_detected as has;
        let Some(chosen) = tile_kernel() else {
            return;
        };
        let mut kernels = vec![Tile::Avx2];
        if has!("avxvnni") {
            kernels.push(Tile::AvxVnni);
        }
        if has!("avx512vnni") && has!("avx512vl") && has!("avx512f") {
            kernels.push(Tile::Avx512Vnni);
        }
        for (k, kinds) in kinds_by_width() {
            let (w, x) = (pseudo_random(16 * k, 1), pseudo_random(7 * k, 2));
            let inputs = [(w.clone(), x[..k].to_vec()), (w, x), extreme(k)];
            // Q8_0 is packed for the chosen kernel only (see `q8_flip`).
            for &dtype in kinds.iter().filter(|&&d| d != GgmlDType::Q8_0) {
                for (w, x) in &inputs {
                    let (n, m, nb) = (w.len() / k, x.len() / k, k / QK);
                    let bytes = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)
                        .and_then(|w| QTensor::quantize(&w, dtype))
                        .and_then(|q| q.data().map(|d| d.to_vec()))
                        .expect("quantize");
                    let Ok(ours) = FastQuant::owned(dtype, k, bytes) else {
                        panic!("{dtype:?} not wrapped")
                    };
                    let mut acts = Vec::new();
                    quantize_act(x, &mut acts);
                    let run = |t: Tile| {
                        let mut out = vec![0f32; m * n];
                        let ptrs = [crate::model::parallel::SharedOut(out.as_mut_ptr())];
                        // SAFETY: out holds m rows of the weight's n outputs, the weight is
                        // packed with nb blocks per row, acts hold m rows of nb blocks, and
                        // the CPU has kernel t (checked above).
                        unsafe { tile_job(t, &[&ours], nb, &acts, &ptrs) };
                        out
                    };
                    let want = run(chosen);
                    for &t in &kernels {
                        assert_eq!(run(t), want, "{dtype:?}, {m} rows, {t:?} vs {chosen:?}");
                    }
                }
            }
        }
    }

    /// The block types we take with a row width each: 288 values (not a multiple of 256, as
    /// for the Q8_0 tensors we take over from candle on VNNI CPUs) for the 32-value types,
    /// 512 (two GGUF blocks) for the k-quants, which have our kernels only with a tile kernel.
    fn kinds_by_width() -> [(usize, Vec<GgmlDType>); 2] {
        let k_kinds = match tile_kernel() {
            Some(_) => vec![GgmlDType::Q4K, GgmlDType::Q6K],
            None => vec![],
        };
        [
            (288, vec![GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0]),
            (512, k_kinds),
        ]
    }

    /// Our results for `kinds` with weights `w` and activations `x` (rows of `k` values),
    /// after checking them against candle.
    fn same_blocks(kinds: &[GgmlDType], w: &[f32], x: &[f32], k: usize) -> Vec<Vec<f32>> {
        let (m, n) = (x.len() / k, w.len() / k);
        let mut results = Vec::new();
        let w = Tensor::from_vec(w.to_vec(), (n, k), &Device::Cpu).expect("w");
        let x = Tensor::from_vec(x.to_vec(), (m, k), &Device::Cpu).expect("x");
        for &dtype in kinds {
            let theirs = QTensor::quantize(&w, dtype).expect("quantize");
            let bytes = theirs.data().expect("bytes").to_vec();
            let Ok(ours) = FastQuant::owned(dtype, k, bytes) else {
                panic!("{dtype:?} not wrapped")
            };
            // Where the tile kernel runs, the weights are packed: the row kernel on the
            // unpacked bytes must agree with it too (k-quants are only ever packed).
            assert_eq!(ours.packed, tile_kernel().is_some());
            let xs = x.flatten_all().and_then(|f| f.to_vec1::<f32>()).expect("x");
            let mut y_ours = vec![0f32; m * n];
            ours.matmul_t((m, k, n), &xs, &mut y_ours).expect("ours");
            results.push(y_ours.clone());
            if ours.kind.is_k() {
                same_as_candle(dtype, theirs, ours, &x, n, k);
                continue;
            }
            let rows = FastQuant {
                kind: ours.kind,
                data: Data::Owned(theirs.data().expect("bytes").to_vec().into()),
                row_blocks: k / QK,
                packed: false,
            };
            let mut y_rows = vec![0f32; m * n];
            rows.matmul_t((m, k, n), &xs, &mut y_rows).expect("rows");
            for (a, b) in y_rows.iter().zip(&y_ours) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                    "{dtype:?}: {a} vs {b}"
                );
            }
            same_as_candle(dtype, theirs, ours, &x, n, k);
        }
        results
    }

    /// Our weights dequantize exactly as candle's, and multiply to within the error that
    /// quantizing the activations to 8 bits allows.
    fn same_as_candle(
        dtype: GgmlDType,
        theirs: QTensor,
        ours: FastQuant,
        x: &Tensor,
        n: usize,
        k: usize,
    ) {
        {
            // Multiplied as the model does (`forward`): inside a QTensor, candle would pick
            // its repacked k-quant kernels and read our packed bytes as GGUF blocks.
            let y: Vec<f32> = ours
                .forward(x)
                .and_then(|y| y.flatten_all()?.to_vec1())
                .expect("fwd");
            let ours = QTensor::new(QStorage::Cpu(Box::new(ours)), (n, k)).expect("qtensor");
            let deq = |t: &QTensor| -> Vec<f32> {
                let d = t.dequantize(&Device::Cpu).expect("dequantize");
                d.flatten_all().and_then(|f| f.to_vec1()).expect("to host")
            };
            let (deq_a, deq_b) = (deq(&theirs), deq(&ours));
            assert_eq!(deq_a, deq_b, "{dtype:?} dequantization");
            let xs = x.flatten_all().and_then(|f| f.to_vec1::<f32>()).expect("x");
            let m = xs.len() / k;
            // Exact products of the dequantized weights, and the most that rounding each
            // activation to its 8-bit step (half a step per value) can move them.
            for i in 0..m {
                let xi = &xs[i * k..(i + 1) * k];
                for j in 0..n {
                    let wj = &deq_a[j * k..(j + 1) * k];
                    let exact: f64 = xi.iter().zip(wj).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let bound: f64 = xi
                        .chunks(QK)
                        .zip(wj.chunks(QK))
                        .map(|(a, w)| {
                            let step = a.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 127.0;
                            w.iter().map(|w| w.abs() as f64).sum::<f64>() * step / 2.0
                        })
                        .sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= bound * 1.01 + 1e-5,
                        "{dtype:?} ({i}, {j}): {got} vs {exact} (bound {bound})"
                    );
                }
            }
        }
    }

    /// Several weights of mixed kinds and widths in one job give, bit for bit, what each
    /// gives alone.
    #[test]
    fn forward_many_equals_forward_each() {
        if tile_kernel().is_none() {
            return;
        }
        let k = 512;
        let ws: Vec<FastQuant> = [
            (GgmlDType::Q4K, 64),
            (GgmlDType::Q6K, 16),
            (GgmlDType::Q4_1, 24),
            (GgmlDType::Q8_0, 8),
        ]
        .into_iter()
        .filter(|&(d, _)| FastQuant::kind_for(d, k, 0).is_some())
        .enumerate()
        .map(|(i, (dtype, n))| {
            let w = Tensor::from_vec(pseudo_random(n * k, 10 + i as u32), (n, k), &Device::Cpu)
                .expect("w");
            let bytes = QTensor::quantize(&w, dtype)
                .and_then(|q| q.data().map(|d| d.to_vec()))
                .expect("quantize");
            match FastQuant::owned(dtype, k, bytes) {
                Ok(f) => f,
                Err(_) => panic!("{dtype:?} not wrapped"),
            }
        })
        .collect();
        let refs: Vec<&FastQuant> = ws.iter().collect();
        // A decode step's few rows, and (where the CPU has AMX) a batch past one tile.
        for rows in [3, 19] {
            let x =
                Tensor::from_vec(pseudo_random(rows * k, 5), (rows, k), &Device::Cpu).expect("x");
            let many = FastQuant::forward_many(&refs, &x)
                .expect("forward_many")
                .expect("all packed");
            assert_eq!(many.len(), ws.len());
            for (w, y) in ws.iter().zip(&many) {
                let alone = w.forward(&x).expect("forward");
                let flat =
                    |t: &Tensor| t.flatten_all().and_then(|f| f.to_vec1::<f32>()).expect("y");
                assert_eq!(y.dims(), alone.dims());
                assert_eq!(flat(y), flat(&alone), "{:?}, {rows} rows", w.kind);
            }
        }
    }

    #[test]
    fn vectorized_activation_quantization_equals_scalar() {
        if !has_avx2() {
            return;
        }
        let mut xs = pseudo_random(32 * 64, 7);
        xs[5] = 0.0;
        xs[32..64].fill(0.0); // an all-zero block
        for v in xs[64..96].iter_mut() {
            *v *= 1e-3;
        }
        for (b, x) in xs.chunks_exact(QK).enumerate() {
            // SAFETY: AVX2 checked above.
            let fast = unsafe { x86::quantize_block(x) };
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: Vec<i8> = x.iter().map(|v| (v * id).round() as i8).collect();
            let sum: i32 = q.iter().map(|&v| v as i32).sum();
            assert_eq!(fast.q.to_vec(), q, "block {b}");
            assert_eq!(fast.d, d, "block {b}");
            assert_eq!(fast.s, d * sum as f32, "block {b}");
            assert_eq!(fast.sum, sum, "block {b}");
            let sum_lo: i32 = q[..16].iter().map(|&v| v as i32).sum();
            assert_eq!(fast.sum_lo, sum_lo, "block {b}");
        }
    }

    #[test]
    fn quantize_round_trips_within_a_step() {
        let xs = pseudo_random(64, 3);
        for kind in [Kind::Q4_1, Kind::Q5_0, Kind::Q8_0] {
            let mut q = FastQuant {
                kind,
                data: Data::Owned(vec![0; 2 * kind.block_bytes()].into()),
                row_blocks: 2,
                packed: false,
            };
            q.from_float(&xs);
            let mut back = vec![0f32; 64];
            q.dequantize_blocks(0, 2, &mut back);
            let step = if kind == Kind::Q4_1 {
                2.0 / 15.0
            } else {
                1.0 / 16.0
            };
            for (a, b) in xs.iter().zip(&back) {
                assert!((a - b).abs() <= step, "{kind:?}: {a} vs {b}");
            }
        }
    }
}
