//! Every kernel of kernels/*.cu against a CPU reference, on whatever device the kernels run
//! on: the CPU execution layer in `cargo test` (tests/kernels.rs) and a real GPU in
//! examples/gpu_check.rs (scripts/gpu-check.sh). One suite for both, so what CI
//! proves on the CPU is what a GPU machine re-checks.
//!
//! The shapes are chosen to catch indexing bugs: contexts on both sides of block and
//! partition boundaries, GQA ratios 1 to 8 and beyond (two head chunks per KV head), every
//! head size built, several block sizes, batches mixing prefill chunks and decode rows,
//! views with row strides, and fp16 edge values (subnormals, 65504, inf, NaN). Cache slots
//! that no query may see hold NaN, so a kernel reading past a context, outside a sliding
//! window or through a wrong block id poisons its output.

use candle_core::{DType, Device, Tensor};
use half::f16;

use super::ops::{
    self, HeadShape, PagedAttention, PagedMeta, RopePositions, Route, SampleBatch, SampleSpec,
    SeqQueries, Split,
};
use super::CudaKvCache;
use crate::engine::sampler::{Sampler, SamplingParams};
use crate::model::config::{Activation, ArchConfig, Family};
use crate::model::{Batch, CpuKvCache, KvCache, Result};

/// The result of one comparison.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub name: String,
    /// The largest error (meaning per check: absolute, relative, or a count of wrong ids).
    pub err: f32,
    pub tol: f32,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.err <= self.tol
    }
}

/// The comparisons of a run, in order.
#[derive(Default, Debug)]
pub struct Report {
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn check(&mut self, name: impl Into<String>, err: f32, tol: f32) {
        self.outcomes.push(Outcome {
            name: name.into(),
            err,
            tol,
        });
    }

    pub fn failed(&self) -> usize {
        self.outcomes.iter().filter(|o| !o.ok()).count()
    }

    /// One line per comparison.
    pub fn table(&self) -> String {
        self.outcomes
            .iter()
            .map(|o| {
                format!(
                    "{:<5} {:<78} err {:.3e} (tol {:.0e})\n",
                    if o.ok() { "ok" } else { "FAIL" },
                    o.name,
                    o.err,
                    o.tol
                )
            })
            .collect()
    }
}

/// A check of one kernel family.
pub type Check = fn(&mut Report, &Device) -> Result<()>;

/// Every check, by name.
pub const CHECKS: &[(&str, Check)] = &[
    ("reshape_and_cache", reshape_and_cache),
    ("paged_attention_gqa", paged_attention_gqa),
    ("paged_attention_contexts", paged_attention_contexts),
    ("paged_attention_mixed", paged_attention_mixed),
    ("paged_attention_prefill", paged_attention_prefill),
    ("paged_attention_edges", paged_attention_edges),
    ("kv_cache", kv_cache),
    ("rms_norm", rms_norm),
    ("rope", rope),
    ("silu_mul", silu_mul),
    ("argmax", argmax),
    ("sampling", sampling),
];

/// Deterministic pseudo-random numbers (xorshift), so every run sees the same data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Rounds through fp16, as the GPU stores it.
fn h(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
}

fn f16_tensor(v: &[f32], shape: &[usize], dev: &Device) -> Result<Tensor> {
    let data: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
    Ok(Tensor::from_vec(data, shape, dev)?)
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// The largest absolute difference; NaN against NaN and equal infinities count as equal,
/// NaN or inf against anything else as infinitely wrong.
pub fn max_err(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g.is_nan() && w.is_nan() || g == w {
                0.0
            } else if g.is_nan() || w.is_nan() || g.is_infinite() || w.is_infinite() {
                f32::INFINITY
            } else {
                (g - w).abs()
            }
        })
        .fold(0.0, f32::max)
}

/// [`max_err`] relative to the largest finite magnitude of `want` (at least 1).
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(1f32, |m, v| m.max(v.abs()));
    max_err(got, want) / scale
}

/// fp16 values worth sprinkling into inputs: subnormals, the largest finite, tiny normals.
const F16_EDGES: [f32; 8] = [
    5.960_464_5e-8, // smallest subnormal
    -3.0e-6,        // a subnormal
    6.097_555e-5,   // largest subnormal
    6.103_515_6e-5, // smallest normal
    65504.0,
    -65504.0,
    0.0,
    -0.0,
];

// ---------------------------------------------------------------------------------------
// reshape_and_cache

