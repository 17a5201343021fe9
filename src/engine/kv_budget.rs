//! Sizing and allocating a model's paged KV cache: bytes per block on its device, the
//! default budget when none is set, and the memory the system has available.

use std::path::Path;

use crate::model::{CpuKvCache, KvCache, Model};

use super::EngineError;

/// Bytes of one KV block on the CPU cache (K and V, f32, every layer).
pub(super) fn block_bytes(model: &Model, block_size: usize) -> usize {
    #[cfg(feature = "cuda")]
    if model.decoder.device().is_cuda() {
        return crate::model::cuda::CudaKvCache::block_bytes(model.config(), block_size);
    }
    let c = model.config();
    2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * std::mem::size_of::<f32>()
}

/// The KV cache budget without `WICK_KV_CACHE_BYTES`, and why: on a GPU, 90% of its free
/// memory after the weights (activations need the rest); on the CPU, `fraction` of what the
/// process may still take ([`memory`]).
pub(super) fn default_cache_bytes(model: &Model, fraction: f64) -> (usize, String) {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = model.decoder.device() {
        return match crate::model::cuda::free_memory(d) {
            Ok(free) => (
                (free as f64 * 0.9) as usize,
                format!("90% of the GPU's {} free after the weights", gib(free)),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read free GPU memory; 1 GiB KV cache");
                (
                    1 << 30,
                    "1 GiB: the GPU's free memory could not be read".into(),
                )
            }
        };
    }
    #[cfg(not(feature = "cuda"))]
    let _ = model;
    let fraction = fraction.clamp(0.0, 1.0);
    let m = memory();
    (
        (m.available as f64 * fraction) as usize,
        format!(
            "{:.0}% of the {} this process may take ({})",
            fraction * 100.0,
            gib(m.available),
            m.source
        ),
    )
}

fn gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The paged KV cache on the model's device.
pub(super) fn new_cache(
    model: &Model,
    num_blocks: usize,
    block_size: usize,
) -> Result<Box<dyn KvCache + Send>, EngineError> {
    #[cfg(feature = "cuda")]
    if model.decoder.device().is_cuda() {
        let c = crate::model::cuda::CudaKvCache::new(
            model.config(),
            num_blocks,
            block_size,
            model.decoder.device(),
        )
        .map_err(EngineError::Cache)?;
        return Ok(Box::new(c));
    }
    Ok(Box::new(CpuKvCache::new(
        model.config(),
        num_blocks,
        block_size,
    )))
}

/// Memory this process may still take, and where the figure comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Memory {
    pub available: usize,
    pub source: String,
}

/// Memory available now: the host's `MemAvailable`, and inside a memory-limited cgroup (a
/// container, a function instance) no more than its limit minus its usage, at every level of
/// the cgroup's hierarchy.
pub fn available_memory() -> usize {
    memory().available
}

/// [`available_memory`] with its source.
pub fn memory() -> Memory {
    memory_under(Path::new("/"))
}

