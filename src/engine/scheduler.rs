//! Continuous batching: which sequences run in the next forward step, and with how many
//! tokens each.
//!
//! Every step mixes the running sequences' next tokens (one per decoding sequence, a chunk per
//! sequence still prefilling) with the first chunks of newly admitted sequences, up to a token
//! budget. Sequences are served first come, first served: the oldest running sequence is
//! scheduled first, waiting sequences are admitted in arrival order while KV blocks, the
//! budget and the running limit allow. When a running sequence needs a block and none is free,
//! the newest running sequence is preempted: its blocks are released (full ones stay cached
//! for reuse) and it goes back to the front of the waiting queue, to be recomputed later. The
//! oldest sequence can always preempt everyone newer, so the engine always makes progress.
//!
//! Speculative decoding (`super::speculative`): a decoding sequence that allows drafts gets
//! up to `num_draft` guessed tokens after its next one, each with its own logits row, as
//! many as pay by the step times the engine measured (a step bound by reading the weights
//! takes extra rows almost free; a compute-bound one pays for each) and at most
//! `spec_max_rows` rows in all. Drafts never preempt anyone: a draft that does not fit the
//! free blocks is dropped.
//!
//! The scheduler knows token ids and block ids only (a draft model's guesses come from the
//! `Drafter` the engine lends it while a step is built); the engine runs the forward pass,
//! samples, and tells the scheduler what happened.

use std::collections::VecDeque;

use crate::model::{Batch, ImageRows, IMAGE_ID};

use super::block_manager::{BlockHash, BlockManager};
use super::request::{rope_position, ImageSpan};
use super::speculative::{ngram_draft, Drafter};

/// Sequence ids, unique per engine, increasing in arrival order.
pub type SeqId = u64;

/// One sequence's scheduling state.
#[derive(Clone, Debug)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose K/V are in the cache.
    pub computed: usize,
    /// Blocks holding positions `0..blocks.len() * block_size`.
    pub blocks: Vec<u32>,
    /// Hashes of the leading full blocks registered for prefix reuse.
    hashes: Vec<BlockHash>,
    /// Prompt tokens found in the prefix cache at the last admission.
    pub cached_tokens: usize,
    /// Times this sequence was preempted.
    pub preemptions: usize,
    /// An embedding: it needs every token computed (no cached prefix) and no logits.
    pub embed: bool,
    /// Draft tokens a step may guess after the next one (0: no speculation).
    pub num_draft: usize,
    /// The most tokens (prompt and output) the sequence may reach; drafts stay within it.
    pub max_len: usize,
    /// Speculation's state: the next draft's length, and steps left without drafts.
    draft_len: usize,
    draft_pause: usize,
    /// Drafts in a row that the sampler rejected at their first token.
    misses: u32,
    /// The prompt's images: each one's rows are computed in one step (they attend to each
    /// other both ways).
    pub images: Vec<ImageSpan>,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            cached_tokens: 0,
            preemptions: 0,
            embed: false,
            num_draft: 0,
            max_len: usize::MAX,
            draft_len: usize::MAX,
            draft_pause: 0,
            misses: 0,
            images: Vec::new(),
        }
    }

    /// A sequence that computes its whole prompt and samples nothing (an embedding).
    pub fn embedding(id: SeqId, prompt: Vec<u32>) -> Self {
        Self {
            embed: true,
            ..Self::new(id, prompt)
        }
    }
}

/// How many of the `n` tokens after `from` a step may take so that none of `images` is
/// split: up to the image a cut would fall in, or, when one starts at or before `from`,
/// through its end (past the step's budget: an image's rows come whole).
fn whole_images(images: &[ImageSpan], from: usize, n: usize) -> usize {
    let to = from + n;
    match images
        .iter()
        .map(ImageSpan::range)
        .find(|r| r.start < to && to < r.end)
    {
        Some(r) if r.start > from => r.start - from,
        Some(r) => r.end - from,
        None => n,
    }
}

/// One sequence's part of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    /// Its first row in the batch.
    pub start: usize,
    /// Tokens of it in the batch.
    pub len: usize,
    /// This chunk computes the last of its tokens.
    pub completes: bool,
    /// Row of the step's logits holding its next-token distribution, when this step
    /// completes everything it had to compute. Each draft token's row follows it.
    pub logits_row: Option<usize>,
    /// Guessed tokens after its last one (the last `draft.len()` of its `len` tokens), to
    /// be checked against the logits rows before them.
    pub draft: Vec<u32>,
}

