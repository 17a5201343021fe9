//! The serving engine of one loaded model: a thread that owns the paged KV cache and runs the
//! scheduler's steps, and the handle the API uses to submit requests and stream their output.
//!
//! `submit` checks a request and queues it; the engine thread admits it when KV blocks allow,
//! runs its prefill chunks and decode tokens packed with every other running sequence, samples,
//! detokenizes and applies stop strings per sequence, and sends [`Event`]s down the request's
//! stream. Dropping the stream cancels the sequence; its blocks are free again after the next
//! step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::model::{KvCache, Model, Tokenizer};

use super::block_manager::BlockManager;
use super::detok::{IncrementalDecoder, StopMatcher};
use super::json_mode::JsonMode;
use super::sampler::{Sampler, SamplerError, SamplingParams};
use super::scheduler::{Scheduler, SchedulerConfig, SeqId, Sequence, Step};

/// Engine settings; [`EngineConfig::from_env`] reads the environment.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Exact number of KV blocks; overrides the byte budget (tests use it).
    pub num_blocks: Option<usize>,
    /// KV cache budget in bytes (`WICK_KV_CACHE_BYTES`).
    pub kv_cache_bytes: Option<usize>,
    /// Without a byte budget: this fraction of the memory available now.
    pub kv_memory_fraction: f64,
    /// Tokens per forward step (decode tokens plus prefill chunks).
    pub max_tokens_per_step: usize,
    /// Running sequences at most (`OLLAMA_NUM_PARALLEL`); `None`: as many as memory allows.
    pub max_running: Option<usize>,
    /// Context length for requests that do not set `num_ctx`.
    pub default_num_ctx: usize,
    /// How long loading the model took, reported once (on the first request) as Ollama's
    /// `load_duration`.
    pub load_duration: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: None,
            kv_cache_bytes: None,
            kv_memory_fraction: 0.3,
            max_tokens_per_step: 512,
            max_running: None,
            default_num_ctx: 4096,
            load_duration: Duration::ZERO,
        }
    }
}

impl EngineConfig {
    /// Defaults, with `WICK_KV_CACHE_BYTES`, `OLLAMA_NUM_PARALLEL` and
    /// `OLLAMA_CONTEXT_LENGTH` applied when set.
    pub fn from_env() -> Result<Self, EngineError> {
        let mut cfg = Self::default();
        let var = |name: &'static str| -> Result<Option<usize>, EngineError> {
            match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| EngineError::BadSetting { name, value: v }),
                _ => Ok(None),
            }
        };
        cfg.kv_cache_bytes = var("WICK_KV_CACHE_BYTES")?;
        cfg.max_running = var("OLLAMA_NUM_PARALLEL")?.filter(|&n| n > 0);
        if let Some(n) = var("OLLAMA_CONTEXT_LENGTH")?.filter(|&n| n > 0) {
            cfg.default_num_ctx = n;
        }
        Ok(cfg)
    }
}

/// One generation request, already tokenized (the API renders chat templates).
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Maximum new tokens; `None` until a stop or the context is full.
    pub num_predict: Option<usize>,
    pub stop: Vec<String>,
    /// Context length (prompt plus output); `None` takes the engine's default.
    pub num_ctx: Option<usize>,
    /// A prompt longer than the context keeps its newest tokens (`true`, Ollama's behaviour)
    /// or is refused.
    pub truncate: bool,
    /// Constrain the output to one JSON object (`format: "json"`).
    pub json: bool,
}

impl Request {
    /// A greedy request with default limits.
    pub fn new(prompt: Vec<u32>) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::greedy(),
            num_predict: None,
            stop: Vec::new(),
            num_ctx: None,
            truncate: true,
            json: false,
        }
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `num_predict` or the context length was reached.
    Length,
    /// The client went away or the engine shut down.
    Cancelled,
    /// The forward pass failed; `Summary::error` says why.
    Error,
}

/// The end of a request, with the counts and timings Ollama reports (nanoseconds there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub finish: FinishReason,
    pub error: Option<String>,
    /// Prompt tokens after truncation.
    pub prompt_eval_count: usize,
    /// Of those, tokens found in the prefix cache (not computed).
    pub prompt_cached: usize,
    /// Prompt tokens dropped from the front to fit the context (0 when it fit).
    pub truncated: usize,
    pub eval_count: usize,
    pub load_duration: Duration,
    /// From admission to the first generated token.
    pub prompt_eval_duration: Duration,
    /// From the first generated token to the end.
    pub eval_duration: Duration,
    /// From submission to the end.
    pub total_duration: Duration,
    /// Times the sequence was preempted and recomputed.
    pub preemptions: usize,
}

