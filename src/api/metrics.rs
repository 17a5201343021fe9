//! `/metrics` in Prometheus' text format: requests by route and status, tokens in and out,
//! time-to-first-token and inter-token histograms, and, read at scrape time from the
//! engines, queue depth, running sequences, KV blocks used and free, and loaded models.
//!
//! Beside our own `wick_*` names, the same state under the names the Gateway API Inference
//! Extension's model-server protocol and llm-d's router read by default (vLLM's, so a wick
//! pod needs no engine mapping): `vllm:num_requests_waiting` (TotalQueuedRequests),
//! `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (KVCacheUtilization, 0..1),
//! `vllm:cache_config_info{block_size,num_gpu_blocks}`, and the
//! `vllm:time_to_first_token_seconds` / `vllm:inter_token_latency_seconds` histograms, plus
//! `vllm:prompt_tokens_total` / `vllm:generation_tokens_total`. These describe the whole
//! process (one series each, no per-model label: a router takes one series per pod, and a
//! counter's labels must not change as models load and unload); per-model detail is in the
//! `wick_*` gauges.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;

/// A histogram over fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.write_series(out, name);
    }

    fn write_series(&self, out: &mut String, name: &str) {
        let mut total = 0;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => b.to_string(),
                None => "+Inf".into(),
            };
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {total}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const ITL_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// The server's counters.
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub rejected_busy: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    /// Requests waiting for their model to load (queued, as a router sees it).
    pub waiting_for_load: AtomicUsize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            rejected_busy: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BOUNDS),
            inter_token: Histogram::new(ITL_BOUNDS),
            waiting_for_load: AtomicUsize::new(0),
        }
    }
}

/// Counts a request as waiting for its model's load while it lives.
pub struct LoadWait<'a>(&'a Metrics);

impl Drop for LoadWait<'_> {
    fn drop(&mut self) {
        self.0.waiting_for_load.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Metrics {
    /// Marks a request waiting for a model to load until the guard drops.
    pub fn waiting_for_load(&self) -> LoadWait<'_> {
        self.waiting_for_load.fetch_add(1, Ordering::AcqRel);
        LoadWait(self)
    }

    /// Counts a finished request under its route pattern (not the raw path, so model ids
    /// in `/v1/models/{id}` do not make new series).
    pub fn request(&self, route: &str, status: StatusCode) {
        let mut map = match self.requests.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        *map.entry((route.to_string(), status.as_u16())).or_default() += 1;
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP wick_requests_total HTTP requests by route and status.\n# TYPE wick_requests_total counter"
        );
        let map = match self.requests.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        };
        for ((route, status), n) in map {
            let route = route.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(
                out,
                "wick_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let counters = [
            (
                "wick_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                &self.prompt_tokens,
            ),
            (
                "wick_generated_tokens_total",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "wick_rejected_busy_total",
                "Requests refused because the queue was full.",
                &self.rejected_busy,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        self.ttft.write(
            out,
            "wick_time_to_first_token_seconds",
            "From submission to the first generated token.",
        );
        self.inter_token.write(
            out,
            "wick_inter_token_seconds",
            "Between consecutive generated tokens of one request.",
        );
    }
}

/// What the vLLM-named series report, summed over the loaded models' engines.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct FleetState {
    /// Submitted and not yet running (never started, or preempted), plus requests
    /// waiting for their model to load.
    pub waiting: usize,
    pub running: usize,
    pub used_blocks: usize,
    pub total_blocks: usize,
    pub block_size: usize,
}

impl FleetState {
    /// The fraction of KV blocks in use (0 with no model loaded).
    pub fn kv_usage(&self) -> f64 {
        if self.total_blocks == 0 {
            0.0
        } else {
            self.used_blocks as f64 / self.total_blocks as f64
        }
    }
}

