//! Prefill and decode speed on the real test models (CPU), one sequence and a batch of 16
//! decoding together, reported by criterion as tokens per second. Compare with llama.cpp
//! on the same files and thread count in the same run: `scripts/bench-model.sh` runs both.
//!
//! `cargo bench --bench model` (models from `scripts/fetch-test-models.sh`; threads from
//! WICK_NUM_THREADS, default the CPUs this process may use).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::Device;
use candlewick::model::{Batch, CpuKvCache, KvCache, Model};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BLOCK: usize = 16;
const PREFILL: usize = 128;
/// Decode steps run at context lengths PREFILL..PREFILL+DECODE_WINDOW, then start over.
const DECODE_WINDOW: usize = 128;
/// Sequences in the batched decode step (the serving benchmark's concurrency 16).
const BATCH: usize = 16;

fn model_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("WICK_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/candlewick/test-models")
        });
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-test-models.sh",
        p.display()
    );
    p
}

fn prompt(model: &Model) -> Vec<u32> {
    let text = "The old lighthouse keeper climbed the spiral stairs every evening, counting the \
                steps as his father had taught him, and at the top he wiped the salt from the \
                great lens before lighting the lamp. Ships passed in the night, and none of them \
                knew his name, yet each of them trusted the light. ";
    let mut ids = Vec::new();
    while ids.len() < PREFILL {
        ids.extend(model.tokenizer.encode(text, false).expect("encode"));
    }
    ids.truncate(PREFILL);
    ids
}

fn bench_model(c: &mut Criterion, label: &str, file: &str) {
    let model = Model::load(&model_path(file), &Device::Cpu).expect("load model");
    let ids = prompt(&model);
    let blocks = (PREFILL + DECODE_WINDOW + 1).div_ceil(BLOCK);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut cache = CpuKvCache::new(model.config(), blocks, BLOCK);
    let prefill = |cache: &mut CpuKvCache| {
        let mut b = Batch::default();
        b.push_seq(&ids, 0, table[..PREFILL.div_ceil(BLOCK)].to_vec(), true);
        model
            .decoder
            .forward(&b, cache as &mut dyn KvCache)
            .expect("prefill");
    };

    let mut g = c.benchmark_group(label);
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(PREFILL as u64));
    g.bench_function("prefill_128", |b| b.iter(|| prefill(&mut cache)));

    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_token", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut pos = PREFILL + DECODE_WINDOW;
            let mut tok = ids[0];
            for _ in 0..iters {
                if pos == PREFILL + DECODE_WINDOW {
                    prefill(&mut cache);
                    pos = PREFILL;
                }
                let mut batch = Batch::default();
                batch.push_seq(
                    &[tok],
                    pos,
                    table[..(pos + 1).div_ceil(BLOCK)].to_vec(),
                    true,
                );
                let t = Instant::now();
                let logits = model
                    .decoder
                    .forward(&batch, &mut cache as &mut dyn KvCache)
                    .expect("decode");
                let row: Vec<f32> = logits.squeeze(0).and_then(|r| r.to_vec1()).expect("logits");
                spent += t.elapsed();
                tok = row
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |a, (i, &v)| if v > a.1 { (i, v) } else { a },
                    )
                    .0 as u32;
                pos += 1;
            }
            spent
        })
    });

    // Continuous batching's decode step: BATCH sequences (each its own blocks, its own
    // prompt-long context) decode one token each in one forward.
    let batch_table = |s: usize, upto: usize| -> Vec<u32> {
        let per = blocks as u32;
        (0..upto.div_ceil(BLOCK) as u32)
            .map(|b| s as u32 * per + b)
            .collect()
    };
    let mut batch_cache = CpuKvCache::new(model.config(), BATCH * blocks, BLOCK);
    let prefill_all = |cache: &mut CpuKvCache| {
        let mut b = Batch::default();
        for s in 0..BATCH {
            b.push_seq(&ids, 0, batch_table(s, PREFILL), true);
        }
        model
            .decoder
            .forward(&b, cache as &mut dyn KvCache)
            .expect("prefill");
    };
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(format!("decode_batch_{BATCH}"), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            let mut pos = PREFILL + DECODE_WINDOW;
            for _ in 0..iters {
                if pos == PREFILL + DECODE_WINDOW {
                    prefill_all(&mut batch_cache);
                    pos = PREFILL;
                }
                let mut batch = Batch::default();
                for (s, &tok) in ids.iter().take(BATCH).enumerate() {
                    batch.push_seq(&[tok], pos, batch_table(s, pos + 1), true);
                }
                let t = Instant::now();
                let logits = model
                    .decoder
                    .forward(&batch, &mut batch_cache as &mut dyn KvCache)
                    .expect("decode");
                let _rows: Vec<Vec<f32>> = logits.to_vec2().expect("logits");
                spent += t.elapsed();
                pos += 1;
            }
            spent
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_model(c, "smollm2-135m-q4_1", "SmolLM2-135M-Instruct.Q4_1.gguf");
    bench_model(
        c,
        "qwen2.5-coder-0.5b-q4_k_m",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    );
    bench_model(c, "gemma-3-270m-q4_k_m", "gemma-3-270m-q4_k_m.gguf");
}

criterion_group!(model, benches);
criterion_main!(model);
