//! How close single-stream decode is to the memory-bandwidth bound: a read-bandwidth probe
//! with the configured threads, the bytes one decode step reads (weights as held in memory,
//! plus the KV cache at the step's context), and the measured decode rate, in one run.
//!
//! `cargo bench --bench decode_bound [-- MODEL_FILE ...]` (defaults: the test models;
//! threads from WICK_NUM_THREADS, default the CPUs this process may use).

use std::time::Instant;

use candle_core::Device;
use candlewick::model::Model;

use common::{decode_times, median, model_files, models_dir, prefilled};

mod common;

/// Decode runs at contexts CONTEXT..CONTEXT+STEPS.
const CONTEXT: usize = 128;
const STEPS: usize = 128;
/// Larger than any last-level cache, so the probe reads memory.
const PROBE_BYTES: usize = 1 << 30;

fn threads() -> usize {
    std::env::var("WICK_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// Sum of a slice in four independent lanes (the compiler vectorises it; the adds are far
/// cheaper than the loads, so memory is the limit).
fn sum(words: &[u64]) -> u64 {
    let mut acc = [0u64; 4];
    for c in words.chunks_exact(4) {
        for (a, &w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(w);
        }
    }
    acc.iter().fold(0, |a, &b| a.wrapping_add(b))
}

/// Best read bandwidth (bytes/s) of `threads` threads each summing its share of 1 GiB.
fn read_bandwidth(threads: usize) -> f64 {
    let words = vec![1u64; PROBE_BYTES / 8];
    let per = words.len().div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..7 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = words.chunks(per).map(|c| s.spawn(move || sum(c))).collect();
            hs.into_iter()
                .map(|h| h.join().expect("probe thread"))
                .sum()
        });
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(total as usize, words.len(), "the probe read every word");
        best = best.max(PROBE_BYTES as f64 / secs);
    }
    best
}

/// Median seconds per decode step over contexts CONTEXT..CONTEXT+STEPS.
fn decode_secs(model: &Model) -> f64 {
    let (mut cache, table) = prefilled(model, CONTEXT, STEPS);
    median(decode_times(model, &mut cache, &table, CONTEXT, STEPS))
}

fn main() {
    let files = model_files(&[
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ]);
    let threads = threads();
    let bw = read_bandwidth(threads);
    println!(
        "\nread bandwidth, {threads} threads: {:.1} GB/s (best of 7 over 1 GiB)",
        bw / 1e9
    );
    println!(
        "| model | weight MB/token | KV MB/token at {} | bound tok/s | decode tok/s | of bound |",
        CONTEXT + STEPS / 2
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for f in files {
        let path = models_dir().join(&f);
        assert!(path.is_file(), "{} is missing", path.display());
        let model = Model::load(&path, &Device::Cpu).expect("load");
        let cfg = model.config();
        let weights = model.decoder.step_weight_bytes();
        // f16 cache; a sliding layer reads at most its window.
        let ctx = CONTEXT + STEPS / 2;
        let kv: usize = (0..cfg.num_layers)
            .map(|l| {
                let span = cfg.layer_window(l).map_or(ctx, |w| w.min(ctx));
                2 * cfg.num_kv_heads * cfg.head_dim * 2 * span
            })
            .sum();
        let bytes = (weights + kv) as f64;
        let bound = bw / bytes;
        let rate = 1.0 / decode_secs(&model);
        println!(
            "| {f} | {:.1} | {:.2} | {bound:.1} | {rate:.1} | {:.0}% |",
            weights as f64 / 1e6,
            kv as f64 / 1e6,
            100.0 * rate / bound
        );
    }
}
