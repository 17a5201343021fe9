//! Serving: sequences, KV blocks, continuous batching, sampling, stop sequences and
//! incremental detokenization. Knows token ids and text, never HTTP.

pub mod block_manager;
pub mod detok;
pub mod generate;
pub mod json_mode;
pub mod runtime;
pub mod sampler;
pub mod scheduler;

pub use runtime::{
    available_memory, Engine, EngineConfig, EngineError, EngineStats, Event, FinishReason, Request,
    RequestStream, Summary,
};
