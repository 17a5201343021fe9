//! How close single-stream decode is to the memory-bandwidth bound: a read-bandwidth probe
//! with the configured threads, the bytes one decode step reads (weights as held in memory,
//! plus the KV cache at the step's context), and the measured decode rate, in one run:
//! per model, rounds of a probe then a decode run, so a neighbour's memory traffic weighs
//! on both sides of each ratio.
//!
//! And how close a batched decode step (16 sequences, one token each: continuous batching
//! at concurrency 16) is to the int8 multiply bound, where batching makes decode
//! compute-bound: a probe of the instruction our x86 tile kernel multiplies with on this
//! CPU (VNNI's `vpdpbusd`, else AVX2's `vpmaddubsw` with the `vpaddw` that accumulates
//! it), the products one token needs (every projection and the output head; attention
//! left out), and the measured rate. With AMX, 16 rows run on its tiles instead, which the
//! probe does not measure.
//!
//! `cargo bench --bench decode_bound [-- MODEL_FILE ...]` (defaults: the test models;
//! threads from WICK_NUM_THREADS, default the CPUs this process may use).

use std::time::Instant;

use candle_core::Device;
use candlewick::model::{Batch, CpuKvCache, HugeBytes, KvCache, Model};

use common::{batch_decode_times, decode_times, median, model_files, models_dir, prefilled};

mod common;

/// Decode runs at contexts CONTEXT..CONTEXT+STEPS.
const CONTEXT: usize = 128;
const STEPS: usize = 128;
/// Larger than any last-level cache, so the probe reads memory.
const PROBE_BYTES: usize = 1 << 30;
/// Probe-then-decode rounds per model (odd: the median is one round's).
const ROUNDS: usize = 3;

fn threads() -> usize {
    std::env::var("WICK_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// Sum of the little-endian u64 words of a slice in four independent lanes (the compiler
/// vectorises it; the adds are far cheaper than the loads, so memory is the limit).
fn sum(bytes: &[u8]) -> u64 {
    let mut acc = [0u64; 4];
    for c in bytes.chunks_exact(32) {
        for (a, w) in acc.iter_mut().zip(c.chunks_exact(8)) {
            *a = a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
    }
    acc.iter().fold(0, |a, &b| a.wrapping_add(b))
}

/// Best read bandwidth (bytes/s) of `threads` threads each summing its share of 1 GiB, held
/// as the weights are (on huge pages where the OS gives them).
fn read_bandwidth(threads: usize) -> f64 {
    let mut bytes = HugeBytes::zeroed(PROBE_BYTES);
    for w in bytes.chunks_exact_mut(8) {
        w[0] = 1;
    }
    let per = (PROBE_BYTES / 8).div_ceil(threads) * 8;
    let mut best = 0.0f64;
    for _ in 0..7 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = bytes.chunks(per).map(|c| s.spawn(move || sum(c))).collect();
            hs.into_iter()
                .map(|h| h.join().expect("probe thread"))
                .sum()
        });
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(total as usize, PROBE_BYTES / 8, "the probe read every word");
        best = best.max(PROBE_BYTES as f64 / secs);
    }
    best
}

/// Sequences in the batched decode step.
const BATCH: usize = 16;
/// Batched decode steps timed (at contexts CONTEXT..CONTEXT+BATCH_STEPS).
const BATCH_STEPS: usize = 24;

/// Best int8 product rate (products/s) of `threads` threads, each running the instruction
/// our tile kernel multiplies with on this CPU on eight independent accumulators, and that
/// instruction's name; `None` off x86 or without AVX2.
fn int8_rate(threads: usize) -> Option<(f64, &'static str)> {
    #[cfg(target_arch = "x86_64")]
    {
        use x86::Probe;
        let probe = if is_x86_feature_detected!("avxvnni") {
            Probe::AvxVnni
        } else if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
            Probe::Avx512Vnni
        } else if is_x86_feature_detected!("avx2") {
            Probe::Avx2
        } else {
            return None;
        };
        const ITERS: usize = 20_000_000;
        let mut best = 0.0f64;
        for _ in 0..5 {
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| std::hint::black_box(x86::run(probe, ITERS)));
                }
            });
            // Each iteration: 8 instructions of 32 byte products.
            best = best.max((threads * ITERS * 8 * 32) as f64 / t.elapsed().as_secs_f64());
        }
        Some((best, probe.name()))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub enum Probe {
        AvxVnni,
        Avx512Vnni,
        Avx2,
    }

    impl Probe {
        pub fn name(self) -> &'static str {
            match self {
                Probe::AvxVnni => "AVX-VNNI vpdpbusd",
                Probe::Avx512Vnni => "AVX-512 VNNI vpdpbusd (256-bit)",
                Probe::Avx2 => "AVX2 vpmaddubsw + vpaddw",
            }
        }
    }

    /// Sum of the accumulators after `iters` rounds (kept so the work is not dropped).
    pub fn run(probe: Probe, iters: usize) -> i32 {
        // SAFETY: `int8_rate` picked the probe from the CPU's detected features.
        unsafe {
            match probe {
                Probe::AvxVnni => vnni(iters),
                Probe::Avx512Vnni => vnni512(iters),
                Probe::Avx2 => avx2(iters),
            }
        }
    }

    macro_rules! probe_fn {
        ($name:ident, $features:literal, $step:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name(iters: usize) -> i32 {
                let mut acc = [_mm256_setzero_si256(); 8];
                let mut u = [
                    _mm256_set1_epi8(3),
                    _mm256_set1_epi8(4),
                    _mm256_set1_epi8(5),
                    _mm256_set1_epi8(6),
                ];
                let mut s = [_mm256_set1_epi8(-5), _mm256_set1_epi8(7)];
                for _ in 0..iters {
                    // Eight different products into eight accumulators, as a tile kernel
                    // has them.
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = $step(*a, u[i % 4], s[i / 4]);
                    }
                    // The operands made opaque each round (an asm comment that "changes"
                    // them in their registers), so the products are not hoisted out of
                    // the loop; it emits no instruction.
                    // SAFETY: the template is a comment; the registers keep their values.
                    unsafe {
                        std::arch::asm!(
                            "/* {0} {1} {2} {3} {4} {5} */",
                            inout(ymm_reg) u[0],
                            inout(ymm_reg) u[1],
                            inout(ymm_reg) u[2],
                            inout(ymm_reg) u[3],
                            inout(ymm_reg) s[0],
                            inout(ymm_reg) s[1],
                            options(nomem, nostack)
                        )
                    };
                }
                let t = acc.iter().fold(_mm256_setzero_si256(), |t, &a| _mm256_add_epi32(t, a));
                _mm256_extract_epi32::<0>(t)
            }
        };
    }

    probe_fn!(avx2, "avx2", |a, u, s| _mm256_add_epi16(
        a,
        _mm256_maddubs_epi16(u, s)
    ));
    probe_fn!(vnni, "avx2,avxvnni", |a, u, s| _mm256_dpbusd_avx_epi32(
        a, u, s
    ));
    probe_fn!(vnni512, "avx2,avx512f,avx512vl,avx512vnni", |a, u, s| {
        _mm256_dpbusd_epi32(a, u, s)
    });
}

