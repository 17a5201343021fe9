//! The Ollama dialect: `/api/version`, `/api/tags`, `/api/show`, `/api/ps`, `/api/chat` and
//! `/api/generate`, with NDJSON streaming (one object per line, flushed per line, a final
//! `done: true` object with metrics) and errors as `{"error": "..."}`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::config::KeepAlive;
use crate::engine::{Grammar, Summary};
use crate::model::{ReplyFormat, ToolCall, ToolSyntax};
use crate::store::{LocalModel, ModelName, MEDIA_LICENSE, MEDIA_SYSTEM, MEDIA_TEMPLATE};

use super::error::{json_response, redact_paths, ApiError, OllamaError};
use super::images;
use super::infer::{self, Finished, InferRequest, Input, Options, Out, Started};
use super::structured::{self, ToolChoice};
use super::{local_time, now_utc, parse_body, AppState, OLLAMA_VERSION};

type Result<T, E = OllamaError> = std::result::Result<T, E>;

pub async fn version() -> Response {
    json_response(StatusCode::OK, &json!({"version": OLLAMA_VERSION}))
}

/// `details` of tags, show and ps.
fn details(m: &LocalModel) -> Value {
    let c = &m.config;
    let format = if c.model_format.is_empty() {
        "gguf"
    } else {
        &c.model_format
    };
    json!({
        "parent_model": "",
        "format": format,
        "family": c.model_family,
        "families": c.model_families,
        "parameter_size": c.model_type,
        "quantization_level": c.file_type,
    })
}

