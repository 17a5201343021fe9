//! The tools scripts/gpu-check.sh runs on a GPU machine (built by scripts/gpu-bundle.sh):
//!
//! * `gpu_check kernels [--device cuda:N|cpu] [--bench]`: the kernel check suite
//!   (`candlewick::model::cuda::check`, the one `cargo test` runs on the CPU execution layer)
//!   on the device, one line per comparison; exit status 1 when one is out of tolerance.
//!   `--bench` adds timings of the attention kernels. (On `cpu` in a build without the cuda
//!   feature it runs on the CPU layer.)
//! * `gpu_check extract-tokenizer SRC.gguf OUT.gguf`: copies the tokenizer and chat template
//!   metadata of a real model into a small GGUF of its own (what the bundle carries).
//! * `gpu_check gen-model --shape qwen2.5-0.5b|qwen2.5-7b|tiny --dtype f16|q4_k
//!   --tokenizer TOK.gguf --out OUT.gguf`: a random-weight model of a real architecture's
//!   shapes, written at memory speed (k-quant blocks built directly, not quantized), for
//!   serving benchmarks that need no download. Q4_K where a row's length allows (a multiple of
//!   256), Q8_0 otherwise, as llama.cpp falls back for Qwen2.5-0.5B's 896-wide rows.

use std::borrow::Cow;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candlewick::model::cuda::check;
use rayon::prelude::*;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn device(spec: &str) -> Res<Device> {
    Ok(match spec {
        "cpu" => Device::Cpu,
        s => {
            let n = s
                .strip_prefix("cuda:")
                .map_or(Ok(0), |n| n.parse::<usize>())
                .map_err(|e| format!("device {s}: {e}"))?;
            Device::new_cuda(n)?
        }
    })
}

// ---------------------------------------------------------------------------------------
// kernels

/// Decode attention over `seqs` sequences of `ctx` tokens: time per launch and the K/V
/// bandwidth it reaches.
fn bench_attention(dev: &Device) -> Res<()> {
    use candlewick::model::cuda::ops::{
        self, HeadShape, PagedAttention, PagedMeta, Route, SeqQueries, Split,
    };
    let mut rng = check::Rng::new(7);
    for &(heads, kvh, d) in &[(14usize, 2usize, 64usize), (28, 4, 128)] {
        let bs = 16;
        for &(seqs, ctx, rows) in &[
            (1usize, 512usize, 1usize),
            (32, 1024, 1),
            (32, 4096, 1),
            (8, 16384, 1),
            (1, 2048, 2048),
            (4, 1024, 512),
        ] {
            let per = ctx.div_ceil(bs);
            let nb = seqs * per;
            let kc = Tensor::from_vec(rng.vec(nb * bs * kvh * d, 1.0), (nb, bs, kvh, d), dev)?
                .to_dtype(DType::F16)?;
            let vc = kc.copy()?;
            let q = Tensor::from_vec(
                rng.vec(seqs * rows * heads * d, 1.0),
                (seqs * rows, heads, d),
                dev,
            )?
            .to_dtype(DType::F16)?;
            let meta = PagedMeta::new(
                &(0..seqs)
                    .map(|s| SeqQueries {
                        start: s * rows,
                        len: rows,
                        context_len: ctx,
                        block_table: ((s * per) as u32..((s + 1) * per) as u32).collect(),
                    })
                    .collect::<Vec<_>>(),
                nb,
                bs,
                HeadShape {
                    heads,
                    kv_heads: kvh,
                    head_dim: d,
                },
                Route::Auto,
                dev,
            )?;
            let run = || {
                ops::paged_attention(&PagedAttention {
                    q: &q,
                    k_cache: &kc,
                    v_cache: &vc,
                    meta: &meta,
                    sliding_window: None,
                    scale: 1.0 / (d as f32).sqrt(),
                    split: Split::Auto,
                })
            };
            run()?;
            dev.synchronize()?;
            let iters = 10;
            let t0 = Instant::now();
            for _ in 0..iters {
                run()?;
            }
            dev.synchronize()?;
            let secs = t0.elapsed().as_secs_f64() / iters as f64;
            let bytes = 2.0 * (seqs * ctx * kvh * d * 2) as f64;
            // Causal prefill: rows x (positions seen) x heads x d x 4 flops.
            let flops: f64 = (0..rows).map(|i| (ctx - rows + i + 1) as f64).sum::<f64>()
                * (seqs * heads * d * 4) as f64;
            println!(
                "bench  attention h{heads}/kv{kvh} d{d} {seqs:>3} seqs x {rows:>4} rows x {ctx:>5} \
                 ctx: {:9.1} us, {:7.1} GB/s K/V, {:6.2} TFLOP/s",
                secs * 1e6,
                bytes / secs / 1e9,
                flops / secs / 1e12
            );
        }
    }
    Ok(())
}

