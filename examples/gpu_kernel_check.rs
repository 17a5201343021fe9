//! Runs the kernel check suite (`candlewick::model::cuda::check`, the one `cargo test` runs
//! on the CPU execution layer) on a real GPU and prints each comparison; exits non-zero when
//! one is beyond its tolerance. Built with `--features cuda` (scripts/gpu-bundle.sh) and run
//! by gpu-check.sh on a machine with a GPU. `--device N` picks the GPU; `--bench` adds
//! timings of the attention kernels.

use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candlewick::model::cuda::ops::{
    self, HeadShape, PagedAttention, PagedMeta, Route, SeqQueries, Split,
};
use candlewick::model::cuda::{self, check};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Decode attention over `seqs` sequences of `ctx` tokens: time per launch and the K/V
/// bandwidth it reaches.
fn bench_attention(dev: &Device) -> Res<()> {
    let mut rng = check::Rng::new(7);
    for &(heads, kvh, d) in &[(14usize, 2usize, 64usize), (28, 4, 128)] {
        let bs = 16;
        for &(seqs, ctx) in &[(1usize, 512usize), (32, 1024), (32, 4096), (8, 16384)] {
            let per = ctx.div_ceil(bs);
            let nb = seqs * per;
            let kc = Tensor::from_vec(rng.vec(nb * bs * kvh * d, 1.0), (nb, bs, kvh, d), dev)?
                .to_dtype(DType::F16)?;
            let vc = kc.copy()?;
            let q = Tensor::from_vec(rng.vec(seqs * heads * d, 1.0), (seqs, heads, d), dev)?
                .to_dtype(DType::F16)?;
            let meta = PagedMeta::new(
                &(0..seqs)
                    .map(|s| SeqQueries {
                        start: s,
                        len: 1,
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
            for split in [Split::Never, Split::Auto] {
                let run = || {
                    ops::paged_attention(&PagedAttention {
                        q: &q,
                        k_cache: &kc,
                        v_cache: &vc,
                        meta: &meta,
                        sliding_window: None,
                        scale: 1.0 / (d as f32).sqrt(),
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
                    "bench  paged_attention h{heads}/kv{kvh} d{d} {seqs:>3} seqs x {ctx:>5} ctx \
                     {split:?}: {:8.1} us, {:7.1} GB/s of K/V",
                    secs * 1e6,
                    bytes / secs / 1e9
                );
            }
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
                "device {ordinal}: compute capability {}, SASS built for {:?}",
                cuda::compute_capability(cd)?,
                cuda::built_archs()
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
            println!("      ({name}: {:.1} s)", t0.elapsed().as_secs_f64());
        }
        if bench {
            bench_attention(&dev)?;
        }
        Ok(failed)
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