pub async fn tags(State(state): State<AppState>) -> Result<Response> {
    let store = state.store.clone();
    let list = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let models: Vec<Value> = list
        .iter()
        .map(|m| {
            let name = m.name.display_short();
            json!({
                "name": name,
                "model": name,
                "modified_at": local_time(m.modified),
                "size": m.size,
                "digest": m.digest,
                "details": details(m),
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({"models": models})))
}

pub async fn ps(State(state): State<AppState>) -> Result<Response> {
    let mut loaded = state.models.list().await;
    loaded.sort_by_key(|l| std::cmp::Reverse(l.expires_at()));
    let models: Vec<Value> = loaded
        .iter()
        .map(|l| {
            let name = l.info.name.display_short();
            let stats = l.engine.stats();
            let mut m = json!({
                "name": name,
                "model": name,
                "size": l.info.size,
                "digest": l.info.digest,
                "details": details(&l.info),
                "expires_at": local_time(l.expires_at()),
                // CPU serving: nothing lives in GPU memory yet.
                "size_vram": 0,
                "context_length": l.context_length(),
                // Ours: the KV cache's size and why (Ollama clients ignore extra fields).
                "kv_cache": {
                    "bytes": l.engine.kv_budget().bytes,
                    "tokens": l.engine.kv_budget().tokens,
                    "type": l.engine.kv_budget().kv_type,
                    "reason": l.engine.kv_budget().why,
                },
                // Ours: speculative decoding (prompt lookup or a draft model), its default
                // and how it went.
                "speculative": {
                    "method": if l.engine.draft_model().is_some() { "draft_model" } else { "ngram" },
                    "draft_model": l.engine.draft_model(),
                    "num_draft": l.engine.num_draft(),
                    "drafted": stats.drafted,
                    "accepted": stats.accepted,
                },
            });
            // On a GPU: which path serves it, our kernels or candle's reference ops (the
            // boot self-check's verdict).
            if let Some(p) = l.model.generator().and_then(|g| g.gpu_path) {
                m["gpu_path"] = json!(p.as_str());
            }
            m
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({"models": models})))
}

#[derive(Deserialize)]
struct ShowRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    verbose: Option<bool>,
}

pub async fn show(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: ShowRequest = parse_body(&body)?;
    // `name` is the deprecated alias; the first non-empty wins.
    let model = [req.model, req.name]
        .into_iter()
        .flatten()
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    let name = ModelName::parse(&model)?;
    let info = match state.store.resolve(&name) {
        Ok(m) => m,
        Err(crate::store::StoreError::NotFound(_)) => {
            return Err(ApiError::ShowNotFound(name.display_short()).into())
        }
        Err(e) => return Err(e.into()),
    };
    let verbose = req.verbose.unwrap_or(false);
    let (store, info2) = (state.store.clone(), info.clone());
    let summary = tokio::task::spawn_blocking(move || store.summary(&info2, verbose))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    // GGUF models name their weights blob by digest (never by where the store lives); a
    // safetensors model is several files.
    let from = match state.store.model_blob(&info) {
        Ok(blob) => blob
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| info.name.display_short()),
        Err(_) => info.name.display_short(),
    };
    let template = state
        .store
        .layer_text(&info, MEDIA_TEMPLATE)
        .or(summary.chat_template.clone())
        .unwrap_or_default();
    let system = state.store.layer_text(&info, MEDIA_SYSTEM);
    let license = state.store.layer_text(&info, MEDIA_LICENSE);
    let params = state.store.params(&info).unwrap_or_default();
    let parameters = params
        .iter()
        .flat_map(|(k, v)| match v {
            Value::Array(items) => items.iter().map(|i| format!("{k:<30} {i}")).collect(),
            v => vec![format!("{k:<30} {v}")],
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut capabilities = vec!["completion"];
    let format = ReplyFormat::from_template(&template);
    if info.is_embedding() {
        capabilities = vec!["embedding"];
    } else {
        if format.tools != ToolSyntax::None {
            capabilities.push("tools");
        }
        if format.thinking {
            capabilities.push("thinking");
        }
        // A vision tower's metadata (GGUF, or what the summary of a safetensors model
        // names the same way) is what LobeChat's image upload waits for; towers load on the
        // CPU only, so a GPU server does not offer it.
        let tower = summary
            .model_info
            .keys()
            .any(|k| k.ends_with(".vision.block_count"));
        if tower && state.models.runs_on_cpu() {
            capabilities.push("vision");
        }
    }
    let short = info.name.display_short();
    let mut modelfile = format!(
        "# Modelfile generated by \"ollama show\"\n# To build a new Modelfile based on this, replace FROM with:\n# FROM {short}\n\nFROM {from}\n"
    );
    if !template.is_empty() {
        modelfile.push_str(&format!("TEMPLATE \"\"\"{template}\"\"\"\n"));
    }
    if let Some(s) = &system {
        modelfile.push_str(&format!("SYSTEM \"\"\"{s}\"\"\"\n"));
    }
    for line in parameters.lines() {
        modelfile.push_str(&format!("PARAMETER {line}\n"));
    }
    let mut out = Map::new();
    out.insert("modelfile".into(), modelfile.into());
    if !parameters.is_empty() {
        out.insert("parameters".into(), parameters.into());
    }
    out.insert("template".into(), template.into());
    if let Some(s) = system {
        out.insert("system".into(), s.into());
    }
    if let Some(l) = license {
        out.insert("license".into(), l.into());
    }
    out.insert("details".into(), details(&info));
    out.insert("model_info".into(), Value::Object(summary.model_info));
    out.insert("capabilities".into(), json!(capabilities));
    out.insert("modified_at".into(), local_time(info.modified).into());
    Ok(json_response(StatusCode::OK, &Value::Object(out)))
}

/// A chat message as clients send it.
#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    images: Option<Vec<String>>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
    #[serde(default)]
    tool_name: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
}

impl Message {
    /// The template's view: OpenAI-style fields, `content` always a string.
    fn into_template_json(self) -> Value {
        let mut m = Map::new();
        m.insert("role".into(), self.role.to_lowercase().into());
        m.insert("content".into(), self.content.unwrap_or_default().into());
        if let Some(calls) = self.tool_calls.filter(|c| !c.is_empty()) {
            m.insert("tool_calls".into(), calls.into());
        }
        if let Some(name) = self.tool_name {
            m.insert("name".into(), name.clone().into());
            m.insert("tool_name".into(), name.into());
        }
        if let Some(t) = self.thinking {
            m.insert("reasoning_content".into(), t.into());
        }
        Value::Object(m)
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(default)]
    think: Option<Value>,
    /// See [`infer::parse_logprobs`].
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    format: Option<Value>,
    /// Our extension (Ollama ignores it): OpenAI's `tool_choice`.
    #[serde(default)]
    tool_choice: Option<Value>,
}

#[derive(Deserialize)]
struct GenerateRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    context: Option<Vec<u32>>,
    #[serde(default)]
    raw: Option<bool>,
    #[serde(default)]
    images: Option<Vec<String>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(default)]
    think: Option<Value>,
    /// See [`infer::parse_logprobs`].
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    format: Option<Value>,
}

