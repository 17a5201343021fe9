//! Token sampling: turns one row of logits into the next token id.
//!
//! The chain follows llama.cpp's default order (which Ollama's options describe):
//! repetition penalties → top-k → top-p → min-p → temperature → draw. Temperature 0 is
//! greedy decoding (argmax of the penalized logits). Each sequence owns one [`Sampler`] with
//! its own seeded RNG, so a fixed seed replays the same tokens for the same logits.
//!
//! Vocabularies reach 150k entries, so nothing here sorts the whole row on the common paths:
//! penalties are applied as a short list of overrides, top-k keeps a bounded heap, and top-p
//! over the whole row finds its cut with a mass-weighted quickselect.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Up to this many candidates top-k uses a bounded heap in one pass over the row; above it a
/// quickselect over all candidates is cheaper than heap maintenance.
const HEAP_TOP_K_MAX: usize = 1024;

/// Top-p over an unsorted row first tests whether the best this-many tokens already reach p;
/// most of the mass of a real distribution sits in far fewer tokens than this.
const TOP_P_FIRST_PIVOT: usize = 256;

/// Top-p's quickselect stops narrowing and sorts once the cut is known to lie within this many
/// candidates.
const TOP_P_SORT_BELOW: usize = 64;

/// Sampling options of one request, with Ollama's names and defaults (`options` object).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 (or less) means greedy decoding. Default 0.8.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 turns it off. Default 40.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1 turns it off. Default 0.9.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the best one's; 0 turns it off.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of recently seen tokens; 1 turns it off.
    pub repeat_penalty: f32,
    /// How many of the last tokens the penalties look at: 0 off, -1 the whole sequence. Default 64.
    pub repeat_last_n: i64,
    /// Subtracted once from the logit of every token seen in the penalty window.
    pub presence_penalty: f32,
    /// Subtracted from a seen token's logit once per occurrence in the penalty window.
    pub frequency_penalty: f32,
    /// RNG seed; `None` seeds from the operating system (Ollama's `seed: -1`).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

/// A sampling option outside the range the sampler can honour.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplerError {
    #[error("invalid option {option}: must be {expected}, got {value}")]
    InvalidOption {
        /// The option's name as the Ollama `options` object spells it.
        option: &'static str,
        /// The accepted range, in words.
        expected: &'static str,
        /// The rejected value, formatted (so NaN reads as `NaN`).
        value: String,
    },
}

fn invalid(option: &'static str, expected: &'static str, value: impl ToString) -> SamplerError {
    SamplerError::InvalidOption {
        option,
        expected,
        value: value.to_string(),
    }
}

impl SamplingParams {
    /// Deterministic argmax decoding; penalties keep their (neutral) defaults.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether [`Sampler::sample`] takes the argmax instead of drawing. NaN counts as greedy so
    /// that an unvalidated NaN never reaches the softmax.
    pub fn is_greedy(&self) -> bool {
        !matches!(self.temperature.partial_cmp(&0.0), Some(Ordering::Greater))
    }

    /// Checks every option; the error names the first bad option and its accepted range.
    pub fn validate(&self) -> Result<(), SamplerError> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(invalid("temperature", "a finite number >= 0", t));
        }
        let p = self.top_p;
        if !(p.is_finite() && p > 0.0 && p <= 1.0) {
            return Err(invalid("top_p", "a number in (0, 1]", p));
        }
        let m = self.min_p;
        if !(m.is_finite() && (0.0..=1.0).contains(&m)) {
            return Err(invalid("min_p", "a number in [0, 1]", m));
        }
        let r = self.repeat_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(invalid("repeat_penalty", "a finite number > 0", r));
        }
        if self.repeat_last_n < -1 {
            return Err(invalid(
                "repeat_last_n",
                "-1 (whole context), 0 (off) or a positive count",
                self.repeat_last_n,
            ));
        }
        if !self.presence_penalty.is_finite() {
            return Err(invalid(
                "presence_penalty",
                "a finite number",
                self.presence_penalty,
            ));
        }
        if !self.frequency_penalty.is_finite() {
            return Err(invalid(
                "frequency_penalty",
                "a finite number",
                self.frequency_penalty,
            ));
        }
        Ok(())
    }

    /// Whether any penalty would change a logit; lets the hot path skip the history scan.
    fn penalties_active(&self) -> bool {
        self.repeat_last_n != 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

/// One token and its (penalized) logit. Orders by logit, then by *lower* id as the better
/// one, so that every path breaks ties the same way and stays deterministic.
#[derive(Clone, Copy, Debug)]
struct Cand {
    id: u32,
    logit: f32,
}

impl PartialEq for Cand {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Cand {}

impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        self.logit
            .total_cmp(&other.logit)
            .then_with(|| other.id.cmp(&self.id))
    }
}

/// Best candidate first.
fn best_first(a: &Cand, b: &Cand) -> Ordering {
    b.cmp(a)
}

