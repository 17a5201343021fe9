//! `/metrics` under the names the Gateway API Inference Extension's model-server protocol
//! and llm-d's router read (vLLM's), checked against the protocol's definitions (gauge
//! types, KV usage as a 0..1 fraction, `cache_config_info`'s labels, cumulative
//! histograms) and against the engine's real state while a concurrent load of streamed
//! requests runs on the real SmolLM2: two running (`OLLAMA_NUM_PARALLEL=2`), the rest
//! queued, KV blocks growing as they decode; and after the load, the histogram counts
//! and token counters against what the clients received.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::api_common::{config, import, ndjson_lines, spawn_server, store_dir};
use candlewick::api::AppState;
use candlewick::engine::EngineStats;
use serde_json::{json, Value};

const MODEL: &str = "smollm2:135m";
const CLIENTS: usize = 5;

/// One scrape: every sample by its full series name (`name{labels}`), and each metric
/// family's `# TYPE`.
struct Scrape {
    samples: HashMap<String, f64>,
    types: HashMap<String, String>,
    text: String,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut samples = HashMap::new();
        let mut types = HashMap::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, ty) = t.split_once(' ').expect("# TYPE name type");
                types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}"));
            assert!(
                samples.insert(series.to_string(), v).is_none(),
                "duplicate {series}"
            );
        }
        Scrape {
            samples,
            types,
            text,
        }
    }

    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{}", self.text))
    }

    /// A histogram's (bucket bound, cumulative count) pairs, checked cumulative, with +Inf
    /// equal to `_count`.
    fn histogram(&self, name: &str) -> (Vec<(f64, f64)>, f64, f64) {
        assert_eq!(self.types.get(name).map(String::as_str), Some("histogram"));
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let b = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((b, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(buckets.len() > 3, "{name} has buckets");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} cumulative"
        );
        let count = self.get(&format!("{name}_count"));
        assert_eq!(
            buckets.last().map(|b| (b.0, b.1)),
            Some((f64::INFINITY, count))
        );
        (buckets, count, self.get(&format!("{name}_sum")))
    }
}

async fn scrape(base: &str) -> Scrape {
    let resp = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    Scrape::parse(resp.text().await.expect("text"))
}

/// The engine's own view: its stats and how many submitted requests have not run yet.
async fn engine_state(state: &AppState) -> (EngineStats, usize) {
    let loaded = state.models.list().await;
    assert_eq!(loaded.len(), 1);
    (loaded[0].engine.stats(), loaded[0].engine.queued())
}