fn keep_alive(v: Option<Value>) -> Result<Option<KeepAlive>, ApiError> {
    infer::parse_keep_alive(v.as_ref())
}

/// The structured output a request asks for: `format`, or a constraint in `options`.
fn constraint(
    format: Option<&Value>,
    options: Option<&Map<String, Value>>,
) -> Result<Option<Grammar>, ApiError> {
    structured::with_options("format", structured::ollama_format(format)?, options)
}

fn options(map: Option<Map<String, Value>>) -> Result<Options, ApiError> {
    map.map(|m| Options::from_map(&m))
        .transpose()
        .map(Option::unwrap_or_default)
}

/// A message's or prompt's base64 images as bytes (at most [`images::MAX_IMAGES`] in all).
fn decode_images(images: Option<&Vec<String>>, out: &mut Vec<Vec<u8>>) -> Result<usize, ApiError> {
    let list = images.map(Vec::as_slice).unwrap_or_default();
    images::check_count(out.len() + list.len())?;
    for img in list {
        out.push(images::from_base64(img)?);
    }
    Ok(list.len())
}

/// The roles templates know.
pub fn check_role(role: &str) -> Result<(), ApiError> {
    match role {
        "system" | "user" | "assistant" | "tool" => Ok(()),
        r => Err(ApiError::BadRequest(format!(
            "invalid message role {r:?}: expected system, user, assistant or tool"
        ))),
    }
}

/// Which endpoint a stream answers, for the shape of its objects.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    /// `context`: whether the final object carries the token context.
    Generate {
        context: bool,
    },
}

pub async fn chat(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: ChatRequest = parse_body(&body)?;
    let logprobs = infer::parse_logprobs(req.logprobs.as_ref(), req.top_logprobs.as_ref())?;
    let mut messages = req.messages.unwrap_or_default();
    let mut image_bytes = Vec::new();
    for m in &mut messages {
        check_role(&m.role.to_lowercase())?;
        let n = decode_images(m.images.as_ref(), &mut image_bytes)?;
        if n > 0 {
            m.content = Some(images::marked(n, m.content.as_deref().unwrap_or_default()));
        }
    }
    let infer_req = InferRequest {
        model: req.model.clone(),
        input: Input::Chat {
            messages: messages
                .into_iter()
                .map(Message::into_template_json)
                .collect(),
            tools: req.tools.filter(|t| !t.is_empty()),
        },
        images: image_bytes,
        format: constraint(req.format.as_ref(), req.options.as_ref())?,
        tool_choice: structured::openai_tool_choice(req.tool_choice.as_ref())?,
        one_call: false,
        options: options(req.options)?,
        keep_alive: keep_alive(req.keep_alive)?,
        think: infer::parse_think(req.think.as_ref())?,
        logprobs,
    };
    respond(
        &state,
        Kind::Chat,
        req.model,
        req.stream.unwrap_or(true),
        infer_req,
    )
    .await
}

pub async fn generate(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: GenerateRequest = parse_body(&body)?;
    let logprobs = infer::parse_logprobs(req.logprobs.as_ref(), req.top_logprobs.as_ref())?;
    let mut image_bytes = Vec::new();
    let n = decode_images(req.images.as_ref(), &mut image_bytes)?;
    let suffix = req.suffix.filter(|s| !s.is_empty());
    let raw = req.raw.unwrap_or(false);
    if req.template.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::BadRequest(
            "template overrides (Go templates) are not supported; the model's own chat template is used".into(),
        )
        .into());
    }
    if raw && (req.system.is_some() || req.context.is_some()) {
        return Err(ApiError::BadRequest(
            "raw mode does not support template, system, or context".into(),
        )
        .into());
    }
    let infer_req = InferRequest {
        model: req.model.clone(),
        input: Input::Generate {
            prompt: images::marked(n, &req.prompt.unwrap_or_default()),
            suffix,
            system: req.system,
            raw,
            context: req.context.unwrap_or_default(),
        },
        images: image_bytes,
        format: constraint(req.format.as_ref(), req.options.as_ref())?,
        tool_choice: ToolChoice::Auto,
        one_call: false,
        options: options(req.options)?,
        keep_alive: keep_alive(req.keep_alive)?,
        think: infer::parse_think(req.think.as_ref())?,
        logprobs,
    };
    // Ollama leaves `context` out in raw mode.
    let kind = Kind::Generate { context: !raw };
    respond(
        &state,
        kind,
        req.model,
        req.stream.unwrap_or(true),
        infer_req,
    )
    .await
}

