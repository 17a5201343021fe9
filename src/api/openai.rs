//! The OpenAI-compatible dialect: `/v1/chat/completions` and `/v1/completions` (JSON or SSE
//! with an optional usage chunk and `data: [DONE]`), `/v1/models` and `/v1/models/{id}`, with errors as
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Unlike Ollama, sampling options the client did not send are left to the model's
//! defaults (Ollama forces temperature and top_p to 1.0), and `max_completion_tokens` is
//! honoured.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::config::KeepAlive;
use crate::engine::{Grammar, TokenLogprobs};
use crate::model::ToolCall;
use crate::store::{LocalModel, ModelName};

use super::error::{json_response, ApiError, OpenAiError};
use super::images;
use super::infer::{self, string_list, Finished, InferRequest, Input, Options, Out, Started};
use super::ollama::{call_id, check_role, embed_inputs, finish_vector};
use super::structured::{self, ToolChoice};
use super::{parse_body, AppState};

type Result<T, E = OpenAiError> = std::result::Result<T, E>;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn model_object(m: &LocalModel) -> Value {
    json!({
        "id": m.name.display_short(),
        "object": "model",
        "created": unix(m.modified),
        "owned_by": m.name.namespace,
    })
}

pub async fn models(State(state): State<AppState>) -> Result<Response> {
    let store = state.store.clone();
    let list = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let data: Vec<Value> = list.iter().map(model_object).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data}),
    ))
}

pub async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let not_found = || ApiError::ShowNotFound(id.clone());
    let name = ModelName::parse(&id).map_err(|_| not_found())?;
    let m = state.store.resolve(&name).map_err(|e| match e {
        crate::store::StoreError::NotFound(_) => not_found(),
        e => e.into(),
    })?;
    let mut obj = model_object(&m);
    // Echo the id as requested, as Ollama does.
    obj["id"] = id.into();
    Ok(json_response(StatusCode::OK, &obj))
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
}

/// What chat and text completions share, OpenAI's fields plus the Ollama extensions we
/// accept on /v1 (`top_k`, `min_p`, `num_ctx`, `keep_alive`, `options`, `think`).
#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    model: String,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    min_p: Option<f64>,
    #[serde(default)]
    num_ctx: Option<i64>,
    #[serde(default)]
    keep_alive: Option<Value>,
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(default)]
    think: Option<Value>,
    #[serde(default)]
    reasoning_effort: Option<String>,
    #[serde(default)]
    reasoning: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
    /// Chat: a bool, with `top_logprobs`; text completions: a count (see [`Common::logprobs`]).
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(flatten)]
    vllm: structured::VllmFields,
}

impl Common {
    /// Structured output: `response_format`, vLLM's `structured_outputs` / `guided_*`, or a
    /// constraint in Ollama's `options`; at most one of them.
    fn format(&self) -> Result<Option<Grammar>, ApiError> {
        structured::merge(vec![
            (
                "response_format",
                structured::openai_response_format(self.response_format.as_ref())?,
            ),
            ("structured_outputs", self.vllm.grammar()?),
            (
                "options",
                self.options
                    .as_ref()
                    .map(structured::ollama_options)
                    .transpose()?
                    .flatten(),
            ),
        ])
    }

    /// Only what the client sent overrides the model's defaults.
    fn options(&self) -> Result<Options, ApiError> {
        let stop = match &self.stop {
            None | Some(Value::Null) => None,
            Some(v) => Some(string_list(v, "stop").map_err(|_| {
                ApiError::BadRequest("stop must be a string or an array of strings".into())
            })?),
        };
        let f = |v: Option<f64>| v.map(|v| v as f32);
        Options {
            temperature: f(self.temperature),
            top_p: f(self.top_p),
            top_k: self.top_k,
            min_p: f(self.min_p),
            frequency_penalty: f(self.frequency_penalty),
            presence_penalty: f(self.presence_penalty),
            seed: self.seed,
            num_predict: self.max_completion_tokens.or(self.max_tokens),
            num_ctx: self.num_ctx,
            stop,
            ..Options::default()
        }
        .over_map(self.options.as_ref())
    }

