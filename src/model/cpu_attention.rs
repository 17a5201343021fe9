//! The CPU attention kernel: a block of query rows (some tokens of one sequence, times the
//! query heads that share one kv head) against the cached keys and values of a span of
//! positions, each row masked to its own causal (and sliding) window.
//!
//! Query rows sit in the lanes of a vector: a key row is read once for all of them (a long
//! prompt's rows share it instead of each streaming the whole cache again), and every lane
//! computes the same chain of operations in the same order whatever rows run beside it. So a
//! token's attention is bit-identical whether it runs alone, in a prompt chunk of any size or
//! in a batch with other sequences: generation does not depend on what else the server does.

/// Lanes per row block (AVX2 f32).
pub const LANES: usize = 8;

/// One block of query rows: `q` transposed to `[head_dim][rows]` and already scaled, with
/// rows padded to a multiple of [`LANES`]; `window[r]` the span-relative keys row `r` sees.
pub struct Rows {
    pub rows: usize,
    pub qt: Vec<f32>,
    pub window: Vec<(u32, u32)>,
}

impl Rows {
    pub fn new(rows: usize, head_dim: usize, span: usize) -> Self {
        let padded = rows.next_multiple_of(LANES);
        Self {
            rows: padded,
            qt: vec![0.0; head_dim * padded],
            // Padding rows see every key (their zero queries give finite scores).
            window: vec![(0, span as u32); padded],
        }
    }
}

/// Attention outputs `[rows][head_dim]` for `rows` against `keys`/`values`: one row of
/// `head_dim` values per span position, in order.
pub fn attend(rows: &Rows, head_dim: usize, keys: &[&[f32]], values: &[&[f32]]) -> Vec<f32> {
    let span = keys.len();
    assert!(
        values.len() == span && keys.iter().chain(values).all(|r| r.len() >= head_dim),
        "attention rows shorter than the head"
    );
    let mut probs = vec![0f32; span * rows.rows];
    let mut out = vec![0f32; head_dim * rows.rows];
    #[cfg(target_arch = "x86_64")]
    if super::cpu_quant::has_avx2() {
        // SAFETY: the features were just checked; buffers have the sizes the kernels use.
        unsafe {
            x86::scores(rows, head_dim, keys, &mut probs);
            x86::softmax(rows.rows, span, &mut probs);
            x86::weighted_values(rows.rows, head_dim, values, &probs, &mut out);
        }
        return out;
    }
    portable(rows, head_dim, keys, values, &mut probs, &mut out);
    out
}

