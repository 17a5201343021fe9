//! A Hugging Face Hub on loopback that answers the requests hf-hub (0.4) and our pull make
//! of the real one, with the headers they read:
//!
//! - `GET /api/models/<user>/<repo>/revision/<rev>[?blobs=true]`: `sha` (the commit) and
//!   `siblings` (`rfilename`; with `blobs=true` also `size`, `blobId` and, for LFS files,
//!   `lfs: {sha256, size, pointerSize}`). Unknown repositories get 401 (`X-Error-Code:
//!   RepoNotFound`), as the Hub answers anonymous callers; unknown revisions 404.
//! - `GET|HEAD /<user>/<repo>/resolve/<rev>/<file>`: files kept in git are served here
//!   (`ETag`, `X-Repo-Commit`, `Range` -> 206 with `Content-Range`); LFS files (every
//!   `*.safetensors`, and anything over 10 MB, as the Hub's default `.gitattributes` and
//!   size limit make them) answer `302` to a second listener, the "CDN", with
//!   `X-Linked-Etag` (the sha256), `X-Linked-Size` and `X-Repo-Commit`.
//! - `GET /lfs/<sha256>` on the CDN listener: the bytes, with `Range` (an end past the file
//!   is cut to it, as HTTP says and hf-hub relies on).
//! - `GET /v2/<user>/<repo>/manifests/<tag>`: the Ollama registry shim, which refuses these
//!   repositories because they hold no GGUF file.
//!
//! Gated repositories want `Authorization: Bearer <token>` on `resolve`. The CDN can
//! misbehave on demand (stop or stall after some bytes, flip a byte) and counts what it
//! serves. Used by tests/integration/hf_pull.rs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;
use sha2::{Digest, Sha256};

const CHUNK: usize = 256 << 10;
/// Files larger than this live in LFS on the Hub.
const LFS_OVER: usize = 10 << 20;

/// How LFS bodies misbehave.
#[derive(Debug, Clone, Default)]
pub struct HubFaults {
    /// Serve at most this many bytes of each LFS object in total; then fail (or stall).
    pub limit: Option<u64>,
    /// At the limit, hold the connection open without sending instead of failing.
    pub stall_at_limit: bool,
    /// Flip one byte in the middle of every LFS object larger than 1 MiB.
    pub corrupt: bool,
}

struct HubRepo {
    sha: String,
    files: Vec<(String, Bytes)>,
    token: Option<String>,
}

#[derive(Default)]
struct Counts {
    /// Body bytes sent per LFS sha256 (hex) or per git file name.
    served: HashMap<String, u64>,
    listings: u64,
}

struct Inner {
    repos: Mutex<HashMap<String, HubRepo>>,
    lfs: Mutex<HashMap<String, Bytes>>,
    faults: Mutex<HubFaults>,
    counts: Mutex<Counts>,
}

