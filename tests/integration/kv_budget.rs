//! The KV cache budget of a server in a memory-limited container: `wick serve` (the real
//! binary, without `WICK_KV_CACHE_BYTES`) moved into a memory cgroup with a 512 MiB limit
//! sizes its cache from that limit, not from the host's free memory, and says so in
//! `/api/ps`.

use crate::api_common;
use crate::common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A memory cgroup with a limit, removed when dropped (its processes must be gone first).
struct Cgroup {
    dir: PathBuf,
    version: u8,
}

impl Cgroup {
    fn create(name: &str, limit: u64) -> Cgroup {
        let v1 = PathBuf::from("/sys/fs/cgroup/memory");
        let (dir, version, file) = if v1.join("memory.limit_in_bytes").is_file() {
            (v1.join(name), 1, "memory.limit_in_bytes")
        } else {
            (PathBuf::from("/sys/fs/cgroup").join(name), 2, "memory.max")
        };
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("creating {} (needs root): {e}", dir.display()));
        std::fs::write(dir.join(file), limit.to_string())
            .unwrap_or_else(|e| panic!("setting {file}: {e}"));
        Cgroup { dir, version }
    }

    fn add(&self, child: &Child) {
        std::fs::write(self.dir.join("cgroup.procs"), child.id().to_string())
            .expect("moving the server into the cgroup");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_budget_follows_the_cgroup_limit() {
    let models = api_common::store_dir("kv-cgroup");
    api_common::import(
        &models,
        "smollm2:135m",
        &common::test_model("SmolLM2-135M-Instruct.Q4_1.gguf"),
    );
    let cgroup = Cgroup::create(&format!("wick-kv-test-{}", std::process::id()), 512 << 20);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let host = format!("127.0.0.1:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_wick"))
        .arg("serve")
        .env("OLLAMA_HOST", &host)
        .env("OLLAMA_MODELS", &models)
        .env_remove("WICK_KV_CACHE_BYTES")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("wick serve");
    cgroup.add(&child);
    let server = Killed(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(&host).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "no listener");
        std::thread::sleep(Duration::from_millis(50));
    }
    let base = format!("http://{host}");
    let load = api_common::post(&base, "/api/generate", json!({"model": "smollm2:135m"})).await;
    assert_eq!(load.status(), 200);
    let ps = api_common::ps(&base).await;
    let kv = &ps[0]["kv_cache"];
    let reason = kv["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("cgroup v{} memory limit 0.50 GiB", cgroup.version)),
        "{kv}"
    );
    let bytes = kv["bytes"].as_u64().unwrap_or(u64::MAX);
    // 30% of what the limit leaves after the server's own memory.
    assert!(bytes > 0 && bytes <= (512 << 20) * 3 / 10, "{kv}");
    drop(server);
}

/// `OLLAMA_KV_CACHE_TYPE=q8_0`: the same budget holds 1.88 times the tokens of the default
/// f16 cache (34 bytes per 32 elements against 64), `/api/ps` says so, and the model still
/// answers.
#[tokio::test]
async fn q8_0_holds_more_tokens_in_the_same_budget() {
    let mut served = Vec::new();
    for ty in ["f16", "q8_0"] {
        let models = api_common::store_dir(&format!("kv-type-{ty}"));
        api_common::import(
            &models,
            "smollm2:135m",
            &common::test_model(common::SMOLLM2_GGUF),
        );
        let cfg = api_common::config(
            models,
            &[
                ("OLLAMA_KV_CACHE_TYPE", ty),
                ("WICK_KV_CACHE_BYTES", &(64usize << 20).to_string()),
            ],
        );
        let (addr, _state) = api_common::spawn_server(cfg);
        let base = format!("http://{addr}");
        let resp = api_common::post(
            &base,
            "/api/chat",
            json!({"model": "smollm2:135m", "stream": false,
                   "options": {"temperature": 0, "num_predict": 24},
                   "messages": [{"role": "user", "content": "What is the capital of Germany?"}]}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.expect("JSON");
        let answer = v["message"]["content"].as_str().unwrap_or_default();
        assert!(answer.contains("Berlin"), "{ty}: {answer:?}");
        let kv = api_common::ps(&base).await[0]["kv_cache"].clone();
        assert_eq!(kv["type"], ty, "{kv}");
        served.push(kv["tokens"].as_u64().unwrap_or(0) as f64);
    }
    let ratio = served[1] / served[0];
    assert!((1.85..1.9).contains(&ratio), "{served:?}");
}
