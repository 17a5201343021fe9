//! Sentence-embedding throughput of all-MiniLM-L6-v2 (CPU) on a batch of 32 sentences,
//! reported by criterion as sentences per second: candle-transformers' BertModel called
//! directly on the padded batch (the peer: the same library without our server around it),
//! our `Embedder` (tokens in, pooled and normalised vectors out), and the whole engine path
//! (`Engine::submit_all` of 32 requests, batched by the encoder thread).
//!
//! `cargo bench --bench embed` (the model from `scripts/fetch-test-models.sh`).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use candlewick::engine::{Engine, EngineConfig, Event, Request};
use candlewick::model::Embedder;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BATCH: usize = 32;

fn model_dir() -> PathBuf {
    let dir = std::env::var_os("WICK_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/candlewick/test-models")
        })
        .join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-test-models.sh",
        dir.display()
    );
    dir
}

/// 32 sentences of 8 to 30 words, as a knowledge base's chunks of short paragraphs vary.
fn sentences() -> Vec<String> {
    let words = "the quick brown fox jumps over a lazy dog while interest rates rise and \
                 the lighthouse keeper counts every step of the spiral stairs at night";
    let words: Vec<&str> = words.split_whitespace().collect();
    (0..BATCH)
        .map(|i| {
            let n = 8 + (i * 7) % 23;
            (0..n)
                .map(|j| words[(i + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = model_dir();
    let emb = Arc::new(Embedder::load(&dir, &Device::Cpu).expect("load"));
    let ids: Vec<Vec<u32>> = sentences()
        .iter()
        .map(|s| emb.encode(s).expect("encode"))
        .collect();
    let inputs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();

    let config: Config = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json")).expect("config.json"),
    )
    .expect("BERT config");
    let weights = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu).expect("vb");
    let bert = BertModel::load(vb, &config).expect("BertModel");
    let len = ids.iter().map(Vec::len).max().unwrap_or(0);
    let mut flat = vec![0u32; BATCH * len];
    let mut mask = vec![0f32; BATCH * len];
    for (r, i) in ids.iter().enumerate() {
        flat[r * len..r * len + i.len()].copy_from_slice(i);
        mask[r * len..r * len + i.len()].fill(1.0);
    }
    let t_ids = Tensor::from_vec(flat, (BATCH, len), &Device::Cpu).expect("ids");
    let t_types = t_ids.zeros_like().expect("types");
    let t_mask = Tensor::from_vec(mask, (BATCH, len), &Device::Cpu).expect("mask");

    let engine = Engine::start_embedder(emb.clone(), EngineConfig::default()).expect("engine");

    let mut g = c.benchmark_group("all-MiniLM-L6-v2 batch of 32");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    g.bench_function("candle-transformers BertModel direct", |b| {
        b.iter(|| {
            let states = bert
                .forward(&t_ids, &t_types, Some(&t_mask))
                .expect("forward");
            let m = t_mask.unsqueeze(2).expect("mask");
            let sum = states
                .broadcast_mul(&m)
                .and_then(|s| s.sum(1))
                .expect("sum");
            sum.broadcast_div(&t_mask.sum_keepdim(1).expect("count"))
                .and_then(|v| v.to_vec2::<f32>())
                .expect("pool")
        })
    });
    g.bench_function("wick Embedder::embed", |b| {
        b.iter(|| emb.embed(&inputs).expect("embed"))
    });
    g.bench_function("wick engine (submit_all, encoder thread)", |b| {
        b.iter(|| {
            let reqs = ids.iter().map(|i| Request::embedding(i.clone())).collect();
            let streams = engine.submit_all(reqs).expect("submit");
            let mut n = 0;
            for s in streams {
                for ev in s {
                    if let Event::Embedding(_) = ev {
                        n += 1;
                    }
                }
            }
            assert_eq!(n, BATCH);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
