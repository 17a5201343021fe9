//! The KV cache's element types at a long context: a 4k-token prefill and decode steps at a
//! 4k context with f32, f16 (the default) and q8_0 caches, on the real test models, in one
//! run, beside the bytes each cache holds for that context.
//!
//! `cargo bench --bench kv_types [-- MODEL_FILE ...]` (defaults: the test models; the context
//! from WICK_BENCH_CONTEXT, default 4096; threads from WICK_NUM_THREADS).

use std::time::Instant;

use candle_core::Device;
use candlewick::model::{KvType, Model};

use common::{decode_times, env_usize, median, model_files, models_dir, prefilled_as};

mod common;

/// Decode steps timed after the prefill.
const STEPS: usize = 32;

fn main() {
    let files = model_files(&[
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ]);
    let ctx = env_usize("WICK_BENCH_CONTEXT", 4096);
    println!("\n| model | cache | KV MiB at {ctx} | prefill {ctx} tok/s | decode tok/s at {ctx} |");
    println!("|---|---|---:|---:|---:|");
    for f in files {
        let path = models_dir().join(&f);
        assert!(path.is_file(), "{} is missing", path.display());
        let model = Model::load(&path, &Device::Cpu).expect("load");
        let per_token = |ty| model.config().kv_bytes_per_token(ty);
        for ty in [KvType::F32, KvType::F16, KvType::Q8_0] {
            let t = Instant::now();
            let (mut cache, table) = prefilled_as(&model, ctx, STEPS, ty);
            let prefill = ctx as f64 / t.elapsed().as_secs_f64();
            let times = decode_times(&model, &mut cache, &table, ctx, STEPS);
            println!(
                "| {f} | {} | {:.0} | {prefill:.0} | {:.1} |",
                ty.name(),
                (per_token(ty) * ctx) as f64 / (1u64 << 20) as f64,
                1.0 / median(times)
            );
        }
    }
}