/// What one step runs.
#[derive(Debug, Default)]
pub struct Step {
    pub batch: Batch,
    pub scheduled: Vec<Scheduled>,
    /// Sequences preempted while building this step (they are waiting again).
    pub preempted: Vec<SeqId>,
}

/// Scheduler limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Tokens per forward step (decode tokens and prefill chunks together).
    pub max_tokens_per_step: usize,
    /// Running sequences at most; `None`: as many as the KV blocks allow.
    pub max_running: Option<usize>,
    /// Rows a step with draft tokens may have at most (how many pay is measured, see
    /// `best_draft`).
    pub spec_max_rows: usize,
}

/// Counters for tests and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerCounters {
    /// Prompt tokens that went through a forward pass (recomputation after preemption
    /// included; tokens found in the prefix cache excluded).
    pub prompt_tokens_computed: u64,
    /// All tokens that went through a forward pass.
    pub tokens_computed: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Draft tokens put into steps, and of those, tokens the sampler agreed with.
    pub drafted: u64,
    pub accepted: u64,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    /// Ordered by id (arrival): the last is the newest, the first to preempt.
    running: Vec<Sequence>,
    counters: SchedulerCounters,
    /// Seconds a forward step of each row count took lately (index: rows, up to
    /// `spec_max_rows`), measured by the engine: what a step with draft rows would cost.
    step_secs: Vec<Option<f64>>,
    /// Share of draft tokens the sampler kept lately.
    accept_rate: f64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        Self {
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters: SchedulerCounters::default(),
            step_secs: vec![None; cfg.spec_max_rows + 1],
            accept_rate: 0.5,
            cfg,
        }
    }

    pub fn block_manager(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn counters(&self) -> &SchedulerCounters {
        &self.counters
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Drops every sequence and starts the block pool over, empty (after a failed step,
    /// whose bookkeeping may be half-updated).
    pub fn reset(&mut self) {
        self.waiting.clear();
        self.running.clear();
        self.blocks = BlockManager::new(self.blocks.num_blocks(), self.blocks.block_size());
    }

    /// Queues a new sequence (its id must be larger than every earlier one).
    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|s| s.id == id)
    }

    /// Appends a sampled token to a running sequence.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.tokens.push(token);
        }
    }

    /// Counts a draft token the sampler chose.
    pub fn count_accepted(&mut self) {
        self.counters.accepted += 1;
    }

    /// Records how a running sequence's draft fared: its first `accepted` tokens were
    /// chosen by the sampler (and appended), so their K/V, written by the step, count as
    /// computed. Then adapts the next drafts, so that text that does not repeat its context
    /// costs few wasted rows: after a draft kept whole, the next may be twice as long;
    /// otherwise one longer than what was kept. Drafts rejected at their first token twice
    /// in a row pause drafting, 2, 4, ... up to 64 steps.
    pub fn drafts_checked(&mut self, id: SeqId, drafted: usize, accepted: usize) {
        if drafted > 0 {
            let kept = accepted.min(drafted) as f64 / drafted as f64;
            self.accept_rate = 0.9 * self.accept_rate + 0.1 * kept;
        }
        let bs = self.blocks.block_size();
        let Some(seq) = self.running.iter_mut().find(|s| s.id == id) else {
            return;
        };
        let accepted = accepted.min(seq.tokens.len() - seq.computed);
        seq.computed += accepted;
        register_full_blocks(&mut self.blocks, seq, bs);
        seq.draft_len = if accepted == drafted {
            drafted.saturating_mul(2)
        } else {
            accepted + 1
        };
        if accepted == 0 {
            seq.misses += 1;
            if seq.misses >= 2 {
                seq.draft_pause = 1usize << (seq.misses - 1).min(6);
            }
        } else {
            seq.misses = 0;
        }
    }

    /// Records that a forward step of `rows` rows took `secs` (what decides how many drafts pay).
    pub fn step_took(&mut self, rows: usize, secs: f64) {
        if let Some(t) = self.step_secs.get_mut(rows) {
            *t = Some(t.map_or(secs, |t| 0.8 * t + 0.2 * secs));
        }
    }

    /// Removes a sequence wherever it is and releases its blocks (finished or cancelled).
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.blocks.free(&seq.blocks);
        Some(seq)
    }

    /// Preempts the newest running sequence: back to the front of the waiting queue with
    /// nothing computed.
    fn preempt_newest(&mut self) -> Option<SeqId> {
        let mut seq = self.running.pop()?;
        self.blocks.free(&seq.blocks);
        seq.blocks.clear();
        seq.hashes.clear();
        seq.computed = 0;
        seq.preemptions += 1;
        self.counters.preemptions += 1;
        let id = seq.id;
        self.waiting.push_front(seq);
        Some(id)
    }

    /// Builds the next step. An empty batch means there is nothing runnable now.
    pub fn schedule(&mut self) -> Step {
        self.schedule_with(None)
    }

    /// [`Self::schedule`], drafting with `drafter` where given (prompt lookup otherwise).
    pub fn schedule_with(&mut self, mut drafter: Option<&mut Drafter>) -> Step {
        let mut step = Step::default();
        let mut budget = self.cfg.max_tokens_per_step.max(1);
        let draft_room = self.draft_room();

        // Running sequences first, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = whole_images(
                &seq.images,
                seq.computed,
                (seq.tokens.len() - seq.computed).min(budget),
            );
            if n == 0 {
                i += 1;
                continue;
            }
            let upto = seq.computed + n;
            let mut draft = self.draft_for(i, n, budget, draft_room, drafter.as_deref_mut());
            // Drafts only take free blocks: without room for them, a plain step.
            if !draft.is_empty()
                && !self
                    .blocks
                    .allocate_slots(&mut self.running[i].blocks, &[], upto + draft.len())
            {
                draft.clear();
            }
            // Grow its block table, preempting the newest sequences (itself last) until
            // the blocks fit (at once when the draft's allocation already covered them).
            let fits = loop {
                if self
                    .blocks
                    .allocate_slots(&mut self.running[i].blocks, &[], upto)
                {
                    break true;
                }
                let victim_is_self = self.running.len() == i + 1;
                if let Some(id) = self.preempt_newest() {
                    step.preempted.push(id);
                }
                if victim_is_self {
                    break false;
                }
            };
            if !fits {
                break;
            }
            self.counters.drafted += draft.len() as u64;
            budget = budget.saturating_sub(n + draft.len());
            push_chunk(&mut step, &self.running[i], n, draft);
            i += 1;
        }

        // Then admit waiting sequences, unless this step had to preempt (memory is short).
        while step.preempted.is_empty()
            && budget > 0
            && self
                .cfg
                .max_running
                .is_none_or(|max| self.running.len() < max)
        {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            // Keep at least one token to compute: its logits give the next token. An
            // embedding pools every token's state, so it computes them all.
            let reusable = if seq.embed {
                0
            } else {
                seq.tokens.len().saturating_sub(1)
            };
            let (cached, hashes) = self.blocks.match_prefix(&seq.tokens, reusable);
            let cached_tokens = cached.len() * self.blocks.block_size();
            let n = whole_images(
                &seq.images,
                cached_tokens,
                (seq.tokens.len() - cached_tokens).min(budget),
            );
            let mut table = Vec::new();
            if !self
                .blocks
                .allocate_slots(&mut table, &cached, cached_tokens + n)
            {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            seq.blocks = table;
            seq.hashes = hashes;
            seq.computed = cached_tokens;
            seq.cached_tokens = cached_tokens.min(seq.prompt_len);
            push_chunk(&mut step, &seq, n, Vec::new());
            budget = budget.saturating_sub(n);
            let at = self.running.partition_point(|s| s.id < seq.id);
            self.running.insert(at, seq);
        }

        for s in &step.scheduled {
            if let Some(seq) = self.running.iter().find(|q| q.id == s.id) {
                let first = seq.computed;
                let prompt = seq.prompt_len.saturating_sub(first).min(s.len);
                self.counters.prompt_tokens_computed += prompt as u64;
            }
            self.counters.tokens_computed += s.len as u64;
        }
        if !step.batch.is_empty() {
            self.counters.steps += 1;
        }
        step
    }

    /// Draft tokens each decoding sequence may add to this step: at most the rows left
    /// below `spec_max_rows` after every running sequence's own tokens, shared evenly among
    /// the sequences that speculate, and of those the number that makes the most tokens
    /// per second by the step times measured so far and the share of drafts kept
    /// ([`best_draft`]). None while a waiting prompt can be admitted: its chunk fills
    /// the step with rows that pay.
    fn draft_room(&self) -> usize {
        let admitting = !self.waiting.is_empty()
            && self
                .cfg
                .max_running
                .is_none_or(|max| self.running.len() < max);
        if admitting {
            return 0;
        }
        let rows: usize = self
            .running
            .iter()
            .map(|s| s.tokens.len() - s.computed)
            .sum();
        let drafting = self
            .running
            .iter()
            .filter(|s| s.num_draft > 0 && s.tokens.len() - s.computed == 1)
            .count();
        if drafting == 0 {
            return 0;
        }
        let most = self.cfg.spec_max_rows.saturating_sub(rows) / drafting;
        best_draft(&self.step_secs, self.accept_rate, rows, drafting, most)
    }

    /// The draft for running sequence `i` whose next `n` tokens are scheduled: only for a
    /// decode step (one token), within the step's budget and the sequence's length, and
    /// while drafting is not paused (see [`Self::drafts_checked`]).
    fn draft_for(
        &mut self,
        i: usize,
        n: usize,
        budget: usize,
        room: usize,
        drafter: Option<&mut Drafter>,
    ) -> Vec<u32> {
        let seq = &mut self.running[i];
        if n != 1 || seq.tokens.len() - seq.computed != 1 || seq.num_draft == 0 {
            return Vec::new();
        }
        if seq.draft_pause > 0 {
            seq.draft_pause -= 1;
            return Vec::new();
        }
        let k = seq
            .num_draft
            .min(seq.draft_len)
            .min(room)
            .min(budget - 1)
            .min(seq.max_len.saturating_sub(seq.tokens.len()));
        let mut draft = match drafter {
            Some(d) => d.propose(seq.id, &seq.tokens, k),
            None => ngram_draft(&seq.tokens, k),
        };
        // An image's placeholders are not tokens the model could write.
        if let Some(cut) = draft.iter().position(|&t| t & IMAGE_ID != 0) {
            draft.truncate(cut);
        }
        draft
    }

    /// Records that `step` ran: its tokens are in the cache now (drafts only once accepted,
    /// see [`Self::drafts_checked`]), and newly full blocks become reusable prefixes.
    pub fn commit(&mut self, step: &Step) {
        let bs = self.blocks.block_size();
        for s in &step.scheduled {
            let Some(seq) = self.running.iter_mut().find(|q| q.id == s.id) else {
                continue;
            };
            seq.computed += s.len - s.draft.len();
            register_full_blocks(&mut self.blocks, seq, bs);
        }
    }
}

