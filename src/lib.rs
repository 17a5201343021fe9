//! candlewick: an Ollama-compatible LLM inference server on candle.
//!
//! The crate is split the way a request flows (ARCHITECTURE.md at the repository root maps
//! it): [`api`] is the HTTP edge (Ollama and OpenAI dialects), [`engine`] owns loaded models,
//! sequences, KV blocks and sampling, [`model`] does the math and knows tensors, [`store`] is
//! the Ollama-layout model directory, and [`config`] holds every setting. The binary `wick`
//! wires them to a command line.

pub mod api;
pub mod config;
pub mod engine;
pub mod model;
pub mod store;