/// NaN can never win and +inf would turn the softmax into NaN; both are mapped to values the
/// rest of the chain handles.
#[inline]
fn sanitize(v: f32) -> f32 {
    if v.is_nan() {
        f32::NEG_INFINITY
    } else if v == f32::INFINITY {
        f32::MAX
    } else {
        v
    }
}

/// Samples the next token of one sequence. Not shared between sequences: it owns the RNG and
/// scratch buffers that are reused from step to step.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch: the penalty window's ids, sorted to count repeats.
    window: Vec<u32>,
    /// Scratch: penalized logits as (id, value), ascending and distinct ids.
    overrides: Vec<(u32, f32)>,
    /// Scratch: the surviving candidates.
    cands: Vec<Cand>,
    /// Scratch: the top-k heap's storage.
    heap: Vec<Reverse<Cand>>,
    /// Scratch: unnormalized probabilities of the candidates.
    weights: Vec<f32>,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler for one sequence. Call [`SamplingParams::validate`] first; out-of-range
    /// options do not panic here but give unspecified (still valid) token ids.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::try_from_os_rng().unwrap_or_else(|_| {
                // No OS entropy (very unusual): the clock still differs between requests.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                StdRng::seed_from_u64(nanos ^ u64::from(std::process::id()))
            }),
        };
        Self {
            params,
            rng,
            window: Vec::new(),
            overrides: Vec::new(),
            cands: Vec::new(),
            heap: Vec::new(),
            weights: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies the repetition, presence and frequency penalties in place, exactly as
    /// [`Sampler::sample`] sees them. `history` is every token of the sequence so far; ids
    /// outside the vocabulary are ignored.
    pub fn apply_penalties(&self, logits: &mut [f32], history: &[u32]) {
        let mut window = Vec::new();
        let mut overrides = Vec::new();
        penalty_overrides(&self.params, logits, history, &mut window, &mut overrides);
        for (id, v) in overrides {
            if let Some(slot) = logits.get_mut(id as usize) {
                *slot = v;
            }
        }
    }

    /// Picks the next token. `logits` is one row over the vocabulary; `history` is every token
    /// of the sequence so far (prompt and generated), which the penalties look at. An empty
    /// row gives token 0.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        let mut overrides = std::mem::take(&mut self.overrides);
        penalty_overrides(
            &self.params,
            logits,
            history,
            &mut self.window,
            &mut overrides,
        );
        let id = if self.params.is_greedy() {
            argmax(logits, &overrides)
        } else {
            self.sample_stochastic(logits, &overrides)
        };
        self.overrides = overrides;
        id
    }

    fn sample_stochastic(&mut self, logits: &[f32], overrides: &[(u32, f32)]) -> u32 {
        let n = logits.len();
        let top_k = self.params.top_k;
        let top_p = self.params.top_p;
        let min_p = self.params.min_p;
        let mut cands = std::mem::take(&mut self.cands);
        cands.clear();

        let mut sorted = false;
        if top_k > 0 && top_k < n {
            if top_k <= HEAP_TOP_K_MAX {
                let mut heap = BinaryHeap::from(std::mem::take(&mut self.heap));
                top_k_heap(logits, overrides, top_k, &mut heap, &mut cands);
                self.heap = heap.into_vec();
            } else {
                collect_all(logits, overrides, &mut cands);
                cands.select_nth_unstable_by(top_k - 1, best_first);
                cands.truncate(top_k);
            }
            cands.sort_unstable_by(best_first);
            sorted = true;
        } else {
            collect_all(logits, overrides, &mut cands);
        }

        if top_p < 1.0 {
            top_p_truncate(&mut cands, top_p, sorted);
        }
        if min_p > 0.0 {
            min_p_filter(&mut cands, min_p);
        }
        let id = self.draw(&cands);
        self.cands = cands;
        id
    }

    /// Softmax at the configured temperature over the survivors, then one draw.
    fn draw(&mut self, cands: &[Cand]) -> u32 {
        let Some(best) = cands.iter().max().copied() else {
            return 0;
        };
        if best.logit == f32::NEG_INFINITY {
            return best.id;
        }
        let inv_t = 1.0 / self.params.temperature;
        self.weights.clear();
        let mut total = 0.0f64;
        for c in cands {
            let w = ((c.logit - best.logit) * inv_t).exp();
            self.weights.push(w);
            total += f64::from(w);
        }
        if !(total.is_finite() && total > 0.0) {
            return best.id;
        }
        let r = self.rng.random::<f64>() * total;
        let mut cum = 0.0f64;
        let mut last_positive = best.id;
        for (c, &w) in cands.iter().zip(&self.weights) {
            if w > 0.0 {
                cum += f64::from(w);
                last_positive = c.id;
                if r < cum {
                    return c.id;
                }
            }
        }
        // Only reachable through rounding at the very top of the range.
        last_positive
    }
}