/// Bit-exact copies into scrambled slots, from views with row strides (aligned and not),
/// values including NaN payloads, infinities and subnormals; untouched slots keep their
/// bits.
pub fn reshape_and_cache(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(11);
    // (blocks, block_size, kv_heads, head_dim, rows per sequence, view offset)
    for &(nb, bs, kvh, d, lens, offset) in &[
        (
            20usize,
            16usize,
            2usize,
            64usize,
            &[37usize, 1, 5][..],
            0usize,
        ),
        (12, 8, 1, 96, &[9, 30][..], 0),
        (40, 16, 4, 128, &[1, 1, 1, 1, 64][..], 0),
        (8, 32, 1, 64, &[33][..], 1), // rows start at an odd element: the unaligned path
    ] {
        let row = kvh * d;
        let n: usize = lens.iter().sum();
        // One flat buffer of fused [K | V | padding] rows, starting `offset` elements in;
        // key and value are views into it with a row stride.
        let width = (2 * kvh + 1) * d;
        let total = offset + n * width;
        let mut vals = h(&rng.vec(total, 4.0));
        for (i, v) in vals.iter_mut().enumerate().step_by(7) {
            *v = F16_EDGES[i % F16_EDGES.len()];
        }
        let mut bits: Vec<u16> = vals.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
        bits[offset + 3] = 0x7e01; // NaN with a payload: copied, not canonicalised
        bits[offset + 4] = 0xfc00; // -inf
        let flat = Tensor::from_vec(
            bits.iter().map(|&b| f16::from_bits(b)).collect::<Vec<_>>(),
            total,
            dev,
        )?;
        let fused = flat
            .narrow(0, offset, n * width)?
            .reshape((n, 2 * kvh + 1, d))?;
        let key = fused.narrow(1, 0, kvh)?;
        let value = fused.narrow(1, kvh, kvh)?;
        // Scrambled block tables, disjoint between sequences.
        let mut ids: Vec<u32> = (0..nb as u32).collect();
        rng.shuffle(&mut ids);
        let mut seqs = Vec::new();
        let (mut start, mut next) = (0, 0);
        for (si, &len) in lens.iter().enumerate() {
            let cached = [0usize, 7, 16][si % 3];
            let ctx = cached + len;
            let blocks = ctx.div_ceil(bs);
            seqs.push(SeqQueries {
                start,
                len,
                context_len: ctx,
                block_table: ids[next..next + blocks].to_vec(),
            });
            start += len;
            next += blocks;
        }
        let shape = HeadShape {
            heads: kvh,
            kv_heads: kvh,
            head_dim: d,
        };
        let meta = PagedMeta::new(&seqs, nb, bs, shape, Route::Auto, dev)?;
        let init: Vec<u16> = (0..nb * bs * row)
            .map(|i| f16::from_f32((i % 251) as f32 * 0.5).to_bits())
            .collect();
        let cache = |bits: &[u16]| {
            Tensor::from_vec(
                bits.iter().map(|&b| f16::from_bits(b)).collect::<Vec<_>>(),
                (nb, bs, kvh, d),
                dev,
            )
        };
        let (kc, vc) = (cache(&init)?, cache(&init)?);
        ops::reshape_and_cache(&key, &value, &kc, &vc, &meta)?;
        let (mut want_k, mut want_v) = (init.clone(), init.clone());
        let mut t = 0;
        for s in &seqs {
            for pos in s.context_len - s.len..s.context_len {
                let slot = s.block_table[pos / bs] as usize * bs + pos % bs;
                for j in 0..row {
                    want_k[slot * row + j] = bits[offset + t * width + j];
                    want_v[slot * row + j] = bits[offset + t * width + row + j];
                }
                t += 1;
            }
        }
        let got_bits = |c: &Tensor| -> Result<Vec<u16>> {
            Ok(c.to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f16>()?
                .iter()
                .map(|x| x.to_bits())
                .collect())
        };
        let wrong = got_bits(&kc)?
            .iter()
            .zip(&want_k)
            .chain(got_bits(&vc)?.iter().zip(&want_v))
            .filter(|(a, b)| a != b)
            .count();
        r.check(
            format!("reshape_and_cache {nb}x{bs} kv{kvh} d{d} rows {lens:?} offset {offset} (wrong values)"),
            wrong as f32,
            0.0,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// paged attention

/// One sequence of an attention case: tokens already cached and query rows this step.
#[derive(Clone, Copy, Debug)]
struct SeqCase {
    cached: usize,
    rows: usize,
}

/// A paged attention case.
struct AttnCase<'a> {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    seqs: &'a [SeqCase],
    window: Option<usize>,
    /// Scale of the random q/k/v values.
    magnitude: f32,
}

fn seq(cached: usize, rows: usize) -> SeqCase {
    SeqCase { cached, rows }
}

/// Reference attention in f64 over fp16-rounded values for one query row of `heads` heads.
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    table: &[u32],
    ctx: usize,
    window: Option<usize>,
    (heads, kvh, d, bs): (usize, usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let lo = window.map_or(0, |w| ctx.saturating_sub(w));
    let g = heads / kvh;
    let mut out = vec![0f32; heads * d];
    for hh in 0..heads {
        let qv = &q[hh * d..(hh + 1) * d];
        let kv = hh / g;
        let at = |p: usize| ((table[p / bs] as usize * bs + p % bs) * kvh + kv) * d;
        let scores: Vec<f64> = (lo..ctx)
            .map(|p| {
                qv.iter()
                    .zip(&kc[at(p)..at(p) + d])
                    .map(|(&a, &b)| (a * scale) as f64 * b as f64)
                    .sum::<f64>()
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        for i in 0..d {
            let o: f64 = (lo..ctx)
                .enumerate()
                .map(|(j, p)| e[j] * vc[at(p) + i] as f64)
                .sum();
            out[hh * d + i] = (o / sum) as f32;
        }
    }
    out
}

/// Runs `case` under every split mode and records the error against the reference.
fn attention_case(r: &mut Report, dev: &Device, rng: &mut Rng, c: &AttnCase) -> Result<()> {
    let (heads, kvh, d, bs) = (c.heads, c.kv_heads, c.head_dim, c.block_size);
    let blocks_per: Vec<usize> = c
        .seqs
        .iter()
        .map(|s| (s.cached + s.rows).div_ceil(bs))
        .collect();
    let nb = blocks_per.iter().sum::<usize>() + 3;
    let mut ids: Vec<u32> = (0..nb as u32).collect();
    rng.shuffle(&mut ids);
    let row = kvh * d;
    // NaN wherever no query may look; values only at positions some row of the sequence sees.
    let mut kc = vec![f32::NAN; nb * bs * row];
    let mut vc = vec![f32::NAN; nb * bs * row];
    let mut seqs = Vec::new();
    let (mut start, mut next) = (0, 0);
    for (s, &blocks) in c.seqs.iter().zip(&blocks_per) {
        let ctx = s.cached + s.rows;
        let table = ids[next..next + blocks].to_vec();
        next += blocks;
        let first_row_ctx = ctx - s.rows + 1;
        let lo = c.window.map_or(0, |w| first_row_ctx.saturating_sub(w));
        for p in lo..ctx {
            let slot = table[p / bs] as usize * bs + p % bs;
            for j in 0..row {
                kc[slot * row + j] = f16::from_f32(rng.uniform() * c.magnitude).to_f32();
                vc[slot * row + j] = f16::from_f32(rng.uniform() * c.magnitude).to_f32();
            }
        }
        seqs.push(SeqQueries {
            start,
            len: s.rows,
            context_len: ctx,
            block_table: table,
        });
        start += s.rows;
    }
    let rows = start;
    let q = h(&rng.vec(rows * heads * d, c.magnitude));
    let scale = 1.0 / (d as f32).sqrt();
    let mut want = Vec::with_capacity(rows * heads * d);
    for s in &seqs {
        for (i, pos) in (s.context_len - s.len..s.context_len).enumerate() {
            let qi = s.start + i;
            want.extend(ref_attention(
                &q[qi * heads * d..(qi + 1) * heads * d],
                &kc,
                &vc,
                &s.block_table,
                pos + 1,
                c.window,
                (heads, kvh, d, bs),
                scale,
            ));
        }
    }
    let kc_t = f16_tensor(&kc, &[nb, bs, kvh, d], dev)?;
    let vc_t = f16_tensor(&vc, &[nb, bs, kvh, d], dev)?;
    let q_t = f16_tensor(&q, &[rows, heads, d], dev)?;
    let ctxs: Vec<usize> = c.seqs.iter().map(|s| s.cached + s.rows).collect();
    let shape = HeadShape {
        heads,
        kv_heads: kvh,
        head_dim: d,
    };
    let all_decode = c.seqs.iter().all(|s| s.rows == 1);
    let mut runs = Vec::new();
    // The decode kernel under every split; the prefill kernel when built for the head size.
    let decode_route = if all_decode {
        Route::Auto
    } else {
        Route::DecodeOnly
    };
    for split in [Split::Never, Split::Partition(4 * bs), Split::Auto] {
        runs.push((decode_route, split));
    }
    if ops::PREFILL_HEAD_DIMS.contains(&d) {
        runs.push((Route::PrefillOnly, Split::Never));
        if !all_decode {
            // Long chunks tiled, decode rows and short chunks one at a time, in one call.
            runs.push((Route::Auto, Split::Partition(4 * bs)));
        }
    }
    // Relative to the values' magnitude: fp16 output rounding and fp32 sums.
    let tol = 2e-3;
    for (route, split) in runs {
        let meta = PagedMeta::new(&seqs, nb, bs, shape, route, dev)?;
        if route == decode_route && split == Split::Auto && meta.max_context() <= ops::SPLIT_ABOVE {
            continue; // same as Never
        }
        let out = ops::paged_attention(&PagedAttention {
            q: &q_t,
            k_cache: &kc_t,
            v_cache: &vc_t,
            meta: &meta,
            sliding_window: c.window,
            scale,
            split,
        })?;
        let err = rel_err(&to_vec(&out)?, &want);
        let rows_desc = if all_decode {
            format!("ctx {ctxs:?}")
        } else {
            format!(
                "seqs {:?}",
                c.seqs
                    .iter()
                    .map(|s| (s.cached, s.rows))
                    .collect::<Vec<_>>()
            )
        };
        let (dec_rows, tiles) = meta.routed();
        r.check(
            format!(
                "paged_attention h{heads}/kv{kvh} d{d} bs{bs} win {:?} x{} {route:?} \
                 ({dec_rows} decode rows, {tiles} tiles) {split:?} {rows_desc}",
                c.window, c.magnitude
            ),
            err,
            tol,
        );
    }
    Ok(())
}

fn decode(ctxs: &[usize]) -> Vec<SeqCase> {
    ctxs.iter().map(|&c| seq(c - 1, 1)).collect()
}

/// GQA ratios 1 to 8 and beyond (a second chunk of heads per KV head), every head size.
pub fn paged_attention_gqa(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(21);
    let ctxs = decode(&[1, 17, 33, 70]);
    for g in 1..=8 {
        for (kvh, d) in [(2, 64), (1, 128)] {
            attention_case(
                r,
                dev,
                &mut rng,
                &AttnCase {
                    heads: g * kvh,
                    kv_heads: kvh,
                    head_dim: d,
                    block_size: 16,
                    seqs: &ctxs,
                    window: None,
                    magnitude: 1.0,
                },
            )?;
        }
    }
    // 14/2 and 28/4 are Qwen2.5-0.5B and 7B; 12 and 16 per KV head need two head chunks.
    for (heads, kvh, d) in [
        (14, 2, 64),
        (28, 4, 128),
        (24, 2, 128),
        (16, 1, 64),
        (12, 4, 96),
        (8, 1, 256),
        (4, 4, 256),
    ] {
        attention_case(
            r,
            dev,
            &mut rng,
            &AttnCase {
                heads,
                kv_heads: kvh,
                head_dim: d,
                block_size: 16,
                seqs: &decode(&[3, 40, 129]),
                window: None,
                magnitude: 1.0,
            },
        )?;
    }
    Ok(())
}

/// Contexts from 1 to 4096 on both sides of block and partition boundaries, block sizes
/// 8/16/32, sliding windows.
pub fn paged_attention_contexts(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(31);
    let ctxs = decode(&[
        1, 2, 15, 16, 17, 31, 32, 33, 255, 256, 257, 511, 512, 513, 1023, 1024, 1025, 2049, 4095,
        4096,
    ]);
    attention_case(
        r,
        dev,
        &mut rng,
        &AttnCase {
            heads: 2,
            kv_heads: 1,
            head_dim: 128,
            block_size: 16,
            seqs: &ctxs,
            window: None,
            magnitude: 1.0,
        },
    )?;
    for bs in [8, 32] {
        attention_case(
            r,
            dev,
            &mut rng,
            &AttnCase {
                heads: 4,
                kv_heads: 2,
                head_dim: 64,
                block_size: bs,
                seqs: &decode(&[1, bs - 1, bs, bs + 1, 3 * bs + 5, 1100]),
                window: None,
                magnitude: 1.0,
            },
        )?;
    }
    for window in [256, 100] {
        attention_case(
            r,
            dev,
            &mut rng,
            &AttnCase {
                heads: 4,
                kv_heads: 1,
                head_dim: 64,
                block_size: 16,
                seqs: &decode(&[40, 101, 256, 257, 1000, 2500]),
                window: Some(window),
                magnitude: 1.0,
            },
        )?;
    }
    Ok(())
}

/// Prefill chunks (one query row per token, causal) and decode rows in one batch.
pub fn paged_attention_mixed(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(41);
    let seqs = [
        seq(0, 40),
        seq(100, 1),
        seq(31, 17),
        seq(0, 1),
        seq(15, 2),
        seq(600, 1),
    ];
    for (heads, kvh, d) in [(14, 2, 64), (8, 1, 128)] {
        attention_case(
            r,
            dev,
            &mut rng,
            &AttnCase {
                heads,
                kv_heads: kvh,
                head_dim: d,
                block_size: 16,
                seqs: &seqs,
                window: None,
                magnitude: 1.0,
            },
        )?;
    }
    attention_case(
        r,
        dev,
        &mut rng,
        &AttnCase {
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            block_size: 16,
            seqs: &[seq(90, 30), seq(5, 1)],
            window: Some(64),
            magnitude: 1.0,
        },
    )?;
    Ok(())
}

/// The tiled prefill kernel on chunked prompts: tiles of 64 / group tokens (group 1 to 16),
/// chunks after a cached prefix, several sequences per launch next to decode rows, windows,
/// block sizes 16 and 32; against the reference and the decode kernel's routes.
pub fn paged_attention_prefill(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(45);
    type Case = (
        usize,
        usize,
        usize,
        usize,
        &'static [(usize, usize)],
        Option<usize>,
    );
    let cases: [Case; 6] = [
        (
            14,
            2,
            64,
            16,
            &[(0, 100), (64, 33), (500, 8), (7, 1), (0, 9)],
            None,
        ),
        (28, 4, 128, 16, &[(0, 70), (1000, 20)], None),
        (16, 1, 64, 16, &[(0, 40), (30, 12)], None),
        (4, 4, 96, 16, &[(0, 130), (200, 65)], None),
        (8, 2, 128, 16, &[(100, 60), (0, 50)], Some(48)),
        (6, 2, 64, 32, &[(31, 33), (0, 64), (1, 1)], None),
    ];
    for (heads, kvh, d, bs, seqs, window) in cases {
        let seqs: Vec<SeqCase> = seqs.iter().map(|&(c, n)| seq(c, n)).collect();
        attention_case(
            r,
            dev,
            &mut rng,
            &AttnCase {
                heads,
                kv_heads: kvh,
                head_dim: d,
                block_size: bs,
                seqs: &seqs,
                window,
                magnitude: 1.0,
            },
        )?;
    }
    Ok(())
}

/// Large scores (softmax close to one-hot; the running max must keep fp32 in range),
/// fp16-extreme values, and NaN in a visible V row propagating to that row only.
pub fn paged_attention_edges(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(51);
    for magnitude in [8.0, 200.0] {
        attention_case(
            r,
            dev,
            &mut rng,
            &AttnCase {
                heads: 8,
                kv_heads: 2,
                head_dim: 64,
                block_size: 16,
                seqs: &decode(&[5, 300, 1500]),
                window: None,
                magnitude,
            },
        )?;
    }
    // V at +-65504 and subnormals; q/k small so the weights spread.
    let (heads, kvh, d, bs) = (4usize, 1usize, 64usize, 16usize);
    let ctx = 50usize;
    let nb = ctx.div_ceil(bs);
    let table: Vec<u32> = (0..nb as u32).rev().collect();
    let mut kc = h(&rng.vec(nb * bs * kvh * d, 0.1));
    let mut vc = vec![0f32; nb * bs * kvh * d];
    for (i, v) in vc.iter_mut().enumerate() {
        *v = F16_EDGES[i % F16_EDGES.len()];
    }
    // Row 1 sees position 30 (holding NaN in V), row 0 does not.
    let nan_pos = 30;
    let slot = table[nan_pos / bs] as usize * bs + nan_pos % bs;
    vc[slot * kvh * d] = f32::NAN;
    kc[slot * kvh * d + 1] = 0.05;
    let seqs = vec![
        SeqQueries {
            start: 0,
            len: 1,
            context_len: nan_pos,
            block_table: table.clone(),
        },
        SeqQueries {
            start: 1,
            len: 1,
            context_len: ctx,
            block_table: table.clone(),
        },
    ];
    let q = h(&rng.vec(2 * heads * d, 0.1));
    let scale = 1.0 / (d as f32).sqrt();
    let mut want = ref_attention(
        &q[..heads * d],
        &kc,
        &vc,
        &table,
        nan_pos,
        None,
        (heads, kvh, d, bs),
        scale,
    );
    want.extend(ref_attention(
        &q[heads * d..],
        &kc,
        &vc,
        &table,
        ctx,
        None,
        (heads, kvh, d, bs),
        scale,
    ));
    let shape = HeadShape {
        heads,
        kv_heads: kvh,
        head_dim: d,
    };
    for (route, split) in [
        (Route::Auto, Split::Never),
        (Route::Auto, Split::Partition(16)),
        (Route::PrefillOnly, Split::Never),
    ] {
        let meta = PagedMeta::new(&seqs, nb, bs, shape, route, dev)?;
        let out = ops::paged_attention(&PagedAttention {
            q: &f16_tensor(&q, &[2, heads, d], dev)?,
            k_cache: &f16_tensor(&kc, &[nb, bs, kvh, d], dev)?,
            v_cache: &f16_tensor(&vc, &[nb, bs, kvh, d], dev)?,
            meta: &meta,
            sliding_window: None,
            scale,
            split,
        })?;
        let got = to_vec(&out)?;
        let nan_row = got[heads * d..].iter().step_by(d).all(|v| v.is_nan());
        r.check(
            format!(
                "paged_attention V at +-65504/subnormals, NaN in a visible V row, {route:?} \
                 {split:?}"
            ),
            if nan_row {
                rel_err(&got, &want)
            } else {
                f32::INFINITY
            },
            2e-3,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The kernel KV cache against the CPU one

/// [`CudaKvCache`] against [`CpuKvCache`] through the `KvCache` trait, with the shapes of
/// Qwen2.5-0.5B and 7B and of Gemma 3 270M with its mix of a sliding-window layer (a window
/// short enough to bite here) and a global one: steps mixing prefill chunks and decode rows
/// over several layers.
pub fn kv_cache(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(61);
    for (heads, kvh, d, window) in [
        (14usize, 2usize, 64usize, None),
        (28, 4, 128, None),
        (4, 1, 256, Some(24usize)),
    ] {
        let cfg = ArchConfig {
            family: Family::Qwen2,
            arch_name: "qwen2".into(),
            vocab_size: 100,
            hidden_size: heads * d,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: heads,
            num_kv_heads: kvh,
            head_dim: d,
            rope_theta: 10000.0,
            rope_scaling: None,
            mrope: None,
            rms_norm_eps: 1e-6,
            tie_embeddings: true,
            qkv_bias: true,
            qk_norm: false,
            sliding_window: window,
            full_attention_layers: if window.is_some() {
                vec![1]
            } else {
                Vec::new()
            },
            sliding_rope_theta: None,
            activation: Activation::Silu,
            post_norms: false,
            scale_embeddings: false,
            norm_weights_offset: false,
            query_pre_attn_scalar: None,
            final_logit_softcap: None,
            max_position_embeddings: 4096,
        };
        let (nb, bs) = (64, 16);
        let mut cpu = CpuKvCache::new(&cfg, nb, bs);
        let mut gpu = CudaKvCache::new(&cfg, nb, bs, dev)?;
        let mut ids: Vec<u32> = (0..nb as u32).collect();
        rng.shuffle(&mut ids);
        let tables: Vec<Vec<u32>> = ids.chunks(20).take(3).map(|c| c.to_vec()).collect();
        let mut cached = [0usize; 3];
        let steps: [[usize; 3]; 4] = [[40, 7, 0], [1, 30, 64], [1, 1, 1], [16, 1, 2]];
        for (si, step) in steps.iter().enumerate() {
            let mut batch = Batch::default();
            for s in 0..3 {
                if step[s] > 0 {
                    batch.push_seq(&vec![1; step[s]], cached[s], tables[s].clone(), true);
                }
            }
            let n = batch.tokens.len();
            let mut worst = 0f32;
            for layer in 0..cfg.num_layers {
                let q = h(&rng.vec(n * heads * d, 1.0));
                let k = h(&rng.vec(n * kvh * d, 1.0));
                let v = h(&rng.vec(n * kvh * d, 1.0));
                let cpu_t =
                    |x: &[f32], hh: usize| Tensor::from_vec(x.to_vec(), (n, hh, d), &Device::Cpu);
                let want = cpu.attend(
                    layer,
                    &cpu_t(&q, heads)?,
                    &cpu_t(&k, kvh)?,
                    &cpu_t(&v, kvh)?,
                    &batch,
                )?;
                let got = gpu.attend(
                    layer,
                    &f16_tensor(&q, &[n, heads, d], dev)?,
                    &f16_tensor(&k, &[n, kvh, d], dev)?,
                    &f16_tensor(&v, &[n, kvh, d], dev)?,
                    &batch,
                )?;
                worst = worst.max(max_err(&to_vec(&got)?, &to_vec(&want)?));
            }
            r.check(
                format!(
                    "CudaKvCache vs CpuKvCache h{heads}/kv{kvh} d{d} window {window:?} step {si} \
                     tokens {step:?}"
                ),
                worst,
                2e-3,
            );
            for s in 0..3 {
                cached[s] += step[s];
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Row kernels

/// RMSNorm with and without the fused residual add: hidden sizes that fill a block or not
/// (1024 threads above 4096), the residual update bit-exact, rows of subnormals, rows at
/// 65504 (sum of squares near 1e13), and inf in the residual (NaN/0 as the formula gives).
pub fn rms_norm(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(71);
    let eps = 1e-6f32;
    for &(rows, hidden) in &[
        (5usize, 896usize),
        (3, 4096),
        (2, 3584),
        (1, 1000),
        (4, 33),
        (2, 5120),
    ] {
        let mut x = h(&rng.vec(rows * hidden, 2.0));
        let delta = h(&rng.vec(rows * hidden, 2.0));
        let w = h(&rng.vec(hidden, 1.0));
        if rows >= 3 {
            // Row 1: subnormals only; row 2: the largest fp16 values.
            for (j, v) in x[hidden..2 * hidden].iter_mut().enumerate() {
                *v = F16_EDGES[j % 3];
            }
            for (j, v) in x[2 * hidden..3 * hidden].iter_mut().enumerate() {
                *v = if j % 2 == 0 { 65504.0 } else { -60000.0 };
            }
        }
        for with_delta in [false, true] {
            let mut xd = x.clone();
            if with_delta && rows >= 4 {
                xd[3 * hidden + 5] = f32::INFINITY;
            }
            let stream = f16_tensor(&xd, &[rows, hidden], dev)?;
            let dt = f16_tensor(&delta, &[rows, hidden], dev)?;
            let out = ops::add_rms_norm(
                &stream,
                with_delta.then_some(&dt),
                &f16_tensor(&w, &[hidden], dev)?,
                eps,
            )?;
            // The kernel's own arithmetic: fp32 sum rounded to fp16, then fp32 statistics.
            let summed: Vec<f32> = if with_delta {
                h(&xd
                    .iter()
                    .zip(&delta)
                    .map(|(a, b)| a + b)
                    .collect::<Vec<_>>())
            } else {
                xd.clone()
            };
            let mut want = vec![0f32; rows * hidden];
            for i in 0..rows {
                let row = &summed[i * hidden..(i + 1) * hidden];
                let ss: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
                let inv = 1.0 / ((ss / hidden as f64) as f32 + eps).sqrt();
                for j in 0..hidden {
                    want[i * hidden + j] = f16::from_f32(row[j] * inv * w[j]).to_f32();
                }
            }
            let got = to_vec(&out)?;
            let mut err = rel_err(&got, &want);
            if with_delta {
                // The residual stream is updated exactly as an unfused fp16 add.
                err = err.max(max_err(&to_vec(&stream)?, &summed) * 1e3);
            }
            r.check(
                format!("add_rms_norm {rows}x{hidden} delta={with_delta} (edge rows)"),
                err,
                2e-3,
            );
        }
    }
    Ok(())
}

/// Rotary embedding in place on q/k views of one fused QKV projection (row strides), at
/// positions 0 to the table's end, head sizes 64 and 128, against candle's rope_thd.
pub fn rope(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(81);
    for &(n, heads, kvh, d) in &[
        (9usize, 14usize, 2usize, 64usize),
        (5, 28, 4, 128),
        (3, 4, 4, 256),
    ] {
        let max_pos = 4096usize;
        let half = d / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / 1e6f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let angles: Vec<f32> = (0..max_pos)
            .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
            .collect();
        let ang = Tensor::from_vec(angles, (max_pos, half), &Device::Cpu)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let positions: Vec<u32> = [0u32, 1, 2, 17, 100, 511, 1000, 2047, 4095]
            .into_iter()
            .cycle()
            .take(n)
            .collect();
        let width = (heads + 2 * kvh) * d;
        let mut qkv = h(&rng.vec(n * width, 1.0));
        qkv[3] = 65504.0;
        qkv[4] = 6.0e-8;
        let pos_cpu = Tensor::new(positions.as_slice(), &Device::Cpu)?;
        let (c, s) = (
            cos.index_select(&pos_cpu, 0)?,
            sin.index_select(&pos_cpu, 0)?,
        );
        let part = |from: usize, hh: usize| -> Vec<f32> {
            (0..n)
                .flat_map(|t| qkv[t * width + from * d..t * width + (from + hh) * d].to_vec())
                .collect()
        };
        let rope = |x: &[f32], hh: usize| -> Result<Vec<f32>> {
            let t = Tensor::from_vec(x.to_vec(), (1, n, hh, d), &Device::Cpu)?;
            to_vec(&candle_nn::rotary_emb::rope_thd(&t, &c, &s)?)
        };
        let (q_in, k_in, v_in) = (part(0, heads), part(heads, kvh), part(heads + kvh, kvh));
        let (want_q, want_k) = (rope(&q_in, heads)?, rope(&k_in, kvh)?);
        let fused = f16_tensor(&qkv, &[n, heads + 2 * kvh, d], dev)?;
        let qv = fused.narrow(1, 0, heads)?;
        let kv = fused.narrow(1, heads, kvh)?;
        ops::rope_neox_inplace(
            &qv,
            &kv,
            &cos.to_device(dev)?,
            &sin.to_device(dev)?,
            &RopePositions::new(&positions, max_pos, dev)?,
        )?;
        let err = rel_err(&to_vec(&qv)?, &want_q).max(rel_err(&to_vec(&kv)?, &want_k));
        // V, between K and the next row's Q, is left alone.
        let v_after = to_vec(&fused.narrow(1, heads + kvh, kvh)?)?;
        let v_err = max_err(&v_after, &v_in);
        r.check(
            format!("rope_neox on fused-QKV views n{n} h{heads}/kv{kvh} d{d} vs candle rope_thd"),
            err.max(v_err * 1e3),
            2e-3,
        );
    }
    // Out-of-table positions are refused before any launch.
    let refused = RopePositions::new(&[0, 4096], 4096, dev).is_err();
    r.check(
        "rope_neox refuses a position beyond the table",
        if refused { 0.0 } else { 1.0 },
        0.0,
    );
    Ok(())
}

/// silu(gate) * up: sizes off the block multiple, a grid-stride pass (more elements than
/// 65535 blocks of 256 threads), and inf/NaN/65504/subnormal gates.
pub fn silu_mul(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(91);
    for &(rows, inter) in &[
        (7usize, 4864usize),
        (1, 1),
        (3, 1000),
        (1, 65_535 * 256 + 777),
    ] {
        let n = rows * inter;
        let mut g = h(&rng.vec(n, 6.0));
        let u = h(&rng.vec(n, 3.0));
        if n > 16 {
            let specials = [
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                65504.0,
                -65504.0,
                6.0e-8,
                -20.0,
                20.0,
            ];
            g[..specials.len()].copy_from_slice(&specials);
        }
        let out = ops::silu_mul(
            &f16_tensor(&g, &[rows, inter], dev)?,
            &f16_tensor(&u, &[rows, inter], dev)?,
        )?;
        let want: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| f16::from_f32(g / (1.0 + (-g).exp()) * u).to_f32())
            .collect();
        r.check(
            format!("silu_mul {rows}x{inter} (inf/NaN/65504 gates)"),
            rel_err(&to_vec(&out)?, &want),
            2e-3,
        );
    }
    Ok(())
}

/// Greedy argmax: ties to the lowest id, NaN never wins, -inf rows give 0, +inf wins,
/// vocabularies below, at and above a block's 1024 threads, fp32 and fp16 logits, a row
/// stride (a view of wider rows).
pub fn argmax(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(101);
    let naive = |row: &[f32]| {
        let (mut best, mut bv) = (0usize, f32::NEG_INFINITY);
        for (i, &v) in row.iter().enumerate() {
            if v > bv {
                best = i;
                bv = v;
            }
        }
        best as u32
    };
    for &(rows, vocab) in &[
        (8usize, 151_936usize),
        (3, 1),
        (4, 1023),
        (2, 1025),
        (5, 32_000),
    ] {
        let mut logits = rng.vec(rows * vocab, 10.0);
        if vocab > 100 {
            // Row 1: a tie (lowest wins); row 2: NaN above all; row 3: all -inf; row 4: +inf;
            // row 5: max at the last id; row 6: max at id 0; row 7: all NaN.
            let set = |l: &mut Vec<f32>, row: usize, i: usize, v: f32| {
                if row < rows {
                    l[row * vocab + i] = v;
                }
            };
            set(&mut logits, 1, vocab - 3, 50.0);
            set(&mut logits, 1, 9, 50.0);
            set(&mut logits, 2, 5, f32::NAN);
            set(&mut logits, 2, 6, 40.0);
            if rows > 3 {
                logits[3 * vocab..4 * vocab].fill(f32::NEG_INFINITY);
            }
            set(&mut logits, 4, 77, f32::INFINITY);
            set(&mut logits, 5, vocab - 1, 60.0);
            set(&mut logits, 6, 0, 60.0);
            if rows > 7 {
                logits[7 * vocab..8 * vocab].fill(f32::NAN);
            }
        }
        for dtype in [DType::F32, DType::F16] {
            let data = if dtype == DType::F16 {
                h(&logits)
            } else {
                logits.clone()
            };
            let want: Vec<u32> = data.chunks(vocab).map(naive).collect();
            // A view of the first `vocab` columns of wider rows.
            let wide: Vec<f32> = data
                .chunks(vocab)
                .flat_map(|row| row.iter().copied().chain([1e30f32; 5]))
                .collect();
            let t = Tensor::from_vec(wide, (rows, vocab + 5), dev)?
                .to_dtype(dtype)?
                .narrow(1, 0, vocab)?;
            let got: Vec<u32> = ops::argmax(&t)?.to_device(&Device::Cpu)?.to_vec1()?;
            let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            r.check(
                format!("argmax {rows}x{vocab} {dtype:?} strided rows (wrong ids)"),
                wrong as f32,
                0.0,
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Sampling on the device

/// The uniform number the device sampler draws with for (seed, step): splitmix64.
pub fn sample_uniform(seed: u64, step: u64) -> f64 {
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(step.wrapping_add(1)));
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

fn params_of(s: &SampleSpec) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: Some(s.seed),
    }
}

/// The engine sampler's chain over one row, written out: the candidates that survive
/// penalties (the engine's own `apply_penalties`), top-k, top-p and min-p, best first, with
/// their (unnormalized) temperature weights.
fn ref_candidates(logits: &[f32], s: &SampleSpec, history: &[u32]) -> Vec<(f32, u32)> {
    let mut row = logits.to_vec();
    Sampler::new(params_of(s)).apply_penalties(&mut row, history);
    let san = |v: f32| {
        if v.is_nan() {
            f32::NEG_INFINITY
        } else if v == f32::INFINITY {
            f32::MAX
        } else {
            v
        }
    };
    let mut c: Vec<(f32, u32)> = row
        .iter()
        .enumerate()
        .map(|(i, &v)| (san(v), i as u32))
        .collect();
    c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if s.top_k > 0 && s.top_k < c.len() {
        c.truncate(s.top_k);
    }
    let mx = c[0].0;
    if mx == f32::NEG_INFINITY {
        c.truncate(1);
        return c;
    }
    if s.top_p < 1.0 {
        let total: f64 = c.iter().map(|x| f64::from((x.0 - mx).exp())).sum();
        let target = f64::from(s.top_p) * total;
        let (mut acc, mut kept) = (0.0f64, 0);
        for x in &c {
            acc += f64::from((x.0 - mx).exp());
            kept += 1;
            if acc >= target {
                break;
            }
        }
        c.truncate(kept.max(1));
    }
    if s.min_p > 0.0 {
        let thr = mx + s.min_p.ln();
        c.retain(|x| x.0 >= thr);
    }
    c
}

/// The token the device sampler must pick: greedy rows as the engine's sampler picks them;
/// otherwise the inverse CDF at `sample_uniform(seed, step)` over the candidates, walked best
/// first when top-k keeps at most 1024 (as the CPU walks its sorted candidates), in id order
/// otherwise.
fn ref_sample(logits: &[f32], s: &SampleSpec, history: &[u32]) -> u32 {
    let p = params_of(s);
    if p.is_greedy() {
        return Sampler::new(p).sample(logits, history);
    }
    let mut c = ref_candidates(logits, s, history);
    let small = s.top_k > 0 && s.top_k < logits.len() && s.top_k <= 1024;
    if c[0].0 == f32::NEG_INFINITY {
        return if small { c[0].1 } else { 0 };
    }
    let mx = c[0].0;
    if !small {
        c.sort_by_key(|x| x.1);
    }
    let inv_t = 1.0 / s.temperature;
    let total: f64 = c
        .iter()
        .map(|x| f64::from(((x.0 - mx) * inv_t).exp()))
        .sum();
    let r = sample_uniform(s.seed, s.step) * total;
    let (mut cum, mut pick) = (0.0f64, c[0].1);
    for x in &c {
        let w = ((x.0 - mx) * inv_t).exp();
        if w > 0.0 {
            cum += f64::from(w);
            pick = x.1;
            if r < cum {
                break;
            }
        }
    }
    pick
}

/// Device sampling against the engine's sampler: greedy rows (with penalties) pick exactly
/// its token; stochastic rows pick exactly the token the engine's chain gives at the same
/// uniform number, over vocabularies up to 151936, top-k below and above 1024 or off, top-p,
/// min-p, temperatures 0.05 to 5, penalties, flat rows (ties everywhere), NaN/inf logits.
/// The written-out chain is itself checked against draws of the engine's sampler.
pub fn sampling(r: &mut Report, dev: &Device) -> Result<()> {
    let mut rng = Rng::new(111);
    let spec = |temperature: f32, top_k: usize, top_p: f32, min_p: f32, pen: bool| SampleSpec {
        temperature,
        top_k,
        top_p,
        min_p,
        repeat_penalty: if pen { 1.3 } else { 1.0 },
        repeat_last_n: if pen { 64 } else { 0 },
        presence_penalty: if pen { 0.4 } else { 0.0 },
        frequency_penalty: if pen { 0.2 } else { 0.0 },
        seed: 0,
        step: 0,
    };
    let specs = [
        ("greedy", spec(0.0, 40, 0.9, 0.0, false)),
        ("greedy+penalties", spec(0.0, 40, 0.9, 0.0, true)),
        ("ollama defaults", spec(0.8, 40, 0.9, 0.0, false)),
        ("defaults+penalties+min_p", spec(0.8, 40, 0.9, 0.05, true)),
        ("top_k 1", spec(1.0, 1, 1.0, 0.0, false)),
        ("top_k 1024, top_p 0.5", spec(1.5, 1024, 0.5, 0.0, false)),
        ("top_k off, top_p 0.95", spec(0.7, 0, 0.95, 0.0, true)),
        ("top_k 2000, min_p 0.1", spec(5.0, 2000, 1.0, 0.1, false)),
        ("everything off, cold", spec(0.05, 0, 1.0, 0.0, false)),
    ];
    for &vocab in &[1000usize, 5000, 151_936] {
        let rows_per = if vocab > 10_000 { 2 } else { 24 };
        let mut logits = Vec::new();
        let mut rows: Vec<(SampleSpec, Vec<u32>)> = Vec::new();
        let mut names = Vec::new();
        for (name, base) in &specs {
            for j in 0..rows_per {
                let mut row: Vec<f32> = rng.vec(vocab, 6.0);
                match j % 6 {
                    // Flat: every logit equal (ties at every cut).
                    1 => row.fill(0.5),
                    // A few NaN and +inf, and a -inf block.
                    2 => {
                        row[3] = f32::NAN;
                        row[vocab / 2] = f32::INFINITY;
                        row[10..40].fill(f32::NEG_INFINITY);
                    }
                    // Quantized values: many ties.
                    3 => row.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0),
                    // All -inf.
                    4 if vocab < 10_000 => row.fill(f32::NEG_INFINITY),
                    _ => {}
                }
                let history: Vec<u32> = (0..100).map(|_| rng.below(vocab + 10) as u32).collect();
                let mut s = *base;
                s.seed = rng.below(1 << 30) as u64 * 7919;
                s.step = j as u64;
                logits.extend_from_slice(&row);
                rows.push((s, history));
                names.push(*name);
            }
        }
        let n = rows.len();
        let batch = SampleBatch::new(
            &rows
                .iter()
                .map(|(s, h)| (*s, h.as_slice()))
                .collect::<Vec<_>>(),
            vocab,
            dev,
        )?;
        let t = Tensor::from_vec(logits.clone(), (n, vocab), dev)?;
        let got: Vec<u32> = ops::sample(&t, &batch)?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        let mut wrong: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        for (i, (s, h)) in rows.iter().enumerate() {
            let want = ref_sample(&logits[i * vocab..(i + 1) * vocab], s, h);
            let e = wrong.entry(names[i]).or_default();
            e.1 += 1;
            if got[i] != want {
                e.0 += 1;
            }
        }
        for (name, (bad, total)) in wrong {
            r.check(
                format!("sample vocab {vocab} {name}: {total} rows (wrong ids)"),
                bad as f32,
                0.0,
            );
        }
    }
    // The written-out chain against the engine's sampler: its draws land on the chain's
    // candidates, as often as their probabilities say.
    let vocab = 300;
    for (name, base) in &specs[2..] {
        let row: Vec<f32> = rng.vec(vocab, 4.0);
        let history: Vec<u32> = (0..50).map(|_| rng.below(vocab) as u32).collect();
        let cands = ref_candidates(&row, base, &history);
        let mx = cands[0].0;
        let inv_t = 1.0 / base.temperature;
        let total: f64 = cands
            .iter()
            .map(|x| f64::from(((x.0 - mx) * inv_t).exp()))
            .sum();
        let draws = 3000;
        let mut counts = vec![0usize; vocab];
        for seed in 0..draws {
            let mut p = params_of(base);
            p.seed = Some(seed as u64);
            counts[Sampler::new(p).sample(&row, &history) as usize] += 1;
        }
        let outside: usize = (0..vocab)
            .filter(|&i| !cands.iter().any(|x| x.1 as usize == i))
            .map(|i| counts[i])
            .sum();
        let worst_sigma = cands
            .iter()
            .map(|x| {
                let p = f64::from(((x.0 - mx) * inv_t).exp()) / total;
                let f = counts[x.1 as usize] as f64 / draws as f64;
                (f - p).abs() / ((p * (1.0 - p) / draws as f64).sqrt() + 1e-9)
            })
            .fold(0f64, f64::max);
        r.check(
            format!("engine sampler draws vs the written-out chain, {name} (draws outside)"),
            outside as f32,
            0.0,
        );
        r.check(
            format!("engine sampler frequencies vs the chain's probabilities, {name} (sigmas)"),
            worst_sigma as f32,
            5.0,
        );
    }
    Ok(())
}
