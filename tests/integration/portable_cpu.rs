//! The portable build on CPUs other than this one, under qemu's user-mode emulation
//! (Debian `qemu-user`): on a Haswell (x86-64-v3, the build's floor: AVX2 but no AVX-512,
//! VNNI or AMX) `wick serve` answers a chat through the kernels' AVX2 paths; on a Westmere
//! (no AVX) the binary refuses to start with a message naming what is missing, instead of
//! dying with SIGILL.
//!
//! The binary is the test build of `wick`: the same `-C target-cpu` as the release build
//! (.cargo/config.toml), so it holds the same instructions.

use crate::api_common;
use crate::common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn qemu() -> &'static str {
    let found = Command::new("qemu-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "qemu-x86_64 is missing: run scripts/test-deps.sh (Debian qemu-user)"
    );
    "qemu-x86_64"
}

#[test]
fn below_the_floor_refuses_with_a_message() {
    let out = Command::new(qemu())
        .args(["-cpu", "Westmere", env!("CARGO_BIN_EXE_wick"), "--version"])
        .output()
        .expect("running wick under qemu");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("lacks AVX2") && err.contains("x86-64-v3"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn haswell_serves_a_chat() {
    let models = api_common::store_dir("portable");
    api_common::import(
        &models,
        "smollm2:135m",
        &common::test_model("SmolLM2-135M-Instruct.Q4_1.gguf"),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let host = format!("127.0.0.1:{port}");
    let mut child = Command::new(qemu())
        .args(["-cpu", "Haswell", env!("CARGO_BIN_EXE_wick"), "serve"])
        .env("OLLAMA_HOST", &host)
        .env("OLLAMA_MODELS", &models)
        .env("WICK_KV_CACHE_BYTES", (64usize << 20).to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting wick serve under qemu");
    let start = Instant::now();
    while std::net::TcpStream::connect(&host).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("wick serve under qemu exited with {status}: {err}");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no listener");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Emulated AVX2 runs about 1 token/s here: a short system prompt keeps this under a
    // minute.
    let body = json!({
        "model": "smollm2:135m",
        "stream": false,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello."}
        ],
        "options": {"temperature": 0, "num_predict": 3}
    });
    let resp = api_common::post(&format!("http://{host}"), "/api/chat", body).await;
    let status = resp.status();
    let v: Value = resp.json().await.expect("a JSON answer");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{v}");
    let content = v["message"]["content"].as_str().unwrap_or_default();
    assert!(content.starts_with("Hello"), "{v}");
    assert_eq!(v["done"], true, "{v}");
}
