//! What the HTTP layer costs: the same concurrent streaming workload (fixed distinct chat
//! prompts, greedy, fixed output length) run in process through the engine, then through a
//! loopback `wick serve` (in this process) via `/api/chat` (NDJSON) and
//! `/v1/chat/completions` (SSE). Prints aggregate output tokens/s and TTFT p50 per path and
//! the ratio to in-process. Each cell is the best of `WICK_BENCH_ROUNDS` rounds (default 2),
//! run interleaved, because this machine's timings swing with its neighbours.
//!
//! `cargo bench --profile dev --bench http_overhead [-- CONCURRENCY ...]` (default 1 8;
//! `WICK_BENCH_TOKENS` output tokens, default 32). Uses SmolLM2 from the test models.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use candlewick::config::Config;
use candlewick::engine::{Engine, EngineConfig, Event, Request};
use candlewick::model::Model;
use futures_util::StreamExt;
use serde_json::{json, Value};

mod common;

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const NAME: &str = "smollm2:135m";

fn models_dir() -> PathBuf {
    std::env::var_os("WICK_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/candlewick/test-models")
        })
}

fn question(i: usize) -> String {
    format!("Write a short paragraph about the number {i}.")
}

/// One request's result: output tokens and time to first token.
type Run = (usize, Duration);

/// (aggregate tok/s, TTFT p50 ms)
fn summarize(runs: &[Run], wall: Duration) -> (f64, f64) {
    let tokens: usize = runs.iter().map(|r| r.0).sum();
    let mut ttft: Vec<f64> = runs.iter().map(|r| r.1.as_secs_f64() * 1e3).collect();
    ttft.sort_by(f64::total_cmp);
    (tokens as f64 / wall.as_secs_f64(), ttft[ttft.len() / 2])
}

fn in_process(engine: &Engine, model: &Model, c: usize, n: usize) -> (f64, f64) {
    let prompts: Vec<Vec<u32>> = (0..c)
        .map(|i| {
            let msgs = [json!({"role": "user", "content": question(i)})];
            let text = model
                .chat_template
                .as_ref()
                .expect("chat template")
                .render(&msgs, None, true, &serde_json::Map::new())
                .expect("render");
            model.tokenizer.encode(&text, false).expect("encode")
        })
        .collect();
    let start = Instant::now();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .into_iter()
            .map(|p| {
                s.spawn(move || {
                    let mut req = Request::new(p);
                    req.num_predict = Some(n);
                    let t0 = Instant::now();
                    let mut first = None;
                    let mut tokens = 0;
                    for ev in engine.submit(req).expect("submit") {
                        match ev {
                            Event::Token { .. } => {
                                first.get_or_insert_with(|| t0.elapsed());
                                tokens += 1;
                            }
                            Event::Text(_) | Event::Embedding(_) => {}
                            Event::Done(_) => break,
                        }
                    }
                    (tokens, first.unwrap_or_default())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    summarize(&runs, start.elapsed())
}

/// One streamed request over HTTP; counts tokens from the server's own totals.
async fn http_one(client: &reqwest::Client, base: &str, openai: bool, i: usize, n: usize) -> Run {
    let msgs = json!([{"role": "user", "content": question(i)}]);
    let (path, body) = if openai {
        (
            "/v1/chat/completions",
            json!({"model": NAME, "messages": msgs, "stream": true, "temperature": 0,
                   "max_tokens": n, "stream_options": {"include_usage": true}}),
        )
    } else {
        (
            "/api/chat",
            json!({"model": NAME, "messages": msgs,
                   "options": {"temperature": 0, "num_predict": n}}),
        )
    };
    let t0 = Instant::now();
    let resp = client
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .expect("request");
    let mut stream = resp.bytes_stream();
    let (mut first, mut tokens, mut buf) = (None, 0, String::new());
    while let Some(chunk) = stream.next().await {
        first.get_or_insert_with(|| t0.elapsed());
        buf.push_str(std::str::from_utf8(&chunk.expect("chunk")).expect("utf-8"));
    }
    for line in buf.lines() {
        let line = line.strip_prefix("data: ").unwrap_or(line);
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let Some(t) = v["eval_count"].as_u64() {
            tokens = t as usize;
        }
        if let Some(t) = v["usage"]["completion_tokens"].as_u64() {
            tokens = t as usize;
        }
    }
    (tokens, first.unwrap_or_default())
}

async fn over_http(base: &str, openai: bool, c: usize, n: usize) -> (f64, f64) {
    let client = reqwest::Client::new();
    let start = Instant::now();
    let runs =
        futures_util::future::join_all((0..c).map(|i| http_one(&client, base, openai, i, n))).await;
    summarize(&runs, start.elapsed())
}

fn main() {
    let levels: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let levels = if levels.is_empty() {
        vec![1, 8]
    } else {
        levels
    };
    let n = std::env::var("WICK_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let rounds = std::env::var("WICK_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize);
    let gguf = models_dir().join(MODEL_FILE);
    assert!(
        gguf.is_file(),
        "{} is missing: run scripts/fetch-test-models.sh",
        gguf.display()
    );

    // Both paths get the same KV cache size and engine settings.
    std::env::set_var("WICK_KV_CACHE_BYTES", (256usize << 20).to_string());
    let model = Arc::new(Model::load(&gguf, &Device::Cpu).expect("load"));
    let engine = Engine::start(
        model.clone(),
        EngineConfig::from_config(&Config::from_env().expect("settings")),
    )
    .expect("engine");

    let store = std::env::temp_dir().join(format!("wick-http-bench-{}", std::process::id()));
    let (rt, base) = common::serve_gguf(&store, NAME, &gguf);
    // Load the model before timing anything.
    rt.block_on(over_http(&base, false, 1, 1));

    println!("SmolLM2-135M Q4_1, {n} output tokens per request, greedy; best of {rounds} rounds");
    println!("| concurrency | path | tok/s | vs in-process | TTFT p50 ms |");
    println!("|---:|---|---:|---:|---:|");
    for &c in &levels {
        let mut best = [(0.0f64, f64::INFINITY); 3];
        for _ in 0..rounds {
            let results = [
                in_process(&engine, &model, c, n),
                rt.block_on(over_http(&base, false, c, n)),
                rt.block_on(over_http(&base, true, c, n)),
            ];
            for (b, r) in best.iter_mut().zip(results) {
                *b = (b.0.max(r.0), b.1.min(r.1));
            }
        }
        for (i, path) in ["in process", "/api/chat", "/v1/chat/completions"]
            .iter()
            .enumerate()
        {
            println!(
                "| {c} | {path} | {:.1} | {:.2}x | {:.0} |",
                best[i].0,
                best[i].0 / best[0].0,
                best[i].1
            );
        }
    }
    let _ = std::fs::remove_dir_all(&store);
}