fn kernels(args: &[String]) -> Res<usize> {
    let dev = device(&arg_value(args, "--device").unwrap_or_else(|| "cuda:0".into()))?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cd) = &dev {
        println!(
            "compute capability {}, SASS built for {:?}",
            candlewick::model::cuda::compute_capability(cd)?,
            candlewick::model::cuda::built_archs()
        );
    }
    let mut failed = 0;
    for (name, f) in check::CHECKS {
        let mut r = check::Report::default();
        let t0 = Instant::now();
        let res = f(&mut r, &dev);
        print!("{}", r.table());
        failed += r.failed();
        if let Err(e) = res {
            println!("FAIL  {name}: error: {e}");
            failed += 1;
        }
        println!("      ({name}: {:.2} s)", t0.elapsed().as_secs_f64());
    }
    if args.iter().any(|a| a == "--bench") {
        bench_attention(&dev)?;
    }
    Ok(failed)
}

// ---------------------------------------------------------------------------------------
// Tokenizer extraction and random-weight models

fn read_gguf(path: &str) -> Res<gguf_file::Content> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    Ok(gguf_file::Content::read(&mut f).map_err(|e| format!("{path}: {e}"))?)
}

fn write_gguf(
    path: &str,
    metadata: &[(String, gguf_file::Value)],
    tensors: &[(String, QTensor)],
) -> Res<()> {
    let f = std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
    let md: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(&mut w, &md, &ts)?;
    Ok(())
}

fn extract_tokenizer(args: &[String]) -> Res<()> {
    let (src, out) = match args {
        [src, out, ..] => (src, out),
        _ => return Err("usage: gpu_check extract-tokenizer SRC.gguf OUT.gguf".into()),
    };
    let c = read_gguf(src)?;
    let mut md: Vec<(String, gguf_file::Value)> = c
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    write_gguf(out, &md, &[])?;
    println!("{out}: {} tokenizer keys", md.len());
    Ok(())
}

/// A real architecture's shapes.
struct Shape {
    name: &'static str,
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    tied: bool,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "qwen2.5-0.5b",
        vocab: 151_936,
        hidden: 896,
        layers: 24,
        heads: 14,
        kv_heads: 2,
        head_dim: 64,
        inter: 4864,
        tied: true,
    },
    Shape {
        name: "qwen2.5-7b",
        vocab: 152_064,
        hidden: 3584,
        layers: 28,
        heads: 28,
        kv_heads: 4,
        head_dim: 128,
        inter: 18_944,
        tied: false,
    },
    // For trying the scripts on a CPU.
    Shape {
        name: "tiny",
        vocab: 151_936,
        hidden: 128,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 64,
        inter: 256,
        tied: true,
    },
];

/// Fast deterministic bytes (xorshift64*), filled in parallel chunks.
fn fill(out: &mut [u8], seed: u64, f: impl Fn(&mut u64, &mut [u8]) + Sync) {
    out.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut s = (seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
            f(&mut s, chunk);
        });
}