/// The same computation without SIMD (each lane's chain of operations spelled out).
fn portable(
    rows: &Rows,
    hd: usize,
    keys: &[&[f32]],
    values: &[&[f32]],
    probs: &mut [f32],
    out: &mut [f32],
) {
    let (n, span) = (rows.rows, keys.len());
    for (j, k) in keys.iter().enumerate() {
        for r in 0..n {
            let (from, to) = rows.window[r];
            probs[j * n + r] = if (from..to).contains(&(j as u32)) {
                (0..hd).fold(0.0, |s, d| rows.qt[d * n + r].mul_add(k[d], s))
            } else {
                f32::NEG_INFINITY
            };
        }
    }
    for r in 0..n {
        let max = (0..span).fold(f32::NEG_INFINITY, |m, j| m.max(probs[j * n + r]));
        let mut sum = 0.0;
        for j in 0..span {
            let e = (probs[j * n + r] - max).exp();
            probs[j * n + r] = e;
            sum += e;
        }
        for j in 0..span {
            probs[j * n + r] *= 1.0 / sum;
        }
    }
    for (j, v) in values.iter().enumerate() {
        for r in 0..n {
            for d in 0..hd {
                out[r * hd + d] = probs[j * n + r].mul_add(v[d], out[r * hd + d]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{Rows, LANES};
    use std::arch::x86_64::*;

    /// Dot products of `B` blocks of 8 query rows (`qt`, `n` floats per head dimension)
    /// with `K` keys, as one fused multiply-add chain per lane over the head dimensions.
    ///
    /// # Safety
    /// `qt` must hold `B * 8` floats per head dimension `n` apart for `hd` dimensions, each key `hd` floats, and the CPU must have AVX2 and FMA.
    #[inline(always)]
    unsafe fn dots<const B: usize, const K: usize>(
        qt: *const f32,
        n: usize,
        keys: [*const f32; K],
        hd: usize,
    ) -> [[__m256; B]; K] {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); B]; K];
            let mut q = qt;
            for d in 0..hd {
                let k = keys.map(|k| _mm256_set1_ps(*k.add(d)));
                for i in 0..B {
                    let qv = _mm256_loadu_ps(q.add(LANES * i));
                    for (acc, k) in acc.iter_mut().zip(k) {
                        acc[i] = _mm256_fmadd_ps(qv, k, acc[i]);
                    }
                }
                q = q.add(n);
            }
            acc
        }
    }

    /// Scores `[span][rows]`: for each key, the dot product with every row's query (see
    /// [`dots`]); keys outside a row's window get -inf.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `rows` and `probs` must have the shapes `attend` gives them (`probs` holds `keys.len()` times the padded row count).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(rows: &Rows, hd: usize, keys: &[&[f32]], probs: &mut [f32]) {
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
                        let acc = dots::<$b, $k>(
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

    /// [`weighted_values`] for rows `r..r + 4` and head dimensions `d0..d0 + 64`: sixteen
    /// 512-bit accumulators, so each value load serves four rows. Same chain per element.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; rows `r..r + 4` and dimensions `d0..d0 + 64` must lie inside `probs`, `values` and `out`.
    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_values_512(
        n: usize,
        hd: usize,
        r: usize,
        d0: usize,
        values: &[&[f32]],
        probs: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            let mut p = probs.as_ptr().add(r);
            for v in values {
                let v = [0, 16, 32, 48].map(|i| _mm512_loadu_ps(v.as_ptr().add(d0 + i)));
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
                let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
                for j in 0..span {
                    max = _mm256_max_ps(max, _mm256_loadu_ps(p.add(j * n + r)));
                }
                let mut sum = _mm256_setzero_ps();
                for j in 0..span {
                    let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(j * n + r)), max));
                    _mm256_storeu_ps(p.add(j * n + r), e);
                    sum = _mm256_add_ps(sum, e);
                }
                let inv = _mm256_div_ps(_mm256_set1_ps(1.0), sum);
                for j in 0..span {
                    let e = _mm256_loadu_ps(p.add(j * n + r));
                    _mm256_storeu_ps(p.add(j * n + r), _mm256_mul_ps(e, inv));
                }
            }
        }
    }

    /// Outputs `[rows][hd]`: each row's probability-weighted sum of the value rows, one fused
    /// multiply-add per position in order, 64 head dimensions per pass in registers.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `probs` must hold `values.len()` rows of `n` lanes, each value row `hd` floats, `out` `n * hd` floats.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_values(
        n: usize,
        hd: usize,
        values: &[&[f32]],
        probs: &[f32],
        out: &mut [f32],
    ) {
        // SAFETY: the caller upholds the contract in `# Safety` above.
        unsafe {
            let p = probs.as_ptr();
            let wide = std::arch::is_x86_feature_detected!("avx512f");
            for r in 0..n {
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
                        let w = _mm256_set1_ps(*p.add(j * n + r));
                        for (i, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(
                                w,
                                _mm256_loadu_ps(v.as_ptr().add(d0 + 8 * i)),
                                *acc,
                            );
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
                        acc = (*p.add(j * n + r)).mul_add(v[d], acc);
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

    /// Rows `(query, window)` against `span` keys and values, through [`attend`].
    fn run(rows: &[(&[f32], (u32, u32))], hd: usize, kv: &[f32], span: usize) -> Vec<Vec<f32>> {
        let mut r = Rows::new(rows.len(), hd, span);
        for (i, (q, w)) in rows.iter().enumerate() {
            r.window[i] = *w;
            for d in 0..hd {
                r.qt[d * r.rows + i] = q[d];
            }
        }
        let keys: Vec<&[f32]> = kv[..span * hd].chunks_exact(hd).collect();
        let values: Vec<&[f32]> = kv[span * hd..].chunks_exact(hd).collect();
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
        // 12 others: one pass shape (four keys, up to 2 row blocks); 40 others: the other
        // (two keys, up to 4 row blocks).
        for others in [12, 40] {
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
}