/// Starts the request and answers in the endpoint's shape, streamed or not.
async fn respond(
    state: &AppState,
    kind: Kind,
    model: String,
    stream: bool,
    req: InferRequest,
) -> Result<Response> {
    let started = if stream {
        infer::start_streaming(state, req).await?
    } else {
        infer::start(state, req).await?
    };
    let rx = match started {
        Started::Loaded => {
            return Ok(one(&final_object(
                kind,
                &model,
                "load",
                None,
                &Reply::default(),
            )))
        }
        Started::Unloaded => {
            return Ok(one(&final_object(
                kind,
                &model,
                "unload",
                None,
                &Reply::default(),
            )))
        }
        Started::Stream(rx) => rx,
    };
    if stream {
        Ok(ndjson(kind, model, rx))
    } else {
        collect(kind, &model, rx).await
    }
}

fn one(v: &Value) -> Response {
    json_response(StatusCode::OK, v)
}

/// What one chunk (or a whole non-streamed answer) carries.
#[derive(Default)]
struct Reply {
    text: String,
    thinking: String,
    tool_calls: Vec<Value>,
    /// The tokens' log-probabilities, when asked for.
    logprobs: Vec<Value>,
}

impl Reply {
    fn add(&mut self, out: Out) {
        match out {
            Out::Text(t) => self.text.push_str(&t),
            Out::Thinking(t) => self.thinking.push_str(&t),
            Out::ToolCall(c) => self
                .tool_calls
                .push(tool_call_json(c, self.tool_calls.len())),
            Out::Logprob(lp) => self.logprobs.push(infer::logprob_json(&lp)),
            Out::Done(_) | Out::Error(_) => {}
        }
    }
}

/// A tool call as Ollama sends it: arguments as an object.
fn tool_call_json(c: ToolCall, index: usize) -> Value {
    json!({
        "id": call_id(),
        "function": {"index": index, "name": c.name, "arguments": c.arguments},
    })
}

/// `call_` and eight random lowercase letters and digits.
pub fn call_id() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let tail: String = (0..8)
        .map(|_| char::from(CHARS[rand::random_range(0..CHARS.len())]))
        .collect();
    format!("call_{tail}")
}

/// A non-final chunk.
fn chunk(kind: Kind, model: &str, r: &Reply) -> Value {
    let mut v = match kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": r.text});
            if !r.thinking.is_empty() {
                message["thinking"] = r.thinking.clone().into();
            }
            if !r.tool_calls.is_empty() {
                message["tool_calls"] = r.tool_calls.clone().into();
            }
            json!({"model": model, "created_at": now_utc(), "message": message})
        }
        Kind::Generate { .. } => {
            let mut v = json!({"model": model, "created_at": now_utc(), "response": r.text});
            if !r.thinking.is_empty() {
                v["thinking"] = r.thinking.clone().into();
            }
            v
        }
    };
    if !r.logprobs.is_empty() {
        v["logprobs"] = r.logprobs.clone().into();
    }
    v["done"] = false.into();
    v
}

/// The `done: true` object; `reply` is the whole output for non-streamed answers.
fn final_object(
    kind: Kind,
    model: &str,
    reason: &str,
    finished: Option<&Finished>,
    reply: &Reply,
) -> Value {
    let mut v = chunk(kind, model, reply);
    v["done"] = true.into();
    v["done_reason"] = reason.into();
    if let Some(f) = finished {
        if kind == (Kind::Generate { context: true }) {
            v["context"] = json!(f.context);
        }
        add_metrics(&mut v, &f.summary);
    }
    v
}

