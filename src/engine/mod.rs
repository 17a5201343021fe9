//! Serving: sequences, sampling, stop sequences and incremental detokenization.
//! Knows token ids and text, never HTTP.

pub mod detok;
pub mod generate;
pub mod sampler;
