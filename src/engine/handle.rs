//! The handle of one model's serving engine: [`Engine::start`] sizes the KV cache and starts
//! the engine thread ([`super::worker`]), or for an embedding model the encoder's thread
//! ([`super::encoder`], no KV cache); [`Engine::submit`] checks a request, fits it to the
//! context and queues it, the same for both. Dropping the engine stops the thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::model::{AnyModel, Embedder, KvType, Model};

use super::block_manager::BlockManager;
use super::constraint::{Constraint, Grammar, GrammarError, Grammars};
use super::encoder::EncoderWorker;
use super::kv_budget::{block_bytes, default_cache_bytes, new_cache};
use super::scheduler::{Scheduler, SchedulerConfig, SeqId};
use super::speculative::{DraftModel, Drafter, DEFAULT_MODEL_DRAFT};
use super::worker::Worker;
use super::{EngineError, Event, Request, RequestStream};

/// The most alternatives a token's logprobs may list (OpenAI's and Ollama's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The most draft tokens a step may guess per sequence (`num_draft`).
pub const MAX_DRAFT: usize = 32;

/// Tokens per forward step unless `WICK_MAX_BATCH_TOKENS` says otherwise.
pub const DEFAULT_STEP_TOKENS: usize = 512;

/// Rows a step with draft tokens has at most; within it the scheduler drafts as far as the
/// step times it measured say drafts pay (`benches/speculative.rs` prints the curve).
const SPEC_MAX_ROWS: usize = 32;

/// Engine settings; [`EngineConfig::from_config`] takes the server's.
#[derive(Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Exact number of KV blocks; overrides the byte budget (tests use it).
    pub num_blocks: Option<usize>,
    /// KV cache budget in bytes (`WICK_KV_CACHE_BYTES`).
    pub kv_cache_bytes: Option<usize>,
    /// The CPU KV cache's element type (`OLLAMA_KV_CACHE_TYPE`; the GPU cache is f16).
    pub kv_type: KvType,
    /// Without a byte budget: this fraction of the memory available now.
    pub kv_memory_fraction: f64,
    /// Tokens per forward step (decode tokens plus prefill chunks).
    pub max_tokens_per_step: usize,
    /// Running sequences at most (`OLLAMA_NUM_PARALLEL`); `None`: as many as memory allows.
    pub max_running: Option<usize>,
    /// Context length for requests that do not set `num_ctx`.
    pub default_num_ctx: usize,
    /// Requests submitted and not yet running before `submit` answers
    /// [`EngineError::Busy`] (`OLLAMA_MAX_QUEUE`).
    pub max_queue: usize,
    /// How long loading the model took, reported once (on the first request) as Ollama's
    /// `load_duration`.
    pub load_duration: Duration,
    /// Draft tokens per step for requests that do not set `num_draft` (`WICK_NUM_DRAFT`;
    /// 0: no speculative decoding).
    pub num_draft: usize,
    /// Steps get draft tokens while they have fewer rows than this (see the scheduler).
    pub spec_max_rows: usize,
    /// A model with the same tokenizer that drafts instead of prompt lookup.
    pub draft: Option<DraftModel>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: None,
            kv_cache_bytes: None,
            kv_type: KvType::F16,
            kv_memory_fraction: 0.3,
            max_tokens_per_step: DEFAULT_STEP_TOKENS,
            max_running: None,
            default_num_ctx: 4096,
            max_queue: usize::MAX,
            load_duration: Duration::ZERO,
            num_draft: 0,
            spec_max_rows: SPEC_MAX_ROWS,
            draft: None,
        }
    }
}

impl EngineConfig {
    /// The defaults with the server's settings (`WICK_KV_CACHE_BYTES`,
    /// `OLLAMA_NUM_PARALLEL`, `OLLAMA_CONTEXT_LENGTH`, `WICK_MAX_BATCH_TOKENS`) applied.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            kv_cache_bytes: cfg.kv_cache_bytes,
            kv_type: cfg.kv_type,
            max_running: cfg.num_parallel,
            default_num_ctx: cfg.context_length,
            max_queue: cfg.max_queue,
            num_draft: cfg.num_draft,
            max_tokens_per_step: cfg.max_batch_tokens,
            ..Self::default()
        }
    }
}

