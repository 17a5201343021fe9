//! The CPU attention kernel: a block of query rows (some tokens of one sequence, times the
//! query heads that share one kv head) against the cached keys and values of a span of
//! positions, each row masked to its own causal (and sliding) window.
//!
//! Query rows sit in the lanes of a vector: a key row is read once for all of them (a long
//! prompt's rows share it instead of each streaming the whole cache again), and every lane
//! computes the same chain of operations in the same order whatever rows run beside it. So a
//! token's attention is bit-identical whether it runs alone, in a prompt chunk of any size or
//! in a batch with other sequences: generation does not depend on what else the server does.
//!
//! Keys and values are read in the cache's own element type ([`KvElem`]: f16 by default, f32
//! or llama.cpp's q8_0 blocks on request) and widened (and scaled) to f32 in registers as they
//! are loaded: no dequantized copy.

use half::f16;

/// Lanes per row block (AVX2 f32).
pub const LANES: usize = 8;

/// One block of query rows: `q` transposed to `[head_dim][rows]` and already scaled, with
/// rows padded to a multiple of [`LANES`]; `window[r]` the span-relative keys row `r` sees.
pub struct Rows {
    /// Rows with padding (a multiple of [`LANES`]).
    pub rows: usize,
    /// Rows asked for: outputs past these are padding's, not computed.
    pub used: usize,
    pub qt: Vec<f32>,
    pub window: Vec<(u32, u32)>,
}

impl Rows {
    pub fn new(rows: usize, head_dim: usize, span: usize) -> Self {
        let padded = rows.next_multiple_of(LANES);
        Self {
            rows: padded,
            used: rows,
            qt: vec![0.0; head_dim * padded],
            // Padding rows see every key (their zero queries give finite scores).
            window: vec![(0, span as u32); padded],
        }
    }
}

/// A unit of the KV cache's storage: how a row of f32 is stored and widened back as it is
/// read. A unit holds [`KvElem::BLOCK`] elements (1 for f16 and f32, 32 for a q8_0 block);
/// rows are whole units, so every pointer below points at a unit.
pub trait KvElem: Copy + Send + Sync + 'static {
    /// Elements per unit.
    const BLOCK: usize;
    /// Stores `src` (a whole number of units' elements) into `dst`.
    fn store(dst: &mut [Self], src: &[f32]);
    /// Element `d` of `row`.
    fn get(row: &[Self], d: usize) -> f32 {
        let u = &row[d / Self::BLOCK];
        // SAFETY: `u` is a whole unit and `d % BLOCK` lies inside it.
        unsafe { Self::scale(u) * Self::raw(u, d % Self::BLOCK) }
    }
    /// `n` zeroed units from zeroed memory: the pages stay untouched (and cost nothing) until
    /// a block is first written, which `vec![zero; n]` guarantees only for primitive types.
    fn zeroed(n: usize) -> Vec<Self>;
    /// The scale of the unit at `p` (1 for plain floats, which the compiler folds away).
    ///
    /// # Safety
    /// `p` must point to a readable unit.
    unsafe fn scale(p: *const Self) -> f32;
    /// Element `i` of the unit at `p`, before its scale.
    ///
    /// # Safety
    /// `p` must point to a readable unit and `i < BLOCK`.
    unsafe fn raw(p: *const Self, i: usize) -> f32;
    /// Elements `d..d + 8` of the row at `p`, widened and scaled (`d` a multiple of 8).
    ///
    /// # Safety
    /// The row must hold those elements; the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self, d: usize) -> std::arch::x86_64::__m256;
    /// Elements `d..d + 16` of the row at `p`, widened and scaled (`d` a multiple of 16).
    ///
    /// # Safety
    /// The row must hold those elements; the CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self, d: usize) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    const BLOCK: usize = 1;
    fn store(dst: &mut [Self], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn zeroed(n: usize) -> Vec<Self> {
        vec![0.0; n]
    }
    #[inline(always)]
    unsafe fn scale(_: *const Self) -> f32 {
        1.0
    }
    #[inline(always)]
    unsafe fn raw(p: *const Self, _: usize) -> f32 {
        // SAFETY: the caller upholds the contract in the trait's `# Safety`.
        unsafe { *p }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self, d: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller upholds the contract in the trait's `# Safety`.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p.add(d)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self, d: usize) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller upholds the contract in the trait's `# Safety`.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p.add(d)) }
    }
}

