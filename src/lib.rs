//! candlewick: an Ollama-compatible LLM inference server on candle.
//!
//! The crate is split the way a request flows (see ARCHITECTURE in the project docs):
//! `model` does the math and knows tensors, `engine` owns sequences, sampling and
//! detokenization, `store` is the Ollama-layout model directory, `api` is the HTTP edge
//! (Ollama and OpenAI dialects), `config` holds every setting, and the binary `wick` wires
//! them to a command line.

pub mod api;
pub mod config;
pub mod engine;
pub mod model;
pub mod store;