/// [`memory`] with `/proc` and `/sys` read under `root` (tests give a fake tree).
fn memory_under(root: &Path) -> Memory {
    const FALLBACK: usize = 1 << 30;
    let host = std::fs::read_to_string(root.join("proc/meminfo"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map(|kb| kb * 1024);
    let cgroup = cgroup_room(root);
    match (host, cgroup) {
        (Some(h), Some((room, source))) if room < h => Memory {
            available: room,
            source,
        },
        (Some(h), _) => Memory {
            available: h,
            source: "the host's MemAvailable".into(),
        },
        (None, Some((room, source))) => Memory {
            available: room,
            source,
        },
        (None, None) => Memory {
            available: FALLBACK,
            source: "a 1 GiB guess: no /proc/meminfo".into(),
        },
    }
}

/// The least room (limit minus usage) of this process's memory cgroup and its ancestors,
/// with a description, when any of them has a limit. cgroup v1 (`memory` controller:
/// `memory.limit_in_bytes`, `memory.usage_in_bytes`) or v2 (`memory.max`,
/// `memory.current`); the cgroup's directory is `/sys/fs/cgroup[/memory]<path>`, or the
/// mount itself when a cgroup namespace hides the path.
fn cgroup_room(root: &Path) -> Option<(usize, String)> {
    let text = std::fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
    let mut candidates = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            let mount = root.join("sys/fs/cgroup/memory");
            candidates.push((
                1,
                mount,
                path,
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ));
        } else if controllers.is_empty() {
            let mount = root.join("sys/fs/cgroup");
            candidates.push((2, mount, path, "memory.max", "memory.current"));
        }
    }
    for (version, mount, path, limit_file, usage_file) in candidates {
        let leaf = [mount.join(path), mount.clone()]
            .into_iter()
            .find(|d| d.join(limit_file).is_file())?;
        let mut best: Option<(usize, usize, usize)> = None;
        let mut dir = leaf.as_path();
        loop {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
            // "max" (v2) or a value near 2^63 (v1) means no limit at this level.
            let limit = read(limit_file)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&l| l < 1 << 60);
            let usage = read(usage_file).and_then(|v| v.trim().parse::<u64>().ok());
            if let (Some(limit), Some(usage)) = (limit, usage) {
                let (limit, usage) = (limit as usize, usage as usize);
                let room = limit.saturating_sub(usage);
                if best.is_none_or(|(r, _, _)| room < r) {
                    best = Some((room, limit, usage));
                }
            }
            if dir == mount.as_path() {
                break;
            }
            match dir.parent() {
                Some(p) if p.starts_with(&mount) => dir = p,
                _ => break,
            }
        }
        if let Some((room, limit, usage)) = best {
            return Some((
                room,
                format!(
                    "cgroup v{version} memory limit {} minus {} in use",
                    gib(limit),
                    gib(usage)
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "wick-mem-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("dirs");
            std::fs::write(p, text).expect("write");
        }
        dir
    }

    const MEMINFO: &str = "MemTotal: 16000000 kB\nMemAvailable: 8388608 kB\n";

    #[test]
    fn host_memory_without_a_limit() {
        let root = tree(&[
            ("proc/meminfo", MEMINFO),
            ("proc/self/cgroup", "0::/\n"),
            ("sys/fs/cgroup/memory.max", "max\n"),
            ("sys/fs/cgroup/memory.current", "1000\n"),
        ]);
        let m = memory_under(&root);
        assert_eq!(m.available, 8 << 30);
        assert_eq!(m.source, "the host's MemAvailable");
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn cgroup_v2_limit_caps_the_host() {
        let root = tree(&[
            ("proc/meminfo", MEMINFO),
            ("proc/self/cgroup", "0::/fn/instance\n"),
            ("sys/fs/cgroup/fn/instance/memory.max", "max\n"),
            ("sys/fs/cgroup/fn/instance/memory.current", "100\n"),
            // The limit sits on the parent.
            ("sys/fs/cgroup/fn/memory.max", "2147483648\n"),
            ("sys/fs/cgroup/fn/memory.current", "536870912\n"),
        ]);
        let m = memory_under(&root);
        assert_eq!(m.available, (2 << 30) - (512 << 20));
        assert!(m.source.contains("cgroup v2"), "{}", m.source);
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn cgroup_v1_limit_in_a_namespace() {
        // The path names a cgroup the namespace hides: the mount is the cgroup itself.
        let root = tree(&[
            ("proc/meminfo", MEMINFO),
            ("proc/self/cgroup", "4:memory:/kubepods/pod1\n0::/\n"),
            ("sys/fs/cgroup/memory/memory.limit_in_bytes", "1073741824\n"),
            ("sys/fs/cgroup/memory/memory.usage_in_bytes", "268435456\n"),
        ]);
        let m = memory_under(&root);
        assert_eq!(m.available, 768 << 20);
        assert!(m.source.contains("cgroup v1"), "{}", m.source);
        let _ = std::fs::remove_dir_all(root);
    }
}
