//! The OpenAI-compatible dialect: `/v1/chat/completions` (JSON or SSE with an optional
//! usage chunk and `data: [DONE]`), `/v1/models` and `/v1/models/{id}`, with errors as
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Unlike Ollama, sampling options the client did not send are left to the model's
//! defaults (Ollama forces temperature and top_p to 1.0), and `max_completion_tokens` is
//! honoured.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::store::{LocalModel, ModelName};

use super::error::{json_response, ApiError, OpenAiError};
use super::infer::{self, string_list, Finished, InferRequest, Input, Options, Out, Started};
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
    reasoning: Option<String>,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    messages: Vec<Message>,
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
    tools: Option<Vec<Value>>,
}

/// Translates one OpenAI message into the template's shape.
fn translate_message(m: Message) -> Result<Value, ApiError> {
    let content = match m.content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => texts.push(
                        part.get("text")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    Some("image_url") | Some("input_audio") => {
                        return Err(ApiError::BadRequest(
                            "this model does not support image or audio input".into(),
                        ))
                    }
                    _ => return Err(ApiError::BadRequest("invalid message format".into())),
                }
            }
            texts.join("\n\n")
        }
        Some(_) => return Err(ApiError::BadRequest("invalid message format".into())),
    };
    let mut out = Map::new();
    out.insert("role".into(), m.role.to_lowercase().into());
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
            fixed.push(call);
        }
        out.insert("tool_calls".into(), fixed.into());
    }
    if let Some(name) = m.name {
        out.insert("name".into(), name.into());
    }
    if let Some(r) = m.reasoning {
        out.insert("reasoning_content".into(), r.into());
    }
    Ok(Value::Object(out))
}

pub async fn chat_completions(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: ChatRequest = parse_body(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::BadRequest("[] is too short - 'messages'".into()).into());
    }
    let messages = req
        .messages
        .into_iter()
        .map(translate_message)
        .collect::<Result<Vec<_>, _>>()?;
    let options = Options {
        temperature: req.temperature.map(|v| v as f32),
        top_p: req.top_p.map(|v| v as f32),
        frequency_penalty: req.frequency_penalty.map(|v| v as f32),
        presence_penalty: req.presence_penalty.map(|v| v as f32),
        seed: req.seed,
        num_predict: req.max_completion_tokens.or(req.max_tokens),
        stop: match &req.stop {
            None | Some(Value::Null) => None,
            Some(v) => Some(string_list(v, "stop").map_err(|_| {
                ApiError::BadRequest("stop must be a string or an array of strings".into())
            })?),
        },
        ..Options::default()
    };
    let stream = req.stream.unwrap_or(false);
    let include_usage = req
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let model = req.model.clone();
    let infer_req = InferRequest {
        model: req.model,
        input: Input::Chat {
            messages,
            tools: req.tools.filter(|t| !t.is_empty()),
        },
        options,
        keep_alive: None,
    };
    let rx = match infer::start(&state, infer_req).await? {
        Started::Stream(rx) => rx,
        // Messages are never empty here, so there is always a prompt.
        Started::Loaded | Started::Unloaded => {
            return Err(ApiError::Internal("no prompt to generate from".into()).into())
        }
    };
    let meta = Meta {
        id: format!("chatcmpl-{}", rand::random_range(0..1_000_000u32)),
        created: unix(SystemTime::now()),
        model,
    };
    if stream {
        Ok(sse(meta, include_usage, rx))
    } else {
        collect(meta, rx).await
    }
}

/// What every chunk of one completion repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
}

fn usage(f: &Finished) -> Value {
    let p = f.summary.prompt_eval_count;
    let c = f.summary.eval_count;
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

async fn collect(meta: Meta, mut rx: mpsc::Receiver<Out>) -> Result<Response> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Out::Text(t)) => text.push_str(&t),
            Some(Out::Done(f)) => {
                return Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "id": meta.id,
                        "object": "chat.completion",
                        "created": meta.created,
                        "model": meta.model,
                        "system_fingerprint": "fp_ollama",
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": f.reason,
                        }],
                        "usage": usage(&f),
                    }),
                ))
            }
            Some(Out::Error(e)) => return Err(ApiError::Internal(e).into()),
            None => return Err(ApiError::Internal("generation ended unexpectedly".into()).into()),
        }
    }
}

fn chunk(meta: &Meta, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
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
}

/// Streams the output as server-sent events: a role chunk (with the first text), content
/// chunks, a finish chunk, the usage chunk when asked, then `[DONE]`.
fn sse(meta: Meta, include_usage: bool, rx: mpsc::Receiver<Out>) -> Response {
    let st = SseState {
        rx,
        meta,
        include_usage,
        sent_role: false,
    };
    let body = futures_util::stream::unfold(Some(st), |st| async move {
        let mut st = st?;
        let mut out = String::new();
        let more = match st.rx.recv().await {
            Some(Out::Text(t)) => {
                let delta = if st.sent_role {
                    json!({"content": t})
                } else {
                    json!({"role": "assistant", "content": t})
                };
                st.sent_role = true;
                event(&mut out, &chunk(&st.meta, delta, None));
                true
            }
            Some(Out::Done(f)) => {
                if !st.sent_role {
                    let delta = json!({"role": "assistant", "content": ""});
                    event(&mut out, &chunk(&st.meta, delta, None));
                }
                event(&mut out, &chunk(&st.meta, json!({}), Some(f.reason)));
                if st.include_usage {
                    let mut u = chunk(&st.meta, json!({}), None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&f);
                    event(&mut out, &u);
                }
                out.push_str("data: [DONE]\n\n");
                false
            }
            Some(Out::Error(e)) => {
                event(&mut out, &ApiError::Internal(e).openai_body());
                false
            }
            None => {
                let e = ApiError::Internal("generation ended unexpectedly".into());
                event(&mut out, &e.openai_body());
                false
            }
        };
        Some((Ok::<_, Infallible>(Bytes::from(out)), more.then_some(st)))
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
