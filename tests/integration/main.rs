//! The integration tests, one module per subject, built as one test binary: each binary
//! links the whole crate and its dependencies, and the shared helpers (`common`,
//! `api_common`, `engine_common`) and their generic code compile once here instead of once
//! per subject. `cargo test --test integration <module>` runs one subject. The CUDA kernel
//! tests (`tests/kernels.rs`, `tests/gpu_selfcheck.rs`) stay their own binaries: the GPU
//! machine's scripts build and run them alone.
//!
//! Tests here share one process: settings go through each server's own `Config`, never the
//! process environment.

mod api_common;
mod common;
mod engine_common;

mod api_browser;
mod api_clients;
mod api_early_headers;
mod api_edge;
mod api_http;
mod api_js;
mod api_metrics;
mod api_ready;
mod api_structured;
mod api_tools;
mod bert_embed;
mod chat_template;
mod deploy_manifests;
mod engine_batching;
mod engine_memory;
mod fixtures_selftest;
mod fleet;
mod gemma3;
mod hardening;
mod hf_pull;
mod kv_budget;
mod load_errors;
mod model_reference;
mod portable_cpu;
mod real_answers;
mod speculative;
mod store_cli;
mod store_hardening;
mod store_pull;
mod store_readonly;
mod structured_grammar;
mod tokenizer;
mod vision;
mod vision_qwen;
