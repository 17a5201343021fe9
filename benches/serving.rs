//! Serving load benchmark: N concurrent streaming requests (fixed prompts, fixed output
//! length, greedy); prints aggregate output tokens/s, time to first token and inter-token
//! latency (p50/p95) per concurrency, and the time to first token of a conversation's
//! second turn against its first.
//!
//! In process, through the batching engine:
//! `cargo bench --bench serving [-- MODEL_FILE [CONCURRENCY ...]]`
//! (defaults: both test models, concurrency 1 8 32; `WICK_BENCH_TOKENS` output tokens, 32).
//!
//! Over HTTP against any OpenAI-compatible server (`wick serve`, llama.cpp's `llama-server`),
//! streaming `/v1/chat/completions` with the same prompts: set `WICK_BENCH_URL` (e.g.
//! `http://127.0.0.1:8080`) and `WICK_BENCH_MODEL` (the served model name);
//! `scripts/bench-serving.sh` runs both servers on the same GGUF in one run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use candlewick::engine::{Engine, EngineConfig, Event, Request};
use candlewick::model::Model;
use common::{chat_prompt, models_dir};

mod common;

const PROMPTS: &[&str] = &[
    "Write a short poem about the sea.",
    "Explain what a hash map is.",
    "List five fruits and their colors.",
    "Describe a sunrise over the mountains.",
    "What are the rules of chess, briefly?",
    "Tell me about the history of bread.",
    "How do airplanes stay in the air?",
    "Give three tips for learning a language.",
];

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct Run {
    /// The reply, which a chat client sends back in the next turn.
    text: String,
    tokens: usize,
    ttft: Duration,
    gaps: Vec<Duration>,
}

/// Arrival times of one request's streamed pieces, from when it was sent.
struct Arrivals {
    start: Instant,
    last: Instant,
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    count: usize,
}

impl Arrivals {
    fn start() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            ttft: None,
            gaps: Vec::new(),
            count: 0,
        }
    }

    fn arrived(&mut self) {
        let now = Instant::now();
        match self.ttft {
            None => self.ttft = Some(now - self.start),
            Some(_) => self.gaps.push(now - self.last),
        }
        self.last = now;
        self.count += 1;
    }

    /// The run, with `tokens` as the server counted them, else one per piece.
    fn run(self, text: String, tokens: Option<usize>) -> Run {
        Run {
            text,
            tokens: tokens.unwrap_or(self.count),
            ttft: self.ttft.unwrap_or_default(),
            gaps: self.gaps,
        }
    }
}

/// Streams one request to its end, timing each token's arrival.
fn drive(engine: &Engine, prompt: Vec<u32>, n: usize) -> Run {
    let mut req = Request::new(prompt);
    req.num_predict = Some(n);
    let mut clock = Arrivals::start();
    let stream = engine.submit(req).expect("submit");
    let mut text = String::new();
    for ev in stream {
        match ev {
            Event::Token { .. } => clock.arrived(),
            Event::Text(t) => text.push_str(&t),
            Event::Embedding(_) => {}
            Event::Done(_) => break,
        }
    }
    clock.run(text, None)
}

fn bench_model(file: &str, levels: &[usize], out_tokens: usize) {
    let path = models_dir().join(file);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-test-models.sh",
        path.display()
    );
    let model = Arc::new(Model::load(&path, &Device::Cpu).expect("load"));
    println!("\n{file}: {out_tokens} output tokens per request, greedy, no stop");
    println!(
        "| concurrency | aggregate tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for &c in levels {
        // A fresh engine per level, so no level reuses another's cached prefixes.
        let engine = Engine::start(model.clone(), EngineConfig::default()).expect("engine");
        let prompts: Vec<Vec<u32>> = (0..c)
            .map(|i| {
                // Distinct prompts: the index makes every one unique beyond the shared template.
                let q = format!("{} (request {i})", PROMPTS[i % PROMPTS.len()]);
                chat_prompt(&model, &[serde_json::json!({"role": "user", "content": q})])
            })
            .collect();
        let start = Instant::now();
        let runs: Vec<Run> = std::thread::scope(|s| {
            let handles: Vec<_> = prompts
                .into_iter()
                .map(|p| {
                    let engine = &engine;
                    s.spawn(move || drive(engine, p, out_tokens))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client"))
                .collect()
        });
        report(c, &runs, start.elapsed().as_secs_f64());
    }

    // A conversation's second turn resends the first turn: its prefix should come from cache.
    let engine = Engine::start(model.clone(), EngineConfig::default()).expect("engine");
    let first = first_turn();
    let turn1 = drive(&engine, chat_prompt(&model, &first), TURN_TOKENS);
    let turn2 = drive(
        &engine,
        chat_prompt(&model, &second_turn(&first, &turn1)),
        8,
    );
    report_turns(&turn1, &turn2);
}

/// A chat front end's agent prompt is typically a few hundred tokens (this is about 300).
const SYSTEM: &str = "You are a helpful assistant who answers in detail, with examples, and \
                      always stays polite and precise. ";
const TURN_TOKENS: usize = 64;

/// The first turn of a conversation: system prompt and a question.
fn first_turn() -> Vec<serde_json::Value> {
    vec![
        serde_json::json!({"role": "system", "content": SYSTEM.repeat(16)}),
        serde_json::json!({"role": "user", "content": "Tell me about the history of bread."}),
    ]
}

/// The second turn as a chat client sends it: the whole first turn, the model's own reply,
/// and a follow-up question.
fn second_turn(first: &[serde_json::Value], reply: &Run) -> Vec<serde_json::Value> {
    let mut second = first.to_vec();
    second.push(serde_json::json!({"role": "assistant", "content": reply.text}));
    second.push(serde_json::json!({"role": "user", "content": "And in Egypt?"}));
    second
}

/// One table row: aggregate output tokens/s over `wall` seconds, TTFT and ITL percentiles.
fn report(c: usize, runs: &[Run], wall: f64) {
    let total: usize = runs.iter().map(|r| r.tokens).sum();
    let mut ttft: Vec<f64> = runs.iter().map(|r| r.ttft.as_secs_f64() * 1e3).collect();
    let mut itl: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.gaps.iter().map(|g| g.as_secs_f64() * 1e3))
        .collect();
    println!(
        "| {c} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} |",
        total as f64 / wall,
        percentile(&mut ttft, 0.5),
        percentile(&mut ttft, 0.95),
        percentile(&mut itl, 0.5),
        percentile(&mut itl, 0.95)
    );
}

