//! A model registry on loopback that speaks the Ollama registry protocol for real:
//! `GET /v2/<ns>/<model>/manifests/<tag>` (404 for unknown names) and
//! `GET|HEAD /v2/<ns>/<model>/blobs/<digest>` with `Range` support. One registry can
//! listen on several ports, some of which answer blob requests with a `307` to another
//! (the way ollama.com sends clients to object storage). It counts what it serves and can
//! misbehave on demand: drop a connection mid-blob, stop serving after some bytes (failing
//! or stalling), hold every blob until a gate opens, or flip a byte.
//!
//! Used by tests/integration/store_pull.rs, tests/integration/api_clients.rs and
//! benches/pull.rs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

const CHUNK: usize = 256 << 10;

/// How blob bodies misbehave.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The next response that has sent this many bytes of its body drops the connection.
    pub drop_once_after: Option<u64>,
    /// Serve at most this many bytes of each blob in total; then fail (or stall, below).
    pub limit: Option<u64>,
    /// At the limit, hold the connection open without sending instead of failing.
    pub stall_at_limit: bool,
    /// Flip one byte in the middle of every blob larger than 1 MiB.
    pub corrupt: bool,
}

#[derive(Default)]
struct Counts {
    /// Body bytes sent per digest.
    served: HashMap<String, u64>,
    /// GET requests per digest.
    gets: HashMap<String, u64>,
    manifest_gets: u64,
}

struct Inner {
    manifests: Mutex<HashMap<String, Vec<u8>>>,
    blobs: Mutex<HashMap<String, Bytes>>,
    counts: Mutex<Counts>,
    faults: Mutex<Faults>,
    /// Blob bodies wait while this is false.
    gate: watch::Sender<bool>,
}