/// Ollama's metric fields (nanoseconds), each left out when zero.
fn add_metrics(v: &mut Value, s: &Summary) {
    let fields = [
        ("total_duration", Summary::nanos(s.total_duration)),
        ("load_duration", Summary::nanos(s.load_duration)),
        ("prompt_eval_count", s.prompt_eval_count as u64),
        (
            "prompt_eval_duration",
            Summary::nanos(s.prompt_eval_duration),
        ),
        ("eval_count", s.eval_count as u64),
        ("eval_duration", Summary::nanos(s.eval_duration)),
    ];
    for (k, n) in fields {
        if n > 0 {
            v[k] = n.into();
        }
    }
}

/// Streams the output as NDJSON. The body ends after the `done` object or an error line;
/// if the client goes away the body is dropped, which drops `rx` and cancels generation.
fn ndjson(kind: Kind, model: String, rx: mpsc::Receiver<Out>) -> Response {
    let objects = futures_util::stream::unfold(Some(rx), move |rx| {
        let model = model.clone();
        async move {
            let mut rx = rx?;
            // Log-probabilities wait for the text they belong to and go out with it.
            let mut r = Reply::default();
            let (v, more) = loop {
                match rx.recv().await {
                    Some(lp @ Out::Logprob(_)) => r.add(lp),
                    Some(Out::Done(f)) => {
                        break (final_object(kind, &model, f.reason, Some(&f), &r), false)
                    }
                    Some(Out::Error(e)) => break (json!({"error": redact_paths(&e)}), false),
                    None => break (json!({"error": "generation ended unexpectedly"}), false),
                    Some(piece) => {
                        r.add(piece);
                        break (chunk(kind, &model, &r), true);
                    }
                }
            };
            Some((v, more.then_some(rx)))
        }
    });
    super::ndjson(objects)
}

/// Gathers the whole output into one object (`stream: false`).
async fn collect(kind: Kind, model: &str, mut rx: mpsc::Receiver<Out>) -> Result<Response> {
    let mut reply = Reply::default();
    loop {
        match rx.recv().await {
            Some(Out::Done(f)) => {
                return Ok(one(&final_object(kind, model, f.reason, Some(&f), &reply)))
            }
            Some(Out::Error(e)) => return Err(ApiError::Internal(e).into()),
            None => return Err(ApiError::Internal("generation ended unexpectedly".into()).into()),
            Some(piece) => reply.add(piece),
        }
    }
}

#[derive(Deserialize)]
struct EmbedRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

/// A string or an array of strings (`input` of the embedding endpoints).
pub fn embed_inputs(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::BadRequest("invalid input type".into())),
            })
            .collect(),
        Some(_) => Err(ApiError::BadRequest("invalid input type".into())),
    }
}

/// Cuts to `dims` (when asked) and normalises.
pub fn finish_vector(mut v: Vec<f32>, dims: Option<usize>) -> Vec<f32> {
    if let Some(d) = dims.filter(|&d| d > 0) {
        v.truncate(d);
    }
    infer::normalize(&mut v);
    v
}

/// `POST /api/embed`: L2-normalised vectors, one per input.
pub async fn embed(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: EmbedRequest = parse_body(&body)?;
    let inputs = embed_inputs(req.input)?;
    let out = infer::embed(
        &state,
        &req.model,
        inputs,
        req.truncate.unwrap_or(true),
        options(req.options)?,
        keep_alive(req.keep_alive)?,
    )
    .await?;
    let embeddings: Vec<Vec<f32>> = out
        .vectors
        .into_iter()
        .map(|v| finish_vector(v, req.dimensions))
        .collect();
    Ok(one(&json!({
        "model": req.model,
        "embeddings": embeddings,
        "total_duration": Summary::nanos(out.total_duration),
        "load_duration": Summary::nanos(out.load_duration),
        "prompt_eval_count": out.prompt_tokens,
    })))
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

/// `POST /api/embeddings` (legacy; LobeChat uses it): one vector, not normalised.
pub async fn embeddings(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: EmbeddingsRequest = parse_body(&body)?;
    let inputs: Vec<String> = req.prompt.into_iter().filter(|p| !p.is_empty()).collect();
    let out = infer::embed(
        &state,
        &req.model,
        inputs,
        true,
        options(req.options)?,
        keep_alive(req.keep_alive)?,
    )
    .await?;
    let embedding: Vec<f64> = out
        .vectors
        .into_iter()
        .next()
        .unwrap_or_default()
        .into_iter()
        .map(f64::from)
        .collect();
    Ok(one(&json!({"embedding": embedding})))
}