/// A running hub; it lives as long as the test process.
#[derive(Clone)]
pub struct TestHub {
    inner: Arc<Inner>,
    /// `http://127.0.0.1:<port>`: what `HF_ENDPOINT` is set to.
    pub endpoint: String,
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether the Hub keeps this file in LFS.
pub fn is_lfs(name: &str, len: usize) -> bool {
    name.ends_with(".safetensors") || len > LFS_OVER
}

impl TestHub {
    pub fn start() -> TestHub {
        let inner = Arc::new(Inner {
            repos: Mutex::default(),
            lfs: Mutex::default(),
            faults: Mutex::default(),
            counts: Mutex::default(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = inner.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("hub runtime");
            rt.block_on(async move {
                let cdn = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("binding the CDN");
                let cdn_addr = cdn.local_addr().expect("CDN addr");
                let main = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("binding the hub");
                let main_addr = main.local_addr().expect("hub addr");
                let cdn_app = Router::new()
                    .route("/lfs/{sha}", get(lfs_object))
                    .with_state(shared.clone());
                tokio::spawn(async move { axum::serve(cdn, cdn_app).await.expect("CDN") });
                let app = Router::new()
                    .route("/api/models/{user}/{repo}/revision/{rev}", get(listing))
                    .route("/{user}/{repo}/resolve/{rev}/{*file}", get(resolve))
                    .route("/v2/{user}/{repo}/manifests/{tag}", get(shim_manifest))
                    .with_state((shared, format!("http://{cdn_addr}")));
                tx.send(main_addr).expect("reporting the address");
                axum::serve(main, app).await.expect("hub serving");
            });
        });
        let addr = rx.recv().expect("hub address");
        TestHub {
            inner,
            endpoint: format!("http://{addr}"),
        }
    }

    /// Publishes `repo` (`user/name`) with `files`; returns its commit id.
    pub fn add_repo(&self, repo: &str, files: Vec<(String, Bytes)>) -> String {
        self.add(repo, files, None)
    }

    /// Publishes a gated `repo` whose files need `Authorization: Bearer <token>`.
    pub fn add_gated_repo(&self, repo: &str, files: Vec<(String, Bytes)>, token: &str) -> String {
        self.add(repo, files, Some(token.to_string()))
    }

    fn add(&self, repo: &str, files: Vec<(String, Bytes)>, token: Option<String>) -> String {
        let mut h = Sha256::new();
        for (name, bytes) in &files {
            h.update(name.as_bytes());
            h.update(sha_hex(bytes).as_bytes());
            if is_lfs(name, bytes.len()) {
                self.inner
                    .lfs
                    .lock()
                    .unwrap()
                    .insert(sha_hex(bytes), bytes.clone());
            }
        }
        // A commit id looks like git's: 40 hex.
        let sha = hex::encode(h.finalize())[..40].to_string();
        self.inner.repos.lock().unwrap().insert(
            repo.to_string(),
            HubRepo {
                sha: sha.clone(),
                files,
                token,
            },
        );
        sha
    }

    pub fn set_faults(&self, f: HubFaults) {
        *self.inner.faults.lock().unwrap() = f;
    }

    /// Body bytes sent of the LFS object with these bytes.
    pub fn served_lfs(&self, bytes: &[u8]) -> u64 {
        let c = self.inner.counts.lock().unwrap();
        c.served.get(&sha_hex(bytes)).copied().unwrap_or(0)
    }

    /// Body bytes sent of the git-stored file `name` (any repository).
    pub fn served_file(&self, name: &str) -> u64 {
        let c = self.inner.counts.lock().unwrap();
        c.served.get(name).copied().unwrap_or(0)
    }

    pub fn listings(&self) -> u64 {
        self.inner.counts.lock().unwrap().listings
    }

    pub fn reset_counts(&self) {
        *self.inner.counts.lock().unwrap() = Counts::default();
    }
}

type Hub = State<(Arc<Inner>, String)>;

fn hub_error(status: StatusCode, code: &str, msg: &str) -> Response {
    (
        status,
        [("x-error-code", code), ("x-error-message", msg)],
        axum::Json(json!({"error": msg})),
    )
        .into_response()
}

async fn listing(
    State((inner, _)): Hub,
    Path((user, repo, rev)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    inner.counts.lock().unwrap().listings += 1;
    let id = format!("{user}/{repo}");
    let repos = inner.repos.lock().unwrap();
    let Some(r) = repos.get(&id) else {
        return hub_error(
            StatusCode::UNAUTHORIZED,
            "RepoNotFound",
            "Repository not found",
        );
    };
    if rev != "main" && rev != r.sha {
        return hub_error(
            StatusCode::NOT_FOUND,
            "RevisionNotFound",
            &format!("Invalid rev id: {rev}"),
        );
    }
    let blobs = q.get("blobs").is_some_and(|v| v == "true");
    let mut files: Vec<&(String, Bytes)> = r.files.iter().collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .map(|(name, bytes)| {
            if !blobs {
                return json!({"rfilename": name});
            }
            let mut s = json!({
                "rfilename": name,
                "size": bytes.len(),
                "blobId": &sha_hex(name.as_bytes())[..40],
            });
            if is_lfs(name, bytes.len()) {
                s["lfs"] =
                    json!({"sha256": sha_hex(bytes), "size": bytes.len(), "pointerSize": 134});
            }
            s
        })
        .collect();
    axum::Json(json!({
        "_id": &r.sha[..24], "id": id, "modelId": id, "author": user, "sha": r.sha,
        "private": false, "gated": if r.token.is_some() { json!("auto") } else { json!(false) },
        "disabled": false, "library_name": "transformers", "tags": ["safetensors"],
        "siblings": siblings,
    }))
    .into_response()
}

async fn resolve(
    State((inner, cdn)): Hub,
    Path((user, repo, rev, file)): Path<(String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let id = format!("{user}/{repo}");
    let (sha, found) = {
        let repos = inner.repos.lock().unwrap();
        let Some(r) = repos.get(&id) else {
            return hub_error(
                StatusCode::NOT_FOUND,
                "RepoNotFound",
                "Repository not found",
            );
        };
        if let Some(t) = &r.token {
            let want = format!("Bearer {t}");
            if headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                != Some(&want)
            {
                return hub_error(
                    StatusCode::UNAUTHORIZED,
                    "GatedRepo",
                    &format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in."),
                );
            }
        }
        if rev != "main" && rev != r.sha {
            return hub_error(
                StatusCode::NOT_FOUND,
                "RevisionNotFound",
                &format!("Invalid rev id: {rev}"),
            );
        }
        let found = r
            .files
            .iter()
            .find(|(n, _)| *n == file)
            .map(|(_, b)| b.clone());
        (r.sha.clone(), found)
    };
    let Some(bytes) = found else {
        return hub_error(
            StatusCode::NOT_FOUND,
            "EntryNotFound",
            &format!("{file} does not exist"),
        );
    };
    if is_lfs(&file, bytes.len()) {
        let digest = sha_hex(&bytes);
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, format!("{cdn}/lfs/{digest}"))
            .header("x-repo-commit", &sha)
            .header("x-linked-etag", format!("\"{digest}\""))
            .header("x-linked-size", bytes.len())
            .header(header::ETAG, format!("\"{digest}\""))
            .body(Body::empty())
            .unwrap();
    }
    let etag = format!("\"{}\"", &sha_hex(&bytes)[..40]);
    ranged(&inner, &file, false, bytes, &method, &headers, |b| {
        b.header("x-repo-commit", &sha).header(header::ETAG, &etag)
    })
}

async fn lfs_object(
    State(inner): State<Arc<Inner>>,
    Path(sha): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let Some(bytes) = inner.lfs.lock().unwrap().get(&sha).cloned() else {
        return (StatusCode::NOT_FOUND, "no such object").into_response();
    };
    ranged(&inner, &sha, true, bytes, &method, &headers, |b| b)
}

/// The Ollama registry shim refuses repositories without GGUF files.
async fn shim_manifest(
    State((inner, _)): Hub,
    Path((user, repo, _tag)): Path<(String, String, String)>,
) -> Response {
    if !inner
        .repos
        .lock()
        .unwrap()
        .contains_key(&format!("{user}/{repo}"))
    {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "Repository not found"}]})),
        )
            .into_response();
    }
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"errors": [{"code": "MANIFEST_INVALID",
            "message": "Repository is not GGUF or is not compatible with llama.cpp"}]})),
    )
        .into_response()
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` within `len`; an end past the file is cut.
fn parse_range(headers: &HeaderMap, len: u64) -> Option<Option<(u64, u64)>> {
    let Some(v) = headers.get(header::RANGE) else {
        return Some(None);
    };
    let (a, b) = v.to_str().ok()?.strip_prefix("bytes=")?.split_once('-')?;
    let last = len.checked_sub(1)?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        (len.saturating_sub(n), last)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            last
        } else {
            b.parse::<u64>().ok()?.min(last)
        };
        (start, end)
    };
    (start <= end).then_some(Some((start, end)))
}

fn ranged(
    inner: &Arc<Inner>,
    key: &str,
    lfs: bool,
    data: Bytes,
    method: &Method,
    headers: &HeaderMap,
    extra: impl FnOnce(axum::http::response::Builder) -> axum::http::response::Builder,
) -> Response {
    let len = data.len() as u64;
    let (status, start, end) = match parse_range(headers, len) {
        Some(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b + 1),
        Some(None) => (StatusCode::OK, 0, len),
        None => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .unwrap()
        }
    };
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        b = b.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        );
    }
    b = extra(b);
    if *method == Method::HEAD {
        return b.body(Body::empty()).unwrap();
    }
    let state = BodyState {
        inner: inner.clone(),
        key: key.to_string(),
        lfs,
        data,
        pos: start,
        end,
    };
    b.body(Body::from_stream(futures_util::stream::unfold(
        state, next_chunk,
    )))
    .unwrap()
}

struct BodyState {
    inner: Arc<Inner>,
    key: String,
    /// Faults are for LFS objects; files kept in git are served whole.
    lfs: bool,
    data: Bytes,
    pos: u64,
    end: u64,
}

type Chunk = Result<Bytes, std::io::Error>;

async fn next_chunk(mut s: BodyState) -> Option<(Chunk, BodyState)> {
    let mut stalled = false;
    loop {
        if s.pos >= s.end {
            return None;
        }
        let faults = s.inner.faults.lock().unwrap().clone();
        let lfs = s.lfs;
        if stalled && !faults.stall_at_limit {
            return Some((Err(std::io::Error::other("stall ended")), s));
        }
        let mut len = CHUNK.min((s.end - s.pos) as usize) as u64;
        if let (Some(limit), true) = (faults.limit, lfs) {
            let served = s
                .inner
                .counts
                .lock()
                .unwrap()
                .served
                .get(&s.key)
                .copied()
                .unwrap_or(0);
            let room = limit.saturating_sub(served);
            if room == 0 {
                if faults.stall_at_limit {
                    stalled = true;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
                return Some((Err(std::io::Error::other("limit reached")), s));
            }
            len = len.min(room);
        }
        let (a, b) = (s.pos as usize, (s.pos + len) as usize);
        let mut chunk = s.data.slice(a..b);
        let mid = s.data.len() / 2;
        if faults.corrupt && lfs && s.data.len() > (1 << 20) && (a..b).contains(&mid) {
            let mut v = chunk.to_vec();
            v[mid - a] ^= 0x55;
            chunk = Bytes::from(v);
        }
        s.pos += len;
        *s.inner
            .counts
            .lock()
            .unwrap()
            .served
            .entry(s.key.clone())
            .or_default() += len;
        return Some((Ok(chunk), s));
    }
}
