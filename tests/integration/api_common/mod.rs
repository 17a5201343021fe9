//! An in-process `wick serve` on loopback for the HTTP tests: a scratch model store with real
//! GGUF models imported, a server on its own runtime thread, and small request helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use candlewick::api::{self, AppState};
use candlewick::config::Config;
use candlewick::store::{ModelName, Store};
use futures_util::StreamExt;
use serde_json::Value;

/// A fresh scratch store under cargo's target tmp dir (rebuilt each run, so repeated runs
/// do not pile up copies of the models).
pub fn store_dir(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("api-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the scratch store");
    dir
}

/// Imports `gguf` into the store at `dir` as `name`.
pub fn import(dir: &Path, name: &str, gguf: &Path) {
    let name = ModelName::parse(name).expect("model name");
    Store::new(dir)
        .import_gguf(&name, gguf)
        .expect("importing a test model");
}

/// The server's settings: the store at `models` plus `extra` environment.
pub fn config(models: PathBuf, extra: &[(&str, &str)]) -> Config {
    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("OLLAMA_MODELS".into(), models.display().to_string());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    Config::from_lookup(|k| env.get(k).cloned()).expect("test config")
}

/// Starts a server on its own runtime thread (tests come and go with their own runtimes)
/// and returns its address and state.
pub fn spawn_server(cfg: Config) -> (SocketAddr, AppState) {
    spawn_server_until(cfg, std::future::pending())
}

/// [`spawn_server`] that drains and stops when `stop` completes.
pub fn spawn_server_until(
    cfg: Config,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> (SocketAddr, AppState) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binding 127.0.0.1:0");
            let state = AppState::new(cfg).expect("app state");
            tx.send((listener.local_addr().expect("local addr"), state.clone()))
                .expect("reporting the address");
            api::serve(listener, state, stop).await.expect("serving");
        });
    });
    rx.recv().expect("server address")
}

/// The whole body as text, read chunk by chunk.
pub async fn body_text(resp: reqwest::Response) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.expect("body chunk"));
    }
    String::from_utf8(body).expect("utf-8 body")
}

/// An NDJSON body, checking that every line is one JSON object.
pub async fn ndjson_lines(resp: reqwest::Response) -> Vec<Value> {
    let ct = resp.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(ct, "application/x-ndjson");
    let text = body_text(resp).await;
    assert!(text.ends_with('\n'), "the last line ends with a newline");
    text.lines()
        .map(|l| {
            assert!(!l.trim().is_empty(), "no blank lines in NDJSON");
            serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}"))
        })
        .collect()
}

/// The `data:` payloads of an SSE body, `[DONE]` included.
pub async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = body_text(resp).await;
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("an SSE event without data: {e:?}"))
                .to_string()
        })
        .collect()
}

/// A `wick serve` process on a free loopback port; killed when dropped.
pub struct WickProcess {
    child: std::process::Child,
    /// `127.0.0.1:PORT`, as OLLAMA_HOST takes it.
    pub host: String,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl WickProcess {
    /// Starts `wick serve` on the store at `models` and waits until it listens.
    pub fn start(models: &Path, extra_env: &[(&str, &str)]) -> WickProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let host = format!("127.0.0.1:{port}");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wick"));
        cmd.arg("serve")
            .env("OLLAMA_HOST", &host)
            .env("OLLAMA_MODELS", models)
            .env("WICK_KV_CACHE_BYTES", (256usize << 20).to_string())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("starting wick serve");
        let base = format!("http://{host}");
        let server = WickProcess { child, host, base };
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(&server.host).is_err() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "wick serve did not listen on {}",
                server.host
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        server
    }
}

impl WickProcess {
    /// SIGKILL, as a crash would end it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WickProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sha256:<hex>` of `bytes`, as digests are written in manifests.
pub fn sha(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub async fn post(base: &str, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .expect("request")
}

/// `post` with its status and JSON body (`Null` when the body is not JSON).
pub async fn post_json(base: &str, path: &str, body: Value) -> (u16, Value) {
    let resp = post(base, path, body).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A PNG of `w` x `h` with a colour pattern set by `seed`.
pub fn test_png(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 5 + seed * 17) % 256) as u8,
            (((x + y) * 3 + seed * 101) % 256) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

/// Standard base64, as clients send images.
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A whole NDJSON reply with status 200 (see [`ndjson_lines`]).
pub async fn ok_lines(resp: reqwest::Response) -> Vec<Value> {
    assert_eq!(resp.status(), 200);
    ndjson_lines(resp).await
}

/// `/api/pull`'s progress lines.
pub async fn pull(base: &str, body: Value) -> Vec<Value> {
    ok_lines(post(base, "/api/pull", body).await).await
}

/// The `models` list a GET of `path` answers (`/api/tags`, `/api/ps`).
async fn models_at(base: &str, path: &str) -> Vec<Value> {
    let v: Value = reqwest::get(format!("{base}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{path} JSON: {e}"));
    v["models"].as_array().expect("models").clone()
}

/// `/api/tags`'s models.
pub async fn tags(base: &str) -> Vec<Value> {
    models_at(base, "/api/tags").await
}

/// `/api/ps`'s loaded models.
pub async fn ps(base: &str) -> Vec<Value> {
    models_at(base, "/api/ps").await
}

/// Files in `blobs/`, by name.
pub fn blob_files(models: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(models.join("blobs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Every file in `blobs/` is a finished blob whose bytes hash to its name.
pub fn assert_store_clean(models: &Path) {
    for name in blob_files(models) {
        let hex = name.strip_prefix("sha256-").unwrap_or("");
        assert!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "stray file in blobs/: {name}"
        );
        let bytes = std::fs::read(models.join("blobs").join(&name)).expect("blob");
        assert_eq!(sha(&bytes), format!("sha256:{hex}"), "blob {name}");
    }
}