/// The KV cache's size and why it is that size (for `/api/ps` and the start-up log). On the
/// CPU this is an upper bound: memory is touched only as blocks are first used, and used
/// blocks are reused before new ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvBudget {
    pub bytes: usize,
    pub tokens: usize,
    /// The element type, as `OLLAMA_KV_CACHE_TYPE` spells it.
    pub kv_type: &'static str,
    pub why: String,
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
    /// Of the waiting, those preempted after they ran (recomputed when they run again).
    pub requeued: usize,
    pub running: usize,
    pub prompt_tokens_computed: u64,
    pub tokens_computed: u64,
    pub preemptions: u64,
    pub steps: u64,
    /// Speculative decoding: draft tokens put into steps, and those the sampler accepted.
    pub drafted: u64,
    pub accepted: u64,
    /// Times a step panicked and the engine recovered (its sequences failed).
    pub restarts: u64,
}

/// What the handle and the engine thread share.
pub(super) struct Shared {
    /// The thread's last published state.
    pub stats: Mutex<EngineStats>,
    /// Submitted requests not yet scheduled once ([`Engine::queued`]).
    pub pending: AtomicUsize,
    /// Set by [`Engine::inject_fault`]: the next step panics.
    pub fault: AtomicBool,
}

/// A checked request on its way to the engine thread.
pub(super) struct Submitted {
    pub id: SeqId,
    pub req: Request,
    /// Tokens of context this sequence may fill.
    pub ctx: usize,
    pub truncated: usize,
    pub tx: Sender<Event>,
    pub cancel: Arc<AtomicBool>,
    pub at: Instant,
}

/// The serving engine of one model. Dropping it cancels what is in flight and stops the
/// thread.
pub struct Engine {
    tx: Option<Sender<Submitted>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    next_id: Mutex<SeqId>,
    model: AnyModel,
    capacity: usize,
    default_num_ctx: usize,
    max_queue: usize,
    /// Draft tokens per step for requests that do not set `num_draft`.
    num_draft: usize,
    /// The draft model's name, when one drafts.
    draft_name: Option<String>,
    budget: KvBudget,
    /// The grammar compiler, built on the first structured-output request.
    grammars: OnceLock<Result<Arc<Grammars>, GrammarError>>,
}

impl Engine {
    /// Starts the engine `model` needs: a decoder's with its KV cache, or an encoder's.
    pub fn start_any(model: AnyModel, cfg: EngineConfig) -> Result<Engine, EngineError> {
        match model {
            AnyModel::Generator(m) => Self::start(m, cfg),
            AnyModel::Embedder(e) => Self::start_embedder(e, cfg),
        }
    }

