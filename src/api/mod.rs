//! The HTTP edge: the Ollama API (`/api/*`) and the OpenAI-compatible API (`/v1/*`) on one
//! axum router, with Ollama's CORS rules and error shapes. Knows wire formats, never
//! tensors; generation goes through [`infer`], which talks to `candlewick::engine`.

pub mod anthropic;
pub mod cors;
pub mod edge;
pub mod error;
pub mod images;
pub mod infer;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod ready;
pub mod responses;
pub mod store_api;
pub mod structured;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, head, post};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::engine::manager::ModelManager;
use crate::store::Store;

pub use error::ApiError;

/// The version we report: recent enough for clients that gate on it (Copilot wants
/// ≥ 0.6.4).
pub const OLLAMA_VERSION: &str = "0.12.3";

/// Request bodies above this are refused (images in chat make them large).
pub const BODY_LIMIT: usize = 64 << 20;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub models: ModelManager,
    pub config: Arc<Config>,
    pub metrics: Arc<metrics::Metrics>,
    /// `WICK_PRELOAD`'s progress and shutdown, for `/api/ready`.
    pub ready: Arc<ready::Readiness>,
    pub drain: Arc<Drain>,
}

impl AppState {
    /// Needs a tokio runtime (the model manager starts a task).
    pub fn new(config: Config) -> Result<AppState, ApiError> {
        let store = Store::new(&config.models_dir).with_readonly(config.models_readonly.clone());
        let removed = store.remove_stale(crate::store::blobs::STALE_AFTER);
        if removed > 0 {
            tracing::info!(
                removed,
                "removed temp files that crashed writers left behind"
            );
        }
        Ok(AppState {
            store,
            models: ModelManager::new(&config)?,
            ready: Arc::new(ready::Readiness::new(config.preload.clone())),
            config: Arc::new(config),
            metrics: Arc::default(),
            drain: Arc::default(),
        })
    }
}

/// The whole router, for a server listening on `bound`.
pub fn router(state: AppState, bound: std::net::IpAddr) -> Router {
    let hosts = Arc::new(edge::Hosts::new(bound, &state.config.allowed_hosts));
    let cors = Arc::new(cors::Cors::new(&state.config.origins));
    let keys = Arc::new(edge::Keys(state.config.api_keys.clone()));
    let metrics = state.metrics.clone();
    Router::new()
        .route("/", get(root))
        .route("/api/ready", get(ready::ready))
        .route("/api/version", get(ollama::version))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(ollama::embed))
        .route("/api/embeddings", post(ollama::embeddings))
        .route("/api/pull", post(store_api::pull))
        .route("/api/create", post(store_api::create))
        .route("/api/copy", post(store_api::copy))
        .route("/api/delete", delete(store_api::delete))
        .route(
            "/api/blobs/{digest}",
            head(store_api::blob_head).post(store_api::blob_upload),
        )
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{*id}", get(openai::model))
        .route("/metrics", get(metrics::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(edge::body_limit))
        // Outermost last: ids and metrics see every answer, CORS headers reach 401s.
        .layer(axum::middleware::from_fn_with_state(keys, edge::auth))
        .layer(axum::middleware::from_fn_with_state(cors, cors::layer))
        .layer(axum::middleware::from_fn_with_state(hosts, edge::hosts))
        .layer(axum::middleware::from_fn_with_state(metrics, edge::observe))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting and lets requests in flight finish
/// for up to the configured shutdown timeout; streams still running then end with an error
/// object in their dialect before their connections close. `WICK_PRELOAD`'s models load in
/// the background meanwhile (`/api/ready` says when they are done).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use tower::ServiceExt;
    let deadline = state.config.shutdown_timeout;
    let header_timeout = state.config.header_timeout;
    let drain = state.drain.clone();
    let preload = tokio::spawn(ready::preload(state.clone()));
    let readiness = state.ready.clone();
    let bound = listener.local_addr()?.ip();
    let app = router(state, bound);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        // Also how long an idle keep-alive connection waits for its next request.
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = hyper_util::service::TowerToHyperService::new(
                    app.clone()
                        .map_request(|req: axum::http::Request<hyper::body::Incoming>| {
                            req.map(axum::body::Body::new)
                        }),
                );
                let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    // Errors here are the client's (a reset, a header timeout).
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    readiness.drain();
    preload.abort();
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    tokio::select! {
        _ = graceful.shutdown() => return Ok(()),
        _ = tokio::time::sleep(deadline) => {}
    }
    tracing::warn!(
        secs = deadline.as_secs_f64(),
        "shutdown deadline passed; ending the streams still running"
    );
    drain.cut();
    // Time for the final error objects to reach the clients.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// Set when the shutdown deadline passes: streams still running end with an error object
/// instead of being cut mid-chunk.
#[derive(Default)]
pub struct Drain {
    cut: std::sync::atomic::AtomicBool,
}

impl Drain {
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(std::sync::atomic::Ordering::Acquire)
    }
}

fn text(status: StatusCode, body: &'static str) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn root() -> Response {
    text(StatusCode::OK, "Ollama is running")
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "404 page not found")
}

async fn method_not_allowed() -> Response {
    text(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed")
}

/// An NDJSON response: each value on its own line, sent as it comes (`application/x-ndjson`).
pub fn ndjson(
    values: impl futures_util::Stream<Item = serde_json::Value> + Send + 'static,
) -> Response {
    use futures_util::StreamExt;
    let body = values.map(|v| {
        let mut s = v.to_string();
        s.push('\n');
        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(s))
    });
    let mut resp = Response::new(axum::body::Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

/// A server-sent events response: each chunk sent as it comes (`text/event-stream`, not
/// cached).
pub fn event_stream(chunks: impl futures_util::Stream<Item = String> + Send + 'static) -> Response {
    use futures_util::StreamExt;
    let body = chunks.map(|c| Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(c)));
    let mut resp = Response::new(axum::body::Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Appends one named event (`event: KIND`, `data: {..., "type": KIND}`), as Anthropic's
/// Messages and OpenAI's Responses streams write them.
pub fn named_event(out: &mut String, kind: &str, mut data: serde_json::Value) {
    data["type"] = kind.into();
    out.push_str("event: ");
    out.push_str(kind);
    out.push_str("\ndata: ");
    out.push_str(&data.to_string());
    out.push_str("\n\n");
}

/// A stream's state that writes its next events into `out`; `false` once it wrote the last.
pub trait EventSource: Send + 'static {
    fn next(&mut self, out: &mut String) -> impl std::future::Future<Output = bool> + Send;
}

/// The [`event_stream`] of a source's events, pulled one batch at a time.
pub fn events_from(source: impl EventSource) -> Response {
    event_stream(futures_util::stream::unfold(
        Some(source),
        |st| async move {
            let mut st = st?;
            let mut out = String::new();
            let more = st.next(&mut out).await;
            Some((out, more.then_some(st)))
        },
    ))
}

/// Parses a JSON body whatever its Content-Type (curl `-d` says form-urlencoded).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::MissingBody);
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadJson(e.to_string()))
}

/// RFC 3339 UTC with trimmed fractional seconds, for `created_at`.
pub fn now_utc() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// RFC 3339 in the local zone with its offset, for `modified_at` and `expires_at`.
pub fn local_time(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, false)
}