impl Summary {
    pub fn nanos(d: Duration) -> u64 {
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What a request's stream carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A generated token and the text it makes final (often empty: held back for an
    /// incomplete character or a possible stop string).
    Token { id: u32, text: String },
    /// Text released at the end that belongs to no new token (what was held back).
    Text(String),
    /// The last event.
    Done(Summary),
}

/// Errors returned by `Engine::start` and `Engine::submit`.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("empty prompt")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens but the context is {ctx} (and truncation is off)")]
    PromptTooLong { prompt: usize, ctx: usize },
    #[error("the prompt has {prompt} tokens but the whole KV cache holds {capacity}")]
    PromptExceedsCache { prompt: usize, capacity: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error(transparent)]
    Sampling(#[from] SamplerError),
    #[error("the KV cache budget of {bytes} bytes is less than one block of {block_bytes}")]
    CacheTooSmall { bytes: usize, block_bytes: usize },
    #[error("invalid setting {name}={value:?}")]
    BadSetting { name: &'static str, value: String },
    #[error("the engine has stopped")]
    Stopped,
    #[error("starting the engine thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("allocating the KV cache: {0}")]
    Cache(#[source] crate::model::Error),
}

/// A request's output. Dropping it cancels the request.
#[derive(Debug)]
pub struct RequestStream {
    rx: Receiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl RequestStream {
    /// The next event; `None` after `Done` (or if the engine died).
    pub fn recv(&self) -> Option<Event> {
        self.rx.recv().ok()
    }

    pub fn recv_timeout(&self, t: Duration) -> Result<Event, RecvTimeoutError> {
        self.rx.recv_timeout(t)
    }

    pub fn try_recv(&self) -> Result<Event, TryRecvError> {
        self.rx.try_recv()
    }

    /// Cancels without dropping (the stream then ends with `Done(Cancelled)`).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Iterator for RequestStream {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.recv()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// A snapshot of the engine's state, for tests and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub total_blocks: usize,
    pub free_blocks: usize,
    pub block_size: usize,
    /// Full blocks holding reusable prefixes.
    pub cached_blocks: usize,
    pub waiting: usize,
    pub running: usize,
    pub prompt_tokens_computed: u64,
    pub tokens_computed: u64,
    pub preemptions: u64,
    pub steps: u64,
}

struct Submitted {
    id: SeqId,
    req: Request,
    /// Tokens of context this sequence may fill.
    ctx: usize,
    truncated: usize,
    tx: Sender<Event>,
    cancel: Arc<AtomicBool>,
    at: Instant,
}

/// The serving engine of one model. Dropping it cancels what is in flight and stops the
/// thread.
pub struct Engine {
    tx: Option<Sender<Submitted>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<EngineStats>>,
    pending: Arc<AtomicUsize>,
    next_id: Mutex<SeqId>,
    model: Arc<Model>,
    capacity: usize,
    default_num_ctx: usize,
}

/// Bytes of one KV block of the model's cache (K and V, every layer).
fn block_bytes(model: &Model, block_size: usize) -> usize {
    model.kv_block_bytes(block_size)
}

/// The KV cache budget without `WICK_KV_CACHE_BYTES`: on a GPU, 90% of its free memory
/// after the weights (activations need the rest); on the CPU, `fraction` of what the
/// system has available.
fn default_cache_bytes(model: &Model, fraction: f64) -> usize {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = model.decoder.device() {
        return match crate::model::cuda::free_memory(d) {
            Ok(free) => (free as f64 * 0.9) as usize,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read free GPU memory; 1 GiB KV cache");
                1 << 30
            }
        };
    }
    #[cfg(not(feature = "cuda"))]
    let _ = model;
    (available_memory() as f64 * fraction.clamp(0.0, 1.0)) as usize
}

/// The paged KV cache on the model's device (on a GPU, of the path it serves on).
fn new_cache(
    model: &Model,
    num_blocks: usize,
    block_size: usize,
) -> Result<Box<dyn KvCache + Send>, EngineError> {
    model
        .new_kv_cache(num_blocks, block_size)
        .map_err(EngineError::Cache)
}

/// Memory available now, from /proc/meminfo; a conservative guess elsewhere.
pub fn available_memory() -> usize {
    const FALLBACK: usize = 1 << 30;
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return FALLBACK;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(FALLBACK, |kb| kb * 1024)
}

impl Engine {
    /// Sizes the KV cache, allocates it once and starts the engine thread.
    pub fn start(model: Arc<Model>, cfg: EngineConfig) -> Result<Engine, EngineError> {
        let block_size = cfg.block_size.max(1);
        let per_block = block_bytes(&model, block_size);
        let num_blocks = match cfg.num_blocks {
            Some(n) => n,
            None => {
                let bytes = cfg
                    .kv_cache_bytes
                    .unwrap_or_else(|| default_cache_bytes(&model, cfg.kv_memory_fraction));
                // No point in more blocks than the longest context times a generous number
                // of sequences; the rest of memory is better left to the system.
                let cap = model.config().max_position_embeddings.div_ceil(block_size) * 64;
                (bytes / per_block).min(cap)
            }
        };
        if num_blocks == 0 {
            return Err(EngineError::CacheTooSmall {
                bytes: cfg.kv_cache_bytes.unwrap_or(0),
                block_bytes: per_block,
            });
        }
        let cache = new_cache(&model, num_blocks, block_size)?;
        tracing::info!(
            num_blocks,
            block_size,
            bytes = num_blocks * per_block,
            "KV cache allocated"
        );
        let stats = Arc::new(Mutex::new(EngineStats {
            total_blocks: num_blocks,
            free_blocks: num_blocks,
            block_size,
            ..EngineStats::default()
        }));
        let (tx, rx) = mpsc::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            model: model.clone(),
            tokenizer: Arc::new(model.tokenizer.clone()),
            eos: model.tokenizer.eos_ids().to_vec(),
            cache,
            sched: Scheduler::new(
                SchedulerConfig {
                    max_tokens_per_step: cfg.max_tokens_per_step,
                    max_running: cfg.max_running,
                },
                BlockManager::new(num_blocks, block_size),
            ),
            active: HashMap::new(),
            rx,
            stats: stats.clone(),
            pending: pending.clone(),
            token_texts: None,
            load_duration: Some(cfg.load_duration),
        };
        let thread = std::thread::Builder::new()
            .name("wick-engine".into())
            .spawn(move || worker.run())
            .map_err(EngineError::Spawn)?;
        Ok(Engine {
            tx: Some(tx),
            thread: Some(thread),
            stats,
            pending,
            next_id: Mutex::new(0),
            model,
            capacity: num_blocks * block_size,
            default_num_ctx: cfg.default_num_ctx,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Tokens the whole KV cache holds.
    pub fn capacity_tokens(&self) -> usize {
        self.capacity
    }

    /// Requests submitted and not yet started, counted at once (the stats lag a step).
    pub fn queued(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> EngineStats {
        match self.stats.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Checks and queues a request; its events arrive on the returned stream.
    pub fn submit(&self, mut req: Request) -> Result<RequestStream, EngineError> {
        let at = Instant::now();
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        req.sampling.validate()?;
        let vocab = self.model.config().vocab_size;
        if let Some(&id) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadToken { id, vocab });
        }
        if req.prompt.len() > self.capacity {
            return Err(EngineError::PromptExceedsCache {
                prompt: req.prompt.len(),
                capacity: self.capacity,
            });
        }
        // A sequence can never outgrow the cache, so the oldest one always fits alone.
        let ctx = req
            .num_ctx
            .unwrap_or(self.default_num_ctx)
            .min(self.model.config().max_position_embeddings)
            .min(self.capacity)
            .max(2);
        let mut truncated = 0;
        if req.prompt.len() >= ctx {
            if !req.truncate {
                return Err(EngineError::PromptTooLong {
                    prompt: req.prompt.len(),
                    ctx,
                });
            }
            // Keep the newest tokens, leaving room to answer (a quarter of the context, or
            // num_predict if smaller), and keep a leading BOS.
            let room = (ctx / 4).min(req.num_predict.unwrap_or(usize::MAX)).max(1);
            let keep = ctx - room;
            let bos = self.model.tokenizer.bos_id();
            let head = usize::from(bos.is_some() && req.prompt.first() == bos.as_ref());
            truncated = req.prompt.len() - keep;
            let tail = req.prompt.split_off(req.prompt.len() - (keep - head));
            req.prompt.truncate(head);
            req.prompt.extend(tail);
        }
        // The id lock is held until the request is queued, so ids reach the engine in
        // increasing order, which the scheduler's first-come-first-served order relies on.
        let mut next = match self.next_id.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *next += 1;
        let id = *next;
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let sub = Submitted {
            id,
            req,
            ctx,
            truncated,
            tx,
            cancel: cancel.clone(),
            at,
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(sub).is_ok());
        if !sent {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Stopped);
        }
        drop(next);
        Ok(RequestStream { rx, cancel })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel tells the thread to stop.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Per-sequence state the engine thread keeps beside the scheduler's.
struct Active {
    json: Option<JsonMode>,
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
}

struct Worker {
    model: Arc<Model>,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    cache: Box<dyn KvCache + Send>,
    sched: Scheduler,
    active: HashMap<SeqId, Active>,
    rx: Receiver<Submitted>,
    stats: Arc<Mutex<EngineStats>>,
    /// Submitted requests not yet scheduled once (shared with [`Engine::queued`]).
    pending: Arc<AtomicUsize>,
    /// Every token's text, built on the first JSON-mode request.
    token_texts: Option<Arc<Vec<Box<[u8]>>>>,
    load_duration: Option<Duration>,
}

impl Worker {
    fn run(mut self) {
        loop {
            if !self.intake() {
                break;
            }
            self.drop_cancelled();
            let step = self.sched.schedule();
            if step.batch.is_empty() {
                self.publish_stats();
                if !self.sched.is_idle() {
                    // Nothing runnable (cannot happen with a consistent pool): wait a bit
                    // rather than spin.
                    std::thread::sleep(Duration::from_millis(5));
                }
                continue;
            }
            self.run_step(step);
            self.publish_stats();
        }
        // Shutting down: tell everyone still here.
        let ids: Vec<SeqId> = self.active.keys().copied().collect();
        for id in ids {
            self.finish(id, FinishReason::Cancelled, None);
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
        let json = sub
            .req
            .json
            .then(|| JsonMode::new(self.token_texts(), self.eos.clone()));
        let active = Active {
            json,
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
        };
        self.active.insert(sub.id, active);
        self.sched.add(Sequence::new(sub.id, sub.req.prompt));
        if limit == 0 {
            self.finish(sub.id, FinishReason::Length, None);
        }
    }

    fn token_texts(&mut self) -> Arc<Vec<Box<[u8]>>> {
        let tok = &self.tokenizer;
        self.token_texts
            .get_or_insert_with(|| {
                let n = tok.vocab_size() as u32;
                // Special tokens decode to nothing here, which JSON mode never allows.
                let texts = (0..n)
                    .map(|id| {
                        tok.decode(&[id], true)
                            .unwrap_or_default()
                            .into_bytes()
                            .into()
                    })
                    .collect();
                Arc::new(texts)
            })
            .clone()
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
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        let rows = self
            .model
            .decoder
            .forward(&step.batch, self.cache.as_mut())
            .and_then(|l| Ok(l.to_vec2::<f32>()?));
        let rows = match rows {
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
        for s in &step.scheduled {
            let Some(row) = s.logits_row.and_then(|r| rows.get(r)) else {
                continue;
            };
            self.on_logits(s.id, row);
        }
    }

    /// Samples a sequence's next token and streams it.
    fn on_logits(&mut self, id: SeqId, row: &[f32]) {
        let (Some(seq), Some(a)) = (self.sched.get(id), self.active.get_mut(&id)) else {
            return;
        };
        let tok = match &mut a.json {
            Some(j) => {
                let tok = a.sampler.sample(&j.mask(row), &seq.tokens);
                j.advance(tok);
                tok
            }
            None => a.sampler.sample(row, &seq.tokens),
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
            if a.tx.send(Event::Token { id: tok, text }).is_err() {
                outcome = Some((FinishReason::Cancelled, None));
            }
            if outcome.is_none() && a.generated >= a.limit {
                outcome = Some((FinishReason::Length, None));
            }
            outcome
        };
        match outcome {
            Some((reason, error)) => self.finish(id, reason, error),
            None => self.sched.append_token(id, tok),
        }
    }

    /// Ends a sequence: flushes held-back text, sends the summary, frees its blocks.
    fn finish(&mut self, id: SeqId, mut reason: FinishReason, error: Option<String>) {
        let seq = self.sched.remove(id);
        let Some(mut a) = self.active.remove(&id) else {
            return;
        };
        if a.admitted.is_none() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
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
            running: self.sched.num_running(),
            prompt_tokens_computed: c.prompt_tokens_computed,
            tokens_computed: c.tokens_computed,
            preemptions: c.preemptions,
            steps: c.steps,
        };
        match self.stats.lock() {
            Ok(mut s) => *s = snapshot,
            Err(p) => *p.into_inner() = snapshot,
        }
    }
}