/// Computes the penalized logit of every token in the penalty window, as (id, value) with
/// ascending distinct ids, so that callers can overlay it on the row without copying it.
fn penalty_overrides(
    params: &SamplingParams,
    logits: &[f32],
    history: &[u32],
    window_buf: &mut Vec<u32>,
    out: &mut Vec<(u32, f32)>,
) {
    out.clear();
    if !params.penalties_active() {
        return;
    }
    let window = if params.repeat_last_n < 0 {
        history
    } else {
        let n = usize::try_from(params.repeat_last_n).unwrap_or(usize::MAX);
        &history[history.len().saturating_sub(n)..]
    };
    window_buf.clear();
    window_buf.extend(
        window
            .iter()
            .copied()
            .filter(|&t| (t as usize) < logits.len()),
    );
    window_buf.sort_unstable();
    for run in window_buf.chunk_by(|a, b| a == b) {
        let Some(&id) = run.first() else { continue };
        let Some(&logit) = logits.get(id as usize) else {
            continue;
        };
        // llama.cpp: the repeat penalty pushes a logit towards "less likely" whatever its sign.
        let mut v = if logit <= 0.0 {
            logit * params.repeat_penalty
        } else {
            logit / params.repeat_penalty
        };
        v -= run.len() as f32 * params.frequency_penalty + params.presence_penalty;
        out.push((id, v));
    }
}

/// Walks the row in id order as plain slices, substituting the penalized value where there is
/// one: `f(first_id, run)` for each run of untouched logits and for each penalized token (as a
/// one-element run). A single pass over the row, no copy. `overrides` must be ascending,
/// distinct and inside the row (as [`penalty_overrides`] makes them).
#[inline]
fn for_each_run(logits: &[f32], overrides: &[(u32, f32)], mut f: impl FnMut(usize, &[f32])) {
    let mut start = 0usize;
    for &(id, v) in overrides {
        let id = id as usize;
        let run = logits.get(start..id).unwrap_or(&[]);
        if !run.is_empty() {
            f(start, run);
        }
        f(id, std::slice::from_ref(&v));
        start = id + 1;
    }
    let tail = logits.get(start..).unwrap_or(&[]);
    if !tail.is_empty() {
        f(start, tail);
    }
}

/// Block size for the skip-ahead scans: a block whose maximum cannot matter is skipped after a
/// vectorizable max, so the per-token branchy code only runs on the few blocks that can.
const BLOCK: usize = 64;

/// Maximum of a block, NaN ignored. Written as independent lanes so the compiler can keep
/// them in one SIMD register (a plain fold is a serial dependency chain).
#[inline]
fn block_max(block: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut exact = block.chunks_exact(LANES);
    for c in &mut exact {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(exact.remainder()) {
        if v > m {
            m = v;
        }
    }
    m
}

/// Greedy decoding: one pass, ties go to the lowest id, NaN never wins.
fn argmax(logits: &[f32], overrides: &[(u32, f32)]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for_each_run(logits, overrides, |start, run| {
        for (b, block) in run.chunks(BLOCK).enumerate() {
            // Strictly greater: a later block that only ties keeps the lower id.
            if block_max(block) > best_v {
                for (j, &v) in block.iter().enumerate() {
                    if v > best_v {
                        best_v = v;
                        best = start + b * BLOCK + j;
                    }
                }
            }
        }
    });
    best as u32
}

/// A row's log-softmax, summarised for logprobs: a token's log-probability is its logit
/// minus `log_norm`.
#[derive(Clone, Debug, PartialEq)]
pub struct RowLogprobs {
    pub log_norm: f32,
    /// The `k` most likely tokens with their log-probabilities, best first (lower ids first
    /// among equals).
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of a raw logits row (no penalties, no temperature) and its `k` best
/// tokens, in two passes over the row and no copy of it. NaN logits count as impossible.
pub fn row_logprobs(row: &[f32], k: usize) -> RowLogprobs {
    let max = row
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| f64::from((v - max).exp()))
        .sum();
    let log_norm = max + sum.ln() as f32;
    let mut top = Vec::new();
    if k > 0 && !row.is_empty() {
        let mut heap = BinaryHeap::new();
        top_k_heap(row, &[], k.min(row.len()), &mut heap, &mut top);
        top.sort_unstable_by(best_first);
    }
    RowLogprobs {
        log_norm,
        top: top
            .into_iter()
            .map(|c| (c.id, c.logit - log_norm))
            .collect(),
    }
}

fn collect_all(logits: &[f32], overrides: &[(u32, f32)], out: &mut Vec<Cand>) {
    out.reserve(logits.len());
    for_each_run(logits, overrides, |start, run| {
        out.extend(run.iter().enumerate().map(|(j, &v)| Cand {
            id: (start + j) as u32,
            logit: sanitize(v),
        }));
    });
}

/// The `k` best tokens in one pass: a min-heap of the current best k. Once it is full, a block
/// whose maximum does not beat the heap's worst logit is skipped whole, which is nearly all of
/// them.
fn top_k_heap(
    logits: &[f32],
    overrides: &[(u32, f32)],
    k: usize,
    heap: &mut BinaryHeap<Reverse<Cand>>,
    out: &mut Vec<Cand>,
) {
    heap.clear();
    let mut threshold = f32::NEG_INFINITY;
    for_each_run(logits, overrides, |start, run| {
        for (b, block) in run.chunks(BLOCK).enumerate() {
            if heap.len() == k && block_max(block) <= threshold {
                continue;
            }
            for (j, &v) in block.iter().enumerate() {
                let cand = Cand {
                    id: (start + b * BLOCK + j) as u32,
                    logit: sanitize(v),
                };
                if heap.len() < k {
                    heap.push(Reverse(cand));
                    if heap.len() == k {
                        threshold = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0.logit);
                    }
                } else if cand.logit > threshold {
                    // Ids arrive in ascending order, so an equal logit here always loses the
                    // tie to the one already kept; only a strictly larger logit can enter.
                    if let Some(mut worst) = heap.peek_mut() {
                        *worst = Reverse(cand);
                    }
                    threshold = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0.logit);
                }
            }
        }
    });
    out.extend(heap.drain().map(|Reverse(c)| c));
}