/// A running registry; it lives as long as the test process.
#[derive(Clone)]
pub struct TestRegistry {
    inner: Arc<Inner>,
    /// `host:port` of the main listener (use it in model names).
    pub host: String,
    /// `host:port` of a second listener that serves the same blobs directly.
    pub blob_host: String,
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl TestRegistry {
    /// Starts the registry on its own runtime thread: a main listener whose blob requests
    /// are redirected to a second listener when `redirect` is set.
    pub fn start(redirect: bool) -> TestRegistry {
        Self::start_at("127.0.0.1", redirect)
    }

    /// [`TestRegistry::start`] on another address of this host (an address in a network
    /// namespace the test made; the runtime thread inherits the caller's namespace).
    pub fn start_at(ip: &str, redirect: bool) -> TestRegistry {
        let ip = ip.to_string();
        let (gate, _) = watch::channel(true);
        let inner = Arc::new(Inner {
            manifests: Mutex::default(),
            blobs: Mutex::default(),
            counts: Mutex::default(),
            faults: Mutex::default(),
            gate,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = inner.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("registry runtime");
            rt.block_on(async move {
                let blob_listener = tokio::net::TcpListener::bind((ip.as_str(), 0))
                    .await
                    .expect("binding the blob host");
                let blob_addr = blob_listener.local_addr().expect("blob addr");
                let main_listener = tokio::net::TcpListener::bind((ip.as_str(), 0))
                    .await
                    .expect("binding the registry");
                let main_addr = main_listener.local_addr().expect("registry addr");
                let to = redirect.then(|| format!("http://{blob_addr}"));
                tokio::spawn(serve(blob_listener, shared.clone(), None));
                tx.send((main_addr, blob_addr))
                    .expect("reporting addresses");
                serve(main_listener, shared, to).await;
            });
        });
        let (main, blob): (SocketAddr, SocketAddr) = rx.recv().expect("registry address");
        TestRegistry {
            inner,
            host: main.to_string(),
            blob_host: blob.to_string(),
        }
    }

    /// Adds a blob and returns its digest.
    pub fn add_blob(&self, bytes: Bytes) -> String {
        let d = sha(&bytes);
        self.inner.blobs.lock().unwrap().insert(d.clone(), bytes);
        d
    }

    /// Publishes `repo:tag` (`repo` is `namespace/model`) as a GGUF model with the given
    /// extra layers (media type suffix, content); returns the manifest bytes.
    pub fn add_model(
        &self,
        repo: &str,
        tag: &str,
        gguf: Bytes,
        extra: &[(&str, &[u8])],
    ) -> Vec<u8> {
        let mut layers = vec![json!({
            "mediaType": "application/vnd.ollama.image.model",
            "digest": self.add_blob(gguf.clone()),
            "size": gguf.len(),
        })];
        for (kind, bytes) in extra {
            layers.push(json!({
                "mediaType": format!("application/vnd.ollama.image.{kind}"),
                "digest": self.add_blob(Bytes::copy_from_slice(bytes)),
                "size": bytes.len(),
            }));
        }
        let config = serde_json::to_vec(&json!({
            "model_format": "gguf", "model_family": "llama", "model_families": ["llama"],
            "model_type": "135M", "file_type": "Q4_1", "architecture": "amd64", "os": "linux",
        }))
        .unwrap();
        let manifest = serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": self.add_blob(Bytes::from(config.clone())),
                "size": config.len(),
            },
            "layers": layers,
        }))
        .unwrap();
        self.inner
            .manifests
            .lock()
            .unwrap()
            .insert(format!("{repo}:{tag}"), manifest.clone());
        manifest
    }

    /// Publishes `repo:tag` with a manifest as given, whatever it claims (sizes included).
    pub fn add_raw_manifest(&self, repo: &str, tag: &str, manifest: Vec<u8>) {
        self.inner
            .manifests
            .lock()
            .unwrap()
            .insert(format!("{repo}:{tag}"), manifest);
    }

    pub fn set_faults(&self, f: Faults) {
        *self.inner.faults.lock().unwrap() = f;
    }

    /// Closes (false) or opens (true) the gate every blob body waits at.
    pub fn set_gate(&self, open: bool) {
        self.inner.gate.send_replace(open);
    }

    /// Body bytes sent for `digest` so far.
    pub fn served(&self, digest: &str) -> u64 {
        let c = self.inner.counts.lock().unwrap();
        c.served.get(digest).copied().unwrap_or(0)
    }

    /// GET requests for `digest` so far (redirects included).
    pub fn gets(&self, digest: &str) -> u64 {
        let c = self.inner.counts.lock().unwrap();
        c.gets.get(digest).copied().unwrap_or(0)
    }

    pub fn manifest_gets(&self) -> u64 {
        self.inner.counts.lock().unwrap().manifest_gets
    }

    pub fn reset_counts(&self) {
        *self.inner.counts.lock().unwrap() = Counts::default();
    }
}

async fn serve(listener: tokio::net::TcpListener, inner: Arc<Inner>, redirect: Option<String>) {
    let app = Router::new()
        .route("/v2/{ns}/{model}/manifests/{tag}", get(manifest))
        .route("/v2/{ns}/{model}/blobs/{digest}", get(blob))
        .with_state((inner, redirect));
    axum::serve(listener, app).await.expect("registry serving");
}

type St = State<(Arc<Inner>, Option<String>)>;

async fn manifest(
    State((inner, _)): St,
    Path((ns, model, tag)): Path<(String, String, String)>,
) -> Response {
    inner.counts.lock().unwrap().manifest_gets += 1;
    let found = inner
        .manifests
        .lock()
        .unwrap()
        .get(&format!("{ns}/{model}:{tag}"))
        .cloned();
    match found {
        Some(bytes) => (
            [(
                header::CONTENT_TYPE,
                "application/vnd.docker.distribution.manifest.v2+json",
            )],
            bytes,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(
                json!({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}),
            ),
        )
            .into_response(),
    }
}

