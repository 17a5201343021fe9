//! Links src/cpu_floor.c into the binaries (a start-up check of the CPU floor, compiled for
//! baseline x86-64), and builds kernels/*.cu, two ways:
//!
//! * With the `cuda` feature: nvcc compiles each source to a fat binary holding SASS for
//!   every architecture asked for (default sm_75 and sm_86: T4 and A10 run it without
//!   JIT-compiling anything at start) plus PTX of the newest of them (later GPUs JIT it
//!   once). src/model/cuda/driver.rs embeds them through `$OUT_DIR/wick_kernels.rs`.
//!   Architectures: `WICK_CUDA_ARCHS`, else `CUDA_COMPUTE_CAP`, as a comma list ("75,86",
//!   "8.6", "sm_86"). (candle-kernels reads `CUDA_COMPUTE_CAP` too but takes a single value,
//!   hence `WICK_CUDA_ARCHS` for ours.) nvcc is `$NVCC`, else the one on PATH, else
//!   `$CUDA_HOME/bin/nvcc`.
//! * Without it: the system C++ compiler (the `cc` crate) compiles the same sources against
//!   the CPU execution layer in kernels/sim/ (a header standing in for CUDA, and a fiber
//!   runtime), with bounds/alignment/overflow checks that trap; src/model/cuda/sim.rs runs
//!   them. `WICK_SIM_UBSAN=1` links the UB sanitizer's runtime instead of trapping, so a
//!   failing check names its source line.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    cpu_floor();
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        build_sim();
        return;
    }
    for var in [
        "WICK_CUDA_ARCHS",
        "CUDA_COMPUTE_CAP",
        "NVCC",
        "CUDA_HOME",
        "NVCC_CCBIN",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Err(e) = build_kernels() {
        eprintln!("error: building the CUDA kernels: {e}");
        std::process::exit(1);
    }
}

/// The CPU execution layer: the kernels (with UB checks) and the runtime (without).
fn build_sim() {
    println!("cargo:rerun-if-env-changed=WICK_SIM_UBSAN");
    println!("cargo:rerun-if-env-changed=CXX");
    let ubsan = env::var("WICK_SIM_UBSAN").is_ok_and(|v| v == "1");
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++17")
            .opt_level(2)
            .include("kernels/sim")
            .include("kernels")
            .flag("-fno-strict-aliasing")
            .flag_if_supported("-Wno-unknown-pragmas")
            .warnings(true)
            .extra_warnings(false);
        b
    };
    let mut kernels = base();
    kernels.file("kernels/sim/kernels.cpp");
    if ubsan {
        kernels
            .flag("-fsanitize=undefined")
            .flag("-fno-sanitize=null,vptr")
            .flag("-g");
        println!("cargo:rustc-link-lib=dylib=ubsan");
    } else {
        // Out-of-bounds indices into fixed-size (shared, local) arrays, misaligned vector
        // accesses and signed overflow in index arithmetic trap; the runtime reports the trap
        // as a kernel error. (The null check is left out: GCC's misfires on loops that test
        // an optional pointer; a null access faults anyway.)
        kernels
            .flag("-fsanitize=bounds,alignment,signed-integer-overflow,shift,vla-bound")
            .flag("-fsanitize-undefined-trap-on-error");
    }
    kernels.compile("wick_sim_kernels");
    // The runtime jumps from a fault handler on a fiber's stack back to the launch
    // (siglongjmp); glibc's fortified longjmp would refuse a jump between stacks.
    base()
        .file("kernels/sim/sim.cpp")
        .flag("-U_FORTIFY_SOURCE")
        .compile("wick_sim_runtime");
}