/// Keeps the smallest best-first prefix whose probability (softmax of the current logits, as
/// llama.cpp computes it before temperature) reaches `p`, at least one token.
///
/// Sorted input (after top-k) is simply walked. Unsorted input (the whole vocabulary when
/// top-k is off) is cut with a mass-weighted quickselect: partition around a pivot rank, keep
/// the upper part whole if its mass is not enough, recurse into the half holding the cut. That
/// is expected linear time, and the first pivot is a small rank because real distributions put
/// most of their mass on a few tokens. Only the last few candidates around the cut get sorted,
/// so the kept candidates are not left in any particular order.
fn top_p_truncate(cands: &mut Vec<Cand>, p: f32, sorted: bool) {
    let n = cands.len();
    if n == 0 {
        return;
    }
    let max = cands
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let weight = |c: &Cand| f64::from((c.logit - max).exp());
    let total: f64 = cands.iter().map(weight).sum();
    let target = f64::from(p) * total;

    // Invariant: the cut lies in [lo, hi); everything before lo is kept and weighs `acc`.
    let mut lo = 0usize;
    let mut hi = n;
    let mut acc = 0.0f64;
    if !sorted {
        let mut first = true;
        while hi - lo > TOP_P_SORT_BELOW {
            let half = (hi - lo) / 2;
            let rank = if first {
                half.min(TOP_P_FIRST_PIVOT)
            } else {
                half
            };
            first = false;
            let pivot = lo + rank;
            cands[lo..hi].select_nth_unstable_by(rank, best_first);
            let upper: f64 = cands[lo..=pivot].iter().map(weight).sum();
            if acc + upper >= target {
                hi = pivot + 1;
            } else {
                acc += upper;
                lo = pivot + 1;
            }
        }
        cands[lo..hi].sort_unstable_by(best_first);
    }
    let mut kept = lo;
    for c in &cands[lo..hi] {
        acc += weight(c);
        kept += 1;
        if acc >= target {
            break;
        }
    }
    cands.truncate(kept.max(1));
}

