//! Every kernel of kernels/*.cu executed on the CPU execution layer (the same sources nvcc
//! compiles, built with the system C++ compiler) against CPU references: the suite of
//! `candlewick::model::cuda::check`, which examples/gpu_check.rs runs on a GPU.
#![cfg(not(feature = "cuda"))]

use candle_core::Device;
use candlewick::model::cuda::{check, sim};

/// Runs the checks named by `names` (all when empty) on two threads and fails with the
/// report's table when any comparison is out of tolerance or a check errs.
fn run(names: &[&str]) {
    let checks: Vec<_> = check::CHECKS
        .iter()
        .filter(|(n, _)| names.is_empty() || names.contains(n))
        .collect();
    assert!(!checks.is_empty(), "no check named {names:?}");
    let results: Vec<(String, Result<check::Report, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = checks
            .iter()
            .map(|&&(name, f)| {
                s.spawn(move || {
                    let mut r = check::Report::default();
                    let res = f(&mut r, &Device::Cpu)
                        .map(|_| r)
                        .map_err(|e| e.to_string());
                    (name.to_string(), res)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("check thread panicked"))
            .collect()
    });
    let mut failed = Vec::new();
    for (name, res) in &results {
        match res {
            Ok(r) => {
                print!("{}", r.table());
                if r.failed() > 0 {
                    failed.push(format!(
                        "{name}: {} comparison(s) out of tolerance",
                        r.failed()
                    ));
                }
            }
            Err(e) => failed.push(format!("{name}: error: {e}")),
        }
    }
    assert!(
        failed.is_empty(),
        "kernel checks failed:\n{}",
        failed.join("\n")
    );
}

#[test]
fn every_kernel_against_its_reference_on_the_cpu_layer() {
    // WICK_KERNEL_CHECKS=name,name runs only those checks (while working on a kernel).
    if let Ok(only) = std::env::var("WICK_KERNEL_CHECKS") {
        run(&only.split(',').map(str::trim).collect::<Vec<_>>());
        return;
    }
    run(&[]);
    // Every kernel the layer knows was launched by the suite (a kernel that is not executed
    // here does not ship).
    let idle: Vec<String> = sim::launch_counts()
        .into_iter()
        .filter(|(name, n)| *n == 0 && !name.starts_with("wick_simtest_"))
        .map(|(name, _)| name)
        .collect();
    assert!(
        idle.is_empty(),
        "kernels never executed by the suite: {idle:?}"
    );
}