    /// Starts an embedding model's engine: the same queue and checks as a decoder's, and a
    /// thread that batches whole inputs through the encoder (`encoder`). Nothing
    /// is kept between steps, so there is no KV cache (`/api/ps` shows none).
    pub fn start_embedder(model: Arc<Embedder>, cfg: EngineConfig) -> Result<Engine, EngineError> {
        let shared = Arc::new(Shared {
            stats: Mutex::new(EngineStats::default()),
            pending: AtomicUsize::new(0),
            fault: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let worker = EncoderWorker::new(
            model.clone(),
            rx,
            shared.clone(),
            // No decode steps wait behind an encoder's batch, so it may be larger than a
            // decoder's step: bigger matmuls, and 8 full 512-token inputs at once.
            cfg.max_tokens_per_step.saturating_mul(8),
            cfg.load_duration,
        );
        let thread = std::thread::Builder::new()
            .name("wick-encoder".into())
            .spawn(move || worker.run())
            .map_err(EngineError::Spawn)?;
        let capacity = model.max_positions();
        Ok(Engine {
            tx: Some(tx),
            thread: Some(thread),
            shared,
            next_id: Mutex::new(0),
            model: AnyModel::Embedder(model),
            capacity,
            default_num_ctx: cfg.default_num_ctx,
            max_queue: cfg.max_queue,
            num_draft: cfg.num_draft,
            draft_name: None,
            grammars: OnceLock::new(),
            budget: KvBudget {
                bytes: 0,
                tokens: 0,
                kv_type: "none",
                why: "an encoder keeps no KV cache".into(),
            },
        })
    }

    /// Sizes the KV cache, allocates it once and starts the engine thread.
    pub fn start(model: Arc<Model>, cfg: EngineConfig) -> Result<Engine, EngineError> {
        let block_size = cfg.block_size.max(1);
        let per_block = block_bytes(&model, block_size, cfg.kv_type);
        let (num_blocks, why) = match cfg.num_blocks {
            Some(n) => (n, "a fixed number of blocks".to_string()),
            None => {
                let (bytes, why) = match cfg.kv_cache_bytes {
                    Some(b) => (b, "WICK_KV_CACHE_BYTES".to_string()),
                    None => default_cache_bytes(&model, cfg.kv_memory_fraction),
                };
                // No point in more blocks than the longest context times a generous number
                // of sequences; the rest of memory is better left to the system.
                let cap = model.config().max_position_embeddings.div_ceil(block_size) * 64;
                if bytes / per_block > cap {
                    (cap, format!("{why}, capped at 64 full contexts"))
                } else {
                    (bytes / per_block, why)
                }
            }
        };
        if num_blocks == 0 {
            return Err(EngineError::CacheTooSmall {
                bytes: cfg.kv_cache_bytes.unwrap_or(0),
                block_bytes: per_block,
            });
        }
        let (cache, kv_type) = new_cache(&model, num_blocks, block_size, cfg.kv_type)?;
        let budget = KvBudget {
            bytes: num_blocks * per_block,
            tokens: num_blocks * block_size,
            kv_type,
            why,
        };
        tracing::info!(
            num_blocks,
            block_size,
            bytes = budget.bytes,
            why = %budget.why,
            "KV cache sized; blocks are touched as they are first used"
        );
        let shared = Arc::new(Shared {
            stats: Mutex::new(EngineStats {
                total_blocks: num_blocks,
                free_blocks: num_blocks,
                block_size,
                ..EngineStats::default()
            }),
            pending: AtomicUsize::new(0),
            fault: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let sched = Scheduler::new(
            SchedulerConfig {
                max_tokens_per_step: cfg.max_tokens_per_step,
                max_running: cfg.max_running,
                spec_max_rows: cfg.spec_max_rows,
            },
            BlockManager::new(num_blocks, block_size),
        );
        // The draft's cache holds as many tokens as the model's.
        let drafter = match &cfg.draft {
            Some(d) => Some(Drafter::new(
                d.model.clone(),
                &model,
                num_blocks,
                block_size,
                cfg.kv_type,
            )?),
            None => None,
        };
        let num_draft = match (&cfg.draft, cfg.num_draft) {
            (Some(_), 0) => DEFAULT_MODEL_DRAFT,
            (_, n) => n,
        };
        let worker = Worker::new(
            model.clone(),
            cache,
            sched,
            drafter,
            rx,
            shared.clone(),
            cfg.load_duration,
        );
        let thread = std::thread::Builder::new()
            .name("wick-engine".into())
            .spawn(move || worker.run())
            .map_err(EngineError::Spawn)?;
        Ok(Engine {
            tx: Some(tx),
            thread: Some(thread),
            shared,
            next_id: Mutex::new(0),
            model: AnyModel::Generator(model),
            capacity: num_blocks * block_size,
            default_num_ctx: cfg.default_num_ctx,
            max_queue: cfg.max_queue,
            num_draft,
            draft_name: cfg.draft.map(|d| d.name),
            budget,
            grammars: OnceLock::new(),
        })
    }

    pub fn model(&self) -> &AnyModel {
        &self.model
    }

    /// Draft tokens per step for requests that do not set `num_draft` (0: off).
    pub fn num_draft(&self) -> usize {
        self.num_draft
    }

    /// The draft model's name, when a draft model guesses (prompt lookup otherwise).
    pub fn draft_model(&self) -> Option<&str> {
        self.draft_name.as_deref()
    }

    /// The KV cache's size and why.
    pub fn kv_budget(&self) -> &KvBudget {
        &self.budget
    }

    /// Tokens the whole KV cache holds.
    pub fn capacity_tokens(&self) -> usize {
        self.capacity
    }

    /// Requests submitted and not yet started, counted at once (the stats lag a step).
    pub fn queued(&self) -> usize {
        self.shared.pending.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> EngineStats {
        match self.shared.stats.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Compiles a structured-output grammar for this model's vocabulary, for
    /// [`Request::constraint`]. Blocking: the first call builds the vocabulary trie (a
    /// fraction of a second), and a large schema takes milliseconds to compile.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, EngineError> {
        let AnyModel::Generator(model) = &self.model else {
            return Err(EngineError::EmbeddingOnly);
        };
        let grammars = self.grammars.get_or_init(|| {
            Grammars::new(&model.tokenizer, model.config().vocab_size).map(Arc::new)
        });
        match grammars {
            Ok(g) => Ok(g.compile(grammar)?),
            Err(e) => Err(e.clone().into()),
        }
    }

    /// Makes the engine thread's next step panic, as a bug in a kernel would: for tests of
    /// the recovery (the step's sequences fail with an error, later requests are served).
    #[doc(hidden)]
    pub fn inject_fault(&self) {
        self.shared.fault.store(true, Ordering::Release);
    }

    /// Whether the engine thread is still running (it stops only when the engine is
    /// dropped, or on a panic outside the recovered step).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Checks and queues a request; its events arrive on the returned stream.
    pub fn submit(&self, req: Request) -> Result<RequestStream, EngineError> {
        let mut streams = self.submit_all(vec![req])?;
        streams.pop().ok_or(EngineError::Stopped)
    }

    /// Checks and queues several requests that together take one place in the queue (the
    /// inputs of one embedding request); nothing is queued unless all of them pass.
    pub fn submit_all(&self, reqs: Vec<Request>) -> Result<Vec<RequestStream>, EngineError> {
        let at = Instant::now();
        let checked = reqs
            .into_iter()
            .map(|r| self.fit(r))
            .collect::<Result<Vec<_>, _>>()?;
        let n = checked.len();
        // The id lock is held until the requests are queued, so ids reach the engine in
        // increasing order, which the scheduler's first-come-first-served order relies on.
        let mut next = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
        // Checking the queue and taking places in it is one step, so a burst cannot
        // overshoot `max_queue`.
        let max = self.max_queue;
        if self
            .shared
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p < max).then_some(p + n)
            })
            .is_err()
        {
            return Err(EngineError::Busy);
        }
        let mut streams = Vec::with_capacity(n);
        for (req, ctx, truncated) in checked {
            *next += 1;
            let (tx, rx) = mpsc::channel();
            let cancel = Arc::new(AtomicBool::new(false));
            let sub = Submitted {
                id: *next,
                req,
                ctx,
                truncated,
                tx,
                cancel: cancel.clone(),
                at,
            };
            if self.tx.as_ref().is_none_or(|tx| tx.send(sub).is_err()) {
                // The thread is gone: nothing more will be taken from the queue.
                self.shared
                    .pending
                    .fetch_sub(n - streams.len(), Ordering::AcqRel);
                return Err(EngineError::Stopped);
            }
            streams.push(RequestStream::new(rx, cancel));
        }
        Ok(streams)
    }

    /// Checks a request and fits its prompt to its context: the request, the context it
    /// may fill, and how many prompt tokens were cut.
    fn fit(&self, req: Request) -> Result<(Request, usize, usize), EngineError> {
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        match &self.model {
            AnyModel::Generator(m) => self.fit_decoder(m, req),
            AnyModel::Embedder(e) => self.fit_encoder(e, req),
        }
    }

    /// An encoder only embeds; its input keeps its first tokens and closing `[SEP]`.
    fn fit_encoder(
        &self,
        model: &Embedder,
        mut req: Request,
    ) -> Result<(Request, usize, usize), EngineError> {
        if !req.embed {
            return Err(EngineError::EmbeddingOnly);
        }
        let vocab = model.vocab_size();
        if let Some(&id) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadToken { id, vocab });
        }
        let ctx = req
            .num_ctx
            .unwrap_or(self.default_num_ctx)
            .min(self.capacity)
            .max(2);
        if req.prompt.len() > ctx && !req.truncate {
            return Err(EngineError::PromptTooLong {
                prompt: req.prompt.len(),
                ctx,
            });
        }
        let truncated = model.fit(&mut req.prompt, ctx);
        Ok((req, ctx, truncated))
    }

