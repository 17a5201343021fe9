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
//! The scheduler knows token ids and block ids only; the engine runs the forward pass, samples,
//! and tells the scheduler what happened.

use std::collections::VecDeque;

use crate::model::Batch;

use super::block_manager::{BlockHash, BlockManager};

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
    /// completes everything it had to compute.
    pub logits_row: Option<usize>,
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
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    /// Ordered by id (arrival): the last is the newest, the first to preempt.
    running: Vec<Sequence>,
    counters: SchedulerCounters,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        Self {
            cfg,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters: SchedulerCounters::default(),
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
        let mut step = Step::default();
        let mut budget = self.cfg.max_tokens_per_step.max(1);

        // Running sequences first, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = (seq.tokens.len() - seq.computed).min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let upto = seq.computed + n;
            // Grow its block table, preempting the newest sequences (itself last) until
            // the blocks fit.
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
            push_chunk(&mut step, &self.running[i], n);
            budget -= n;
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
            let n = (seq.tokens.len() - cached_tokens).min(budget);
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
            push_chunk(&mut step, &seq, n);
            budget -= n;
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

    /// Records that `step` ran: its tokens are in the cache now, and newly full blocks become
    /// reusable prefixes.
    pub fn commit(&mut self, step: &Step) {
        let bs = self.blocks.block_size();
        for s in &step.scheduled {
            let Some(seq) = self.running.iter_mut().find(|q| q.id == s.id) else {
                continue;
            };
            seq.computed += s.len;
            while seq.hashes.len() < seq.computed / bs {
                let b = seq.hashes.len();
                let parent = seq.hashes.last().copied();
                let hash = self.blocks.register_full(
                    seq.blocks[b],
                    parent,
                    &seq.tokens[b * bs..(b + 1) * bs],
                );
                seq.hashes.push(hash);
            }
        }
    }
}

fn push_chunk(step: &mut Step, seq: &Sequence, n: usize) {
    let from = seq.computed;
    let completes = from + n == seq.tokens.len();
    let want_logits = completes && !seq.embed;
    let logits_row = want_logits.then_some(step.batch.logits_indices.len());
    let start = step.batch.tokens.len();
    step.batch.push_seq(
        &seq.tokens[from..from + n],
        from,
        seq.blocks.clone(),
        want_logits,
    );
    step.scheduled.push(Scheduled {
        id: seq.id,
        start,
        len: n,
        completes,
        logits_row,
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