#[tokio::test]
async fn gateway_metrics_follow_the_engine_under_load() {
    let dir = store_dir("metrics");
    import(&dir, MODEL, &common::test_model(common::SMOLLM2_GGUF));
    let (addr, state) = spawn_server(config(
        dir.clone(),
        &[
            ("OLLAMA_NUM_PARALLEL", "2"),
            ("WICK_KV_CACHE_BYTES", &(64usize << 20).to_string()),
        ],
    ));
    let base = format!("http://{addr}");

    // The protocol's families, with their types, before any model is loaded.
    let idle = scrape(&base).await;
    for g in [
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
    ] {
        assert_eq!(idle.types.get(g).map(String::as_str), Some("gauge"), "{g}");
    }
    assert_eq!(idle.get("vllm:num_requests_waiting"), 0.0);
    assert_eq!(idle.get("vllm:kv_cache_usage_perc"), 0.0);
    let (_, ttft0, _) = idle.histogram("vllm:time_to_first_token_seconds");
    let (_, itl0, _) = idle.histogram("vllm:inter_token_latency_seconds");
    let prompt0 = idle.get("vllm:prompt_tokens_total");
    let gen0 = idle.get("vllm:generation_tokens_total");

    // Load the model first, so the load's wait is not part of what follows.
    let warm = reqwest::Client::new()
        .post(format!("{base}/api/generate"))
        .json(&json!({"model": MODEL, "prompt": "Hi", "stream": false, "options": {"num_predict": 1}}))
        .send()
        .await
        .expect("warm-up");
    let warm: Value = warm.json().await.expect("warm-up JSON");
    let warm_tokens = warm["eval_count"].as_f64().unwrap_or(0.0);
    let warm_prompt = warm["prompt_eval_count"].as_f64().unwrap_or(0.0);

    // Five long streamed generations with distinct prompts (no shared prefix blocks).
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let base = base.clone();
        clients.push(tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(format!("{base}/api/generate"))
                .json(&json!({"model": MODEL, "raw": true,
                    "prompt": format!("{i} {i} {i}. List of numbers from {i} upwards: {i}, "),
                    "options": {"num_predict": 160, "temperature": 0, "stop": []}}))
                .send()
                .await
                .expect("generate");
            ndjson_lines(resp).await
        }));
    }

    // While two run and three wait, each scrape must sit between two readings of the
    // engine taken around it (blocks only grow while nothing finishes).
    let start = Instant::now();
    let mut checked = 0;
    while checked < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "never saw 2 running, 3 waiting"
        );
        let (before, q_before) = engine_state(&state).await;
        let s = scrape(&base).await;
        let (after, q_after) = engine_state(&state).await;
        let steady = before.running == 2
            && after.running == 2
            && q_before + before.requeued == 3
            && q_after + after.requeued == 3
            && after.free_blocks <= before.free_blocks;
        if !steady {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert_eq!(s.get("vllm:num_requests_running"), 2.0);
        assert_eq!(s.get("vllm:num_requests_waiting"), 3.0);
        let total = before.total_blocks as f64;
        let used = |e: &EngineStats| (e.total_blocks - e.free_blocks) as f64 / total;
        let kv = s.get("vllm:kv_cache_usage_perc");
        assert!(
            used(&before) <= kv && kv <= used(&after) && kv > 0.0 && kv < 1.0,
            "{} <= {kv} <= {}",
            used(&before),
            used(&after)
        );
        // Each running sequence holds at least its prompt's blocks.
        assert!(kv * total >= 2.0, "{kv}");
        let info = format!(
            "vllm:cache_config_info{{block_size=\"{}\",num_gpu_blocks=\"{}\",enable_prefix_caching=\"True\"}}",
            before.block_size, before.total_blocks
        );
        assert_eq!(s.get(&info), 1.0);
        // The per-model gauges say the same.
        assert_eq!(
            s.get(&format!("wick_running_sequences{{model=\"{MODEL}\"}}")),
            2.0
        );
        checked += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut tokens = 0.0;
    let mut prompt = 0.0;
    let mut with_tokens = 0.0;
    for c in clients {
        let lines = c.await.expect("client");
        let done = lines.last().expect("final line");
        assert_eq!(done["done"], true, "{done}");
        let n = done["eval_count"].as_f64().unwrap_or(0.0);
        tokens += n;
        prompt += done["prompt_eval_count"].as_f64().unwrap_or(0.0);
        if n > 0.0 {
            with_tokens += 1.0;
        }
    }
    assert!(tokens > 100.0, "a real load: {tokens} tokens");

    // Idle again: nothing waits or runs, every block is free (or cached, which is free).
    let s = scrape(&base).await;
    assert_eq!(s.get("vllm:num_requests_waiting"), 0.0);
    assert_eq!(s.get("vllm:num_requests_running"), 0.0);
    assert_eq!(s.get("vllm:kv_cache_usage_perc"), 0.0);
    let (_, ttft, ttft_sum) = s.histogram("vllm:time_to_first_token_seconds");
    let (_, itl, itl_sum) = s.histogram("vllm:inter_token_latency_seconds");
    let warm_first = if warm_tokens > 0.0 { 1.0 } else { 0.0 };
    assert_eq!(
        ttft - ttft0,
        with_tokens + warm_first,
        "one TTFT per request with a token"
    );
    assert_eq!(
        itl - itl0,
        tokens - with_tokens + (warm_tokens - warm_first),
        "one gap per token after each first"
    );
    assert!(ttft_sum > 0.0 && itl_sum > 0.0);
    assert_eq!(
        s.get("vllm:generation_tokens_total") - gen0,
        tokens + warm_tokens
    );
    assert_eq!(
        s.get("vllm:prompt_tokens_total") - prompt0,
        prompt + warm_prompt
    );
    // And the same data under our own name.
    assert_eq!(s.get("wick_time_to_first_token_seconds_count"), ttft);
    let _ = std::fs::remove_dir_all(&dir);
}
