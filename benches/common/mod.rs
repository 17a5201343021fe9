// Each bench uses part of this module.
#![allow(dead_code)]

//! What the in-process engine benches share: where the test models are and how a chat
//! prompt becomes token ids.

use std::path::{Path, PathBuf};

use candlewick::model::{Batch, CpuKvCache, KvCache, KvType, Model};

/// `WICK_TEST_MODELS`, or where scripts/fetch-test-models.sh puts them.
pub fn models_dir() -> PathBuf {
    std::env::var_os("WICK_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/candlewick/test-models")
        })
}

/// `messages` through the model's chat template, ready for the assistant's turn.
pub fn chat_prompt(model: &Model, messages: &[serde_json::Value]) -> Vec<u32> {
    let text = model
        .chat_template
        .as_ref()
        .expect("chat template")
        .render(messages, None, true, &serde_json::Map::new())
        .expect("render");
    model.tokenizer.encode(&text, false).expect("encode")
}

/// The model files named on the command line (arguments not starting with `--`), or
/// `defaults`.
pub fn model_files(defaults: &[&str]) -> Vec<String> {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if named.is_empty() {
        defaults.iter().map(|f| f.to_string()).collect()
    } else {
        named
    }
}

/// A `usize` setting from the environment, or `default`.
pub fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median (upper middle for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A KV cache of 16-token blocks holding a `ctx`-token context, with room for `more`
/// tokens after it, and its block table: where a decode-step timing starts.
pub fn prefilled(model: &Model, ctx: usize, more: usize) -> (CpuKvCache, Vec<u32>) {
    prefilled_as(model, ctx, more, KvType::F16)
}

/// [`prefilled`] with elements of type `ty`.
pub fn prefilled_as(model: &Model, ctx: usize, more: usize, ty: KvType) -> (CpuKvCache, Vec<u32>) {
    const BLOCK: usize = 16;
    let blocks = (ctx + more).div_ceil(BLOCK);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut cache = CpuKvCache::with_type(model.config(), blocks, BLOCK, ty);
    let mut b = Batch::default();
    b.push_seq(&vec![100; ctx], 0, table.clone(), true);
    model
        .decoder
        .forward(&b, &mut cache as &mut dyn KvCache)
        .expect("prefill");
    (cache, table)
}

/// Seconds of each decode step at contexts `from..from + steps` in `cache` (block table
/// `table`), the logits read back as the engine reads them.
pub fn decode_times(
    model: &Model,
    cache: &mut CpuKvCache,
    table: &[u32],
    from: usize,
    steps: usize,
) -> Vec<f64> {
    batch_decode_times(model, cache, &[table.to_vec()], from, steps)
}

/// [`decode_times`] for a step of one token from each sequence, one block table each.
pub fn batch_decode_times(
    model: &Model,
    cache: &mut CpuKvCache,
    tables: &[Vec<u32>],
    from: usize,
    steps: usize,
) -> Vec<f64> {
    (from..from + steps)
        .map(|pos| {
            let mut b = Batch::default();
            for table in tables {
                b.push_seq(&[101], pos, table.clone(), true);
            }
            let t = std::time::Instant::now();
            let logits = model
                .decoder
                .forward(&b, cache as &mut dyn KvCache)
                .expect("decode");
            let _rows: Vec<Vec<f32>> = logits.to_vec2().expect("logits");
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// A `wick serve` in this process on a loopback port, over a new store at `store` holding
/// `gguf` as `name`: the runtime it runs on and its base URL.
pub fn serve_gguf(store: &Path, name: &str, gguf: &Path) -> (tokio::runtime::Runtime, String) {
    use candlewick::store::{ModelName, Store};
    Store::new(store)
        .import_gguf(&ModelName::parse(name).expect("name"), gguf)
        .expect("import");
    let env = std::collections::HashMap::from([(
        "OLLAMA_MODELS".to_string(),
        store.display().to_string(),
    )]);
    let cfg = candlewick::config::Config::from_lookup(|k| env.get(k).cloned()).expect("config");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let base = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let state = candlewick::api::AppState::new(cfg).expect("state");
        tokio::spawn(candlewick::api::serve(
            listener,
            state,
            std::future::pending(),
        ));
        base
    });
    (rt, base)
}