/// Of 0..=`most` draft tokens for each of `drafting` sequences in a step of `rows` own rows,
/// the count with the most expected tokens per second: `rows + drafting * k * accept` tokens
/// in the time a step of `rows + drafting * k` rows takes. Where a decode step is bound by
/// reading the weights, rows are nearly free and drafts pay even when few are kept; where it
/// is compute-bound (a full batch on a CPU), a row costs about as much as the token it may
/// give, and drafting stops. Drafts must promise a quarter more than the plain step: step
/// times vary with the context and the host, and a wrong guess costs every sequence in the
/// step latency. `secs` holds the measured step times by rows; a size never measured is
/// priced between the nearest measured sizes, or at the largest smaller one when none above
/// is known (so it is tried, then priced by what it cost); with no measured size at or below
/// `rows`, no drafts (the plain step is measured first). Before any step was measured, `most`.
fn best_draft(
    secs: &[Option<f64>],
    accept: f64,
    rows: usize,
    drafting: usize,
    most: usize,
) -> usize {
    let price = |x: usize| -> Option<f64> {
        let known = |r: usize| secs.get(r).copied().flatten().map(|t| (r, t));
        let below = (0..=x).rev().find_map(known)?;
        if below.0 == x {
            return Some(below.1);
        }
        Some(match (x + 1..secs.len()).find_map(known) {
            Some((r1, t1)) => {
                below.1 + (t1 - below.1) * (x - below.0) as f64 / (r1 - below.0) as f64
            }
            None => below.1,
        })
    };
    if secs.iter().all(Option::is_none) {
        return most;
    }
    let Some(base) = price(rows) else {
        return 0;
    };
    let mut best = (1.25 * rows as f64 / base, 0);
    for k in 1..=most {
        let Some(t) = price(rows + drafting * k) else {
            break;
        };
        let rate = (rows as f64 + (drafting * k) as f64 * accept) / t;
        if rate > best.0 {
            best = (rate, k);
        }
    }
    best.1
}