    /// The alternatives each token's logprobs list, or `None` for no logprobs.
    fn logprobs(&self, kind: Kind) -> Result<Option<usize>, ApiError> {
        match kind {
            Kind::Chat => infer::parse_logprobs(self.logprobs.as_ref(), self.top_logprobs.as_ref()),
            Kind::Completion => infer::parse_completion_logprobs(self.logprobs.as_ref()),
        }
    }

    fn keep_alive(&self) -> Result<Option<KeepAlive>, ApiError> {
        infer::parse_keep_alive(self.keep_alive.as_ref())
    }

    /// `think`, or OpenAI's `reasoning_effort` / `reasoning.effort`.
    fn think(&self) -> Result<Option<bool>, ApiError> {
        let effort = self.reasoning_effort.clone().or_else(|| {
            self.reasoning
                .as_ref()
                .and_then(|r| r.get("effort"))
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        match effort.as_deref() {
            None => infer::parse_think(self.think.as_ref()),
            Some("none") => Ok(Some(false)),
            Some("minimal" | "low" | "medium" | "high" | "max" | "xhigh" | "ultra") => Ok(Some(true)),
            Some(e) => Err(ApiError::BadRequest(format!(
                "invalid reasoning value: '{e}' (must be \"none\", \"minimal\", \"low\", \"medium\", \"high\" or \"max\")"
            ))),
        }
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    suffix: Option<String>,
}

/// Translates one OpenAI message into the template's shape. `call_names` maps the ids of the
/// tool calls in earlier messages to their function names (the latest call with an id wins),
/// so that a tool result without a `name` finds its call by `tool_call_id` in constant time;
/// this message's calls are added to it.
/// An image part stands where it is among the text parts (as an [`images::MARKER`]), its
/// source is added to `images`.
fn translate_message(
    m: Message,
    call_names: &mut HashMap<String, String>,
    images: &mut Vec<images::Source>,
) -> Result<Value, ApiError> {
    let content = match m.content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => {
            let mut content = images::PartsText::default();
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        content.text(part.get("text").and_then(Value::as_str).unwrap_or_default())
                    }
                    Some("image_url") => {
                        // `{"url": ...}`, or the bare string some clients send.
                        let url = part
                            .get("image_url")
                            .and_then(|u| u.get("url").or(Some(u)))
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                ApiError::BadRequest("image_url without a url".into())
                            })?;
                        images.push(images::from_url(url)?);
                        content.image();
                    }
                    Some("input_audio") => {
                        return Err(ApiError::BadRequest("audio input is not supported".into()))
                    }
                    _ => return Err(ApiError::BadRequest("invalid message format".into())),
                }
            }
            content.finish()
        }
        Some(_) => return Err(ApiError::BadRequest("invalid message format".into())),
    };
    // OpenAI's newer name for the system role.
    let role = match m.role.to_lowercase() {
        r if r == "developer" => "system".to_string(),
        r => r,
    };
    check_role(&role)?;
    let mut out = Map::new();
    out.insert("role".into(), role.into());
    out.insert("content".into(), content.into());
    if let Some(calls) = m.tool_calls.filter(|c| !c.is_empty()) {
        // Templates want arguments as objects; OpenAI sends them as JSON strings.
        let mut fixed = Vec::with_capacity(calls.len());
        for mut call in calls {
            if let Some(args) = call.pointer_mut("/function/arguments") {
                if let Value::String(s) = args {
                    let parsed: Value = serde_json::from_str(s)
                        .ok()
                        .filter(Value::is_object)
                        .ok_or_else(|| {
                            ApiError::BadRequest("invalid tool call arguments".into())
                        })?;
                    *args = parsed;
                }
            }
            let id = call.get("id").and_then(Value::as_str);
            let name = call.pointer("/function/name").and_then(Value::as_str);
            if let (Some(id), Some(name)) = (id, name) {
                call_names.insert(id.to_string(), name.to_string());
            }
            fixed.push(call);
        }
        out.insert("tool_calls".into(), fixed.into());
    }
    let name = m
        .name
        .or_else(|| call_names.get(m.tool_call_id.as_deref()?).cloned());
    if let Some(name) = name {
        out.insert("name".into(), name.clone().into());
        out.insert("tool_name".into(), name.into());
    }
    if let Some(r) = m.reasoning.or(m.reasoning_content) {
        out.insert("reasoning_content".into(), r.into());
    }
    Ok(Value::Object(out))
}

