//! The engine thread: owns the KV cache and the scheduler, takes submitted requests, runs
//! one batched forward per step, samples, detokenizes and applies stop strings per
//! sequence, and streams [`Event`]s back.
//!
//! Structured output: a constrained sequence's token mask is computed on another thread
//! while the step's forward pass runs (masks of several sequences in parallel), so the
//! grammar work hides behind the model's and only constrained sequences pay for it.

use std::collections::HashMap;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{KvCache, Model, Tokenizer};

use super::constraint::Constraint;
use super::detok::{IncrementalDecoder, StopMatcher};
use super::handle::{EngineStats, Shared, Submitted};
use super::sampler::{row_logprobs, Sampler};
use super::scheduler::{Scheduled, Scheduler, SeqId, Sequence, Step};
use super::speculative::Drafter;
use super::{Candidate, Event, FinishReason, Reasoning, Summary, TokenLogprobs};

/// A constrained sequence's place relative to its free reasoning block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The constraint applies.
    Answer,
    /// The first token may open reasoning (`open`) or start the answer.
    MayReason { open: u32, close: u32 },
    /// Inside the reasoning: free until `close`.
    Reasoning { close: u32 },
}

impl Phase {
    fn new(r: Option<Reasoning>) -> Phase {
        match r {
            None => Phase::Answer,
            Some(Reasoning {
                open: Some(open),
                close,
            }) => Phase::MayReason { open, close },
            Some(Reasoning { open: None, close }) => Phase::Reasoning { close },
        }
    }

    /// The next token is sampled under the constraint (with `MayReason`'s opener allowed).
    fn constrained(self) -> bool {
        !matches!(self, Phase::Reasoning { .. })
    }
}

/// Per-sequence state the engine thread keeps beside the scheduler's.
struct Active {
    constraint: Option<Constraint>,
    /// Where the output is relative to a free reasoning block before the constraint.
    reasoning: Phase,
    tx: Sender<Event>,
    cancel: Arc<AtomicBool>,
    sampler: Sampler,
    detok: IncrementalDecoder<Arc<Tokenizer>>,
    stops: StopMatcher,
    /// New tokens allowed.
    limit: usize,
    generated: usize,
    truncated: usize,
    submitted: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    load_duration: Duration,
    /// An embedding's running sum of final hidden states (`None` for generation).
    pooled: Option<Vec<f32>>,
    /// Alternatives to report beside each token's log-probability (`None`: no logprobs).
    logprobs: Option<usize>,
}

pub(super) struct Worker {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    cache: Box<dyn KvCache + Send>,
    sched: Scheduler,
    /// The draft model's guesses, when one is loaded (prompt lookup otherwise).
    drafter: Option<Drafter>,
    active: HashMap<SeqId, Active>,
    rx: Receiver<Submitted>,
    shared: Arc<Shared>,
    load_duration: Option<Duration>,
    /// Panics recovered from.
    restarts: u64,
}

/// The text of a panic's payload.
pub(super) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

impl Worker {
    pub fn new(
        model: Arc<Model>,
        cache: Box<dyn KvCache + Send>,
        sched: Scheduler,
        drafter: Option<Drafter>,
        rx: Receiver<Submitted>,
        shared: Arc<Shared>,
        load_duration: Duration,
    ) -> Self {
        Self {
            tokenizer: Arc::new(model.tokenizer.clone()),
            eos: model.tokenizer.eos_ids().to_vec(),
            model,
            cache,
            sched,
            drafter,
            active: HashMap::new(),
            rx,
            shared,
            load_duration: Some(load_duration),
            restarts: 0,
        }
    }