impl Metrics {
    /// The vLLM-named series (see the module doc).
    fn render_vllm(&self, out: &mut String, s: &FleetState) {
        let gauges = [
            (
                "vllm:num_requests_waiting",
                "Requests waiting to be processed (queued, preempted, or waiting for their model to load).",
                s.waiting.to_string(),
            ),
            (
                "vllm:num_requests_running",
                "Requests in the running batch.",
                s.running.to_string(),
            ),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage: the fraction of KV blocks in use, 1 means 100 percent.",
                s.kv_usage().to_string(),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP vllm:cache_config_info Information of the KV cache: tokens per block and blocks in all.\n\
             # TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{block_size=\"{}\",num_gpu_blocks=\"{}\",enable_prefix_caching=\"True\"}} 1",
            s.block_size, s.total_blocks
        );
        for (name, help, v) in [
            (
                "vllm:prompt_tokens_total",
                "Prompt tokens of finished requests.",
                &self.prompt_tokens,
            ),
            (
                "vllm:generation_tokens_total",
                "Generated tokens.",
                &self.generated_tokens,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        self.ttft.write(
            out,
            "vllm:time_to_first_token_seconds",
            "Time to first token: from submission to the engine to the first generated token.",
        );
        self.inter_token.write(
            out,
            "vllm:inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
        );
    }
}

fn gauge(out: &mut String, name: &str, help: &str, rows: &[(String, usize)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, v) in rows {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// `wick_gpu_path`, when a GPU self-check ran: 1 on the path GPU models serve on.
fn gpu_path_gauge(out: &mut String, path: Option<crate::model::selfcheck::GpuPath>) {
    use crate::model::selfcheck::GpuPath;
    let Some(path) = path else { return };
    let rows: Vec<(String, usize)> = [GpuPath::Kernels, GpuPath::Reference]
        .into_iter()
        .map(|p| (format!("{{path=\"{p}\"}}"), usize::from(p == path)))
        .collect();
    gauge(
        out,
        "wick_gpu_path",
        "1 for the path GPU models serve on: our kernels, or candle's reference ops when the \
         boot self-check found the kernels wrong.",
        &rows,
    );
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = String::new();
    state.metrics.render(&mut out);
    let loaded = state.models.list().await;
    let mut rows: [Vec<(String, usize)>; 5] = Default::default();
    let mut fleet = FleetState {
        waiting: state.metrics.waiting_for_load.load(Ordering::Acquire),
        block_size: crate::engine::EngineConfig::default().block_size,
        ..FleetState::default()
    };
    for l in &loaded {
        let s = l.engine.stats();
        fleet.waiting += l.engine.queued() + s.requeued;
        fleet.running += s.running;
        fleet.used_blocks += s.total_blocks - s.free_blocks;
        fleet.total_blocks += s.total_blocks;
        fleet.block_size = s.block_size;
        let label = format!(
            "{{model=\"{}\"}}",
            l.info.name.display_short().replace('"', "")
        );
        let values = [
            l.engine.queued(),
            s.running,
            s.total_blocks - s.free_blocks,
            s.free_blocks,
            s.cached_blocks,
        ];
        for (row, v) in rows.iter_mut().zip(values) {
            row.push((label.clone(), v));
        }
    }
    let [waiting, running, used, free, cached] = rows;
    gauge(
        &mut out,
        "wick_queue_depth",
        "Requests waiting for the engine.",
        &waiting,
    );
    gauge(
        &mut out,
        "wick_running_sequences",
        "Sequences being generated.",
        &running,
    );
    gauge(
        &mut out,
        "wick_kv_blocks_used",
        "KV cache blocks in use.",
        &used,
    );
    gauge(
        &mut out,
        "wick_kv_blocks_free",
        "KV cache blocks free.",
        &free,
    );
    gauge(
        &mut out,
        "wick_kv_blocks_cached",
        "Free KV blocks holding reusable prefixes.",
        &cached,
    );
    gauge(
        &mut out,
        "wick_loaded_models",
        "Models loaded.",
        &[(String::new(), loaded.len())],
    );
    state.metrics.render_vllm(&mut out, &fleet);
    gpu_path_gauge(&mut out, crate::model::selfcheck::status().map(|c| c.path));
    let mut resp = (StatusCode::OK, out).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_path_gauge_marks_the_serving_path() {
        use crate::model::selfcheck::GpuPath;
        let mut out = String::new();
        gpu_path_gauge(&mut out, None);
        assert!(out.is_empty(), "no self-check, no gauge");
        gpu_path_gauge(&mut out, Some(GpuPath::Reference));
        assert!(out.contains("# TYPE wick_gpu_path gauge"), "{out}");
        assert!(out.contains("wick_gpu_path{path=\"kernels\"} 0"), "{out}");
        assert!(out.contains("wick_gpu_path{path=\"reference\"} 1"), "{out}");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let mut out = String::new();
        h.write(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum 5.55\nx_count 3\n"), "{out}");
    }
}