pub async fn chat_completions(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: ChatRequest = parse_body(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::BadRequest("[] is too short - 'messages'".into()).into());
    }
    let mut call_names = HashMap::new();
    let mut sources = Vec::new();
    let messages = req
        .messages
        .into_iter()
        .map(|m| translate_message(m, &mut call_names, &mut sources))
        .collect::<Result<Vec<_>, _>>()?;
    let c = &req.common;
    let infer_req = InferRequest {
        model: c.model.clone(),
        input: Input::Chat {
            messages,
            tools: req.tools.filter(|t| !t.is_empty()),
        },
        images: images::resolve(sources, state.config.fetch_images).await?,
        options: c.options()?,
        keep_alive: c.keep_alive()?,
        think: c.think()?,
        format: c.format()?,
        tool_choice: structured::openai_tool_choice(req.tool_choice.as_ref())?,
        one_call: req.parallel_tool_calls == Some(false),
        logprobs: c.logprobs(Kind::Chat)?,
    };
    run(&state, Kind::Chat, c, infer_req).await
}

pub async fn completions(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: CompletionRequest = parse_body(&body)?;
    let prompt = match req.prompt {
        Some(Value::String(p)) => p,
        None | Some(Value::Null) => String::new(),
        Some(_) => {
            return Err(ApiError::BadRequest("prompt must be a string".into()).into());
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::BadRequest("prompt is required".into()).into());
    }
    let c = &req.common;
    let infer_req = InferRequest {
        model: c.model.clone(),
        input: Input::Generate {
            prompt,
            suffix: req.suffix.filter(|s| !s.is_empty()),
            system: None,
            raw: false,
            context: Vec::new(),
        },
        images: Vec::new(),
        options: c.options()?,
        keep_alive: c.keep_alive()?,
        // Text completions have nowhere to put reasoning: off unless asked for.
        think: Some(c.think()?.unwrap_or(false)),
        format: c.format()?,
        tool_choice: ToolChoice::Auto,
        one_call: false,
        logprobs: c.logprobs(Kind::Completion)?,
    };
    run(&state, Kind::Completion, c, infer_req).await
}

/// Which endpoint answers, for the shape of its objects.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// Starts the request and answers streamed or not.
async fn run(state: &AppState, kind: Kind, c: &Common, req: InferRequest) -> Result<Response> {
    let logprobs = req.logprobs.is_some();
    let started = if c.stream.unwrap_or(false) {
        infer::start_streaming(state, req).await?
    } else {
        infer::start(state, req).await?
    };
    let rx = match started {
        Started::Stream(rx) => rx,
        // Both callers refuse an empty input, so there is always a prompt.
        Started::Loaded | Started::Unloaded => {
            return Err(ApiError::Internal("no prompt to generate from".into()).into())
        }
    };
    let n = rand::random_range(0..1_000_000u32);
    let meta = Meta {
        id: match kind {
            Kind::Chat => format!("chatcmpl-{n}"),
            Kind::Completion => format!("cmpl-{n}"),
        },
        created: unix(SystemTime::now()),
        model: c.model.clone(),
        kind,
        stream: c.stream.unwrap_or(false),
        logprobs,
    };
    if meta.stream {
        Ok(sse(meta, c.include_usage(), rx))
    } else {
        collect(meta, rx).await
    }
}

/// What every chunk of one completion repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    stream: bool,
    /// The request asked for logprobs.
    logprobs: bool,
}

