//! The store's routes in the Ollama dialect: `POST /api/pull` (from a registry, Hugging
//! Face or the catalog, with NDJSON progress), `POST /api/create`, `POST /api/copy`,
//! `DELETE /api/delete`, and `HEAD`/`POST /api/blobs/{digest}`. Handlers parse and answer;
//! the work is in `crate::store`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::store::blobs::normalize_digest;
use crate::store::hf::HfHub;
use crate::store::pull::{PullProgress, Registry};
use crate::store::sources::Puller;
use crate::store::write::CreateSpec;
use crate::store::{ModelName, StoreError};

use super::error::{json_response, redact_paths, ApiError};
use super::{parse_body, AppState, OLLAMA_VERSION};

/// Errors of the store routes, with Ollama's wording for each.
#[derive(Debug, thiserror::Error)]
pub enum StoreApiError {
    #[error(transparent)]
    Api(ApiError),
    #[error("{0}")]
    Store(StoreError),
    /// `/api/delete`: the name as sent.
    #[error("model '{0}' not found")]
    DeleteNotFound(String),
    /// `/api/copy` and `/api/create`'s `from`: the name as sent.
    #[error("model \"{0}\" not found")]
    SourceNotFound(String),
    /// `/api/copy`: which of `source`/`destination` does not parse.
    #[error("{which} \"{name}\" is invalid")]
    InvalidCopyName { which: &'static str, name: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ApiError> for StoreApiError {
    fn from(e: ApiError) -> Self {
        StoreApiError::Api(e)
    }
}

impl From<StoreError> for StoreApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidName(_) => StoreApiError::Api(ApiError::InvalidName),
            e => StoreApiError::Store(e),
        }
    }
}

impl StoreApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            StoreApiError::Api(e) => e.status(),
            StoreApiError::Store(e) => match e {
                StoreError::InvalidName(_)
                | StoreError::BadDigest(_)
                | StoreError::UploadMismatch { .. }
                | StoreError::BadGguf { .. }
                | StoreError::NoModelLayer(_)
                | StoreError::BadModelFiles(_) => StatusCode::BAD_REQUEST,
                StoreError::NotFound(_) | StoreError::BlobNotFound(_) => StatusCode::NOT_FOUND,
                StoreError::DiskFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
                StoreError::BlobTooLarge { .. } => StatusCode::BAD_GATEWAY,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            StoreApiError::DeleteNotFound(_) | StoreApiError::SourceNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            StoreApiError::InvalidCopyName { .. } | StoreApiError::Unsupported(_) => {
                StatusCode::BAD_REQUEST
            }
            StoreApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for StoreApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "store request failed");
        }
        json_response(status, &json!({"error": redact_paths(&self.to_string())}))
    }
}

type Result<T, E = StoreApiError> = std::result::Result<T, E>;

/// `model`, else the deprecated `name`: the first non-empty one.
fn model_field(model: Option<String>, name: Option<String>) -> String {
    [model, name]
        .into_iter()
        .flatten()
        .find(|s| !s.is_empty())
        .unwrap_or_default()
}

fn join_err(e: tokio::task::JoinError) -> StoreApiError {
    StoreApiError::Internal(format!("store task failed: {e}"))
}

/// The registry client, shared by all pulls, introducing itself the way ollama.com
/// expects of a current Ollama.
fn registry() -> Result<&'static Registry> {
    static REGISTRY: OnceLock<Option<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            let arch = match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                a => a,
            };
            let ua = format!(
                "ollama/{OLLAMA_VERSION} ({arch} {}) Go/go1.24.1 candlewick/{}",
                std::env::consts::OS,
                env!("CARGO_PKG_VERSION")
            );
            Registry::new(&ua)
                .map_err(|e| tracing::error!(error = %e, "registry client"))
                .ok()
        })
        .as_ref()
        .ok_or_else(|| StoreApiError::Internal("the registry client could not start".into()))
}

/// Everything a pull may go to: the shared registry client, a Hub client for this
/// server's `HF_ENDPOINT`/`HF_TOKEN`, and its `WICK_CATALOG`.
fn puller(state: &AppState) -> Result<Puller> {
    let c = &state.config;
    let hub = HfHub::new(
        c.hf_endpoint.as_deref(),
        c.hf_token.as_ref().map(|t| t.0.as_str()),
    )
    .map_err(|e| StoreApiError::Internal(e.to_string()))?;
    Ok(Puller {
        registry: registry()?.clone(),
        hub,
        catalog: c.catalog.clone(),
    })
}

/// A stream of NDJSON lines that ends when the sender is dropped.
fn ndjson(rx: mpsc::UnboundedReceiver<Value>) -> Response {
    super::ndjson(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|v| (v, rx))
    }))
}

#[derive(Deserialize)]
struct PullRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    insecure: Option<bool>,
    #[serde(default)]
    stream: Option<bool>,
}