fn report_turns(turn1: &Run, turn2: &Run) {
    println!(
        "second turn TTFT {:.0} ms vs first turn {:.0} ms ({:.0}%)",
        turn2.ttft.as_secs_f64() * 1e3,
        turn1.ttft.as_secs_f64() * 1e3,
        100.0 * turn2.ttft.as_secs_f64() / turn1.ttft.as_secs_f64()
    );
}

/// Streams one chat over HTTP to its end, timing each content chunk's arrival.
async fn drive_http(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    messages: &[serde_json::Value],
    n: usize,
) -> Run {
    use futures_util::StreamExt;
    let body = serde_json::json!({
        "model": model, "messages": messages, "stream": true, "max_tokens": n,
        "temperature": 0, "stream_options": {"include_usage": true},
    });
    let mut clock = Arrivals::start();
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("request to {url}: {e}"));
    assert!(resp.status().is_success(), "HTTP {}", resp.status());
    let (mut buf, mut text, mut usage) = (Vec::new(), String::new(), None);
    let mut body = resp.bytes_stream();
    while let Some(bytes) = body.next().await {
        buf.extend_from_slice(&bytes.expect("stream"));
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let Some(data) = line.strip_prefix(b"data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
                continue;
            };
            if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(u as usize);
            }
            let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            text.push_str(content);
            if !content.is_empty() {
                clock.arrived();
            }
        }
    }
    clock.run(text, usage)
}

/// The same workload as [`bench_model`], over HTTP.
fn bench_http(url: &str, model: &str, levels: &[usize], out_tokens: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // A fresh connection per request: servers close idle keep-alive connections at will,
    // and a request on a just-closed one would fail.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    // Servers that load the model on first use (Ollama, wick) should not have it counted.
    rt.block_on(async {
        let hi = [serde_json::json!({"role": "user", "content": "Hi"})];
        drive_http(&client, url, model, &hi, 1).await
    });
    println!("\n{model} at {url}: {out_tokens} output tokens per request, greedy");
    println!(
        "| concurrency | aggregate tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for (round, &c) in levels.iter().enumerate() {
        let start = Instant::now();
        let runs: Vec<Run> = rt.block_on(async {
            let tasks: Vec<_> = (0..c)
                .map(|i| {
                    // Unique per level too: no level reuses another's cached prompts.
                    let q = format!(
                        "{} (request {i}, round {round})",
                        PROMPTS[i % PROMPTS.len()]
                    );
                    let (client, url, model) = (client.clone(), url.to_string(), model.to_string());
                    tokio::spawn(async move {
                        let msgs = [serde_json::json!({"role": "user", "content": q})];
                        drive_http(&client, &url, &model, &msgs, out_tokens).await
                    })
                })
                .collect();
            let mut runs = Vec::new();
            for t in tasks {
                runs.push(t.await.expect("client"));
            }
            runs
        });
        report(c, &runs, start.elapsed().as_secs_f64());
    }
    let first = first_turn();
    let (turn1, turn2) = rt.block_on(async {
        let t1 = drive_http(&client, url, model, &first, TURN_TOKENS).await;
        let second = second_turn(&first, &t1);
        (t1, drive_http(&client, url, model, &second, 8).await)
    });
    report_turns(&turn1, &turn2);
}

fn main() {
    // `cargo bench` passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let out_tokens = std::env::var("WICK_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    // Model files, then concurrency levels (numbers).
    let (levels, files): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| a.parse::<usize>().is_ok());
    let mut levels: Vec<usize> = levels.iter().filter_map(|l| l.parse().ok()).collect();
    if levels.is_empty() {
        levels = vec![1, 8, 32];
    }
    if let Ok(url) = std::env::var("WICK_BENCH_URL") {
        let model = std::env::var("WICK_BENCH_MODEL").unwrap_or_else(|_| "bench".into());
        bench_http(url.trim_end_matches('/'), &model, &levels, out_tokens);
        return;
    }
    let files: Vec<String> = if files.is_empty() {
        vec![
            "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf".into(),
        ]
    } else {
        files.into_iter().cloned().collect()
    };
    for f in files {
        bench_model(&f, &levels, out_tokens);
    }
}
