//! Checks every kernel of kernels/*.cu on a real GPU against a CPU reference and prints the
//! largest error of each; exits non-zero when one is beyond its tolerance. Built with
//! `--features cuda` (scripts/cuda-compile-check.sh --example-gpu-check) and run by
//! scripts/gpu-check.sh on a machine with a GPU. `--device N` picks the GPU; `--bench` adds
//! rough timings of the decode attention.

use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candlewick::model::config::{Activation, ArchConfig, Family};
use candlewick::model::cuda::ops::{self, PagedAttention, Split};
use candlewick::model::cuda::{self, CudaKvCache};
use candlewick::model::{Batch, CpuKvCache, KvCache};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Deterministic pseudo-random numbers in [-1, 1) (xorshift), so every run sees the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.next() + 1.0) * 0.5 * n as f32) as usize % n.max(1)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Rounds through fp16, as the GPU stores it.
fn h(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

fn to_vec(t: &Tensor) -> Res<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

struct Report {
    failed: usize,
}

impl Report {
    fn check(&mut self, name: &str, err: f32, tol: f32) {
        let ok = err <= tol;
        println!(
            "{:<6} {name:<64} max err {err:.3e} (tol {tol:.0e})",
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            self.failed += 1;
        }
    }
}

fn gpu_f16(v: &[f32], shape: &[usize], dev: &Device) -> Res<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), shape, dev)?.to_dtype(DType::F16)?)
}

fn check_reshape_and_cache(r: &mut Report, rng: &mut Rng, dev: &Device) -> Res<()> {
    let (nb, bs, kvh, d, n) = (20, 16, 2, 64, 37);
    let row = kvh * d;
    let key = h(&rng.vec(n * row, 1.0));
    let value = h(&rng.vec(n * row, 1.0));
    let mut slots: Vec<u32> = (0..(nb * bs) as u32).collect();
    rng.shuffle(&mut slots);
    slots.truncate(n);
    slots[5] = u32::MAX; // skipped
    let kc = Tensor::zeros((nb, bs, kvh, d), DType::F16, dev)?;
    let vc = Tensor::zeros((nb, bs, kvh, d), DType::F16, dev)?;
    ops::reshape_and_cache(
        &gpu_f16(&key, &[n, kvh, d], dev)?,
        &gpu_f16(&value, &[n, kvh, d], dev)?,
        &kc,
        &vc,
        &Tensor::new(slots.as_slice(), dev)?,
    )?;
    let mut want_k = vec![0f32; nb * bs * row];
    let mut want_v = want_k.clone();
    for (t, &s) in slots.iter().enumerate() {
        if s != u32::MAX {
            let s = s as usize;
            want_k[s * row..(s + 1) * row].copy_from_slice(&key[t * row..(t + 1) * row]);
            want_v[s * row..(s + 1) * row].copy_from_slice(&value[t * row..(t + 1) * row]);
        }
    }
    let err = max_err(&to_vec(&kc)?, &want_k).max(max_err(&to_vec(&vc)?, &want_v));
    r.check("reshape_and_cache 37 tokens, one skipped", err, 0.0);
    Ok(())
}

/// Reference attention over f16-rounded data in f32 for one query row.
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    table: &[u32],
    ctx: usize,
    window: Option<usize>,
    heads: usize,
    kvh: usize,
    d: usize,
    bs: usize,
) -> Vec<f32> {
    let lo = window.map_or(0, |w| ctx.saturating_sub(w));
    let g = heads / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; heads * d];
    for hh in 0..heads {
        let qv = &q[hh * d..(hh + 1) * d];
        let kv = hh / g;
        let at = |p: usize| ((table[p / bs] as usize * bs + p % bs) * kvh + kv) * d;
        let scores: Vec<f32> = (lo..ctx)
            .map(|p| {
                qv.iter()
                    .zip(&kc[at(p)..at(p) + d])
                    .map(|(a, b)| a * b)
                    .sum::<f32>()
                    * scale
            })
            .collect();
        let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let sum: f32 = e.iter().sum();
        for (j, p) in (lo..ctx).enumerate() {
            for i in 0..d {
                out[hh * d + i] += e[j] / sum * vc[at(p) + i];
            }
        }
    }
    out
}

