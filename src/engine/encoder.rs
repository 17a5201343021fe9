//! The engine thread of an embedding model. An encoder reads each input once, all of it at
//! once, and keeps nothing between steps: no KV cache, no block manager, no sampling. So
//! its requests share everything of the decoder's path up to the thread (the handle's
//! checks, the bounded queue and its `pending` count, the `Submitted` channel, cancellation,
//! [`Event`]s and the published stats) and differ only here: each step takes the oldest
//! waiting inputs that fit the step's token budget (padded to the longest of them), runs
//! one batched forward, and answers each with [`Event::Embedding`] and [`Event::Done`].

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::Embedder;

use super::handle::{EngineStats, Shared, Submitted};
use super::worker::panic_message;
use super::{Event, FinishReason, Summary};

pub(super) struct EncoderWorker {
    model: Arc<Embedder>,
    rx: Receiver<Submitted>,
    shared: Arc<Shared>,
    waiting: VecDeque<Submitted>,
    /// Padded tokens (batch rows times the longest input) per forward pass; one input is
    /// always taken, however long.
    max_tokens: usize,
    load_duration: Option<Duration>,
    prompt_tokens: u64,
    steps: u64,
    restarts: u64,
}

impl EncoderWorker {
    pub fn new(
        model: Arc<Embedder>,
        rx: Receiver<Submitted>,
        shared: Arc<Shared>,
        max_tokens: usize,
        load_duration: Duration,
    ) -> Self {
        Self {
            model,
            rx,
            shared,
            waiting: VecDeque::new(),
            max_tokens: max_tokens.max(1),
            load_duration: Some(load_duration),
            prompt_tokens: 0,
            steps: 0,
            restarts: 0,
        }
    }

    pub fn run(mut self) {
        while self.intake() {
            self.drop_cancelled();
            let batch = self.next_batch();
            if batch.is_empty() {
                self.publish(0);
                continue;
            }
            self.publish(batch.len());
            self.run_batch(batch);
            self.publish(0);
        }
        for sub in std::mem::take(&mut self.waiting) {
            self.unqueue(sub);
        }
        self.publish(0);
    }

    /// Takes new requests; blocks while nothing waits. False once the engine is dropped.
    fn intake(&mut self) -> bool {
        if self.waiting.is_empty() {
            match self.rx.recv() {
                Ok(sub) => self.waiting.push_back(sub),
                Err(_) => return false,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(sub) => self.waiting.push_back(sub),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn drop_cancelled(&mut self) {
        let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|s| s.cancel.load(Ordering::Relaxed));
        self.waiting = keep.into();
        for sub in gone {
            self.unqueue(sub);
        }
    }

    /// The oldest waiting inputs whose padded batch fits the token budget.
    fn next_batch(&mut self) -> Vec<Submitted> {
        let mut batch: Vec<Submitted> = Vec::new();
        let mut longest = 0;
        while let Some(next) = self.waiting.front() {
            let len = longest.max(next.req.prompt.len());
            if !batch.is_empty() && len * (batch.len() + 1) > self.max_tokens {
                break;
            }
            longest = len;
            if let Some(sub) = self.waiting.pop_front() {
                batch.push(sub);
            }
        }
        // They are running now: out of the queue that `OLLAMA_MAX_QUEUE` bounds.
        self.shared.pending.fetch_sub(batch.len(), Ordering::AcqRel);
        batch
    }

    fn run_batch(&mut self, batch: Vec<Submitted>) {
        let started = Instant::now();
        let fault = self.shared.fault.swap(false, Ordering::AcqRel);
        let model = self.model.clone();
        let inputs: Vec<&[u32]> = batch.iter().map(|s| s.req.prompt.as_slice()).collect();
        // A panic in the forward pass (a kernel bug) fails this batch, not the engine.
        let out = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if fault {
                panic!("injected engine fault");
            }
            model.embed(&inputs)
        }));
        self.steps += 1;
        let result = match out {
            Ok(Ok(vectors)) if vectors.len() == batch.len() => Ok(vectors),
            Ok(Ok(_)) => Err("the encoder returned the wrong number of vectors".to_string()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "encoder forward failed");
                Err(e.to_string())
            }
            Err(payload) => {
                let what = panic_message(payload.as_ref());
                tracing::error!(panic = %what, "encoder step panicked; failing its requests");
                self.restarts += 1;
                Err(format!(
                    "the model's engine failed ({what}) and was restarted; please retry"
                ))
            }
        };
        let spent = started.elapsed();
        match result {
            Ok(vectors) => {
                for (sub, v) in batch.into_iter().zip(vectors) {
                    self.prompt_tokens += sub.req.prompt.len() as u64;
                    // A client that left is noticed by the closed channel; nothing to undo.
                    let _ = sub.tx.send(Event::Embedding(v));
                    self.finish(sub, FinishReason::Stop, None, spent);
                }
            }
            Err(msg) => {
                for sub in batch {
                    self.finish(sub, FinishReason::Error, Some(msg.clone()), spent);
                }
            }
        }
    }

    /// Ends a request that never ran (cancelled, or the engine stopping): it leaves the
    /// queue.
    fn unqueue(&mut self, sub: Submitted) {
        self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        self.finish(sub, FinishReason::Cancelled, None, Duration::ZERO);
    }

    /// Sends a request's summary; `compute` is its batch's forward time.
    fn finish(
        &mut self,
        sub: Submitted,
        finish: FinishReason,
        error: Option<String>,
        compute: Duration,
    ) {
        let summary = Summary {
            finish,
            error,
            prompt_eval_count: sub.req.prompt.len(),
            prompt_cached: 0,
            truncated: sub.truncated,
            eval_count: 0,
            load_duration: self.load_duration.take().unwrap_or_default(),
            prompt_eval_duration: compute,
            eval_duration: Duration::ZERO,
            total_duration: sub.at.elapsed(),
            preemptions: 0,
            stop_string: None,
        };
        let _ = sub.tx.send(Event::Done(summary));
    }

    fn publish(&self, running: usize) {
        let snapshot = EngineStats {
            waiting: self.waiting.len(),
            running,
            prompt_tokens_computed: self.prompt_tokens,
            tokens_computed: self.prompt_tokens,
            steps: self.steps,
            restarts: self.restarts,
            ..EngineStats::default()
        };
        match self.shared.stats.lock() {
            Ok(mut s) => *s = snapshot,
            Err(p) => *p.into_inner() = snapshot,
        }
    }
}
