//! The store under hostile registries and full disks, and after crashes: a manifest
//! declaring an absurd blob size is refused before anything is allocated, a pull that does
//! not fit the disk fails at once and one that fills it mid-way gives the space back, temp
//! files of cut-short writes are never listed and are cleaned up at start when stale and
//! unheld, and answers never reveal where the store lives.

use crate::api_common;
use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::common::registry::TestRegistry;
use axum::body::Bytes;
use serde_json::{json, Value};

use crate::api_common::{config, post, pull, store_dir, tags};

fn server(models: &Path) -> String {
    let (addr, _) = api_common::spawn_server(config(
        models.to_path_buf(),
        &[("WICK_KV_CACHE_BYTES", "67108864")],
    ));
    format!("http://{addr}")
}

fn error_of(lines: &[Value]) -> String {
    lines
        .last()
        .and_then(|l| l["error"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Files under `dir` whose names end in `-partial` (downloads left behind).
fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("blobs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with("-partial"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn absurd_declared_sizes_are_refused() {
    let reg = TestRegistry::start(false);
    let real = reg.add_blob(Bytes::from_static(b"config"));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": real, "size": 6},
        "layers": [{"mediaType": "application/vnd.ollama.image.model",
                    "digest": format!("sha256:{}", "ab".repeat(32)),
                    "size": 1u64 << 62}],
    });
    reg.add_raw_manifest(
        "library/huge",
        "latest",
        serde_json::to_vec(&manifest).unwrap(),
    );
    let dir = store_dir("huge");
    let base = server(&dir);
    let lines = pull(
        &base,
        json!({"model": format!("{}/library/huge", reg.host), "insecure": true}),
    )
    .await;
    let err = error_of(&lines);
    assert!(
        err.contains("declares a blob of 4611686018427387904 bytes"),
        "{lines:?}"
    );
    // Still serving, nothing half-made.
    assert!(tags(&base).await.is_empty());
    assert!(partials(&dir).is_empty());
}

/// A tmpfs of `mib` MiB at a fresh directory, unmounted when dropped. `None` where mounting
/// is not allowed (not root), which the caller reports.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(tag: &str, mib: u64) -> Option<Tmpfs> {
        let dir = store_dir(tag);
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Random bytes (a blob's content does not matter to a pull).
fn noise(len: usize, seed: u64) -> Bytes {
    let mut s = seed;
    Bytes::from(
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn a_full_disk_keeps_nothing_half_written() {
    let Some(fs) = Tmpfs::mount("diskfull", 24) else {
        panic!("mounting a tmpfs needs root (CI runs as root)");
    };
    let reg = TestRegistry::start(false);
    reg.add_model("library/big", "latest", noise(40 << 20, 1), &[]);
    reg.add_model("library/a", "latest", noise(14 << 20, 2), &[]);
    reg.add_model("library/b", "latest", noise(14 << 20, 3), &[]);
    let base = server(&fs.0);
    // Larger than the disk: refused before a byte is written.
    let lines = pull(
        &base,
        json!({"model": format!("{}/library/big", reg.host), "insecure": true}),
    )
    .await;
    assert!(
        error_of(&lines).contains("not enough disk space"),
        "{lines:?}"
    );
    assert!(partials(&fs.0).is_empty());
    // Two that each fit but not together: whichever runs out gives its space back.
    let pulls = ["a", "b"].map(|m| {
        let (base, host) = (base.clone(), reg.host.clone());
        tokio::spawn(async move {
            pull(
                &base,
                json!({"model": format!("{host}/library/{m}"), "insecure": true}),
            )
            .await
        })
    });
    let mut failed = 0;
    for p in pulls {
        let lines = p.await.expect("pull task");
        if !error_of(&lines).is_empty() {
            failed += 1;
        }
    }
    assert!(failed >= 1, "both fit in 24 MiB?");
    assert!(partials(&fs.0).is_empty(), "{:?}", partials(&fs.0));
    assert_eq!(tags(&base).await.len(), 2 - failed);
    // The freed space is usable: the failed one pulls now that it is alone... if it fits.
    let used: u64 = std::fs::read_dir(fs.0.join("blobs"))
        .expect("blobs")
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(used < 16 << 20, "{used} bytes kept");
}

fn set_age(path: &Path, age: Duration) {
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open");
    f.set_modified(SystemTime::now() - age).expect("mtime");
}

#[tokio::test]
async fn temp_files_are_hidden_and_stale_ones_removed() {
    let dir = store_dir("stale");
    api_common::import(
        &dir,
        "smollm2:135m",
        &common::test_model("SmolLM2-135M-Instruct.Q4_1.gguf"),
    );
    let model_dir = dir.join("manifests/registry.ollama.ai/library/smollm2");
    let day = Duration::from_secs(24 * 3600);
    let old_tmp = model_dir.join(".135m.tmp-4242-17");
    let new_tmp = model_dir.join(".135m.tmp-4243-18");
    std::fs::copy(model_dir.join("135m"), &old_tmp).expect("temp manifest");
    std::fs::copy(model_dir.join("135m"), &new_tmp).expect("temp manifest");
    set_age(&old_tmp, 2 * day);
    let blobs = dir.join("blobs");
    let old_upload = blobs.join(".upload-4242-17");
    std::fs::write(&old_upload, b"half an upload").expect("upload");
    set_age(&old_upload, 2 * day);
    // Two abandoned downloads: one nobody holds, one whose lock a live process holds.
    let (free_d, held_d) = ("ab".repeat(32), "cd".repeat(32));
    for d in [&free_d, &held_d] {
        let partial = blobs.join(format!("sha256-{d}-partial"));
        std::fs::write(&partial, b"some bytes").expect("partial");
        std::fs::write(blobs.join(format!("sha256-{d}-partial.json")), b"{}").expect("state");
        set_age(&partial, 2 * day);
    }
    let lock =
        std::fs::File::create(blobs.join(format!("sha256-{held_d}-partial.lock"))).expect("lock");
    // Held through another open file description, as another process would hold it.
    lock.lock().expect("flock");

    let base = server(&dir);
    let listed: Vec<String> = tags(&base)
        .await
        .iter()
        .map(|m| m["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(listed, ["smollm2:135m"]);
    assert!(!old_tmp.exists() && !old_upload.exists());
    assert!(
        new_tmp.exists(),
        "a recent temp file may belong to a live write"
    );
    assert!(!blobs.join(format!("sha256-{free_d}-partial")).exists());
    assert!(blobs.join(format!("sha256-{held_d}-partial")).exists());
    drop(lock);
}

#[tokio::test]
async fn answers_name_blobs_not_paths() {
    let dir = store_dir("paths");
    api_common::import(
        &dir,
        "smollm2:135m",
        &common::test_model("SmolLM2-135M-Instruct.Q4_1.gguf"),
    );
    let base = server(&dir);
    let show: Value = post(&base, "/api/show", json!({"model": "smollm2:135m"}))
        .await
        .json()
        .await
        .expect("JSON");
    let modelfile = show["modelfile"].as_str().unwrap_or_default();
    let from = modelfile
        .lines()
        .find(|l| l.starts_with("FROM "))
        .expect("a FROM line");
    assert!(from.starts_with("FROM sha256-"), "{from}");
    let root = dir.display().to_string();
    assert!(!modelfile.contains(&root));
    // A broken weights file: the error says which blob, not where it is.
    let blob = from.trim_start_matches("FROM ");
    std::fs::write(dir.join("blobs").join(blob), b"GGUF but not really").expect("corrupt");
    let resp = post(
        &base,
        "/api/generate",
        json!({"model": "smollm2:135m", "prompt": "hi", "stream": false}),
    )
    .await;
    assert_eq!(resp.status(), 500);
    let body = resp.text().await.expect("body");
    assert!(body.contains(blob), "{body}");
    assert!(!body.contains(&root) && !body.contains("/blobs/"), "{body}");
}
