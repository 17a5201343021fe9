//! Speculative decoding by prompt lookup, single stream: output tokens/s of the edit task
//! (a 60-line file returned with one method renamed) and of an ordinary chat answer, with
//! and without drafts, alternated in one run on one engine; the outputs must be identical.
//! Also the cost of one decode step by its number of rows, which is what decides how many
//! draft rows a step may carry before it stops being bound by reading the weights.
//!
//! `cargo bench --bench speculative [-- MODEL_FILE ...]` (defaults: both test models;
//! `WICK_BENCH_TOKENS` output tokens, default 400; `WICK_BENCH_ROUNDS`, default 3;
//! `WICK_BENCH_DRAFT` draft tokens, default 8).

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use candlewick::engine::{Engine, EngineConfig, Event, Request};
use candlewick::model::{Batch, KvCache, Model};
use serde_json::json;

use common::{chat_prompt, env_usize, median, model_files, models_dir, prefilled};

mod common;

const FILE: &str = include_str!("../tests/fixtures/speculative/inventory.py");

/// One greedy request: its tokens and its decode rate (tokens after the first, per second
/// after the first).
fn run(engine: &Engine, prompt: &[u32], n: usize, draft: usize) -> (Vec<u32>, f64) {
    let req = Request {
        num_predict: Some(n),
        num_draft: Some(draft),
        ..Request::new(prompt.to_vec())
    };
    let mut ids = Vec::new();
    let mut first = None;
    for ev in engine.submit(req).expect("submit") {
        match ev {
            Event::Token { id, .. } => {
                first.get_or_insert_with(Instant::now);
                ids.push(id);
            }
            Event::Done(d) => {
                assert!(d.error.is_none(), "{:?}", d.error);
                break;
            }
            _ => {}
        }
    }
    let secs = first.map_or(f64::NAN, |f| f.elapsed().as_secs_f64());
    let rate = (ids.len().saturating_sub(1)) as f64 / secs;
    (ids, rate)
}

/// Milliseconds of one decode step of `rows` rows of one sequence at a 512-token context.
fn step_ms(model: &Model, rows: usize) -> f64 {
    let ctx = 512;
    let (mut cache, table) = prefilled(model, ctx, rows);
    let mut times = Vec::new();
    for _ in 0..7 {
        let mut b = Batch::default();
        b.push_seq_rows(&vec![101; rows], ctx, table.clone(), rows);
        let t = Instant::now();
        model
            .decoder
            .forward(&b, &mut cache as &mut dyn KvCache)
            .expect("step");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    median(times)
}

fn bench_model(file: &str) {
    let path = models_dir().join(file);
    assert!(path.is_file(), "{} is missing", path.display());
    let model = Arc::new(Model::load(&path, &Device::Cpu).expect("load"));
    let n = env_usize("WICK_BENCH_TOKENS", 400);
    let rounds = env_usize("WICK_BENCH_ROUNDS", 3);
    let draft = env_usize("WICK_BENCH_DRAFT", 8);
    let engine = Engine::start(model.clone(), EngineConfig::default()).expect("engine");
    let edit = format!(
        "Rename the method `sell` to `sell_items` in this file. Reply with the whole file \
         and nothing else.\n\n```python\n{FILE}```"
    );
    let tasks = [
        (
            "edit a 60-line file",
            chat_prompt(&model, &[json!({"role": "user", "content": edit})]),
        ),
        (
            "chat answer",
            chat_prompt(
                &model,
                &[
                    json!({"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."}),
                ],
            ),
        ),
    ];
    println!(
        "\n{file}: single stream, greedy, up to {n} tokens, num_draft {draft}, median of {rounds}"
    );
    println!("| task | tokens | plain tok/s | speculative tok/s | speedup | drafted | accepted |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    run(&engine, &tasks[1].1, 8, draft);
    for (label, prompt) in &tasks {
        let (mut plain, mut spec) = (vec![], vec![]);
        let before = engine.stats();
        let mut tokens = 0;
        for _ in 0..rounds {
            let (a, ra) = run(&engine, prompt, n, 0);
            let (b, rb) = run(&engine, prompt, n, draft);
            assert_eq!(a, b, "{label}: speculation changed the output");
            tokens = a.len();
            plain.push(ra);
            spec.push(rb);
        }
        let after = engine.stats();
        let (p, s) = (median(plain), median(spec));
        println!(
            "| {label} | {tokens} | {p:.1} | {s:.1} | {:.2}x | {} | {} |",
            s / p,
            (after.drafted - before.drafted) / rounds as u64,
            (after.accepted - before.accepted) / rounds as u64
        );
    }
    let one = step_ms(&model, 1);
    print!("decode step by rows (ms, x one row):");
    for rows in [1, 2, 4, 8, 9, 16, 24, 32, 48] {
        let ms = step_ms(&model, rows);
        print!(" {rows}: {ms:.1} ({:.2}x)", ms / one);
    }
    println!();
}

fn main() {
    let files = model_files(&[
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ]);
    for f in files {
        bench_model(&f);
    }
}