/// Median seconds per decode step of BATCH sequences, each at context CONTEXT and on.
fn batch_decode_secs(model: &Model) -> f64 {
    const BLOCK: usize = 16;
    let per = (CONTEXT + BATCH_STEPS).div_ceil(BLOCK);
    let tables: Vec<Vec<u32>> = (0..BATCH)
        .map(|s| ((s * per) as u32..((s + 1) * per) as u32).collect())
        .collect();
    let mut cache = CpuKvCache::new(model.config(), BATCH * per, BLOCK);
    for (s, table) in tables.iter().enumerate() {
        let mut b = Batch::default();
        b.push_seq(&vec![100 + s as u32; CONTEXT], 0, table.clone(), true);
        model
            .decoder
            .forward(&b, &mut cache as &mut dyn KvCache)
            .expect("prefill");
    }
    median(batch_decode_times(
        model,
        &mut cache,
        &tables,
        CONTEXT,
        BATCH_STEPS,
    ))
}

/// Median seconds per decode step over contexts CONTEXT..CONTEXT+STEPS.
fn decode_secs(model: &Model) -> f64 {
    let (mut cache, table) = prefilled(model, CONTEXT, STEPS);
    median(decode_times(model, &mut cache, &table, CONTEXT, STEPS))
}

fn main() {
    let files = model_files(&[
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ]);
    let threads = threads();
    println!(
        "\n{threads} threads; each row: {ROUNDS} rounds of a read-bandwidth probe (best of 7 \
         reads of 1 GiB) then {STEPS} decode steps; the median round's numbers"
    );
    println!(
        "| model | weight MB/token | KV MB/token at {} | read GB/s | bound tok/s | decode tok/s | of bound |",
        CONTEXT + STEPS / 2
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut loaded = Vec::new();
    for f in files {
        let path = models_dir().join(&f);
        assert!(path.is_file(), "{} is missing", path.display());
        let model = Model::load(&path, &Device::Cpu).expect("load");
        let cfg = model.config();
        let weights = model.decoder.step_weight_bytes();
        // f16 cache; a sliding layer reads at most its window.
        let ctx = CONTEXT + STEPS / 2;
        let kv: usize = (0..cfg.num_layers)
            .map(|l| {
                let span = cfg.layer_window(l).map_or(ctx, |w| w.min(ctx));
                2 * cfg.num_kv_heads * cfg.head_dim * 2 * span
            })
            .sum();
        let bytes = (weights + kv) as f64;
        // A co-tenant's memory traffic comes and goes: each decode run is set against a
        // probe taken just before it, and the median of the rounds' ratios is reported.
        let mut rounds: Vec<(f64, f64)> = (0..ROUNDS)
            .map(|_| (read_bandwidth(threads), 1.0 / decode_secs(&model)))
            .collect();
        rounds.sort_by(|a, b| (a.1 * bytes / a.0).total_cmp(&(b.1 * bytes / b.0)));
        let (bw, rate) = rounds[ROUNDS / 2];
        let bound = bw / bytes;
        println!(
            "| {f} | {:.1} | {:.2} | {:.1} | {bound:.1} | {rate:.1} | {:.0}% |",
            weights as f64 / 1e6,
            kv as f64 / 1e6,
            bw / 1e9,
            100.0 * rate / bound
        );
        loaded.push((f, model));
    }
    let Some((rate, how)) = int8_rate(threads) else {
        println!("\nno x86 int8 probe for this CPU: batched decode bound skipped");
        return;
    };
    println!(
        "\nint8 products, {threads} threads: {:.1} G/s ({how}, best of 5)",
        rate / 1e9
    );
    println!(
        "| model | M products/token | bound tok/s | {BATCH}-sequence decode tok/s | of bound |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (f, model) in loaded {
        let c = model.config();
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let layer = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size;
        let macs = (c.num_layers * layer + h * c.vocab_size) as f64;
        let bound = rate / macs;
        let got = BATCH as f64 / batch_decode_secs(&model);
        println!(
            "| {f} | {:.0} | {bound:.0} | {got:.1} | {:.0}% |",
            macs / 1e6,
            100.0 * got / bound
        );
    }
}
