//! candlewick: an Ollama-compatible LLM inference server on candle.
//!
//! The crate is split the way a request flows (see ARCHITECTURE in the project docs):
//! `model` does the math and knows tensors, `engine` owns sequences, sampling and
//! detokenization, and the binary `wick` wires them to a command line.

pub mod engine;
pub mod model;