    fn fit_decoder(
        &self,
        model: &Model,
        mut req: Request,
    ) -> Result<(Request, usize, usize), EngineError> {
        req.sampling.validate()?;
        if let Some(asked) = req.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(EngineError::TooManyLogprobs {
                asked,
                max: MAX_TOP_LOGPROBS,
            });
        }
        match req.num_draft {
            Some(asked) if asked > MAX_DRAFT => {
                return Err(EngineError::TooManyDrafts {
                    asked,
                    max: MAX_DRAFT,
                })
            }
            Some(_) => {}
            None => req.num_draft = Some(self.num_draft),
        }
        let vocab = model.config().vocab_size;
        if let Some(&id) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadToken { id, vocab });
        }
        place_images(
            &mut req,
            model.config().hidden_size,
            model.config().num_layers,
        )?;
        // A sequence can never outgrow the cache, so the oldest one always fits alone; a
        // prompt longer than the cache is therefore cut like one longer than `num_ctx`.
        let ctx = req
            .num_ctx
            .unwrap_or(self.default_num_ctx)
            .min(model.config().max_position_embeddings)
            .min(self.capacity)
            .max(2);
        // A generation needs room to answer; an embedding does not.
        let fits = if req.embed {
            req.prompt.len() <= ctx
        } else {
            req.prompt.len() < ctx
        };
        if fits {
            return Ok((req, ctx, 0));
        }
        if !req.truncate || !req.images.is_empty() {
            // Cutting a prompt's front could cut an image in half: with images it is refused.
            return Err(EngineError::PromptTooLong {
                prompt: req.prompt.len(),
                ctx,
            });
        }
        let truncated;
        if req.embed {
            // An embedding keeps its first tokens, as Ollama does.
            truncated = req.prompt.len() - ctx;
            req.prompt.truncate(ctx);
        } else {
            // Keep the newest tokens, leaving room to answer (a quarter of the context, or
            // num_predict if smaller), and keep a leading BOS.
            let room = (ctx / 4).min(req.num_predict.unwrap_or(usize::MAX)).max(1);
            let keep = ctx - room;
            let bos = model.tokenizer.bos_id();
            let head = usize::from(bos.is_some() && req.prompt.first() == bos.as_ref());
            truncated = req.prompt.len() - keep;
            let tail = req.prompt.split_off(req.prompt.len() - (keep - head));
            req.prompt.truncate(head);
            req.prompt.extend(tail);
        }
        Ok((req, ctx, truncated))
    }
}

/// Checks a request's images against its prompt (in order, inside it, apart, `hidden`
/// wide or a multiple of it with a DeepStack feature for each of the first `layers`) and
/// writes their placeholder ids into the prompt.
fn place_images(req: &mut Request, hidden: usize, layers: usize) -> Result<(), EngineError> {
    let mut end = 0;
    for img in &req.images {
        let r = img.range();
        let width = img.embeds.dims().get(1).copied().unwrap_or(0);
        let parts = width / hidden.max(1);
        let fits = width == parts * hidden && (1..=layers + 1).contains(&parts);
        if img.is_empty() || r.start < end || r.end > req.prompt.len() || !fits {
            return Err(EngineError::BadImage(format!(
                "image embeddings {:?} at {} do not fit a prompt of {} tokens and width {hidden}",
                img.embeds.dims(),
                img.start,
                req.prompt.len()
            )));
        }
        for (i, t) in r.clone().enumerate() {
            req.prompt[t] = img.placeholder(i);
        }
        end = r.end;
    }
    Ok(())
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
