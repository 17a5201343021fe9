//! Structured output under load: aggregate output tokens/s of N concurrent greedy requests
//! with a JSON schema against the same load without one, in one run and on one engine, so
//! the ratio is what the constraint costs (the mask of each constrained sequence is
//! computed while the step's forward pass runs). Also: one constrained request among free
//! ones, and the time one mask takes on its own.
//!
//! `cargo bench --profile dev --bench structured [-- MODEL_FILE ...]` (defaults: both test
//! models; `WICK_BENCH_TOKENS` output tokens per request, default 48; `WICK_BENCH_ROUNDS`
//! alternating rounds, default 3; `WICK_BENCH_CONCURRENCY`, default 8).

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use candlewick::engine::{Engine, EngineConfig, Event, Grammar, Request};
use candlewick::model::Model;
use serde_json::json;

use common::{chat_prompt, env_usize, median, model_files, models_dir};

mod common;

/// A schema no answer of a few dozen tokens completes, so every request generates exactly
/// the same number of tokens with and without it: a list of at least 200 short notes.
fn schema() -> Grammar {
    Grammar::JsonSchema(json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "notes": {"type": "array", "minItems": 200,
                      "items": {"type": "object", "properties": {
                          "text": {"type": "string", "maxLength": 30},
                          "priority": {"type": "integer", "minimum": 1, "maximum": 5}},
                          "required": ["text", "priority"], "additionalProperties": false}}
        },
        "required": ["title", "notes"],
        "additionalProperties": false
    }))
}

fn prompt(model: &Model, i: usize) -> Vec<u32> {
    let ask = format!("Write notes about topic {i} as JSON: a title and a list of notes.");
    chat_prompt(model, &[json!({"role": "user", "content": ask})])
}

/// Runs `c` requests at once, the first `constrained` of them with the schema; returns the
/// aggregate output tokens/s and the tokens/s of the free ones alone.
fn run(engine: &Engine, model: &Model, c: usize, constrained: usize, n: usize) -> (f64, f64) {
    let start = Instant::now();
    let counts: Vec<(bool, usize, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..c)
            .map(|i| {
                let mut req = Request::new(prompt(model, i));
                req.num_predict = Some(n);
                let with = i < constrained;
                if with {
                    req.constraint = Some(engine.compile(&schema()).expect("schema compiles"));
                }
                s.spawn(move || {
                    let stream = engine.submit(req).expect("submit");
                    let mut tokens = 0;
                    for ev in stream {
                        match ev {
                            Event::Token { .. } => tokens += 1,
                            Event::Done(d) => {
                                assert!(d.error.is_none(), "{:?}", d.error);
                                break;
                            }
                            _ => {}
                        }
                    }
                    (with, tokens, start.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    for (with, tokens, _) in &counts {
        assert_eq!(
            *tokens, n,
            "constrained {with}: every request runs to num_predict"
        );
    }
    let total: usize = counts.iter().map(|c| c.1).sum();
    let free: Vec<&(bool, usize, f64)> = counts.iter().filter(|c| !c.0).collect();
    let free_rate = if free.is_empty() {
        f64::NAN
    } else {
        let t = free.iter().map(|c| c.2).fold(0.0, f64::max);
        free.iter().map(|c| c.1).sum::<usize>() as f64 / t
    };
    (total as f64 / wall, free_rate)
}

/// Time of one mask on its own: a fresh constraint walked along a valid answer.
fn mask_micros(engine: &Engine, model: &Model) -> (f64, f64) {
    let answer = r#"{"title": "Shopping", "notes": [{"text": "buy milk", "priority": 2}, {"text": "call the bank", "priority": 5}, {"text": "fix the bike", "priority": 1}"#;
    let ids = model.tokenizer.encode(answer, false).expect("encode");
    let vocab = model.config().vocab_size;
    let mut c = engine.compile(&schema()).expect("schema compiles");
    let mut times = Vec::new();
    let mut row = vec![0.0f32; vocab];
    for id in ids {
        let t = Instant::now();
        c.prepare();
        times.push(t.elapsed().as_secs_f64() * 1e6);
        row.fill(0.0);
        c.apply(&mut row).expect("mask");
        assert!(
            row[id as usize].is_finite(),
            "the answer follows the schema"
        );
        c.commit(id).expect("commit");
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    (median(times), mean)
}

fn bench_model(file: &str) {
    let path = models_dir().join(file);
    assert!(path.is_file(), "{} is missing", path.display());
    let model = Arc::new(Model::load(&path, &Device::Cpu).expect("load"));
    let n = env_usize("WICK_BENCH_TOKENS", 48);
    let rounds = env_usize("WICK_BENCH_ROUNDS", 3);
    let c = env_usize("WICK_BENCH_CONCURRENCY", 8);
    let engine = Engine::start(model.clone(), EngineConfig::default()).expect("engine");
    // Warm up: the vocabulary trie is built once per model, outside the timings.
    let t = Instant::now();
    engine.compile(&schema()).expect("schema compiles");
    let first_compile = t.elapsed();
    let t = Instant::now();
    engine.compile(&schema()).expect("schema compiles");
    let compile = t.elapsed();
    run(&engine, &model, 2, 1, 4);
    let (mut free, mut with, mut one, mut one_free) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        free.push(run(&engine, &model, c, 0, n).0);
        with.push(run(&engine, &model, c, c, n).0);
        let (agg, others) = run(&engine, &model, c, 1, n);
        one.push(agg);
        one_free.push(others);
    }
    let (free, with, one, one_free) = (median(free), median(with), median(one), median(one_free));
    let (p50, mean) = mask_micros(&engine, &model);
    println!(
        "\n{file}: concurrency {c}, {n} output tokens per request, greedy, median of {rounds}"
    );
    println!("| load | aggregate tok/s | vs free |");
    println!("|---|---:|---:|");
    println!("| free | {free:.1} | 1.00 |");
    println!(
        "| all {c} with the schema | {with:.1} | {:.2} |",
        with / free
    );
    println!(
        "| 1 with the schema, {} free | {one:.1} (free ones: {one_free:.1}) | {:.2} |",
        c - 1,
        one / free
    );
    println!(
        "trie + first compile {:.0} ms, compile {:.1} ms; one mask p50 {p50:.0} us, mean {mean:.0} us",
        first_compile.as_secs_f64() * 1e3,
        compile.as_secs_f64() * 1e3
    );
}

fn main() {
    let files = model_files(&[
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ]);
    for f in files {
        bench_model(&f);
    }
}