fn next(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// `[rows, cols]` of random weights with standard deviation about `1 / sqrt(cols)`, as
/// `dtype`: F16 (uniform), Q8_0 or Q4_K blocks built directly.
fn random_matrix(rows: usize, cols: usize, dtype: GgmlDType, seed: u64) -> Res<QTensor> {
    let n = rows * cols;
    let sigma = 1.0 / (cols as f32).sqrt();
    let bytes = match dtype {
        GgmlDType::F16 => {
            let mut b = vec![0u8; n * 2];
            let a = sigma * 3f32.sqrt();
            fill(&mut b, seed, |s, c| {
                for pair in c.chunks_exact_mut(2) {
                    let u = (next(s) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    pair.copy_from_slice(&half::f16::from_f32(u * a).to_le_bytes());
                }
            });
            b
        }
        GgmlDType::Q8_0 => {
            // 32 weights a block: an f16 scale and 32 signed bytes.
            let mut b = vec![0u8; n / 32 * 34];
            let d = half::f16::from_f32(sigma * 3f32.sqrt() / 127.0).to_le_bytes();
            fill(&mut b, seed, |s, c| {
                for block in c.chunks_exact_mut(34) {
                    block[..2].copy_from_slice(&d);
                    for q in block[2..].chunks_mut(8) {
                        let r = next(s).to_le_bytes();
                        q.copy_from_slice(&r[..q.len()]);
                    }
                }
            });
            b
        }
        GgmlDType::Q4K => {
            // 256 weights a block: f16 d and dmin, 12 bytes of 6-bit scales and mins, 128
            // bytes of 4-bit quants; w = d * scale * q - dmin * min.
            let mut b = vec![0u8; n / 256 * 144];
            let d = half::f16::from_f32(sigma / 200.0).to_le_bytes();
            let dmin = half::f16::from_f32(sigma / 200.0 * 7.5).to_le_bytes();
            fill(&mut b, seed, |s, c| {
                for block in c.chunks_exact_mut(144) {
                    block[..2].copy_from_slice(&d);
                    block[2..4].copy_from_slice(&dmin);
                    for q in block[4..].chunks_mut(8) {
                        let r = next(s).to_le_bytes();
                        q.copy_from_slice(&r[..q.len()]);
                    }
                }
            });
            b
        }
        other => return Err(format!("no random {other:?} matrices").into()),
    };
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

fn vector(values: Vec<f32>) -> Res<QTensor> {
    let n = values.len();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, GgmlDType::F32)?;
    Ok(QTensor::new(storage, n)?)
}

fn gen_model(args: &[String]) -> Res<()> {
    let shape_name = arg_value(args, "--shape").ok_or("--shape missing")?;
    let dtype_name = arg_value(args, "--dtype").unwrap_or_else(|| "f16".into());
    let tok = arg_value(args, "--tokenizer").ok_or("--tokenizer missing")?;
    let out = arg_value(args, "--out").ok_or("--out missing")?;
    let s = SHAPES
        .iter()
        .find(|s| s.name == shape_name)
        .ok_or_else(|| format!("unknown shape {shape_name}"))?;
    let quant = match dtype_name.as_str() {
        "f16" => false,
        "q4_k" => true,
        d => return Err(format!("unknown dtype {d} (f16, q4_k)").into()),
    };
    // Q4_K needs rows of whole 256-blocks; Q8_0 (32) otherwise.
    let dtype_for = |cols: usize| match (quant, cols % 256) {
        (false, _) => GgmlDType::F16,
        (true, 0) => GgmlDType::Q4K,
        (true, _) => GgmlDType::Q8_0,
    };
    let t0 = Instant::now();
    let c = read_gguf(&tok)?;
    let mut md: Vec<(String, gguf_file::Value)> = c.metadata.into_iter().collect();
    md.retain(|(k, _)| k.starts_with("tokenizer."));
    use gguf_file::Value as V;
    let arch = "qwen2";
    let u = |v: usize| V::U32(v as u32);
    md.extend([
        ("general.architecture".into(), V::String(arch.into())),
        (
            "general.name".into(),
            V::String(format!("random {} {dtype_name}", s.name)),
        ),
        (format!("{arch}.vocab_size"), u(s.vocab)),
        (format!("{arch}.block_count"), u(s.layers)),
        (format!("{arch}.context_length"), u(32_768)),
        (format!("{arch}.embedding_length"), u(s.hidden)),
        (format!("{arch}.feed_forward_length"), u(s.inter)),
        (format!("{arch}.attention.head_count"), u(s.heads)),
        (format!("{arch}.attention.head_count_kv"), u(s.kv_heads)),
        (format!("{arch}.attention.key_length"), u(s.head_dim)),
        (format!("{arch}.rope.freq_base"), V::F32(1_000_000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            V::F32(1e-6),
        ),
    ]);
    let (q_out, kv_out) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut seed = 1u64;
    let mut mat = |name: String, rows: usize, cols: usize| -> Res<(String, QTensor)> {
        seed += 1;
        Ok((name, random_matrix(rows, cols, dtype_for(cols), seed)?))
    };
    tensors.push(mat("token_embd.weight".into(), s.vocab, s.hidden)?);
    for l in 0..s.layers {
        let p = |n: &str| format!("blk.{l}.{n}");
        tensors.push(mat(p("attn_q.weight"), q_out, s.hidden)?);
        tensors.push(mat(p("attn_k.weight"), kv_out, s.hidden)?);
        tensors.push(mat(p("attn_v.weight"), kv_out, s.hidden)?);
        tensors.push(mat(p("attn_output.weight"), s.hidden, q_out)?);
        tensors.push(mat(p("ffn_gate.weight"), s.inter, s.hidden)?);
        tensors.push(mat(p("ffn_up.weight"), s.inter, s.hidden)?);
        tensors.push(mat(p("ffn_down.weight"), s.hidden, s.inter)?);
        for (n, len) in [
            ("attn_q.bias", q_out),
            ("attn_k.bias", kv_out),
            ("attn_v.bias", kv_out),
        ] {
            tensors.push((p(n), vector(vec![0.01; len])?));
        }
        for n in ["attn_norm.weight", "ffn_norm.weight"] {
            tensors.push((p(n), vector(vec![1.0; s.hidden])?));
        }
    }
    tensors.push(("output_norm.weight".into(), vector(vec![1.0; s.hidden])?));
    if !s.tied {
        tensors.push(mat("output.weight".into(), s.vocab, s.hidden)?);
    }
    let built = t0.elapsed().as_secs_f64();
    write_gguf(&out, &md, &tensors)?;
    let size = std::fs::metadata(&out)?.len();
    println!(
        "{out}: random {} {dtype_name}, {:.2} GB (built in {built:.1} s, written in {:.1} s)",
        s.name,
        size as f64 / 1e9,
        t0.elapsed().as_secs_f64() - built
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: gpu_check kernels|extract-tokenizer|gen-model ... (see the source)");
        return ExitCode::from(2);
    };
    let res: Res<usize> = match cmd.as_str() {
        "kernels" => kernels(rest),
        "extract-tokenizer" => extract_tokenizer(rest).map(|_| 0),
        "gen-model" => gen_model(rest).map(|_| 0),
        other => Err(format!("unknown command {other}").into()),
    };
    match res {
        Ok(0) => {
            if cmd == "kernels" {
                println!("all kernel checks passed");
            }
            ExitCode::SUCCESS
        }
        Ok(n) => {
            println!("{n} kernel check(s) failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