/// Compiles the CPU floor check for baseline x86-64 (whatever `-C target-cpu` says) and links
/// its object into the binaries only: an object given to the linker is always kept, with its
/// constructor, where a library member nobody references would be dropped.
fn cpu_floor() {
    println!("cargo:rerun-if-changed=src/cpu_floor.c");
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
        return;
    }
    let objects = cc::Build::new()
        .file("src/cpu_floor.c")
        .flag("-march=x86-64")
        .flag("-mtune=generic")
        .opt_level(2)
        .compile_intermediates();
    for obj in objects {
        println!("cargo:rustc-link-arg-bins={}", obj.display());
    }
}

fn build_kernels() -> Result<(), String> {
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let archs = archs()?;
    let nvcc = nvcc()?;
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map_err(|e| format!("kernels/: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let mut table = String::new();
    for src in &sources {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("odd kernel file name {}", src.display()))?;
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        compile(&nvcc, src, &archs, &fatbin)?;
        table.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            fatbin.display().to_string()
        ));
    }
    let nums: Vec<String> = archs
        .iter()
        .map(|a| a.chars().take_while(char::is_ascii_digit).collect())
        .collect();
    let rs = format!(
        "/// Compute capabilities (major*10+minor) with SASS in the fat binaries.\n\
         pub const ARCHS: &[u32] = &[{}];\n\
         /// (module, fat binary) for every kernels/*.cu.\n\
         pub const FATBINS: &[(&str, &[u8])] = &[\n{table}];\n",
        nums.join(", ")
    );
    std::fs::write(out_dir.join("wick_kernels.rs"), rs).map_err(|e| format!("writing: {e}"))
}

fn archs() -> Result<Vec<String>, String> {
    let raw = env::var("WICK_CUDA_ARCHS")
        .or_else(|_| env::var("CUDA_COMPUTE_CAP"))
        .unwrap_or_else(|_| "75,86".into());
    let mut archs = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let p = part
            .trim_start_matches("sm_")
            .trim_start_matches("compute_");
        let a = if let Some((major, minor)) = p.split_once('.') {
            format!("{major}{minor}")
        } else {
            p.to_string()
        };
        let digits = a.chars().take_while(char::is_ascii_digit).count();
        if !(2..=3).contains(&digits) || !a[digits..].chars().all(|c| c == 'a' || c == 'f') {
            return Err(format!("bad compute capability {part:?} in {raw:?}"));
        }
        if a[..digits].parse::<u32>().map_err(|e| e.to_string())? < 75 {
            return Err(format!(
                "compute capability {part} is below 7.5 (the kernels need Turing or newer)"
            ));
        }
        if !archs.contains(&a) {
            archs.push(a);
        }
    }
    if archs.is_empty() {
        return Err(format!("no compute capability in {raw:?}"));
    }
    Ok(archs)
}

fn nvcc() -> Result<PathBuf, String> {
    if let Ok(p) = env::var("NVCC") {
        return Ok(PathBuf::from(p));
    }
    if let Some(paths) = env::var_os("PATH") {
        if let Some(p) = env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
        {
            return Ok(p);
        }
    }
    if let Ok(home) = env::var("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err("nvcc not found (set NVCC, put it on PATH or set CUDA_HOME)".into())
}

/// One fat binary: SASS for each arch, and PTX of the newest plain (not `a`/`f`-suffixed,
/// which are not forward compatible) one.
fn compile(nvcc: &Path, src: &Path, archs: &[String], out: &Path) -> Result<(), String> {
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin")
        .args(["-O3", "-std=c++17", "-Ikernels"])
        .arg("-o")
        .arg(out);
    for a in archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    let ptx = archs
        .iter()
        .filter(|a| a.chars().all(|c| c.is_ascii_digit()))
        .max_by_key(|a| a.parse::<u32>().unwrap_or(0));
    if let Some(a) = ptx {
        cmd.arg(format!("-gencode=arch=compute_{a},code=compute_{a}"));
    }
    cmd.arg(src);
    if let Ok(ccbin) = env::var("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    let output = cmd
        .output()
        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} for {archs:?} failed:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