impl KvElem for f16 {
    const BLOCK: usize = 1;
    fn store(dst: &mut [Self], src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        // The slice conversion uses F16C where the CPU has it: the same rounding (to nearest,
        // ties to even) as one value at a time, which took 2% of a 16-row decode step.
        let n = dst.len().min(src.len());
        dst[..n].convert_from_f32_slice(&src[..n]);
    }
    fn zeroed(n: usize) -> Vec<Self> {
        use half::vec::HalfBitsVecExt;
        // Zero bits are +0.0; reinterpreting keeps the zeroed allocation (no copy).
        vec![0u16; n].reinterpret_into()
    }
    #[inline(always)]
    unsafe fn scale(_: *const Self) -> f32 {
        1.0
    }
    #[inline(always)]
    unsafe fn raw(p: *const Self, _: usize) -> f32 {
        // SAFETY: the caller upholds the contract in the trait's `# Safety`.
        unsafe { (*p).to_f32() }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self, d: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller upholds the contract in the trait's `# Safety`; f16 is 16 bits.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.add(d).cast())) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self, d: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller upholds the contract in the trait's `# Safety`; f16 is 16 bits.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.add(d).cast())) }
    }
}

/// 32 elements as llama.cpp's `q8_0` stores them: one f16 scale and 32 signed bytes (34 bytes,
/// 1.06 per element against f16's 2). An element is `scale * q`, rounded to f32 once.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct Q8Block {
    pub scale: f16,
    pub qs: [i8; 32],
}

impl Q8Block {
    /// Elements per block.
    pub const ELEMENTS: usize = 32;

    /// The nearest block to `x` (32 values): the largest magnitude maps to +-127.
    pub fn quantize(x: &[f32]) -> Self {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        Self {
            scale: f16::from_f32(d),
            qs: std::array::from_fn(|i| (x[i] * inv).round() as i8),
        }
    }
}