/// `POST /api/pull`. Streamed, the pull runs as its own task and stops when the client
/// goes away (the next pull continues where it stopped).
pub async fn pull(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: PullRequest = parse_body(&body)?;
    let raw = model_field(req.model, req.name);
    let name = ModelName::parse(&raw)?;
    let http = raw.starts_with("http://");
    let insecure = req.insecure.unwrap_or(false);
    let puller = puller(&state)?;
    let store = state.store.clone();
    if !req.stream.unwrap_or(true) {
        return match puller.pull(&store, &name, http, insecure, &|_| {}).await {
            Ok(()) => Ok(json_response(StatusCode::OK, &json!({"status": "success"}))),
            // Ollama answers every failed blocking pull with 500.
            Err(e) => Err(StoreApiError::Internal(e.to_string())),
        };
    }
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    tokio::spawn(async move {
        let lines = tx.clone();
        let emit = move |p: PullProgress| {
            let _ = lines.send(p.to_json());
        };
        tokio::select! {
            r = puller.pull(&store, &name, http, insecure, &emit) => {
                if let Err(e) = r {
                    tracing::warn!(model = %name, error = %e, "pull failed");
                    let _ = tx.send(json!({"error": redact_paths(&e.to_string())}));
                }
            }
            _ = tx.closed() => tracing::info!(model = %name, "pull cancelled by the client"),
        }
    });
    Ok(ndjson(rx))
}

#[derive(Deserialize)]
struct DeleteRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// `DELETE /api/delete`: 200 with an empty body.
pub async fn delete(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: DeleteRequest = parse_body(&body)?;
    let raw = model_field(req.model, req.name);
    let name = ModelName::parse(&raw)?;
    let info = match state.store.resolve(&name) {
        Ok(m) => m,
        Err(StoreError::NotFound(_)) => return Err(StoreApiError::DeleteNotFound(raw)),
        Err(e) => return Err(e.into()),
    };
    state.models.unload(&info).await;
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.delete(&info))
        .await
        .map_err(join_err)??;
    Ok(StatusCode::OK.into_response())
}

#[derive(Deserialize)]
struct CopyRequest {
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
}

/// `POST /api/copy`: 200 with an empty body.
pub async fn copy(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: CopyRequest = parse_body(&body)?;
    let invalid = |which, name: &str| StoreApiError::InvalidCopyName {
        which,
        name: name.to_string(),
    };
    let src = ModelName::parse(&req.source).map_err(|_| invalid("source", &req.source))?;
    let dst =
        ModelName::parse(&req.destination).map_err(|_| invalid("destination", &req.destination))?;
    let info = match state.store.resolve(&src) {
        Ok(m) => m,
        Err(StoreError::NotFound(_)) => return Err(StoreApiError::SourceNotFound(req.source)),
        Err(e) => return Err(e.into()),
    };
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || store.copy(&info, &dst))
        .await
        .map_err(join_err)??;
    Ok(StatusCode::OK.into_response())
}

/// `HEAD /api/blobs/{digest}`: 200 when the blob is there, else 404.
pub async fn blob_head(
    State(state): State<AppState>,
    Path(digest): Path<String>,
) -> Result<Response> {
    let digest = normalize_digest(&digest)?;
    if state.store.has_blob(&digest)? {
        Ok(StatusCode::OK.into_response())
    } else {
        Err(StoreError::BlobNotFound(digest).into())
    }
}

/// `POST /api/blobs/{digest}`: the raw body becomes the blob if it hashes to `digest`
/// (201), a blob already there is left alone (200), anything else is a 400.
pub async fn blob_upload(
    State(state): State<AppState>,
    Path(digest): Path<String>,
    body: Body,
) -> Result<Response> {
    let digest = normalize_digest(&digest)?;
    let limit = state.config.max_blob_bytes;
    let too_large = || StoreApiError::Api(ApiError::TooLarge(limit as usize));
    let mut stream = body.into_data_stream();
    if state.store.has_blob(&digest)? {
        // Read the body anyway (answering while the client still sends breaks its pipe),
        // but no more than an upload may be.
        let mut total = 0u64;
        while let Some(Ok(chunk)) = stream.next().await {
            total += chunk.len() as u64;
            if total > limit {
                return Err(too_large());
            }
        }
        return Ok(StatusCode::OK.into_response());
    }
    let upload = state.store.begin_upload(&digest)?;
    // The file is written on a blocking thread; the async side only moves chunks to it.
    let (tx, mut rx) = mpsc::channel::<Option<Bytes>>(8);
    let writer = tokio::task::spawn_blocking(move || {
        let mut upload = upload;
        loop {
            match rx.blocking_recv() {
                Some(Some(chunk)) => upload.write(&chunk)?,
                // The whole body arrived: check and keep it.
                Some(None) => return upload.finish().map(Some),
                // Given up (too large, the client left): dropping the upload removes it.
                None => return Ok(None),
            }
        }
    });
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            StoreApiError::Api(ApiError::BadRequest(format!("reading the upload: {e}")))
        })?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(too_large());
        }
        if tx.send(Some(chunk)).await.is_err() {
            // The writer failed: its error is the answer.
            break;
        }
    }
    let _ = tx.send(None).await;
    drop(tx);
    match writer.await.map_err(join_err)?? {
        Some(_) => Ok(StatusCode::CREATED.into_response()),
        None => Err(StoreApiError::Internal(
            "the upload was not finished".into(),
        )),
    }
}