/// `bytes=a-b` or `bytes=a-` within `len`.
fn parse_range(headers: &HeaderMap, len: u64) -> Option<(u64, u64)> {
    let v = headers.get(header::RANGE)?.to_str().ok()?;
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    let start: u64 = a.parse().ok()?;
    let end: u64 = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse().ok()?
    };
    (start <= end && end < len).then_some((start, end))
}

async fn blob(
    State((inner, redirect)): St,
    Path((ns, model, digest)): Path<(String, String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Response {
    if method == axum::http::Method::GET {
        *inner
            .counts
            .lock()
            .unwrap()
            .gets
            .entry(digest.clone())
            .or_default() += 1;
    }
    if let Some(to) = redirect {
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(
                header::LOCATION,
                format!("{to}/v2/{ns}/{model}/blobs/{digest}"),
            )],
        )
            .into_response();
    }
    let Some(data) = inner.blobs.lock().unwrap().get(&digest).cloned() else {
        return (StatusCode::NOT_FOUND, "blob unknown").into_response();
    };
    let len = data.len() as u64;
    let (status, start, end) = match parse_range(&headers, len) {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b + 1),
        None if headers.contains_key(header::RANGE) && len > 0 => {
            return StatusCode::RANGE_NOT_SATISFIABLE.into_response()
        }
        None => (StatusCode::OK, 0, len),
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        );
    }
    if method == axum::http::Method::HEAD {
        return builder.body(Body::empty()).unwrap();
    }
    let body = BodyState {
        inner,
        digest,
        data,
        pos: start,
        end,
        sent: 0,
    };
    builder
        .body(Body::from_stream(futures_util::stream::unfold(
            body, next_chunk,
        )))
        .unwrap()
}

struct BodyState {
    inner: Arc<Inner>,
    digest: String,
    data: Bytes,
    pos: u64,
    end: u64,
    sent: u64,
}

type Chunk = Result<Bytes, std::io::Error>;

async fn next_chunk(mut s: BodyState) -> Option<(Chunk, BodyState)> {
    let mut gate = s.inner.gate.subscribe();
    if gate.wait_for(|open| *open).await.is_err() {
        return None;
    }
    let mut stalled = false;
    loop {
        if s.pos >= s.end {
            return None;
        }
        let faults = s.inner.faults.lock().unwrap().clone();
        if stalled && !faults.stall_at_limit {
            // The test moved on: a stalled connection ends instead of resuming.
            return Some((Err(std::io::Error::other("stall ended")), s));
        }
        let mut len = CHUNK.min((s.end - s.pos) as usize) as u64;
        if let Some(limit) = faults.limit {
            let served = s
                .inner
                .counts
                .lock()
                .unwrap()
                .served
                .get(&s.digest)
                .copied()
                .unwrap_or(0);
            let room = limit.saturating_sub(served);
            if room == 0 {
                if faults.stall_at_limit {
                    stalled = true;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                // An error ends the body early: hyper drops the connection mid-message.
                return Some((Err(std::io::Error::other("limit reached")), s));
            }
            len = len.min(room);
        }
        if let Some(n) = faults.drop_once_after {
            if s.sent >= n {
                s.inner.faults.lock().unwrap().drop_once_after = None;
                return Some((Err(std::io::Error::other("dropped on purpose")), s));
            }
            len = len.min(n - s.sent);
        }
        let (a, b) = (s.pos as usize, (s.pos + len) as usize);
        let mut chunk = s.data.slice(a..b);
        let mid = s.data.len() / 2;
        if faults.corrupt && s.data.len() > (1 << 20) && (a..b).contains(&mid) {
            let mut v = chunk.to_vec();
            v[mid - a] ^= 0x55;
            chunk = Bytes::from(v);
        }
        s.pos += len;
        s.sent += len;
        *s.inner
            .counts
            .lock()
            .unwrap()
            .served
            .entry(s.digest.clone())
            .or_default() += len;
        return Some((Ok(chunk), s));
    }
}