fn check_paged_attention(r: &mut Report, rng: &mut Rng, dev: &Device) -> Res<()> {
    let bs = 16;
    // (heads, kv_heads, head_dim, contexts, window)
    type Case = (usize, usize, usize, &'static [usize], Option<usize>);
    let cases: [Case; 6] = [
        (14, 2, 64, &[1, 17, 300, 1500], None),
        (32, 8, 128, &[5, 64, 2100], None),
        (24, 2, 128, &[33, 700], None), // 12 heads per kv head: two head chunks
        (12, 4, 96, &[100, 1200], None),
        (8, 1, 256, &[3, 900], None),
        (32, 8, 128, &[40, 1000, 2500], Some(256)),
    ];
    for (heads, kvh, d, ctxs, window) in cases {
        let seqs = ctxs.len();
        let blocks_per: Vec<usize> = ctxs.iter().map(|c| c.div_ceil(bs)).collect();
        let nb = blocks_per.iter().sum::<usize>() + 3;
        let mut ids: Vec<u32> = (0..nb as u32).collect();
        rng.shuffle(&mut ids);
        let max_blocks = *blocks_per.iter().max().unwrap_or(&1);
        let mut tables = vec![0u32; seqs * max_blocks];
        let mut next = 0;
        for (s, &nbk) in blocks_per.iter().enumerate() {
            tables[s * max_blocks..s * max_blocks + nbk].copy_from_slice(&ids[next..next + nbk]);
            next += nbk;
        }
        let cache_len = nb * bs * kvh * d;
        let kc = h(&rng.vec(cache_len, 1.0));
        let vc = h(&rng.vec(cache_len, 1.0));
        let q = h(&rng.vec(seqs * heads * d, 1.0));
        let mut want = Vec::new();
        for s in 0..seqs {
            want.extend(ref_attention(
                &q[s * heads * d..(s + 1) * heads * d],
                &kc,
                &vc,
                &tables[s * max_blocks..(s + 1) * max_blocks],
                ctxs[s],
                window,
                heads,
                kvh,
                d,
                bs,
            ));
        }
        let kc_t = gpu_f16(&kc, &[nb, bs, kvh, d], dev)?;
        let vc_t = gpu_f16(&vc, &[nb, bs, kvh, d], dev)?;
        let q_t = gpu_f16(&q, &[seqs, heads, d], dev)?;
        let bt = Tensor::from_vec(tables.clone(), (seqs, max_blocks), dev)?;
        let qs = Tensor::from_vec((0..seqs as u32).collect::<Vec<_>>(), seqs, dev)?;
        let qc = Tensor::from_vec(
            ctxs.iter().map(|&c| c as u32).collect::<Vec<_>>(),
            seqs,
            dev,
        )?;
        let max_context = *ctxs.iter().max().unwrap_or(&1);
        for split in [Split::Never, Split::Partition(256), Split::Auto] {
            let out = ops::paged_attention(&PagedAttention {
                q: &q_t,
                k_cache: &kc_t,
                v_cache: &vc_t,
                block_tables: &bt,
                query_seq: &qs,
                query_ctx: &qc,
                max_context,
                sliding_window: window,
                scale: 1.0 / (d as f32).sqrt(),
                split,
            })?;
            r.check(
                &format!(
                    "paged_attention h{heads}/kv{kvh} d{d} ctx {ctxs:?} win {window:?} {split:?}"
                ),
                max_err(&to_vec(&out)?, &want),
                2e-3,
            );
        }
    }
    Ok(())
}

/// CudaKvCache against CpuKvCache through the KvCache trait: three steps mixing prefill
/// chunks and decode tokens of several sequences, a few layers.
fn check_kv_cache(r: &mut Report, rng: &mut Rng, dev: &Device) -> Res<()> {
    let cfg = ArchConfig {
        family: Family::Qwen2,
        arch_name: "qwen2".into(),
        vocab_size: 100,
        hidden_size: 14 * 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 14,
        num_kv_heads: 2,
        head_dim: 64,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-6,
        tie_embeddings: true,
        qkv_bias: true,
        qk_norm: false,
        sliding_window: None,
        full_attention_layers: Vec::new(),
        sliding_rope_theta: None,
        activation: Activation::Silu,
        post_norms: false,
        scale_embeddings: false,
        norm_weights_offset: false,
        query_pre_attn_scalar: None,
        final_logit_softcap: None,
        max_position_embeddings: 4096,
    };
    let (nb, bs) = (64, 16);
    let mut cpu = CpuKvCache::new(&cfg, nb, bs);
    let mut gpu = CudaKvCache::new(&cfg, nb, bs, dev)?;
    // Three sequences with disjoint, scrambled blocks.
    let mut ids: Vec<u32> = (0..nb as u32).collect();
    rng.shuffle(&mut ids);
    let tables: Vec<Vec<u32>> = ids.chunks(20).take(3).map(|c| c.to_vec()).collect();
    let mut cached = [0usize; 3];
    // (tokens per sequence) for each step: prefill chunks, then mixed, then decode.
    let steps: [[usize; 3]; 3] = [[40, 7, 0], [1, 30, 100], [1, 1, 1]];
    let (heads, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    for (si, step) in steps.iter().enumerate() {
        let mut batch = Batch::default();
        for s in 0..3 {
            if step[s] > 0 {
                batch.push_seq(&vec![1; step[s]], cached[s], tables[s].clone(), true);
            }
        }
        let n = batch.tokens.len();
        let mut worst = 0f32;
        for layer in 0..cfg.num_layers {
            let q = h(&rng.vec(n * heads * d, 1.0));
            let k = h(&rng.vec(n * kvh * d, 1.0));
            let v = h(&rng.vec(n * kvh * d, 1.0));
            let cpu_t =
                |x: &[f32], hh: usize| Tensor::from_vec(x.to_vec(), (n, hh, d), &Device::Cpu);
            let want = cpu.attend(
                layer,
                &cpu_t(&q, heads)?,
                &cpu_t(&k, kvh)?,
                &cpu_t(&v, kvh)?,
                &batch,
            )?;
            let got = gpu.attend(
                layer,
                &gpu_f16(&q, &[n, heads, d], dev)?,
                &gpu_f16(&k, &[n, kvh, d], dev)?,
                &gpu_f16(&v, &[n, kvh, d], dev)?,
                &batch,
            )?;
            worst = worst.max(max_err(&to_vec(&got)?, &to_vec(&want)?));
        }
        r.check(
            &format!("CudaKvCache vs CpuKvCache step {si} tokens {step:?}"),
            worst,
            2e-3,
        );
        for s in 0..3 {
            cached[s] += step[s];
        }
    }
    Ok(())
}

fn check_rms_norm(r: &mut Report, rng: &mut Rng, dev: &Device) -> Res<()> {
    for &(rows, hidden) in &[(5usize, 896usize), (3, 4096), (1, 1000)] {
        let x = h(&rng.vec(rows * hidden, 2.0));
        let delta = h(&rng.vec(rows * hidden, 2.0));
        let w = h(&rng.vec(hidden, 1.0));
        let eps = 1e-6f32;
        for with_delta in [false, true] {
            let stream = gpu_f16(&x, &[rows, hidden], dev)?;
            let dt = gpu_f16(&delta, &[rows, hidden], dev)?;
            let out = ops::add_rms_norm(
                &stream,
                with_delta.then_some(&dt),
                &gpu_f16(&w, &[hidden], dev)?,
                eps,
            )?;
            let summed: Vec<f32> = if with_delta {
                h(&x.iter().zip(&delta).map(|(a, b)| a + b).collect::<Vec<_>>())
            } else {
                x.clone()
            };
            let mut want = vec![0f32; rows * hidden];
            for i in 0..rows {
                let row = &summed[i * hidden..(i + 1) * hidden];
                let inv =
                    1.0 / (row.iter().map(|v| v * v).sum::<f32>() / hidden as f32 + eps).sqrt();
                for j in 0..hidden {
                    want[i * hidden + j] = row[j] * inv * w[j];
                }
            }
            let got = to_vec(&out)?;
            // Relative to the magnitude: fp16 output rounding dominates.
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            let mut err = max_err(&got, &want) / scale;
            if with_delta {
                err = err.max(max_err(&to_vec(&stream)?, &summed));
            }
            r.check(
                &format!("add_rms_norm {rows}x{hidden} delta={with_delta}"),
                err,
                2e-3,
            );
        }
    }
    Ok(())
}

fn check_rope(r: &mut Report, rng: &mut Rng, dev: &Device) -> Res<()> {
    let (n, heads, kvh, d, max_pos) = (9usize, 14usize, 2usize, 64usize, 4096usize);
    let half = d / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / 1e6f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let angles: Vec<f32> = (0..max_pos)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    let ang = Tensor::from_vec(angles, (max_pos, half), &Device::Cpu)?;
    let (cos, sin) = (ang.cos()?, ang.sin()?);
    let positions: Vec<u32> = vec![0, 1, 2, 17, 100, 511, 1000, 2047, 4095];
    let q = h(&rng.vec(n * heads * d, 1.0));
    let k = h(&rng.vec(n * kvh * d, 1.0));
    // The decoder's own convention: candle's rope_thd over gathered cos/sin rows, on the CPU.
    let pos_cpu = Tensor::new(positions.as_slice(), &Device::Cpu)?;
    let (c, s) = (
        cos.index_select(&pos_cpu, 0)?,
        sin.index_select(&pos_cpu, 0)?,
    );
    let rope = |x: &[f32], hh: usize| -> Res<Vec<f32>> {
        let t = Tensor::from_vec(x.to_vec(), (1, n, hh, d), &Device::Cpu)?;
        to_vec(&candle_nn::rotary_emb::rope_thd(&t, &c, &s)?)
    };
    let (want_q, want_k) = (rope(&q, heads)?, rope(&k, kvh)?);
    let qg = gpu_f16(&q, &[n, heads, d], dev)?;
    let kg = gpu_f16(&k, &[n, kvh, d], dev)?;
    ops::rope_neox_inplace(
        &qg,
        &kg,
        &cos.to_device(dev)?,
        &sin.to_device(dev)?,
        &Tensor::new(positions.as_slice(), dev)?,
    )?;
    let err = max_err(&to_vec(&qg)?, &want_q).max(max_err(&to_vec(&kg)?, &want_k));
    r.check("rope_neox in place vs candle rope_thd (CPU)", err, 2e-3);
    Ok(())
}

fn check_silu_mul(r: &mut Report, rng: &mut Rng, dev: &Device) -> Res<()> {
    let (rows, inter) = (7usize, 4864usize);
    let g = h(&rng.vec(rows * inter, 6.0));
    let u = h(&rng.vec(rows * inter, 3.0));
    let out = ops::silu_mul(
        &gpu_f16(&g, &[rows, inter], dev)?,
        &gpu_f16(&u, &[rows, inter], dev)?,
    )?;
    let want: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
    r.check(
        "silu_mul 7x4864",
        max_err(&to_vec(&out)?, &want) / scale,
        2e-3,
    );
    Ok(())
}

fn check_argmax(r: &mut Report, rng: &mut Rng, dev: &Device) -> Res<()> {
    let vocab = 151_936usize;
    let rows = 6;
    let mut logits = rng.vec(rows * vocab, 10.0);
    // Row 1: a tie between two ids (lowest wins); row 2: NaN above everything; row 3: all -inf;
    // row 4: the max at the last id; row 5: the max at id 0.
    logits[vocab + 70_000] = 50.0;
    logits[vocab + 9_000] = 50.0;
    logits[2 * vocab + 5] = f32::NAN;
    logits[2 * vocab + 6] = 40.0;
    logits[3 * vocab..4 * vocab].fill(f32::NEG_INFINITY);
    logits[5 * vocab - 1] = 60.0;
    logits[5 * vocab] = 60.0;
    let naive = |row: &[f32]| {
        let (mut best, mut bv) = (0usize, f32::NEG_INFINITY);
        for (i, &v) in row.iter().enumerate() {
            if v > bv {
                best = i;
                bv = v;
            }
        }
        best as u32
    };
    let want: Vec<u32> = logits.chunks(vocab).map(naive).collect();
    for dtype in [DType::F32, DType::F16] {
        let t = Tensor::from_vec(logits.clone(), (rows, vocab), dev)?.to_dtype(dtype)?;
        let got: Vec<u32> = ops::argmax(&t)?.to_device(&Device::Cpu)?.to_vec1()?;
        // f16 rounds the random logits, so ties can appear: compare against its own rounding.
        let want = if dtype == DType::F16 {
            h(&logits).chunks(vocab).map(naive).collect()
        } else {
            want.clone()
        };
        let wrong = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        if wrong > 0 {
            println!("       got {got:?}, want {want:?}");
        }
        r.check(
            &format!("argmax {rows}x{vocab} {dtype:?} (wrong rows)"),
            wrong as f32,
            0.0,
        );
    }
    // Against candle's own argmax too, on plain rows.
    let t = Tensor::from_vec(rng.vec(4 * 1000, 1.0), (4, 1000), dev)?;
    let ours: Vec<u32> = ops::argmax(&t)?.to_device(&Device::Cpu)?.to_vec1()?;
    let candle: Vec<u32> = t.argmax(D::Minus1)?.to_device(&Device::Cpu)?.to_vec1()?;
    r.check(
        "argmax vs candle argmax (wrong rows)",
        ours.iter().zip(&candle).filter(|(a, b)| a != b).count() as f32,
        0.0,
    );
    Ok(())
}

fn bench_attention(rng: &mut Rng, dev: &Device) -> Res<()> {
    let (heads, kvh, d, bs) = (14usize, 2usize, 64usize, 16usize);
    for &(seqs, ctx) in &[(1usize, 512usize), (32, 1024), (32, 4096), (8, 16384)] {
        let per = ctx.div_ceil(bs);
        let nb = seqs * per;
        let kc = Tensor::from_vec(rng.vec(nb * bs * kvh * d, 1.0), (nb, bs, kvh, d), dev)?
            .to_dtype(DType::F16)?;
        let vc = kc.clone();
        let q = Tensor::from_vec(rng.vec(seqs * heads * d, 1.0), (seqs, heads, d), dev)?
            .to_dtype(DType::F16)?;
        let bt = Tensor::from_vec((0..nb as u32).collect::<Vec<_>>(), (seqs, per), dev)?;
        let qs = Tensor::from_vec((0..seqs as u32).collect::<Vec<_>>(), seqs, dev)?;
        let qc = Tensor::from_vec(vec![ctx as u32; seqs], seqs, dev)?;
        for split in [Split::Never, Split::Auto] {
            let run = || {
                ops::paged_attention(&PagedAttention {
                    q: &q,
                    k_cache: &kc,
                    v_cache: &vc,
                    block_tables: &bt,
                    query_seq: &qs,
                    query_ctx: &qc,
                    max_context: ctx,
                    sliding_window: None,
                    scale: 0.125,
                    split,
                })
            };
            run()?;
            dev.synchronize()?;
            let iters = 20;
            let t0 = Instant::now();
            for _ in 0..iters {
                run()?;
            }
            dev.synchronize()?;
            let secs = t0.elapsed().as_secs_f64() / iters as f64;
            let bytes = 2.0 * (seqs * ctx * kvh * d * 2) as f64;
            println!(
                "bench  paged_attention {seqs:>3} seqs x {ctx:>5} ctx {split:?}: {:8.1} us, {:7.1} GB/s of K/V",
                secs * 1e6,
                bytes / secs / 1e9
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let ordinal = args
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let bench = args.iter().any(|a| a == "--bench");
    let run = || -> Res<usize> {
        let dev = Device::new_cuda(ordinal)?;
        if let Device::Cuda(cd) = &dev {
            println!(
                "device {ordinal}: compute capability {}, PTX built for {:?}",
                cuda::compute_capability(cd)?,
                cuda::built_archs()
            );
        }
        let mut r = Report { failed: 0 };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        type Check = fn(&mut Report, &mut Rng, &Device) -> Res<()>;
        let checks: [(&str, Check); 7] = [
            ("reshape_and_cache", check_reshape_and_cache),
            ("paged_attention", check_paged_attention),
            ("kv_cache", check_kv_cache),
            ("rms_norm", check_rms_norm),
            ("rope", check_rope),
            ("silu_mul", check_silu_mul),
            ("argmax", check_argmax),
        ];
        for (name, check) in checks {
            if let Err(e) = check(&mut r, &mut rng, &dev) {
                println!("FAIL   {name}: error: {e}");
                r.failed += 1;
            }
        }
        if bench {
            bench_attention(&mut rng, &dev)?;
        }
        Ok(r.failed)
    };
    match run() {
        Ok(0) => {
            println!("all kernel checks passed");
            ExitCode::SUCCESS
        }
        Ok(n) => {
            println!("{n} kernel check(s) failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