#[derive(Deserialize)]
struct CreateRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    files: Option<BTreeMap<String, String>>,
    #[serde(default)]
    adapters: Option<BTreeMap<String, String>>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    license: Option<Value>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    quantize: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
}

/// `stop` is always a list in the params layer.
fn normalize_parameters(mut p: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::String(s)) = p.get("stop").cloned() {
        p.insert("stop".into(), json!([s]));
    }
    p
}

/// What `files` of `/api/create` hold.
enum Files<'a> {
    None,
    /// One file that is not part of a safetensors directory: GGUF weights.
    Gguf(&'a str),
    /// A Hugging Face directory's files (`config.json`, `*.safetensors`, ...).
    Safetensors,
}

fn files_kind(files: &BTreeMap<String, String>) -> Files<'_> {
    let mut it = files.iter();
    match (it.next(), it.next()) {
        (None, _) => Files::None,
        (Some((name, d)), None) if !name.ends_with(".json") && !name.ends_with(".safetensors") => {
            Files::Gguf(d)
        }
        _ => Files::Safetensors,
    }
}

/// Turns the request into a [`CreateSpec`], or the error Ollama gives before streaming.
fn create_spec(state: &AppState, req: CreateRequest) -> Result<CreateSpec> {
    if req.quantize.as_ref().is_some_and(|q| !q.is_empty()) {
        return Err(StoreApiError::Unsupported(
            "quantizing while creating a model is not supported".into(),
        ));
    }
    if req.adapters.as_ref().is_some_and(|a| !a.is_empty()) {
        return Err(StoreApiError::Unsupported(
            "adapters are not supported".into(),
        ));
    }
    let mut spec = CreateSpec::default();
    if let Some(from) = req.from.filter(|f| !f.is_empty()) {
        let name = ModelName::parse(&from)?;
        spec.base = match state.store.resolve(&name) {
            Ok(m) => Some(m),
            Err(StoreError::NotFound(_)) => return Err(StoreApiError::SourceNotFound(from)),
            Err(e) => return Err(e.into()),
        };
    }
    let files = req.files.unwrap_or_default();
    match files_kind(&files) {
        Files::None => {}
        Files::Gguf(d) => spec.gguf = Some(normalize_digest(d)?),
        // Checked (blobs and headers) by the caller, off the async threads.
        Files::Safetensors => {}
    }
    if spec.base.is_none() && files.is_empty() {
        return Err(StoreApiError::Api(ApiError::BadRequest(
            "neither 'from' or 'files' was specified".into(),
        )));
    }
    spec.template = req.template;
    spec.system = req.system;
    spec.license = match req.license {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(StoreApiError::Api(ApiError::BadJson(format!(
                    "license must be a string or a list of strings, not {other}"
                )))),
            })
            .collect::<Result<_>>()?,
        Some(other) => {
            return Err(StoreApiError::Api(ApiError::BadJson(format!(
                "license must be a string or a list of strings, not {other}"
            ))))
        }
    };
    spec.parameters = req.parameters.map(normalize_parameters);
    spec.messages = req.messages;
    Ok(spec)
}

/// `POST /api/create`.
pub async fn create(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let mut req: CreateRequest = parse_body(&body)?;
    let name = ModelName::parse(&model_field(req.model.take(), req.name.take()))?;
    let stream = req.stream.unwrap_or(true);
    let files = req.files.clone().unwrap_or_default();
    let mut spec = create_spec(&state, req)?;
    let store = state.store.clone();
    if let Files::Safetensors = files_kind(&files) {
        // A file set that is not a loadable model is a 400 before anything streams.
        let s = store.clone();
        let model = tokio::task::spawn_blocking(move || s.safetensors_model(&files))
            .await
            .map_err(join_err)??;
        spec.safetensors = Some(model);
    }
    if !stream {
        tokio::task::spawn_blocking(move || store.create(&name, spec, &mut |_| {}))
            .await
            .map_err(join_err)??;
        return Ok(json_response(StatusCode::OK, &json!({"status": "success"})));
    }
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    tokio::task::spawn_blocking(move || {
        let lines = tx.clone();
        let mut status = |s: String| {
            let _ = lines.send(json!({"status": s}));
        };
        match store.create(&name, spec, &mut status) {
            Ok(_) => status("success".into()),
            Err(e) => {
                let e = StoreApiError::from(e);
                let _ = tx.send(json!({"error": redact_paths(&e.to_string())}));
            }
        }
    });
    Ok(ndjson(rx))
}
