//! Links src/cpu_floor.c into the binaries (a start-up check of the CPU floor, compiled for
//! baseline x86-64), and compiles kernels/*.cu to PTX with nvcc when the `cuda` feature is
//! on; the CPU build needs no CUDA toolkit.
//!
//! One PTX file per kernel source and per architecture, embedded by src/model/cuda/ptx.rs
//! (through `$OUT_DIR/wick_kernels.rs`); at run time the newest one the GPU can take is loaded.
//! Architectures: `WICK_CUDA_ARCHS`, else `CUDA_COMPUTE_CAP`, as a comma list ("75,86",
//! "8.6", "sm_86"), default `75,86`. (candle-kernels reads `CUDA_COMPUTE_CAP` too but takes
//! a single value, hence `WICK_CUDA_ARCHS` for building ours for several.) nvcc is `$NVCC`,
//! else the one on PATH, else `$CUDA_HOME/bin/nvcc`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    cpu_floor();
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=kernels");
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
        for arch in &archs {
            let ptx = out_dir.join(format!("{stem}.sm_{arch}.ptx"));
            compile(&nvcc, src, arch, &ptx)?;
            let num: String = arch.chars().take_while(char::is_ascii_digit).collect();
            table.push_str(&format!(
                "    ({stem:?}, {num}, include_str!({:?})),\n",
                ptx.display().to_string()
            ));
        }
    }
    let rs = format!(
        "/// (module, compute capability as major*10+minor, PTX) for every kernels/*.cu and arch.\n\
         pub const PTX: &[(&str, u32, &str)] = &[\n{table}];\n"
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

fn compile(nvcc: &Path, src: &Path, arch: &str, out: &Path) -> Result<(), String> {
    let mut cmd = Command::new(nvcc);
    cmd.arg("--ptx")
        .arg(format!("-arch=compute_{arch}"))
        .args(["-O3", "-std=c++17", "-Ikernels"])
        .arg("-o")
        .arg(out)
        .arg(src);
    if let Ok(ccbin) = env::var("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    let output = cmd
        .output()
        .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} for sm_{arch} failed:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