    pub fn run(mut self) {
        while self.intake() {
            // A panic in a step (a kernel bug, a bad index) must not leave a dead engine
            // registered: what was in flight fails with a clear error, the scheduler starts
            // over empty, and the engine keeps serving.
            let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| self.step()));
            if let Err(payload) = stepped {
                self.recover(panic_message(payload.as_ref()));
            }
        }
        // Shutting down: tell everyone still here.
        let ids: Vec<SeqId> = self.active.keys().copied().collect();
        for id in ids {
            self.finish(id, FinishReason::Cancelled, None);
        }
        self.publish_stats();
    }

    /// One scheduling step and its forward pass.
    fn step(&mut self) {
        self.drop_cancelled();
        let step = self.sched.schedule_with(self.drafter.as_mut());
        if step.batch.is_empty() {
            self.publish_stats();
            if !self.sched.is_idle() {
                // Nothing runnable (cannot happen with a consistent pool): wait a bit
                // rather than spin.
                std::thread::sleep(Duration::from_millis(5));
            }
            return;
        }
        if self.shared.fault.swap(false, Ordering::AcqRel) {
            panic!("injected engine fault");
        }
        let (rows, t0) = (step.batch.tokens.len(), Instant::now());
        self.run_step(step);
        self.sched.step_took(rows, t0.elapsed().as_secs_f64());
        self.publish_stats();
    }

    /// After a panic: every sequence in flight ends with an error naming it, and the
    /// scheduler and its blocks start over (their bookkeeping may be half-updated).
    fn recover(&mut self, what: String) {
        tracing::error!(panic = %what, sequences = self.active.len(), "engine step panicked; failing its sequences and restarting the scheduler");
        self.sched.reset();
        if let Some(d) = &mut self.drafter {
            d.reset();
        }
        self.restarts += 1;
        let msg = format!("the model's engine failed ({what}) and was restarted; please retry");
        let ids: Vec<SeqId> = self.active.keys().copied().collect();
        for id in ids {
            self.finish(id, FinishReason::Error, Some(msg.clone()));
        }
        self.publish_stats();
    }

    /// Takes new requests; blocks while idle. Returns false when the engine is dropped.
    fn intake(&mut self) -> bool {
        if self.sched.is_idle() {
            match self.rx.recv() {
                Ok(sub) => self.admit(sub),
                Err(_) => return false,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(sub) => self.admit(sub),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn admit(&mut self, sub: Submitted) {
        let prompt_len = sub.req.prompt.len();
        let limit = sub
            .req
            .num_predict
            .unwrap_or(usize::MAX)
            .min(sub.ctx.saturating_sub(prompt_len));
        // A grammar's mask is prepared for one row per step, so constrained output is not
        // speculated.
        let num_draft = match sub.req.constraint {
            Some(_) => 0,
            None => sub.req.num_draft.unwrap_or(0),
        };
        let active = Active {
            constraint: sub.req.constraint,
            reasoning: Phase::new(sub.req.reasoning),
            tx: sub.tx,
            cancel: sub.cancel,
            sampler: Sampler::new(sub.req.sampling),
            detok: IncrementalDecoder::with_context(self.tokenizer.clone(), &sub.req.prompt),
            stops: StopMatcher::new(sub.req.stop),
            limit,
            generated: 0,
            truncated: sub.truncated,
            submitted: sub.at,
            admitted: None,
            first_token: None,
            load_duration: self.load_duration.take().unwrap_or_default(),
            pooled: sub.req.embed.then(Vec::new),
            logprobs: sub.req.logprobs,
        };
        self.active.insert(sub.id, active);
        if sub.req.embed {
            self.sched.add(Sequence::embedding(sub.id, sub.req.prompt));
            return;
        }
        let mut seq = Sequence::new(sub.id, sub.req.prompt);
        seq.images = sub.req.images;
        seq.num_draft = num_draft;
        seq.max_len = prompt_len.saturating_add(limit);
        self.sched.add(seq);
        if limit == 0 {
            self.finish(sub.id, FinishReason::Length, None);
        }
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.cancel.load(Ordering::Relaxed))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.finish(id, FinishReason::Cancelled, None);
        }
    }

    fn run_step(&mut self, step: Step) {
        let now = Instant::now();
        for s in &step.scheduled {
            if let Some(a) = self.active.get_mut(&s.id) {
                if a.admitted.is_none() {
                    a.admitted = Some(now);
                    self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        // The constrained sequences that sample this step get their masks computed while
        // the forward pass runs.
        let mut masks: Vec<(SeqId, Constraint)> = step
            .scheduled
            .iter()
            .filter(|s| s.logits_row.is_some())
            .filter_map(|s| {
                let a = self.active.get_mut(&s.id)?;
                if !a.reasoning.constrained() {
                    return None;
                }
                Some((s.id, a.constraint.take()?))
            })
            .collect();
        // Embeddings pool every row of their chunks.
        let pooling: Vec<&Scheduled> = step
            .scheduled
            .iter()
            .filter(|s| self.active.get(&s.id).is_some_and(|a| a.pooled.is_some()))
            .collect();
        let sums: Vec<Range<usize>> = pooling.iter().map(|s| s.start..s.start + s.len).collect();
        let (model, cache, batch) = (&self.model, self.cache.as_mut(), &step.batch);
        let mut forward = || {
            model
                .decoder
                .forward_with_sums(batch, cache, &sums)
                .and_then(|(l, sums)| Ok((l.to_vec2::<f32>()?, sums)))
        };
        let out = if masks.is_empty() {
            forward()
        } else {
            std::thread::scope(|scope| {
                scope.spawn(|| prepare_masks(&mut masks));
                forward()
            })
        };
        for (id, c) in masks {
            if let Some(a) = self.active.get_mut(&id) {
                a.constraint = Some(c);
            }
        }
        let (mut rows, sums) = match out {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "forward step failed");
                let msg = e.to_string();
                for s in &step.scheduled {
                    self.finish(s.id, FinishReason::Error, Some(msg.clone()));
                }
                return;
            }
        };
        self.sched.commit(&step);
        let finished: Vec<SeqId> = pooling
            .iter()
            .zip(sums)
            .filter_map(|(s, sum)| self.pool(s, sum).then_some(s.id))
            .collect();
        for id in finished {
            self.finish(id, FinishReason::Stop, None);
        }
        for s in &step.scheduled {
            let Some(first) = s.logits_row else {
                continue;
            };
            // The sequence's own row, then one per draft token: each is sampled as its own
            // decode step would be, while the sampler keeps choosing the draft.
            let mut accepted = 0;
            for i in 0..=s.draft.len() {
                let Some(row) = rows.get_mut(first + i) else {
                    break;
                };
                let Some(tok) = self.on_logits(s.id, row) else {
                    break;
                };
                if s.draft.get(i) != Some(&tok) {
                    break;
                }
                // Counted now: the next row may end the sequence, which publishes stats.
                self.sched.count_accepted();
                accepted += 1;
            }
            if !s.draft.is_empty() {
                self.sched.drafts_checked(s.id, s.draft.len(), accepted);
            }
        }
    }

    /// Adds an embedding chunk's hidden-state sum; on its last chunk sends the mean and
    /// returns true (the sequence is done).
    fn pool(&mut self, s: &Scheduled, sum: Vec<f32>) -> bool {
        let Some(a) = self.active.get_mut(&s.id) else {
            return false;
        };
        let Some(acc) = a.pooled.as_mut() else {
            return false;
        };
        if acc.is_empty() {
            *acc = sum;
        } else {
            acc.iter_mut().zip(&sum).for_each(|(a, b)| *a += b);
        }
        if !s.completes {
            return false;
        }
        let n = self.sched.get(s.id).map_or(1, |q| q.tokens.len()).max(1) as f32;
        let mean: Vec<f32> = acc.iter().map(|v| v / n).collect();
        a.first_token.get_or_insert_with(Instant::now);
        // A client that left is noticed at the next step.
        let _ = a.tx.send(Event::Embedding(mean));
        true
    }

    /// Samples a sequence's next token and streams it; the token when the sequence goes on.
    fn on_logits(&mut self, id: SeqId, row: &mut [f32]) -> Option<u32> {
        let (Some(seq), Some(a)) = (self.sched.get(id), self.active.get_mut(&id)) else {
            return None;
        };
        // Before masks change the row: logprobs are the model's own distribution.
        let raw = a.logprobs.map(|k| row_logprobs(row, k));
        let mut grammar_error = None;
        let mut grammar_done = false;
        let tok = match (&mut a.constraint, a.reasoning) {
            (Some(c), phase) if phase.constrained() => {
                // A thinking model may open its reasoning instead of answering.
                let opener = match phase {
                    Phase::MayReason { open, .. } => row.get(open as usize).map(|&l| (open, l)),
                    _ => None,
                };
                if let Err(e) = c.apply(row) {
                    self.finish(id, FinishReason::Error, Some(e));
                    return None;
                }
                if let Some((open, logit)) = opener {
                    row[open as usize] = logit;
                }
                let tok = a.sampler.sample(row, &seq.tokens);
                a.reasoning = match phase {
                    Phase::MayReason { open, close } if tok == open => Phase::Reasoning { close },
                    _ => Phase::Answer,
                };
                if a.reasoning == Phase::Answer && !self.eos.contains(&tok) {
                    match c.commit(tok) {
                        Ok(()) => grammar_done = c.is_finished(),
                        Err(e) => grammar_error = Some(e),
                    }
                }
                tok
            }
            (_, phase) => {
                let tok = a.sampler.sample(row, &seq.tokens);
                if phase == (Phase::Reasoning { close: tok }) {
                    a.reasoning = Phase::Answer;
                }
                tok
            }
        };
        a.first_token.get_or_insert_with(Instant::now);
        let outcome = if self.eos.contains(&tok) {
            Some((FinishReason::Stop, None))
        } else {
            a.generated += 1;
            let mut outcome = None;
            let text = match a.detok.push(tok) {
                Ok(Some(piece)) => {
                    let out = a.stops.push(&piece);
                    if out.stopped {
                        outcome = Some((FinishReason::Stop, None));
                    }
                    out.emit
                }
                Ok(None) => String::new(),
                Err(e) => {
                    outcome = Some((FinishReason::Error, Some(e.to_string())));
                    String::new()
                }
            };
            // The chosen token survived any mask, so its logit is still the model's.
            let logprobs = raw.map(|r| TokenLogprobs {
                chosen: candidate(
                    &self.tokenizer,
                    tok,
                    row.get(tok as usize)
                        .map_or(f32::NEG_INFINITY, |l| l - r.log_norm),
                ),
                top: r
                    .top
                    .iter()
                    .map(|&(id, lp)| candidate(&self.tokenizer, id, lp))
                    .collect(),
            });
            let event = Event::Token {
                id: tok,
                text,
                logprobs,
            };
            if a.tx.send(event).is_err() {
                outcome = Some((FinishReason::Cancelled, None));
            }
            if outcome.is_none() {
                if let Some(e) = grammar_error {
                    outcome = Some((FinishReason::Error, Some(e)));
                } else if grammar_done {
                    // The grammar allows nothing more: the answer is complete.
                    outcome = Some((FinishReason::Stop, None));
                }
            }
            if outcome.is_none() && a.generated >= a.limit {
                outcome = Some((FinishReason::Length, None));
            }
            outcome
        };
        match outcome {
            Some((reason, error)) => {
                self.finish(id, reason, error);
                None
            }
            None => {
                self.sched.append_token(id, tok);
                Some(tok)
            }
        }
    }

    /// Ends a sequence: flushes held-back text, sends the summary, frees its blocks.
    fn finish(&mut self, id: SeqId, mut reason: FinishReason, error: Option<String>) {
        let seq = self.sched.remove(id);
        if let Some(d) = &mut self.drafter {
            d.forget(id);
        }
        let Some(mut a) = self.active.remove(&id) else {
            return;
        };
        if a.admitted.is_none() {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        }
        if matches!(reason, FinishReason::Stop | FinishReason::Length) && !a.stops.is_stopped() {
            // Whatever the detokenizer and stop matcher still hold is final now.
            let mut tail = String::new();
            match a.detok.flush() {
                Ok(rest) => {
                    let out = a.stops.push(&rest);
                    tail = out.emit;
                    if out.stopped {
                        reason = FinishReason::Stop;
                    } else {
                        tail.push_str(&a.stops.finish());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "detokenizer flush failed"),
            }
            if !tail.is_empty() {
                let _ = a.tx.send(Event::Text(tail));
            }
        }
        let end = Instant::now();
        let (prompt_len, cached, preemptions) = seq.as_ref().map_or((0, 0, 0), |s| {
            (s.prompt_len, s.cached_tokens, s.preemptions)
        });
        let summary = Summary {
            finish: reason,
            error,
            stop_string: a.stops.matched().map(str::to_string),
            prompt_eval_count: prompt_len,
            prompt_cached: cached,
            truncated: a.truncated,
            eval_count: a.generated,
            load_duration: a.load_duration,
            prompt_eval_duration: match (a.admitted, a.first_token) {
                (Some(s), Some(f)) => f - s,
                _ => Duration::ZERO,
            },
            eval_duration: a.first_token.map_or(Duration::ZERO, |f| end - f),
            total_duration: end - a.submitted,
            preemptions,
        };
        // Published before `Done` so a client that sees the end also sees the blocks back.
        self.publish_stats();
        let _ = a.tx.send(Event::Done(summary));
    }

    fn publish_stats(&self) {
        let bm = self.sched.block_manager();
        let c = self.sched.counters();
        let snapshot = EngineStats {
            total_blocks: bm.num_blocks(),
            free_blocks: bm.num_free(),
            block_size: bm.block_size(),
            cached_blocks: bm.num_cached(),
            waiting: self.sched.num_waiting(),
            // Every sequence that never ran is waiting too; the rest of the waiting ran
            // before and were preempted.
            requeued: self.sched.num_waiting().saturating_sub(
                self.active
                    .values()
                    .filter(|a| a.admitted.is_none())
                    .count(),
            ),
            running: self.sched.num_running(),
            prompt_tokens_computed: c.prompt_tokens_computed,
            tokens_computed: c.tokens_computed,
            preemptions: c.preemptions,
            steps: c.steps,
            drafted: c.drafted,
            accepted: c.accepted,
            restarts: self.restarts,
        };
        match self.shared.stats.lock() {
            Ok(mut s) => *s = snapshot,
            Err(p) => *p.into_inner() = snapshot,
        }
    }
}

/// A token with its text's bytes, for logprobs.
fn candidate(tokenizer: &Tokenizer, id: u32, logprob: f32) -> Candidate {
    let bytes = match tokenizer.token_bytes(id) {
        Ok(entry) => entry.map(|e| e.bytes).unwrap_or_default(),
        // Pieces that do not map to bytes: the token decoded on its own.
        Err(_) => tokenizer
            .decode(&[id], false)
            .map(String::into_bytes)
            .unwrap_or_default(),
    };
    Candidate { id, bytes, logprob }
}

/// Computes the next masks of several constrained sequences, in parallel when there are
/// several (each is independent).
fn prepare_masks(masks: &mut [(SeqId, Constraint)]) {
    use rayon::prelude::*;
    if masks.len() == 1 {
        masks[0].1.prepare();
    } else {
        masks.par_iter_mut().for_each(|(_, c)| c.prepare());
    }
}