/// Keeps tokens whose probability is at least `min_p` times the best one's, i.e. whose logit
/// is at least `max + ln(min_p)`; order is preserved.
fn min_p_filter(cands: &mut Vec<Cand>, min_p: f32) {
    let max = cands
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let threshold = max + min_p.ln();
    cands.retain(|c| c.logit >= threshold);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sampling-only params: no filters unless a test sets them.
    fn plain(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn counts(sampler: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut c = vec![0; logits.len()];
        for _ in 0..draws {
            c[sampler.sample(logits, &[]) as usize] += 1;
        }
        c
    }

    fn ln_probs(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    /// Pseudo-random logits without depending on the sampler's own RNG use.
    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 20.0 - 10.0).collect()
    }

    #[test]
    fn row_logprobs_is_the_log_softmax_and_its_best() {
        let mut row = random_logits(5000, 7);
        row[17] = f32::NAN;
        let got = row_logprobs(&row, 20);
        let finite: Vec<f64> = row
            .iter()
            .map(|&v| {
                if v.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    f64::from(v)
                }
            })
            .collect();
        let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let norm = max + finite.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        assert!((f64::from(got.log_norm) - norm).abs() < 1e-4);
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| finite[b].total_cmp(&finite[a]).then(a.cmp(&b)));
        let want: Vec<u32> = order[..20].iter().map(|&i| i as u32).collect();
        let ids: Vec<u32> = got.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, want);
        for (id, lp) in &got.top {
            assert!((f64::from(*lp) - (finite[*id as usize] - norm)).abs() < 1e-4);
        }
        let mass: f64 = finite.iter().map(|v| (v - norm).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-6);
        assert!(row_logprobs(&row, 0).top.is_empty());
        assert_eq!(row_logprobs(&row[..3], 10).top.len(), 3);
    }

    #[test]
    fn defaults_are_ollamas() {
        let p = SamplingParams::default();
        assert_eq!(p.temperature, 0.8);
        assert_eq!(p.top_k, 40);
        assert_eq!(p.top_p, 0.9);
        assert_eq!(p.min_p, 0.0);
        assert_eq!(p.repeat_penalty, 1.0);
        assert_eq!(p.repeat_last_n, 64);
        assert_eq!(p.presence_penalty, 0.0);
        assert_eq!(p.frequency_penalty, 0.0);
        assert_eq!(p.seed, None);
        assert!(p.validate().is_ok());
        assert!(!p.is_greedy());
        let g = SamplingParams::greedy();
        assert!(g.is_greedy());
        assert!(g.validate().is_ok());
    }

    #[test]
    fn serde_fills_missing_fields_with_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature":0.2,"seed":7}"#).unwrap();
        assert_eq!(p.temperature, 0.2);
        assert_eq!(p.seed, Some(7));
        assert_eq!(p.top_k, 40);
        let back: SamplingParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn validate_rejects_out_of_range_options() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: -0.1,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    min_p: 1.1,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repeat_penalty: 0.0,
                    ..Default::default()
                },
                "repeat_penalty",
            ),
            (
                SamplingParams {
                    repeat_penalty: f32::NAN,
                    ..Default::default()
                },
                "repeat_penalty",
            ),
            (
                SamplingParams {
                    repeat_last_n: -2,
                    ..Default::default()
                },
                "repeat_last_n",
            ),
            (
                SamplingParams {
                    presence_penalty: f32::INFINITY,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
        ];
        for (params, option) in cases {
            let err = params.validate().unwrap_err();
            let SamplerError::InvalidOption { option: got, .. } = &err;
            assert_eq!(*got, option);
            let msg = err.to_string();
            assert!(msg.contains(option), "{msg}");
            assert!(msg.contains("must be"), "{msg}");
        }
        // Edges that are allowed.
        for params in [
            SamplingParams {
                top_p: 1.0,
                min_p: 1.0,
                repeat_last_n: -1,
                presence_penalty: -2.0,
                frequency_penalty: 2.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: 0.0,
                min_p: 0.0,
                repeat_last_n: 0,
                ..Default::default()
            },
        ] {
            assert!(params.validate().is_ok(), "{params:?}");
        }
        let nan = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        };
        assert!(nan.validate().unwrap_err().to_string().contains("NaN"));
    }

    #[test]
    fn greedy_picks_max_and_breaks_ties_low() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9], &[]), 1);
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, 0.0], &[]), 1);
        assert_eq!(s.sample(&[-5.0, -1.0, -3.0], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, 1.0, f32::NAN], &[]), 1);
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0], &[]), 1);
        assert_eq!(s.sample(&[7.0], &[]), 0);
        assert_eq!(s.sample(&[], &[]), 0);
        // Negative temperature is greedy too.
        let mut s = Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.0, 0.5, 0.4], &[]), 1);
    }

    #[test]
    fn greedy_sees_penalized_logits() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            ..Default::default()
        });
        // Token 1 would win, but it was just generated: 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(s.sample(&[2.0, 3.0, 0.0], &[1]), 0);
        assert_eq!(s.sample(&[2.0, 3.0, 0.0], &[0]), 1);
        // A large vocabulary with the override in the middle and at both ends.
        let mut logits = vec![0.0f32; 10_000];
        logits[0] = 9.0;
        logits[5000] = 10.0;
        logits[9999] = 8.0;
        assert_eq!(s.sample(&logits, &[]), 5000);
        assert_eq!(s.sample(&logits, &[5000]), 0);
        assert_eq!(s.sample(&logits, &[5000, 0]), 9999);
    }

    #[test]
    fn blocked_argmax_matches_a_naive_scan() {
        let naive = |row: &[f32]| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] || row[best].is_nan() && !v.is_nan() {
                    best = i;
                }
            }
            best as u32
        };
        for seed in 0..30 {
            let n = [1usize, 7, 63, 64, 65, 200, 4099][seed as usize % 7];
            let mut row: Vec<f32> = random_logits(n, seed).iter().map(|v| v.round()).collect();
            if n > 10 {
                row[n / 3] = f32::NAN;
            }
            // Rounded values tie a lot, across block boundaries too.
            assert_eq!(argmax(&row, &[]), naive(&row), "n={n} seed={seed}");
            let overrides: Vec<(u32, f32)> = (0..n as u32).step_by(5).map(|i| (i, -1.0)).collect();
            let mut penalized = row.clone();
            for &(i, v) in &overrides {
                penalized[i as usize] = v;
            }
            assert_eq!(
                argmax(&row, &overrides),
                naive(&penalized),
                "n={n} seed={seed}"
            );
        }
        // The maximum in the last, partial block; in the first slot of a later block.
        let mut row = vec![0.0f32; 130];
        row[129] = 1.0;
        assert_eq!(argmax(&row, &[]), 129);
        row[64] = 1.0;
        assert_eq!(argmax(&row, &[]), 64);
        row[63] = 1.0;
        assert_eq!(argmax(&row, &[]), 63);
        assert_eq!(argmax(&row, &[(63, 0.5)]), 64);
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let logits = random_logits(500, 1);
        let run = |seed: u64| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.5,
                top_k: 100,
                top_p: 0.95,
                seed: Some(seed),
                ..Default::default()
            });
            (0..300).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        let b = run(43);
        assert_ne!(a, b);
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(differing > 100, "only {differing} of 300 draws differ");
    }

    #[test]
    fn unseeded_samplers_differ() {
        let logits = vec![0.0f32; 1000];
        let draw = || {
            let mut s = Sampler::new(SamplingParams {
                seed: None,
                ..plain(1.0, 0)
            });
            (0..50).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_ne!(draw(), draw());
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let mut greedy = Sampler::new(SamplingParams::greedy());
        let mut k1 = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            top_p: 1.0,
            seed: Some(9),
            ..Default::default()
        });
        for seed in 0..50 {
            let logits = random_logits(2000, seed);
            assert_eq!(k1.sample(&logits, &[]), greedy.sample(&logits, &[]));
        }
        // Ties at the top: both keep the lowest id.
        assert_eq!(k1.sample(&[1.0, 4.0, 4.0, 4.0], &[]), 1);
    }

    #[test]
    fn top_k_two_only_yields_the_top_two() {
        let mut logits = random_logits(1000, 3);
        logits[17] = 20.0;
        logits[900] = 19.5;
        let mut s = Sampler::new(SamplingParams {
            temperature: 10.0,
            top_k: 2,
            top_p: 1.0,
            seed: Some(1),
            ..Default::default()
        });
        let c = counts(&mut s, &logits, 1000);
        assert_eq!(c[17] + c[900], 1000);
        assert!(c[17] > 300 && c[900] > 300, "{} {}", c[17], c[900]);
    }

    #[test]
    fn top_k_heap_and_quickselect_agree() {
        for seed in 0..20 {
            let mut logits = random_logits(5000, seed);
            // Ties across the cut must resolve the same way on both paths.
            for i in (0..5000).step_by(7) {
                logits[i] = 8.0;
            }
            logits[11] = f32::NAN;
            let overrides = vec![(3u32, 50.0f32), (4000, -50.0)];
            for k in [1usize, 2, 40, 500, 1024] {
                let mut heap = BinaryHeap::new();
                let mut a = Vec::new();
                top_k_heap(&logits, &overrides, k, &mut heap, &mut a);
                a.sort_unstable_by(best_first);
                let mut b = Vec::new();
                collect_all(&logits, &overrides, &mut b);
                b.select_nth_unstable_by(k - 1, best_first);
                b.truncate(k);
                b.sort_unstable_by(best_first);
                let ids_a: Vec<u32> = a.iter().map(|c| c.id).collect();
                let ids_b: Vec<u32> = b.iter().map(|c| c.id).collect();
                assert_eq!(ids_a, ids_b, "k={k}");
                assert_eq!(ids_a[0], 3);
            }
        }
    }

    #[test]
    fn large_top_k_uses_quickselect_and_respects_k() {
        let logits = random_logits(5000, 8);
        let k = 2000;
        let mut order: Vec<u32> = (0..5000).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let allowed: std::collections::HashSet<u32> = order[..k].iter().copied().collect();
        let mut s = Sampler::new(SamplingParams {
            temperature: 100.0,
            top_k: k,
            top_p: 1.0,
            seed: Some(5),
            ..Default::default()
        });
        for _ in 0..2000 {
            assert!(allowed.contains(&s.sample(&logits, &[])));
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        let logits = ln_probs(&[0.5, 0.3, 0.15, 0.05]);
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.7,
            ..plain(1.0, 11)
        });
        let c = counts(&mut s, &logits, 2000);
        assert_eq!(c[2] + c[3], 0, "{c:?}");
        // Renormalized 0.5 : 0.3.
        assert!(c[0] > 1100 && c[1] > 600, "{c:?}");

        // p just above the first token's mass still needs the second one; p below it does not.
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.4,
            ..plain(1.0, 11)
        });
        assert_eq!(counts(&mut s, &logits, 500)[0], 500);
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.9,
            ..plain(1.0, 11)
        });
        let c = counts(&mut s, &logits, 3000);
        assert_eq!(c[3], 0, "{c:?}");
        assert!(c[2] > 0, "{c:?}");
    }

    #[test]
    fn top_p_after_top_k_renormalizes_over_survivors() {
        // After top_k = 2 the survivors are 0.5/0.8 and 0.3/0.8; top_p 0.6 keeps only the first.
        let logits = ln_probs(&[0.5, 0.3, 0.15, 0.05]);
        let mut s = Sampler::new(SamplingParams {
            top_k: 2,
            top_p: 0.6,
            ..plain(1.0, 2)
        });
        assert_eq!(counts(&mut s, &logits, 500)[0], 500);
    }

    #[test]
    fn quickselect_top_p_matches_full_sort() {
        for seed in 0..10 {
            for (n, scale) in [
                (10usize, 1.0f32),
                (300, 1.0),
                (3000, 0.3),
                (20_000, 1.0),
                (20_000, 4.0),
            ] {
                // Scale sets how peaked the distribution is (how far the cut lies).
                let logits: Vec<f32> = random_logits(n, seed + 100)
                    .iter()
                    .map(|l| l * scale)
                    .collect();
                for p in [0.05f32, 0.5, 0.9, 0.999] {
                    let mut cands = Vec::new();
                    collect_all(&logits, &[], &mut cands);
                    top_p_truncate(&mut cands, p, false);

                    let mut full = Vec::new();
                    collect_all(&logits, &[], &mut full);
                    full.sort_unstable_by(best_first);
                    top_p_truncate(&mut full, p, true);

                    let mut a: Vec<u32> = cands.iter().map(|c| c.id).collect();
                    let mut b: Vec<u32> = full.iter().map(|c| c.id).collect();
                    a.sort_unstable();
                    b.sort_unstable();
                    assert_eq!(a, b, "n={n} scale={scale} p={p}");
                    assert!(!a.is_empty());
                }
            }
        }
    }

    #[test]
    fn min_p_filters_below_fraction_of_best() {
        // Threshold 0.2 * 0.5 = 0.1: 0.15 stays, 0.05 goes.
        let logits = ln_probs(&[0.5, 0.3, 0.15, 0.05]);
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.2,
            ..plain(1.0, 4)
        });
        let c = counts(&mut s, &logits, 3000);
        assert_eq!(c[3], 0, "{c:?}");
        assert!(c[2] > 200, "{c:?}");
        // min_p = 1 keeps only the best.
        let mut s = Sampler::new(SamplingParams {
            min_p: 1.0,
            ..plain(1.0, 4)
        });
        assert_eq!(counts(&mut s, &logits, 300)[0], 300);
        // Without min_p the last one does show up.
        let mut s = Sampler::new(plain(1.0, 4));
        assert!(counts(&mut s, &logits, 3000)[3] > 50);
    }

    #[test]
    fn temperature_concentrates_or_flattens() {
        let logits = [2.0f32, 1.0, 0.0];
        let share_of_best = |t: f32| {
            let mut s = Sampler::new(plain(t, 21));
            counts(&mut s, &logits, 5000)[0]
        };
        let cold = share_of_best(0.3);
        let warm = share_of_best(1.0);
        let hot = share_of_best(5.0);
        assert!(cold > warm && warm > hot, "{cold} {warm} {hot}");
        // Expected shares: ~0.96, ~0.67, ~0.40.
        assert!(cold > 4600, "{cold}");
        assert!((3000..3700).contains(&warm), "{warm}");
        assert!(hot < 2300, "{hot}");
    }

    #[test]
    fn full_vocabulary_sampling_without_filters() {
        let mut logits = vec![-10.0f32; 150_000];
        logits[149_999] = 10.0;
        logits[70_000] = 10.0;
        let mut s = Sampler::new(plain(1.0, 6));
        for _ in 0..100 {
            let id = s.sample(&logits, &[]);
            assert!(id == 149_999 || id == 70_000 || logits[id as usize] == -10.0);
        }
        let c = counts(&mut s, &logits, 1000);
        assert!(c[149_999] > 400 && c[70_000] > 400);
    }

    #[test]
    fn degenerate_rows_do_not_panic() {
        let mut s = Sampler::new(SamplingParams {
            seed: Some(1),
            ..Default::default()
        });
        assert_eq!(s.sample(&[f32::NAN; 4], &[]), 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[]), 0);
        // Two +inf logits tie: either may be drawn, nothing else.
        for _ in 0..20 {
            let id = s.sample(&[0.0, f32::INFINITY, 1.0, f32::INFINITY], &[]);
            assert!(id == 1 || id == 3, "{id}");
        }
        assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.0, f32::NAN], &[]), 1);
        assert_eq!(s.sample(&[], &[1, 2, 3]), 0);
        // Unvalidated params still give an id inside the row.
        let mut s = Sampler::new(SamplingParams {
            temperature: f32::INFINITY,
            top_p: f32::NAN,
            min_p: 5.0,
            repeat_penalty: 0.0,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..20 {
            assert!(s.sample(&[1.0, -1.0, 0.0], &[0, 1, 2]) < 3);
        }
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative() {
        let s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        let mut logits = vec![2.0, -2.0, 1.0, 0.0];
        s.apply_penalties(&mut logits, &[0, 1, 3, 0]);
        // Counted once no matter how often it appears; zero stays zero.
        assert_eq!(logits, vec![1.0, -4.0, 1.0, 0.0]);
    }

    #[test]
    fn repeat_penalty_lowers_the_chance_of_repeats() {
        let logits = [1.0f32, 1.0, -1.0, -1.0];
        let run = |penalty: f32, history: &[u32]| {
            let mut s = Sampler::new(SamplingParams {
                repeat_penalty: penalty,
                ..plain(1.0, 31)
            });
            let mut c = vec![0; 4];
            for _ in 0..4000 {
                c[s.sample(&logits, history) as usize] += 1;
            }
            c
        };
        let base = run(1.0, &[0, 2]);
        let pen = run(2.0, &[0, 2]);
        assert!(pen[0] < base[0] - 200, "positive: {base:?} vs {pen:?}");
        assert!(pen[2] < base[2] - 50, "negative: {base:?} vs {pen:?}");
        assert!(pen[1] > base[1], "{base:?} vs {pen:?}");
    }

    #[test]
    fn presence_and_frequency_shift_by_the_right_amounts() {
        let s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        });
        let mut logits = vec![1.0f32, 1.0, 1.0, -1.0];
        s.apply_penalties(&mut logits, &[0, 0, 0, 1, 3]);
        assert_eq!(
            logits,
            vec![1.0 - 0.75 - 0.5, 1.0 - 0.25 - 0.5, 1.0, -1.0 - 0.75]
        );

        // All three together: repeat first, then the subtractions.
        let s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            presence_penalty: 1.0,
            frequency_penalty: 0.5,
            ..SamplingParams::greedy()
        });
        let mut logits = vec![4.0f32, -1.0];
        s.apply_penalties(&mut logits, &[0, 0, 1]);
        assert_eq!(logits, vec![4.0 / 2.0 - 1.0 - 1.0, -2.0 - 1.0 - 0.5]);

        // Negative penalties encourage (OpenAI allows them).
        let s = Sampler::new(SamplingParams {
            presence_penalty: -1.0,
            ..SamplingParams::greedy()
        });
        let mut logits = vec![0.0f32, 0.0];
        s.apply_penalties(&mut logits, &[1]);
        assert_eq!(logits, vec![0.0, 1.0]);
    }

    #[test]
    fn repeat_last_n_window() {
        let params = |n: i64| SamplingParams {
            repeat_penalty: 2.0,
            frequency_penalty: 1.0,
            repeat_last_n: n,
            ..SamplingParams::greedy()
        };
        let history = [0u32, 1, 2, 2];
        let apply = |n: i64| {
            let mut logits = vec![4.0f32; 4];
            Sampler::new(params(n)).apply_penalties(&mut logits, &history);
            logits
        };
        // Last 2: only token 2 (twice).
        assert_eq!(apply(2), vec![4.0, 4.0, 0.0, 4.0]);
        // Last 3: tokens 1 and 2.
        assert_eq!(apply(3), vec![4.0, 1.0, 0.0, 4.0]);
        // Whole history, and a window longer than the history.
        assert_eq!(apply(-1), vec![1.0, 1.0, 0.0, 4.0]);
        assert_eq!(apply(1000), vec![1.0, 1.0, 0.0, 4.0]);
        // Off.
        assert_eq!(apply(0), vec![4.0; 4]);
        // The default window is 64: a token 65 back is not penalized.
        let mut long = vec![0u32];
        long.extend(std::iter::repeat_n(3u32, 64));
        let mut logits = vec![4.0f32; 4];
        Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        })
        .apply_penalties(&mut logits, &long);
        assert_eq!(logits, vec![4.0, 4.0, 4.0, 2.0]);
    }

    #[test]
    fn history_ids_outside_the_vocabulary_are_ignored() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            presence_penalty: 1.0,
            ..plain(1.0, 3)
        });
        let mut logits = vec![1.0f32, 2.0];
        s.apply_penalties(&mut logits, &[7, u32::MAX, 1]);
        assert_eq!(logits, vec![1.0, 0.0]);
        for _ in 0..20 {
            assert!(s.sample(&[1.0, 2.0], &[7, u32::MAX, 1]) < 2);
        }
    }

    #[test]
    fn sampling_uses_the_same_penalties_as_apply_penalties() {
        let params = SamplingParams {
            repeat_penalty: 1.3,
            presence_penalty: 0.4,
            frequency_penalty: 0.2,
            repeat_last_n: 16,
            top_k: 50,
            top_p: 0.8,
            min_p: 0.05,
            temperature: 0.7,
            seed: Some(77),
        };
        let logits = random_logits(3000, 12);
        let history: Vec<u32> = (0..40).map(|i| (i * 37) % 3000).collect();
        let mut penalized = logits.clone();
        Sampler::new(params.clone()).apply_penalties(&mut penalized, &history);
        // The same draws come from pre-penalized logits with penalties off.
        let mut a = Sampler::new(params.clone());
        let mut b = Sampler::new(SamplingParams {
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            ..params
        });
        for _ in 0..200 {
            assert_eq!(a.sample(&logits, &history), b.sample(&penalized, &history));
        }
    }

    #[test]
    fn default_chain_stays_inside_top_k() {
        let logits = random_logits(150_000, 99);
        let mut order: Vec<u32> = (0..150_000).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let top40: std::collections::HashSet<u32> = order[..40].iter().copied().collect();
        let mut s = Sampler::new(SamplingParams {
            seed: Some(0),
            ..Default::default()
        });
        let history: Vec<u32> = order[..10].to_vec();
        for _ in 0..200 {
            assert!(top40.contains(&s.sample(&logits, &history)));
        }
    }
}
