//! The GPU self-check's logic on the CPU execution layer: random-weight models with real
//! head shapes through the kernel path (our kernels, executed by the layer) and the
//! reference path (candle ops only) must agree, and a kernel broken on purpose must make the
//! check choose the reference path.
#![cfg(not(feature = "cuda"))]

use candle_core::Device;
use candlewick::model::cuda::sim;
use candlewick::model::selfcheck::{self, GpuPath, Scope};

#[test]
fn kernel_path_agrees_with_the_reference_path() {
    let c = selfcheck::run(&Device::Cpu, Scope::Quick);
    println!("{c:#?}");
    assert_eq!(c.path, GpuPath::Kernels, "{:?}", c.problem);
    assert!(c.worst <= c.tolerance / 3.0, "margin too thin: {c:?}");
    assert!(c.cases.len() >= 3);
    assert!(
        c.cases.iter().any(|(n, _)| n.starts_with("gemma3")),
        "{c:?}"
    );
}

#[test]
fn a_wrong_attention_kernel_sends_serving_to_the_reference_path() {
    let _broken = sim::inject_fault("wick_paged_attention");
    let c = selfcheck::run(&Device::Cpu, Scope::Quick);
    println!("{c:#?}");
    assert_eq!(c.path, GpuPath::Reference);
    let p = c.problem.expect("a problem is named");
    assert!(p.contains("differ from the reference"), "{p}");
}

#[test]
fn a_wrong_norm_kernel_sends_serving_to_the_reference_path() {
    let _broken = sim::inject_fault("wick_add_rms_norm");
    let c = selfcheck::run(&Device::Cpu, Scope::Quick);
    assert_eq!(c.path, GpuPath::Reference, "{c:?}");
}

#[test]
fn the_switch_turns_the_check_off() {
    // Read by `at_boot`; the check itself never runs on a CPU device.
    assert!(selfcheck::at_boot(&Device::Cpu).is_none());
    std::env::set_var("WICK_GPU_SELFCHECK", "off");
    assert!(selfcheck::disabled());
    std::env::set_var("WICK_GPU_SELFCHECK", "on");
    assert!(!selfcheck::disabled());
}
