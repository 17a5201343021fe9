//! Serving: sequences, KV blocks, continuous batching, sampling, stop sequences and
//! incremental detokenization, and the set of loaded models. Knows token ids and text, never
//! HTTP.
//!
//! [`manager`] loads models on demand and unloads them (keep-alive, LRU); each loaded model has
//! an [`Engine`] (`handle`) whose thread (`worker`) runs the [`scheduler`]'s steps over
//! the blocks of the [`block_manager`], sized by `kv_budget`. An embedding model's engine
//! has the same handle and queue and its own thread (`encoder`), without KV cache.
//! [`speculative`] guesses draft tokens for speculative decoding, by prompt lookup or with a
//! draft model.

pub mod block_manager;
pub mod constraint;
pub mod detok;
mod encoder;
mod error;
pub mod generate;
mod handle;
mod kv_budget;
pub mod manager;
mod request;
pub mod sampler;
pub mod scheduler;
pub mod speculative;
mod worker;

pub use constraint::{Constraint, Grammar, GrammarError};
pub use error::EngineError;
pub use handle::{
    Engine, EngineConfig, EngineStats, KvBudget, DEFAULT_STEP_TOKENS, MAX_DRAFT, MAX_TOP_LOGPROBS,
};
pub use kv_budget::{available_memory, memory, Memory};
pub use request::{
    Candidate, Event, FinishReason, ImageSpan, Reasoning, Request, RequestStream, Summary,
    TokenLogprobs,
};