impl Meta {
    /// A choice's `logprobs` for `entries` in the endpoint's shape (null when not asked);
    /// `offset` is where their text starts in the output (text completions count it).
    fn logprobs(&self, entries: &[TokenLogprobs], offset: &mut usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => json!({
                "content": entries.iter().map(infer::logprob_json).collect::<Vec<_>>(),
                "refusal": null,
            }),
            Kind::Completion => infer::completion_logprobs_json(entries, offset),
        }
    }

    fn object(&self, choices: Value) -> Value {
        let object = match (self.kind, self.stream) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Completion, _) => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": choices,
        })
    }
}

fn usage(f: &Finished) -> Value {
    let p = f.summary.prompt_eval_count;
    let c = f.summary.eval_count;
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

/// A tool call as OpenAI sends it: arguments as a JSON string.
fn tool_call_json(c: ToolCall, index: usize) -> Value {
    json!({
        "id": call_id(),
        "index": index,
        "type": "function",
        "function": {
            "name": c.name,
            "arguments": Value::Object(c.arguments).to_string(),
        },
    })
}

/// `stop` becomes `tool_calls` when the model called tools.
fn finish_reason(f: &Finished, called: bool) -> &'static str {
    if called && f.reason == "stop" {
        "tool_calls"
    } else {
        f.reason
    }
}

async fn collect(meta: Meta, mut rx: mpsc::Receiver<Out>) -> Result<Response> {
    let mut text = String::new();
    let mut thinking = String::new();
    let mut calls = Vec::new();
    let mut entries = Vec::new();
    loop {
        match rx.recv().await {
            Some(Out::Text(t)) => text.push_str(&t),
            Some(Out::Thinking(t)) => thinking.push_str(&t),
            Some(Out::ToolCall(c)) => calls.push(tool_call_json(c, calls.len())),
            Some(Out::Logprob(lp)) => entries.push(lp),
            Some(Out::Done(f)) => {
                let reason = finish_reason(&f, !calls.is_empty());
                let logprobs = meta.logprobs(&entries, &mut 0);
                let choice = match meta.kind {
                    Kind::Chat => {
                        let mut message = json!({"role": "assistant", "content": text});
                        if !thinking.is_empty() {
                            message["reasoning"] = thinking.clone().into();
                            message["reasoning_content"] = thinking.into();
                        }
                        if !calls.is_empty() {
                            message["tool_calls"] = calls.into();
                        }
                        json!({"index": 0, "message": message, "logprobs": logprobs,
                               "finish_reason": reason})
                    }
                    Kind::Completion => {
                        json!({"text": text, "index": 0, "logprobs": logprobs, "finish_reason": reason})
                    }
                };
                let mut v = meta.object(json!([choice]));
                v["usage"] = usage(&f);
                return Ok(json_response(StatusCode::OK, &v));
            }
            Some(Out::Error(e)) => return Err(ApiError::Internal(e).into()),
            None => return Err(ApiError::Internal("generation ended unexpectedly".into()).into()),
        }
    }
}

fn event(out: &mut String, v: &Value) {
    out.push_str("data: ");
    out.push_str(&v.to_string());
    out.push_str("\n\n");
}

struct SseState {
    rx: mpsc::Receiver<Out>,
    meta: Meta,
    include_usage: bool,
    sent_role: bool,
    calls: usize,
    /// Logprobs of tokens not yet sent: they go out with the next chunk.
    pending: Vec<TokenLogprobs>,
    /// Characters of text sent so far (text completions' `text_offset`).
    offset: usize,
}