/// Registers a sequence's newly full computed blocks as reusable prefixes.
fn register_full_blocks(blocks: &mut BlockManager, seq: &mut Sequence, bs: usize) {
    while seq.hashes.len() < seq.computed / bs {
        let b = seq.hashes.len();
        let parent = seq.hashes.last().copied();
        let hash = blocks.register_full(seq.blocks[b], parent, &seq.tokens[b * bs..(b + 1) * bs]);
        seq.hashes.push(hash);
    }
}

/// Adds a sequence's next `n` tokens and its draft to the step.
fn push_chunk(step: &mut Step, seq: &Sequence, n: usize, draft: Vec<u32>) {
    let from = seq.computed;
    let completes = from + n == seq.tokens.len();
    let want_logits = completes && !seq.embed;
    let logits_row = want_logits.then_some(step.batch.logits_indices.len());
    let start = step.batch.tokens.len();
    let mut tokens = seq.tokens[from..from + n].to_vec();
    tokens.extend_from_slice(&draft);
    let rows = if want_logits { 1 + draft.len() } else { 0 };
    for img in &seq.images {
        let r = img.range();
        let (lo, hi) = (r.start.max(from), r.end.min(from + n));
        if lo < hi {
            // `whole_images` cut the chunk at image boundaries, so narrowing cannot fail
            // for a well-formed span; one that does is left for the batch check to refuse.
            if let Ok(embeds) = img.embeds.narrow(0, lo - r.start, hi - lo) {
                step.batch.images.push(ImageRows {
                    row: start + lo - from,
                    embeds,
                    bidirectional: img.bidirectional,
                });
            }
        }
    }
    let positions = from..from + tokens.len();
    if seq.images.iter().any(|i| i.grid.is_some()) {
        // Rows of sequences without such images, before these, turn by their positions.
        let b = &mut step.batch;
        b.rope
            .extend(b.positions[b.rope.len()..].iter().map(|&p| [p; 3]));
        b.rope
            .extend(positions.clone().map(|p| rope_position(&seq.images, p)));
    } else if !step.batch.rope.is_empty() {
        step.batch
            .rope
            .extend(positions.clone().map(|p| [p as u32; 3]));
    }
    step.batch
        .push_seq_rows(&tokens, from, seq.blocks.clone(), rows);
    step.scheduled.push(Scheduled {
        id: seq.id,
        start,
        len: tokens.len(),
        completes,
        logits_row,
        draft,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_tokens_per_step: budget,
                max_running: None,
                spec_max_rows: 32,
            },
            BlockManager::new(blocks, 4),
        )
    }

    /// Runs a step as if the model produced `next` for every sequence that wants a token.
    fn run(s: &mut Scheduler, next: u32) -> Step {
        let step = s.schedule();
        s.commit(&step);
        for sc in &step.scheduled {
            if sc.logits_row.is_some() {
                s.append_token(sc.id, next);
            }
        }
        step
    }

    #[test]
    fn images_are_never_split_across_steps() {
        use crate::engine::request::ImageSpan;
        // Text 0..3, a 4-row image at 3..7, text 7..9; two tokens per step.
        let mut s = sched(16, 2);
        let mut seq = Sequence::new(0, vec![1, 2, 3, 0, 0, 0, 0, 4, 5]);
        let embeds =
            candle_core::Tensor::zeros((4, 8), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let img = ImageSpan {
            start: 3,
            embeds,
            hash: [7; 32],
            bidirectional: true,
            grid: None,
        };
        for (i, t) in img.range().enumerate() {
            seq.tokens[t] = img.placeholder(i);
        }
        seq.images = vec![img];
        s.add(seq);
        let mut chunks = Vec::new();
        for _ in 0..4 {
            let st = run(&mut s, 9);
            chunks.push(st.batch.positions.clone());
            let rows: Vec<_> = st.batch.images.iter().map(|i| i.rows()).collect();
            if st.batch.positions.first() == Some(&3) {
                assert_eq!(rows, vec![0..4], "the image's rows, all in this step");
            } else {
                assert!(rows.is_empty());
            }
        }
        // Up to the image, then the image whole (past the budget), then on.
        assert_eq!(
            chunks,
            vec![vec![0, 1], vec![2], vec![3, 4, 5, 6], vec![7, 8]]
        );
    }

    #[test]
    fn long_prompt_is_chunked_and_mixed_with_decode() {
        let mut s = sched(16, 8);
        s.add(Sequence::new(0, vec![1; 3]));
        let st = run(&mut s, 7);
        assert_eq!(st.batch.tokens.len(), 3);
        s.add(Sequence::new(1, vec![2; 20]));
        let st = run(&mut s, 7);
        // One decode token for 0, then a 7-token chunk of 1.
        assert_eq!(st.scheduled[0].len, 1);
        assert_eq!(st.scheduled[1].len, 7);
        assert_eq!(st.scheduled[1].logits_row, None);
        let st = run(&mut s, 7);
        assert_eq!(st.batch.positions[1], 7, "second chunk continues at 7");
        assert_eq!(s.counters().prompt_tokens_computed, 3 + 7 + 7);
    }

    #[test]
    fn newest_is_preempted_and_everything_returns() {
        // 4 blocks of 4: two sequences of 6 tokens fit, but not once both grow past 8.
        let mut s = sched(4, 64);
        s.add(Sequence::new(0, vec![1; 6]));
        s.add(Sequence::new(1, vec![2; 6]));
        let mut preempted = 0;
        for _ in 0..6 {
            preempted += run(&mut s, 3).preempted.len();
        }
        assert!(preempted > 0);
        assert!(s.get(0).is_some_and(|q| q.tokens.len() == 12));
        for id in [0, 1] {
            s.remove(id);
        }
        assert_eq!(s.block_manager().num_free(), 4);
        assert!(s.is_idle());
    }

    #[test]
    fn drafts_ride_along_and_count_once_accepted() {
        let mut s = sched(16, 64);
        // "1 2 3 4 5 1 2 3": prompt lookup guesses "4 5 1" after the last token.
        let mut seq = Sequence::new(0, vec![1, 2, 3, 4, 5, 1, 2]);
        seq.num_draft = 3;
        s.add(seq);
        run(&mut s, 3);
        let st = s.schedule();
        assert_eq!(st.scheduled[0].draft, vec![4, 5, 1]);
        assert_eq!(st.batch.tokens, vec![3, 4, 5, 1]);
        assert_eq!(st.batch.logits_indices, vec![0, 1, 2, 3]);
        assert_eq!(st.scheduled[0].logits_row, Some(0));
        s.commit(&st);
        assert_eq!(
            s.get(0).map(|q| q.computed),
            Some(8),
            "drafts wait for acceptance"
        );
        // The sampler agreed with "4", then chose 9 instead of "5".
        s.append_token(0, 4);
        s.count_accepted();
        s.append_token(0, 9);
        s.drafts_checked(0, 3, 1);
        let q = s.get(0).expect("running");
        assert_eq!((q.tokens.len(), q.computed), (10, 9));
        assert_eq!(s.counters().drafted, 3);
        assert_eq!(s.counters().accepted, 1);
        // The next step computes only the new token, at its position.
        let st = s.schedule();
        assert_eq!(st.batch.positions[0], 9);
        assert!(
            st.scheduled[0].draft.is_empty(),
            "nothing follows 4 9 earlier"
        );
        s.remove(0);
        assert_eq!(s.block_manager().num_free(), 16);
    }

    #[test]
    fn drafts_go_where_the_measured_step_times_say_they_pay() {
        let mut secs = vec![None; 33];
        // Nothing measured yet: the row limit alone decides.
        assert_eq!(best_draft(&secs, 0.5, 1, 1, 31), 31);
        // This machine's Qwen decode steps (ms by rows, `benches/speculative.rs`): cheap
        // rows up to 16, then a second tile of rows doubles the cost.
        for (rows, ms) in [
            (1, 20.1),
            (2, 23.1),
            (4, 27.9),
            (8, 38.1),
            (16, 49.1),
            (32, 95.8),
        ] {
            secs[rows] = Some(ms / 1e3);
        }
        // One stream: even a third of the drafts kept pays for many rows.
        assert!(best_draft(&secs, 0.3, 1, 1, 31) >= 7);
        // Nothing kept: no drafts.
        assert_eq!(best_draft(&secs, 0.0, 1, 1, 31), 0);
        // Sixteen streams fill the step: a row per stream more costs as much as it gives.
        assert_eq!(best_draft(&secs, 0.8, 16, 16, 1), 0);
        // Eight streams: a draft each (16 rows) pays when most are kept, not when few are.
        assert_eq!(best_draft(&secs, 0.9, 8, 8, 3), 1);
        assert_eq!(best_draft(&secs, 0.2, 8, 8, 3), 0);
        // A row count never measured runs plain first.
        secs[1] = None;
        assert_eq!(best_draft(&secs, 0.5, 1, 1, 31), 0);
    }

    #[test]
    fn no_drafts_past_the_row_limit_or_the_length() {
        let mut s = sched(64, 64);
        s.cfg.spec_max_rows = 4;
        for id in 0..3 {
            let mut seq = Sequence::new(id, vec![1, 2, 1, 2, 1, 2]);
            seq.num_draft = 8;
            s.add(seq);
        }
        run(&mut s, 1);
        let st = s.schedule();
        // Three decode rows leave one draft row under 4: split among three, none each.
        assert!(st.scheduled.iter().all(|x| x.draft.is_empty()));
        s.commit(&st);
        let mut s = sched(64, 64);
        let mut seq = Sequence::new(0, vec![1, 2, 1, 2, 1, 2]);
        seq.num_draft = 8;
        seq.max_len = 9;
        s.add(seq);
        run(&mut s, 1);
        let st = s.schedule();
        // Seven tokens now, nine at most: two drafts.
        assert_eq!(st.scheduled[0].draft, vec![2, 1]);
    }

    #[test]
    fn drafts_shrink_and_pause_when_rejected() {
        let mut s = sched(64, 64);
        let mut seq = Sequence::new(0, [1, 2, 3, 4, 5, 6, 7, 8, 9].repeat(3));
        seq.num_draft = 6;
        s.add(seq);
        run(&mut s, 1); // Appends 1: "9 1" occurred before, followed by 2 3 4 ...
                        // The cycle goes on, so prompt lookup keeps finding it.
        let next = |s: &mut Scheduler| {
            let last = s.get(0).and_then(|q| q.tokens.last().copied()).unwrap_or(0);
            s.append_token(0, last % 9 + 1);
        };
        // A step; without a draft, its one sampled token is appended.
        let draft = |s: &mut Scheduler| {
            let st = s.schedule();
            let d = st.scheduled[0].draft.len();
            s.commit(&st);
            if d == 0 {
                next(s);
            }
            d
        };
        // The accepted tokens and the sampler's own, then the verdict.
        let checked = |s: &mut Scheduler, drafted: usize, accepted: usize| {
            for _ in 0..=accepted {
                next(s);
            }
            (0..accepted).for_each(|_| s.count_accepted());
            s.drafts_checked(0, drafted, accepted);
        };
        assert_eq!(draft(&mut s), 6);
        checked(&mut s, 6, 2);
        assert_eq!(draft(&mut s), 3, "one more than was kept");
        checked(&mut s, 3, 0);
        assert_eq!(draft(&mut s), 1);
        checked(&mut s, 1, 0);
        // Two first-token misses in a row: two steps without drafts, then one token.
        assert_eq!((draft(&mut s), draft(&mut s), draft(&mut s)), (0, 0, 1));
        checked(&mut s, 1, 1);
        assert_eq!(s.counters().accepted, 3);
        let q = s.get(0).expect("running");
        assert_eq!(
            q.tokens.len() - q.computed,
            1,
            "accepted drafts count as computed: only the sampler's own token is left"
        );
        assert_eq!(draft(&mut s), 2, "a draft kept whole doubles");
    }

    #[test]
    fn cached_prefix_is_not_recomputed() {
        let mut s = sched(16, 64);
        let prompt: Vec<u32> = (0..10).collect();
        s.add(Sequence::new(0, prompt.clone()));
        run(&mut s, 99);
        s.remove(0);
        let mut p2 = prompt[..8].to_vec();
        p2.extend([50, 51, 52]);
        s.add(Sequence::new(1, p2));
        let before = s.counters().prompt_tokens_computed;
        let st = run(&mut s, 99);
        assert_eq!(st.batch.positions[0], 8);
        assert_eq!(s.counters().prompt_tokens_computed - before, 3);
        assert_eq!(s.get(1).map(|q| q.cached_tokens), Some(8));
    }
}