impl KvElem for Q8Block {
    const BLOCK: usize = Self::ELEMENTS;
    fn store(dst: &mut [Self], src: &[f32]) {
        for (d, x) in dst.iter_mut().zip(src.chunks_exact(32)) {
            *d = Q8Block::quantize(x);
        }
    }
    fn zeroed(n: usize) -> Vec<Self> {
        if n == 0 {
            return Vec::new();
        }
        let Ok(layout) = std::alloc::Layout::array::<Self>(n) else {
            // More bytes than an address space holds: no allocation can succeed.
            std::alloc::handle_alloc_error(std::alloc::Layout::new::<Self>());
        };
        // SAFETY: the layout is non-zero and that of `n` blocks; all-zero bytes are a valid
        // block (scale +0.0, zero quants), so the vector owns `n` initialised elements of its
        // own allocation, which `Vec` frees with the same layout.
        unsafe {
            let p = std::alloc::alloc_zeroed(layout).cast::<Self>();
            if p.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            Vec::from_raw_parts(p, n, n)
        }
    }
    #[inline(always)]
    unsafe fn scale(p: *const Self) -> f32 {
        // SAFETY: the caller upholds the contract in the trait's `# Safety`.
        unsafe { (*p).scale.to_f32() }
    }
    #[inline(always)]
    unsafe fn raw(p: *const Self, i: usize) -> f32 {
        // SAFETY: the caller upholds the contract in the trait's `# Safety`.
        unsafe { f32::from(*(*p).qs.as_ptr().add(i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self, d: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller upholds the contract in the trait's `# Safety`: `d` is a multiple
        // of 8, so the eight bytes lie inside block `d / 32`.
        unsafe {
            let b = p.add(d / 32);
            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((*b).qs.as_ptr().add(d % 32).cast()));
            _mm256_mul_ps(_mm256_set1_ps(Self::scale(b)), _mm256_cvtepi32_ps(q))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self, d: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: as in `load8`: sixteen bytes inside block `d / 32`.
        unsafe {
            let b = p.add(d / 32);
            let q = _mm512_cvtepi8_epi32(_mm_loadu_si128((*b).qs.as_ptr().add(d % 32).cast()));
            _mm512_mul_ps(_mm512_set1_ps(Self::scale(b)), _mm512_cvtepi32_ps(q))
        }
    }
}

/// Attention outputs `[rows][head_dim]` for `rows` against `keys`/`values`: one row of
/// `head_dim` values per span position, in order.
pub fn attend<E: KvElem>(rows: &Rows, head_dim: usize, keys: &[&[E]], values: &[&[E]]) -> Vec<f32> {
    attend_with(rows, head_dim, keys, values, None)
}

/// One part of a long context: [`attend`]'s outputs before the softmax's division, with each
/// row's largest score and sum of exponentials over the part (`-inf` and 0 for a row that sees
/// none of it), for [`merge_parts`].
pub struct Partial {
    pub out: Vec<f32>,
    pub max: Vec<f32>,
    pub sum: Vec<f32>,
}

/// [`attend`] over one part of the keys, unnormalised (see [`Partial`]).
pub fn attend_partial<E: KvElem>(
    rows: &Rows,
    head_dim: usize,
    keys: &[&[E]],
    values: &[&[E]],
) -> Partial {
    let (mut max, mut sum) = (vec![0f32; rows.rows], vec![0f32; rows.rows]);
    let out = attend_with(rows, head_dim, keys, values, Some((&mut max, &mut sum)));
    Partial { out, max, sum }
}

/// [`attend`], or with `stats` [`attend_partial`]: the softmax's row maxima and sums go there
/// and the outputs are left undivided.
fn attend_with<E: KvElem>(
    rows: &Rows,
    head_dim: usize,
    keys: &[&[E]],
    values: &[&[E]],
    stats: Option<(&mut [f32], &mut [f32])>,
) -> Vec<f32> {
    let span = keys.len();
    assert!(
        values.len() == span
            && keys
                .iter()
                .chain(values)
                .all(|r| r.len() * E::BLOCK >= head_dim),
        "attention rows shorter than the head"
    );
    let mut probs = vec![0f32; span * rows.rows];
    let mut out = vec![0f32; head_dim * rows.rows];
    #[cfg(target_arch = "x86_64")]
    if super::cpu_quant::has_avx2() && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the features were just checked; buffers have the sizes the kernels use
        // (`stats` holds `rows.rows` floats each, as `attend_partial` allocates them).
        unsafe {
            x86::scores(rows, head_dim, keys, &mut probs);
            match stats {
                Some((max, sum)) => x86::exponentials(rows.rows, span, &mut probs, max, sum),
                None => x86::softmax(rows.rows, span, &mut probs),
            }
            x86::weighted_values(rows.rows, rows.used, head_dim, values, &probs, &mut out);
        }
        return out;
    }
    portable(rows, head_dim, keys, values, &mut probs, &mut out, stats);
    out
}

/// Row `r`'s attention output (`hd` values) from its parts, in order: each part's sums
/// rescaled to the largest score over all parts, then divided by the total weight. The
/// arithmetic depends only on the row's own scores, so the row's result is the same in any
/// batch and any chunk of rows.
pub fn merge_parts(parts: &[&Partial], r: usize, hd: usize, out: &mut [f32]) {
    let top = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.max[r]));
    out.fill(0.0);
    let mut total = 0.0;
    for p in parts.iter().filter(|p| p.max[r] > f32::NEG_INFINITY) {
        let w = (p.max[r] - top).exp();
        total = p.sum[r].mul_add(w, total);
        for (o, &v) in out.iter_mut().zip(&p.out[r * hd..(r + 1) * hd]) {
            *o = v.mul_add(w, *o);
        }
    }
    let inv = 1.0 / total;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// The same computation without SIMD (each lane's chain of operations spelled out).
fn portable<E: KvElem>(
    rows: &Rows,
    hd: usize,
    keys: &[&[E]],
    values: &[&[E]],
    probs: &mut [f32],
    out: &mut [f32],
    mut stats: Option<(&mut [f32], &mut [f32])>,
) {
    let (n, span) = (rows.rows, keys.len());
    for (j, k) in keys.iter().enumerate() {
        for r in 0..n {
            let (from, to) = rows.window[r];
            probs[j * n + r] = if (from..to).contains(&(j as u32)) {
                (0..hd).fold(0.0, |s, d| rows.qt[d * n + r].mul_add(E::get(k, d), s))
            } else {
                f32::NEG_INFINITY
            };
        }
    }
    for r in 0..n {
        let max = (0..span).fold(f32::NEG_INFINITY, |m, j| m.max(probs[j * n + r]));
        // A row that sees none of a part's keys: every exponential 0, not NaN.
        let shift = if max == f32::NEG_INFINITY { 0.0 } else { max };
        let mut sum = 0.0;
        for j in 0..span {
            let e = (probs[j * n + r] - shift).exp();
            probs[j * n + r] = e;
            sum += e;
        }
        if let Some((m, s)) = stats.as_mut() {
            (m[r], s[r]) = (max, sum);
            continue;
        }
        for j in 0..span {
            probs[j * n + r] *= 1.0 / sum;
        }
    }
    for (j, v) in values.iter().enumerate() {
        for r in 0..n {
            for d in 0..hd {
                out[r * hd + d] = probs[j * n + r].mul_add(E::get(v, d), out[r * hd + d]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{KvElem, Rows, LANES};
    use std::arch::x86_64::*;

    /// Dot products of `B` blocks of 8 query rows (`qt`, `n` floats per head dimension)
    /// with `K` keys, as one fused multiply-add chain per lane over the head dimensions.
    ///
    /// # Safety
    /// `qt` must hold `B * 8` floats per head dimension `n` apart for `hd` dimensions, each key a row of `hd` elements, and the CPU must have AVX2 and FMA.
    #[inline(always)]
    unsafe fn dots<E: KvElem, const B: usize, const K: usize>(
        qt: *const f32,
        n: usize,
        keys: [*const E; K],
        hd: usize,
    ) -> [[__m256; B]; K] {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); B]; K];
            let mut q = qt;
            for u in 0..hd / E::BLOCK {
                let scale = keys.map(|k| E::scale(k.add(u)));
                for e in 0..E::BLOCK {
                    let k: [__m256; K] = std::array::from_fn(|j| {
                        _mm256_set1_ps(scale[j] * E::raw(keys[j].add(u), e))
                    });
                    for i in 0..B {
                        let qv = _mm256_loadu_ps(q.add(LANES * i));
                        for (acc, k) in acc.iter_mut().zip(k) {
                            acc[i] = _mm256_fmadd_ps(qv, k, acc[i]);
                        }
                    }
                    q = q.add(n);
                }
            }
            acc
        }
    }

    /// Scores `[span][rows]`: for each key, the dot product with every row's query (see
    /// [`dots`]); keys outside a row's window get -inf.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `rows` and `probs` must have the shapes `attend` gives them (`probs` holds `keys.len()` times the padded row count).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores<E: KvElem>(rows: &Rows, hd: usize, keys: &[&[E]], probs: &mut [f32]) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let n = rows.rows;
            let (from, to): (Vec<i32>, Vec<i32>) = rows
                .window
                .iter()
                .map(|&(f, t)| (f as i32, t as i32))
                .unzip();
            let out = probs.as_mut_ptr();
            let store = |j: usize, r: usize, acc: __m256| {
                let jv = _mm256_set1_epi32(j as i32);
                let lo = _mm256_loadu_si256(from.as_ptr().add(r) as *const __m256i);
                let hi = _mm256_loadu_si256(to.as_ptr().add(r) as *const __m256i);
                // Outside the window: j < from or j >= to.
                let outside = _mm256_or_si256(
                    _mm256_cmpgt_epi32(lo, jv),
                    _mm256_cmpgt_epi32(_mm256_add_epi32(jv, _mm256_set1_epi32(1)), hi),
                );
                let s = _mm256_blendv_ps(
                    acc,
                    _mm256_set1_ps(f32::NEG_INFINITY),
                    _mm256_castsi256_ps(outside),
                );
                _mm256_storeu_ps(out.add(j * n + r), s);
            };
            if n == LANES && hd.is_multiple_of(LANES) {
                // One block of rows (a decode token's query heads): keys in the lanes.
                macro_rules! by_key {
                    ($($r:literal)*) => {
                        match rows.used {
                            $($r => by_key::<E, $r>(&rows.qt, hd, keys, |j, s| store(j, 0, s)),)*
                            _ => unreachable!("a block holds at most {LANES} rows"),
                        }
                    };
                }
                by_key!(1 2 3 4 5 6 7 8);
                return;
            }
            // Few rows (decode): four keys per pass; more rows: two keys times up to four blocks.
            // Either way the accumulators, keys and queries of a pass fit the 16 registers.
            let per_pass = if n <= 2 * LANES { 4 } else { 2 };
            for j in (0..keys.len()).step_by(per_pass) {
                // Past the last key, a pass repeats it (and does not store it again).
                let key = |i: usize| keys[(j + i).min(keys.len() - 1)].as_ptr();
                let valid = keys.len() - j;
                let mut r = 0;
                macro_rules! pass {
                    ($b:literal, $k:literal) => {{
                        let acc = dots::<E, $b, $k>(
                            rows.qt.as_ptr().add(r),
                            n,
                            std::array::from_fn(key),
                            hd,
                        );
                        for (i, acc) in acc.iter().enumerate().take(valid) {
                            for (b, a) in acc.iter().enumerate() {
                                store(j + i, r + LANES * b, *a);
                            }
                        }
                        r += $b * LANES;
                    }};
                }
                if per_pass == 4 {
                    match n / LANES {
                        2 => pass!(2, 4),
                        _ => pass!(1, 4),
                    }
                } else {
                    while n - r >= 4 * LANES {
                        pass!(4, 2);
                    }
                    match (n - r) / LANES {
                        3 => pass!(3, 2),
                        2 => pass!(2, 2),
                        1 => pass!(1, 2),
                        _ => {}
                    }
                }
                debug_assert_eq!(r, n);
            }
        }
    }

    /// Scores of `R` rows (one block, `qt` 8 floats per head dimension) with eight keys per
    /// pass in the lanes: each key's elements `d..d + 8` are widened and the eight transposed,
    /// so a row's eight scores take one fused multiply-add per head dimension, where the
    /// row-lane pass of [`dots`] broadcasts every key element to lanes mostly idle at a few
    /// rows. Each (row, key) is still one chain over the head dimensions in order, so scores
    /// are bit-identical to that pass. `store(j, s)` gets key `j`'s scores of the 8 rows
    /// (padding rows 0).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `qt` must hold `hd * 8` floats, `hd` a multiple of 8, each key `hd` elements, `R <= 8`.
    #[inline(always)]
    unsafe fn by_key<E: KvElem, const R: usize>(
        qt: &[f32],
        hd: usize,
        keys: &[&[E]],
        mut store: impl FnMut(usize, __m256),
    ) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let span = keys.len();
            for j in (0..span).step_by(LANES) {
                // Past the last key, a pass repeats it (and does not store it again).
                let k: [*const E; LANES] =
                    std::array::from_fn(|i| keys[(j + i).min(span - 1)].as_ptr());
                // The next pass's keys: a block's rows are contiguous, but blocks lie anywhere
                // in the cache, where the hardware prefetcher does not follow (decode at a
                // long context waited on these loads).
                for next in keys.iter().skip(j + LANES).take(LANES) {
                    prefetch(next.as_ptr(), hd);
                }
                let mut acc = [_mm256_setzero_ps(); R];
                let mut q = qt.as_ptr();
                for d in (0..hd).step_by(LANES) {
                    let kd = transpose(k.map(|k| E::load8(k, d)));
                    for kd in kd {
                        for (r, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(_mm256_set1_ps(*q.add(r)), kd, *acc);
                        }
                        q = q.add(LANES);
                    }
                }
                let by_row =
                    std::array::from_fn(|r| acc.get(r).copied().unwrap_or(_mm256_setzero_ps()));
                for (i, s) in transpose(by_row).into_iter().take(span - j).enumerate() {
                    store(j + i, s);
                }
            }
        }
    }

    /// How many positions ahead [`weighted_values`] prefetches value rows.
    const AHEAD: usize = 8;

    /// Asks for the cache lines of a row of `hd` elements at `p` to be brought into L1.
    #[inline(always)]
    fn prefetch<E: KvElem>(p: *const E, hd: usize) {
        super::super::cpu_quant::prefetch_lines(p.cast(), hd / E::BLOCK * std::mem::size_of::<E>());
    }

    /// An 8 x 8 transpose: lane `i` of output `e` is lane `e` of input `i`.
    ///
    /// # Safety
    /// The CPU must have AVX.
    #[inline(always)]
    unsafe fn transpose(r: [__m256; LANES]) -> [__m256; LANES] {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let lo = |a, b| _mm256_unpacklo_ps(a, b);
            let hi = |a, b| _mm256_unpackhi_ps(a, b);
            let t = [
                lo(r[0], r[1]),
                hi(r[0], r[1]),
                lo(r[2], r[3]),
                hi(r[2], r[3]),
                lo(r[4], r[5]),
                hi(r[4], r[5]),
                lo(r[6], r[7]),
                hi(r[6], r[7]),
            ];
            // u[e] holds element e (low half) and e + 4 (high half) of rows 0-3, then 4-7.
            let u = [
                _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
            ];
            std::array::from_fn(|e| {
                let (a, b) = (u[e % 4], u[4 + e % 4]);
                if e < 4 {
                    _mm256_permute2f128_ps::<0x20>(a, b)
                } else {
                    _mm256_permute2f128_ps::<0x31>(a, b)
                }
            })
        }
    }

    /// [`weighted_values`] for rows `r..r + 4` and head dimensions `d0..d0 + 64`: sixteen
    /// 512-bit accumulators, so each value load serves four rows. Same chain per element.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; rows `r..r + 4` and dimensions `d0..d0 + 64` must lie inside `probs`, `values` and `out`.
    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_values_512<E: KvElem>(
        n: usize,
        hd: usize,
        r: usize,
        d0: usize,
        values: &[&[E]],
        probs: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            let mut p = probs.as_ptr().add(r);
            for v in values {
                let v = [0, 16, 32, 48].map(|i| E::load16(v.as_ptr(), d0 + i));
                for (row, acc) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*p.add(row));
                    for (a, v) in acc.iter_mut().zip(v) {
                        *a = _mm512_fmadd_ps(w, v, *a);
                    }
                }
                p = p.add(n);
            }
            for (row, acc) in acc.iter().enumerate() {
                for (i, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add((r + row) * hd + d0 + 16 * i), *a);
                }
            }
        }
    }

    /// e^x for 8 lanes: 2^n * p(r) with x = n ln 2 + r, |r| <= ln 2 / 2 and p the degree-6
    /// Taylor polynomial (relative error about 1e-7, f32's own rounding). -inf gives 0, as
    /// does anything below -87 (under f32's normal range).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[inline(always)]
    pub(crate) unsafe fn exp(x: __m256) -> __m256 {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            // ln 2 in two parts, so r = x - n ln 2 keeps its low bits.
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
            let mut p = _mm256_set1_ps(1.0 / 720.0);
            for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let two_n = _mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            );
            let e = _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
            // Masked scores (-inf) and deep underflow: exactly 0.
            let zero = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_LE_OQ);
            _mm256_andnot_ps(zero, e)
        }
    }

    /// Rows `r..r + 8`'s scores over the span replaced by their exponentials less the row's
    /// largest score: that largest score and the exponentials' sum, per lane. A row that sees
    /// no key keeps `-inf` as its largest score and gets exponentials (and a sum) of 0.
    ///
    /// # Safety
    /// `p` must hold `span` rows of `n` lanes with `r + 8 <= n`, and the CPU must have AVX2
    /// and FMA.
    #[inline(always)]
    unsafe fn row_exponentials(p: *mut f32, n: usize, span: usize, r: usize) -> (__m256, __m256) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut max = ninf;
            for j in 0..span {
                max = _mm256_max_ps(max, _mm256_loadu_ps(p.add(j * n + r)));
            }
            // Bitwise the same shift as `max` for every row that sees a key.
            let shift = _mm256_andnot_ps(_mm256_cmp_ps(max, ninf, _CMP_EQ_OQ), max);
            let mut sum = _mm256_setzero_ps();
            for j in 0..span {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(j * n + r)), shift));
                _mm256_storeu_ps(p.add(j * n + r), e);
                sum = _mm256_add_ps(sum, e);
            }
            (max, sum)
        }
    }

    /// Softmax over the span, per row (lane), in place.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `probs` must hold `span` rows of `n` lanes (padded to whole vectors).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax(n: usize, span: usize, probs: &mut [f32]) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let p = probs.as_mut_ptr();
            for r in (0..n).step_by(LANES) {
                let (_, sum) = row_exponentials(p, n, span, r);
                let inv = _mm256_div_ps(_mm256_set1_ps(1.0), sum);
                for j in 0..span {
                    let e = _mm256_loadu_ps(p.add(j * n + r));
                    _mm256_storeu_ps(p.add(j * n + r), _mm256_mul_ps(e, inv));
                }
            }
        }
    }

    /// [`softmax`]'s exponentials without the division: each row's largest score goes to
    /// `max` and the sum of its exponentials to `sum` (for a row that sees no key: `-inf`,
    /// and 0 with every exponential 0).
    ///
    /// # Safety
    /// As [`softmax`]; `max` and `sum` must hold `n` floats.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exponentials(
        n: usize,
        span: usize,
        probs: &mut [f32],
        max_out: &mut [f32],
        sum_out: &mut [f32],
    ) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let p = probs.as_mut_ptr();
            for r in (0..n).step_by(LANES) {
                let (max, sum) = row_exponentials(p, n, span, r);
                _mm256_storeu_ps(max_out.as_mut_ptr().add(r), max);
                _mm256_storeu_ps(sum_out.as_mut_ptr().add(r), sum);
            }
        }
    }

    /// Outputs `[rows][hd]` of the first `used` rows: each row's probability-weighted sum of
    /// the value rows, one fused multiply-add per position in order, 64 head dimensions per
    /// pass in registers. Padding rows are skipped (a decode token of a model with three
    /// query heads per kv head pads them to eight).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `probs` must hold `values.len()` rows of `n` lanes, each value row `hd` elements, `out` `n * hd` floats, `used <= n`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_values<E: KvElem>(
        n: usize,
        used: usize,
        hd: usize,
        values: &[&[E]],
        probs: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let p = probs.as_ptr();
            let wide = std::arch::is_x86_feature_detected!("avx512f");
            for r in 0..used {
                let mut d0 = 0;
                if wide {
                    // Rows in fours (n is a multiple of 8), so each value load serves four rows.
                    if r % 4 == 0 {
                        for d0 in (0..hd - hd % 64).step_by(64) {
                            weighted_values_512(n, hd, r, d0, values, probs, out);
                        }
                    }
                    d0 = hd - hd % 64;
                }
                while d0 + 64 <= hd {
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for (j, v) in values.iter().enumerate() {
                        // The first pass only: it brings whole rows, the later ones find
                        // them cached.
                        if r == 0 && d0 == 0 {
                            if let Some(next) = values.get(j + AHEAD) {
                                prefetch(next.as_ptr(), hd);
                            }
                        }
                        let w = _mm256_set1_ps(*p.add(j * n + r));
                        for (i, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(w, E::load8(v.as_ptr(), d0 + 8 * i), *acc);
                        }
                    }
                    for (i, acc) in acc.iter().enumerate() {
                        _mm256_storeu_ps(out.as_mut_ptr().add(r * hd + d0 + 8 * i), *acc);
                    }
                    d0 += 64;
                }
                // Head sizes that are not a multiple of 64: the same chain, one lane at a time.
                for d in d0..hd {
                    let mut acc = 0f32;
                    for (j, v) in values.iter().enumerate() {
                        acc = (*p.add(j * n + r)).mul_add(E::get(v, d), acc);
                    }
                    out[r * hd + d] = acc;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pseudo_random;

    /// The resident set of this process, in bytes (Linux).
    fn rss() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// A KV cache of either element type costs no memory until its blocks are written (the
    /// f16 cache was once filled element by element at allocation: the whole budget resident
    /// at start).
    #[test]
    fn zeroed_caches_are_not_resident() {
        const N: usize = 256 << 20;
        let before = rss();
        let h = f16::zeroed(N);
        let f = f32::zeroed(N);
        let grown = rss().saturating_sub(before);
        assert!(
            grown < 64 << 20,
            "{} MiB resident for 1.5 GiB of zeros",
            grown >> 20
        );
        assert_eq!((h[0], h[N - 1]), (f16::ZERO, f16::ZERO));
        assert_eq!((f[0], f[N - 1]), (0.0, 0.0));
    }

    /// Rows `(query, window)` against `span` keys and values, through [`attend`].
    fn run(rows: &[(&[f32], (u32, u32))], hd: usize, kv: &[f32], span: usize) -> Vec<Vec<f32>> {
        run_as::<f32>(rows, hd, kv, span)
    }

    /// [`run`] with the keys and values stored as `E`.
    fn run_as<E: KvElem>(
        rows: &[(&[f32], (u32, u32))],
        hd: usize,
        kv: &[f32],
        span: usize,
    ) -> Vec<Vec<f32>> {
        let mut units = E::zeroed(kv.len() / E::BLOCK);
        E::store(&mut units, kv);
        let mut r = Rows::new(rows.len(), hd, span);
        for (i, (q, w)) in rows.iter().enumerate() {
            r.window[i] = *w;
            for d in 0..hd {
                r.qt[d * r.rows + i] = q[d];
            }
        }
        let (row, rows_len) = (hd / E::BLOCK, span * hd / E::BLOCK);
        let keys: Vec<&[E]> = units[..rows_len].chunks_exact(row).collect();
        let values: Vec<&[E]> = units[rows_len..].chunks_exact(row).collect();
        let out = attend(&r, hd, &keys, &values);
        out.chunks_exact(hd)
            .take(rows.len())
            .map(<[f32]>::to_vec)
            .collect()
    }

    /// A row's output is bit-identical whatever rows share its block and however long the
    /// span around its window is, and agrees with softmax attention computed in f64.
    #[test]
    fn rows_are_independent_of_their_neighbours() {
        let (hd, span) = (128, 45);
        let kv = pseudo_random(2 * span * hd, 7);
        let qs = pseudo_random(41 * hd, 8);
        let q = |i: usize| &qs[i * hd..(i + 1) * hd];
        let target = (q(0), (3, 30));
        let alone = run(&[target], hd, &kv, span)[0].clone();
        // Up to 7 others: one block of rows, keys in the lanes; 12 others: four keys per
        // pass, up to 2 row blocks; 40 others: two keys times up to 4 row blocks.
        for others in [2, 7, 12, 40] {
            let crowd: Vec<(&[f32], (u32, u32))> = (1..=others)
                .map(|i| (q(i), (0, (i as u32 * 3 + 1).min(span as u32))))
                .chain([target])
                .collect();
            let out = run(&crowd, hd, &kv, span);
            assert_eq!(out[others], alone, "next to {others} other rows");
        }
        let (keys, values) = kv.split_at(span * hd);
        // The span cut right after the window.
        let short = [&keys[..30 * hd], &values[..30 * hd]].concat();
        assert_eq!(
            run(&[target], hd, &short, 30)[0],
            alone,
            "in a shorter span"
        );
        let scores: Vec<f64> = (3..30)
            .map(|j| {
                (0..hd)
                    .map(|d| q(0)[d] as f64 * keys[j * hd + d] as f64)
                    .sum()
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for d in 0..hd {
            let want: f64 = (3..30)
                .map(|j| weights[j - 3] / total * values[j * hd + d] as f64)
                .sum();
            assert!(
                (want - alone[d] as f64).abs() < 1e-5,
                "dim {d}: {want} vs {}",
                alone[d]
            );
        }
    }

    /// An f16 cache: rows stay independent of their neighbours, and the result is that of
    /// f32 attention over the f16-rounded keys and values (read directly, widened exactly).
    #[test]
    fn f16_rows_are_exact_widenings() {
        let (hd, span) = (64, 37);
        let kv = pseudo_random(2 * span * hd, 3);
        let qs = pseudo_random(20 * hd, 4);
        let q = |i: usize| &qs[i * hd..(i + 1) * hd];
        let target = (q(0), (0, 37));
        let alone = run_as::<f16>(&[target], hd, &kv, span)[0].clone();
        let crowd: Vec<(&[f32], (u32, u32))> = (1..20)
            .map(|i| (q(i), (0, i as u32 + 1)))
            .chain([target])
            .collect();
        assert_eq!(run_as::<f16>(&crowd, hd, &kv, span)[19], alone);
        let rounded: Vec<f32> = kv.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        assert_eq!(run(&[target], hd, &rounded, span)[0], alone);
    }

    /// q8_0 blocks: every element within half a quantization step of its value, and
    /// attention over them that of f32 attention over their dequantized values (read directly,
    /// scaled in registers), whatever rows run beside; a head of three blocks takes the
    /// scalar tail after the 64-wide pass.
    #[test]
    fn q8_0_rows_are_exact_dequantizations() {
        for hd in [96, 128] {
            let span = 37;
            let kv = pseudo_random(2 * span * hd, 5);
            let mut blocks = Q8Block::zeroed(kv.len() / 32);
            Q8Block::store(&mut blocks, &kv);
            let deq: Vec<f32> = (0..kv.len()).map(|d| Q8Block::get(&blocks, d)).collect();
            for (b, (x, y)) in kv.chunks_exact(32).zip(deq.chunks_exact(32)).enumerate() {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(amax > 0.0);
                let step = blocks[b].scale.to_f32();
                for (x, y) in x.iter().zip(y) {
                    assert!(
                        (x - y).abs() <= 0.5 * step + amax * 1e-3,
                        "{x} stored as {y}"
                    );
                }
            }
            let qs = pseudo_random(20 * hd, 6);
            let q = |i: usize| &qs[i * hd..(i + 1) * hd];
            let target = (q(0), (2, 37));
            let alone = run_as::<Q8Block>(&[target], hd, &kv, span)[0].clone();
            let crowd: Vec<(&[f32], (u32, u32))> = (1..20)
                .map(|i| (q(i), (0, i as u32 + 1)))
                .chain([target])
                .collect();
            assert_eq!(run_as::<Q8Block>(&crowd, hd, &kv, span)[19], alone);
            assert_eq!(run(&[target], hd, &deq, span)[0], alone, "head of {hd}");
        }
    }

    /// An all-zero block (unwritten cache) reads as zeros; a zero row stores as one.
    #[test]
    fn q8_0_zero_blocks() {
        let z = Q8Block::zeroed(4);
        assert!((0..128).all(|d| Q8Block::get(&z, d) == 0.0));
        assert_eq!(Q8Block::quantize(&[0.0; 32]), z[0]);
    }
}