impl SseState {
    /// One chunk; chat chunks carry a `delta`, the first one with the role.
    fn chunk(&mut self, delta: Value, finish: Option<&str>) -> Value {
        let entries = std::mem::take(&mut self.pending);
        let logprobs = self.meta.logprobs(&entries, &mut self.offset);
        let mut choice = match self.meta.kind {
            Kind::Chat => {
                let mut delta = delta;
                if !self.sent_role {
                    delta["role"] = "assistant".into();
                    if delta.get("content").is_none() {
                        delta["content"] = "".into();
                    }
                    self.sent_role = true;
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
            Kind::Completion => json!({
                "text": delta.get("content").cloned().unwrap_or_else(|| "".into()),
                "index": 0,
                "finish_reason": finish,
            }),
        };
        choice["logprobs"] = logprobs;
        self.meta.object(json!([choice]))
    }
}

/// Streams the output as server-sent events: a role chunk (with the first text), content,
/// reasoning and tool-call chunks, a finish chunk, the usage chunk when asked, `[DONE]`.
fn sse(meta: Meta, include_usage: bool, rx: mpsc::Receiver<Out>) -> Response {
    let st = SseState {
        rx,
        meta,
        include_usage,
        sent_role: false,
        calls: 0,
        pending: Vec::new(),
        offset: 0,
    };
    let body = futures_util::stream::unfold(Some(st), |st| async move {
        let mut st = st?;
        let mut out = String::new();
        // Log-probabilities wait for the next chunk and go out with it.
        let more = loop {
            break match st.rx.recv().await {
                Some(Out::Logprob(lp)) => {
                    st.pending.push(lp);
                    continue;
                }
                Some(Out::Text(t)) => {
                    let c = st.chunk(json!({"content": t}), None);
                    event(&mut out, &c);
                    true
                }
                Some(Out::Thinking(t)) => {
                    if st.meta.kind == Kind::Chat {
                        let delta = json!({"reasoning": t, "reasoning_content": t});
                        let c = st.chunk(delta, None);
                        event(&mut out, &c);
                    }
                    true
                }
                Some(Out::ToolCall(call)) => {
                    if st.meta.kind == Kind::Chat {
                        let call = tool_call_json(call, st.calls);
                        st.calls += 1;
                        let c = st.chunk(json!({"tool_calls": [call]}), None);
                        event(&mut out, &c);
                    }
                    true
                }
                Some(Out::Done(f)) => {
                    if !st.sent_role && st.meta.kind == Kind::Chat {
                        let c = st.chunk(json!({"content": ""}), None);
                        event(&mut out, &c);
                    }
                    let reason = finish_reason(&f, st.calls > 0);
                    let c = st.chunk(json!({}), Some(reason));
                    event(&mut out, &c);
                    if st.include_usage {
                        let mut u = st.meta.object(json!([]));
                        u["usage"] = usage(&f);
                        event(&mut out, &u);
                    }
                    out.push_str("data: [DONE]\n\n");
                    false
                }
                Some(Out::Error(e)) => {
                    // An error event, then the end marker clients wait for.
                    event(&mut out, &ApiError::Internal(e).openai_body());
                    out.push_str("data: [DONE]\n\n");
                    false
                }
                None => {
                    let e = ApiError::Internal("generation ended unexpectedly".into());
                    event(&mut out, &e.openai_body());
                    out.push_str("data: [DONE]\n\n");
                    false
                }
            };
        };
        Some((out, more.then_some(st)))
    });
    super::event_stream(body)
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// `POST /v1/embeddings`: normalised vectors as float arrays or base64 little-endian f32.
pub async fn embeddings(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: EmbeddingsRequest = parse_body(&body)?;
    let inputs = match req.input {
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) if !a.is_empty() => embed_inputs(Some(Value::Array(a)))?,
        _ => return Err(ApiError::BadRequest("invalid input".into()).into()),
    };
    // OpenAI refuses empty strings too: there is nothing to embed.
    if inputs.iter().any(String::is_empty) {
        return Err(
            ApiError::BadRequest("invalid input: an input is an empty string".into()).into(),
        );
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("") | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(ApiError::BadRequest(format!(
                "invalid encoding_format {f:?}: must be \"float\" or \"base64\""
            ))
            .into())
        }
    };
    let out = infer::embed(&state, &req.model, inputs, true, Options::default(), None).await?;
    let data: Vec<Value> = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let v = finish_vector(v, req.dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "embedding": embedding, "index": i})
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens},
        }),
    ))
}

/// Standard padded base64.
fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(super::base64_encode(b""), "");
        assert_eq!(super::base64_encode(b"f"), "Zg==");
        assert_eq!(super::base64_encode(b"fo"), "Zm8=");
        assert_eq!(super::base64_encode(b"foobar"), "Zm9vYmFy");
    }
}
