//! OpenAI's Responses API, `POST /v1/responses`, stateless (as Ollama serves it): `input`
//! as a string or a list of items (messages with text parts, earlier `function_call`s and
//! their `function_call_output`s), `instructions`, function `tools` with `tool_choice`,
//! `text.format` for structured output, `reasoning.effort`, `max_output_tokens`; answered
//! as one `response` object or as server-sent events in the order openai-python's
//! `client.responses.stream()` reads them: `response.created`, `response.in_progress`,
//! then per output item `output_item.added`, its content events and `output_item.done`,
//! and last `response.completed` (or `response.incomplete` when `max_output_tokens` cut it).
//! Nothing is stored: `previous_response_id` is refused.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::engine::Grammar;
use crate::model::ToolCall;

use super::error::{json_response, ApiError, OpenAiError};
use super::images;
use super::infer::{self, Finished, InferRequest, Input, Options, Out};
use super::structured;
use super::{events_from, named_event, parse_body, AppState, EventSource};

type Result<T, E = OpenAiError> = std::result::Result<T, E>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

#[derive(Deserialize)]
struct ResponsesRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    instructions: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    max_output_tokens: Option<i64>,
    #[serde(default)]
    reasoning: Option<Value>,
    #[serde(default)]
    text: Option<Value>,
    #[serde(default)]
    previous_response_id: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
    /// With `include: ["message.output_text.logprobs"]` (see [`infer::parse_logprobs`]).
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    include: Option<Vec<String>>,
    /// Ollama extensions, as on the other `/v1` endpoints.
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

/// Random id with a prefix (`resp_`, `msg_`, `fc_`, `rs_`, `call_`).
fn new_id(prefix: &str) -> String {
    let tail: String = (0..24)
        .map(|_| char::from(b"0123456789abcdef"[rand::random_range(0..16usize)]))
        .collect();
    format!("{prefix}{tail}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The text of a content value: a string, or text parts (`input_text`, `output_text`,
/// `text`), and where `images` is given `input_image` parts (an [`images::MARKER`] in the
/// text, the source added to `images`); anything else (files, audio) is refused.
fn content_text(
    content: &Value,
    what: &str,
    mut images: Option<&mut Vec<images::Source>>,
) -> Result<String, ApiError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = images::PartsText::default();
            for p in parts {
                let field = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or_default();
                match (p.get("type").and_then(Value::as_str), images.as_deref_mut()) {
                    (
                        Some(
                            "input_text" | "output_text" | "text" | "summary_text"
                            | "reasoning_text",
                        ),
                        _,
                    ) => text.text(field("text")),
                    (Some("refusal"), _) => text.text(field("refusal")),
                    (Some("input_image"), Some(images)) => {
                        images.push(images::from_url(field("image_url"))?);
                        text.image();
                    }
                    (Some(t @ ("input_image" | "input_file" | "input_audio")), _) => {
                        return Err(bad(format!(
                            "{what}: {t} parts are not supported; send text"
                        )))
                    }
                    (other, _) => {
                        return Err(bad(format!(
                            "{what}: unknown content part type {}",
                            other.unwrap_or("(none)")
                        )))
                    }
                }
            }
            Ok(text.finish())
        }
        v => Err(bad(format!(
            "{what}: content must be a string or a list of parts, got {v}"
        ))),
    }
}

/// The conversation in the chat template's shape, from `instructions` and `input`.
fn conversation(
    instructions: Option<&Value>,
    input: Option<&Value>,
    images: &mut Vec<images::Source>,
) -> Result<Vec<Value>, ApiError> {
    let mut messages: Vec<Value> = Vec::new();
    // The function each earlier call id named, for the outputs that answer them.
    let mut call_names: HashMap<String, String> = HashMap::new();
    if let Some(i) = instructions {
        let text = content_text(i, "instructions", None)?;
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    let items = match input {
        None | Some(Value::Null) => return Err(bad("input is required")),
        Some(Value::String(s)) => {
            messages.push(json!({"role": "user", "content": s}));
            return Ok(messages);
        }
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(bad(format!(
                "input must be a string or a list of items, got {v}"
            )))
        }
    };
    for (n, item) in items.iter().enumerate() {
        let what = format!("input[{n}]");
        let kind = item.get("type").and_then(Value::as_str);
        match kind {
            Some("message") | None if item.get("role").is_some() => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or_default();
                let role = match role {
                    "developer" => "system",
                    r @ ("system" | "user" | "assistant") => r,
                    r => return Err(bad(format!("{what}: invalid role {r:?}"))),
                };
                // Images only in user messages, as OpenAI takes them.
                let images = (role == "user").then_some(&mut *images);
                let content = item.get("content").unwrap_or(&Value::Null);
                let text = content_text(content, &what, images)?;
                messages.push(json!({"role": role, "content": text}));
            }
            Some("function_call") => {
                let name = item.get("name").and_then(Value::as_str).unwrap_or_default();
                let call_id = item
                    .get("call_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if name.is_empty() || call_id.is_empty() {
                    return Err(bad(format!(
                        "{what}: a function_call needs name and call_id"
                    )));
                }
                let args = match item.get("arguments") {
                    Some(Value::String(s)) if s.trim().is_empty() => json!({}),
                    Some(Value::String(s)) => serde_json::from_str::<Value>(s)
                        .ok()
                        .filter(Value::is_object)
                        .ok_or_else(|| {
                            bad(format!("{what}: arguments must be a JSON object string"))
                        })?,
                    Some(v @ Value::Object(_)) => v.clone(),
                    _ => json!({}),
                };
                call_names.insert(call_id.to_string(), name.to_string());
                let call = json!({"id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": args}});
                // Calls in a row belong to one assistant turn.
                match messages.last_mut() {
                    Some(m) if m["role"] == "assistant" && m.get("tool_calls").is_some() => {
                        if let Some(calls) = m["tool_calls"].as_array_mut() {
                            calls.push(call);
                        }
                    }
                    _ => messages
                        .push(json!({"role": "assistant", "content": "", "tool_calls": [call]})),
                }
            }
            Some("function_call_output") => {
                let call_id = item
                    .get("call_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let output = content_text(item.get("output").unwrap_or(&Value::Null), &what, None)?;
                messages.push(infer::tool_turn(output, call_id, call_names.get(call_id)));
            }
            // Earlier reasoning is not shown to the model again (as chat templates drop it).
            Some("reasoning") => {}
            Some("item_reference") => {
                return Err(bad(format!(
                    "{what}: item references need stored responses; this server is stateless, \
                     send the items themselves"
                )))
            }
            other => {
                return Err(bad(format!(
                    "{what}: unsupported input item type {}",
                    other.unwrap_or("(none)")
                )))
            }
        }
    }
    if messages.iter().all(|m| m["role"] == "system") {
        return Err(bad("input has no messages"));
    }
    Ok(messages)
}

/// Function tools in the chat shape; built-in tools (web search, files...) are refused.
fn chat_tools(tools: Option<&Vec<Value>>) -> Result<Option<Vec<Value>>, ApiError> {
    let Some(tools) = tools.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    tools
        .iter()
        .map(|t| match t.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = t.get("name").and_then(Value::as_str).unwrap_or_default();
                if name.is_empty() {
                    return Err(bad("a function tool needs a name"));
                }
                let mut f = json!({"name": name});
                for k in ["description", "parameters"] {
                    if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                        f[k] = v.clone();
                    }
                }
                Ok(json!({"type": "function", "function": f}))
            }
            other => Err(bad(format!(
                "tool type {} is not supported; only function tools are",
                other.unwrap_or("(none)")
            ))),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `text.format`: `text`, `json_object`, or `json_schema` with `schema` (and `name`,
/// `strict`) beside `type`.
fn text_format(text: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(format) = text.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            let schema = json!({"type": "json_schema", "json_schema": format});
            structured::openai_response_format(Some(&schema))
        }
        _ => structured::openai_response_format(Some(format)),
    }
}

pub async fn responses(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: ResponsesRequest = parse_body(&body)?;
    if req
        .previous_response_id
        .as_ref()
        .is_some_and(|v| !v.is_null())
    {
        return Err(bad(
            "previous_response_id is not supported: this server keeps no responses; send the \
             whole conversation in input",
        )
        .into());
    }
    let include_logprobs = req
        .include
        .iter()
        .flatten()
        .any(|i| i == "message.output_text.logprobs");
    // Alternatives asked for imply the logprobs they come with.
    let asks_top = req
        .top_logprobs
        .as_ref()
        .and_then(Value::as_u64)
        .unwrap_or(0)
        > 0;
    let logprobs = infer::parse_logprobs(
        Some(&Value::Bool(include_logprobs || asks_top)),
        req.top_logprobs.as_ref(),
    )?;
    let mut sources = Vec::new();
    let messages = conversation(req.instructions.as_ref(), req.input.as_ref(), &mut sources)?;
    let tools = chat_tools(req.tools.as_ref())?;
    let f = |v: Option<f64>| v.map(|v| v as f32);
    let options = Options {
        temperature: f(req.temperature),
        top_p: f(req.top_p),
        num_predict: req.max_output_tokens,
        ..Options::default()
    }
    .over_map(req.options.as_ref())?;
    let think = match req
        .reasoning
        .as_ref()
        .and_then(|r| r.get("effort"))
        .and_then(Value::as_str)
    {
        None => None,
        Some("none") => Some(false),
        Some("minimal" | "low" | "medium" | "high" | "xhigh") => Some(true),
        Some(e) => return Err(bad(format!("invalid reasoning.effort {e:?}")).into()),
    };
    let keep_alive = infer::parse_keep_alive(req.keep_alive.as_ref())?;
    let format = structured::with_options(
        "text.format",
        text_format(req.text.as_ref())?,
        req.options.as_ref(),
    )?;
    let infer_req = InferRequest {
        model: req.model.clone(),
        input: Input::Chat { messages, tools },
        images: images::resolve(sources, state.config.fetch_images).await?,
        options,
        keep_alive,
        think,
        format,
        tool_choice: structured::openai_tool_choice(req.tool_choice.as_ref())?,
        one_call: req.parallel_tool_calls == Some(false),
        logprobs,
    };
    let rx = infer::start_stream(&state, infer_req).await?;
    let echo = Echo {
        id: new_id("resp_"),
        created_at: unix_now(),
        model: req.model,
        instructions: req.instructions.unwrap_or(Value::Null),
        tools: req.tools.unwrap_or_default(),
        tool_choice: req.tool_choice.unwrap_or_else(|| "auto".into()),
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        temperature: req.temperature,
        top_p: req.top_p,
        max_output_tokens: req.max_output_tokens,
        text: req
            .text
            .unwrap_or_else(|| json!({"format": {"type": "text"}})),
        metadata: req.metadata.unwrap_or_else(|| json!({})),
    };
    if req.stream.unwrap_or(false) {
        Ok(sse(echo, rx))
    } else {
        collect(echo, rx).await
    }
}

/// What the response object repeats from the request.
struct Echo {
    id: String,
    created_at: u64,
    model: String,
    instructions: Value,
    tools: Vec<Value>,
    tool_choice: Value,
    parallel_tool_calls: bool,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_output_tokens: Option<i64>,
    text: Value,
    metadata: Value,
}

impl Echo {
    /// The response object; `finished` adds the status, usage and completion time.
    fn response(&self, output: &[Value], finished: Option<&Finished>) -> Value {
        let (status, incomplete, usage, completed_at) = match finished {
            None => ("in_progress", Value::Null, Value::Null, Value::Null),
            Some(f) => {
                let s = &f.summary;
                let usage = json!({
                    "input_tokens": s.prompt_eval_count,
                    "input_tokens_details": {"cached_tokens": s.prompt_cached, "cache_write_tokens": 0},
                    "output_tokens": s.eval_count,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": s.prompt_eval_count + s.eval_count,
                });
                if f.reason == "length" {
                    let why = json!({"reason": "max_output_tokens"});
                    ("incomplete", why, usage, Value::Null)
                } else {
                    ("completed", Value::Null, usage, unix_now().into())
                }
            }
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": completed_at,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": false,
            "temperature": self.temperature,
            "text": self.text,
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": usage,
            "metadata": self.metadata,
        })
    }
}

fn reasoning_item(id: &str, text: &str, done: bool) -> Value {
    let content = if done {
        json!([{"type": "reasoning_text", "text": text}])
    } else {
        json!([])
    };
    json!({"id": id, "type": "reasoning", "summary": [], "content": content,
           "status": if done { "completed" } else { "in_progress" }})
}

/// A message item: `Some((text, logprobs))` when complete, `None` when just opened.
fn message_item(id: &str, done: Option<(&str, &[Value])>) -> Value {
    let (content, status) = match done {
        Some((t, lp)) => (json!([text_part(t, lp)]), "completed"),
        None => (json!([]), "in_progress"),
    };
    json!({"id": id, "type": "message", "status": status, "role": "assistant", "content": content})
}

fn text_part(text: &str, logprobs: &[Value]) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

fn call_item(id: &str, call_id: &str, c: &ToolCall, arguments: &str, done: bool) -> Value {
    json!({"id": id, "type": "function_call", "call_id": call_id, "name": c.name,
           "arguments": arguments, "status": if done { "completed" } else { "in_progress" }})
}

/// `stream: false`: the whole response.
async fn collect(echo: Echo, mut rx: mpsc::Receiver<Out>) -> Result<Response> {
    let (mut text, mut thinking, mut calls) = (String::new(), String::new(), Vec::new());
    // Logprobs arrive before the piece their token completes; only the answer's are kept.
    let (mut logprobs, mut pending) = (Vec::new(), Vec::new());
    loop {
        match rx.recv().await {
            Some(Out::Logprob(lp)) => pending.push(infer::logprob_json(&lp)),
            Some(Out::Text(t)) => {
                text.push_str(&t);
                logprobs.append(&mut pending);
            }
            Some(Out::Thinking(t)) => {
                thinking.push_str(&t);
                pending.clear();
            }
            Some(Out::ToolCall(c)) => {
                calls.push(c);
                pending.clear();
            }
            Some(Out::Done(f)) => {
                let mut output = Vec::new();
                if !thinking.is_empty() {
                    output.push(reasoning_item(&new_id("rs_"), &thinking, true));
                }
                if !text.is_empty() || calls.is_empty() {
                    output.push(message_item(&new_id("msg_"), Some((&text, &logprobs))));
                }
                for c in &calls {
                    let args = Value::Object(c.arguments.clone()).to_string();
                    output.push(call_item(&new_id("fc_"), &new_id("call_"), c, &args, true));
                }
                return Ok(json_response(
                    StatusCode::OK,
                    &echo.response(&output, Some(&f)),
                ));
            }
            Some(Out::Error(e)) => return Err(ApiError::Internal(e).into()),
            None => return Err(ApiError::Internal("generation ended unexpectedly".into()).into()),
        }
    }
}

/// The item being streamed.
enum Open {
    None,
    Reasoning {
        id: String,
        text: String,
    },
    Message {
        id: String,
        text: String,
        logprobs: Vec<Value>,
    },
}

struct Stream {
    rx: mpsc::Receiver<Out>,
    echo: Echo,
    seq: u64,
    /// Finished output items, in order.
    output: Vec<Value>,
    open: Open,
    started: bool,
    /// Logprobs of tokens whose text has not been sent yet.
    pending: Vec<Value>,
}

impl Stream {
    fn event(&mut self, out: &mut String, kind: &str, mut data: Value) {
        data["sequence_number"] = self.seq.into();
        self.seq += 1;
        named_event(out, kind, data);
    }

    fn index(&self) -> usize {
        self.output.len()
    }

    /// Closes the item being streamed.
    fn close(&mut self, out: &mut String) {
        let i = self.index();
        match std::mem::replace(&mut self.open, Open::None) {
            Open::None => {}
            Open::Reasoning { id, text } => {
                self.event(
                    out,
                    "response.reasoning_text.done",
                    json!({"item_id": id, "output_index": i, "content_index": 0, "text": text}),
                );
                let item = reasoning_item(&id, &text, true);
                self.event(
                    out,
                    "response.output_item.done",
                    json!({"output_index": i, "item": item}),
                );
                self.output.push(item);
            }
            Open::Message { id, text, logprobs } => {
                let ids = json!({"item_id": id, "output_index": i, "content_index": 0});
                let mut done = ids.clone();
                done["text"] = text.clone().into();
                done["logprobs"] = logprobs.clone().into();
                self.event(out, "response.output_text.done", done);
                let mut part = ids;
                part["part"] = text_part(&text, &logprobs);
                self.event(out, "response.content_part.done", part);
                let item = message_item(&id, Some((&text, &logprobs)));
                self.event(
                    out,
                    "response.output_item.done",
                    json!({"output_index": i, "item": item}),
                );
                self.output.push(item);
            }
        }
    }

    fn thinking(&mut self, out: &mut String, t: String) {
        self.pending.clear();
        if !matches!(self.open, Open::Reasoning { .. }) {
            self.close(out);
            let id = new_id("rs_");
            let i = self.index();
            self.event(
                out,
                "response.output_item.added",
                json!({"output_index": i, "item": reasoning_item(&id, "", false)}),
            );
            self.open = Open::Reasoning {
                id,
                text: String::new(),
            };
        }
        let i = self.index();
        if let Open::Reasoning { id, text } = &mut self.open {
            text.push_str(&t);
            let data = json!({"item_id": id, "output_index": i, "content_index": 0, "delta": t});
            self.event(out, "response.reasoning_text.delta", data);
        }
    }

    fn text(&mut self, out: &mut String, t: String) {
        if !matches!(self.open, Open::Message { .. }) {
            self.close(out);
            let id = new_id("msg_");
            let i = self.index();
            self.event(
                out,
                "response.output_item.added",
                json!({"output_index": i, "item": message_item(&id, None)}),
            );
            self.event(
                out,
                "response.content_part.added",
                json!({"item_id": id, "output_index": i, "content_index": 0, "part": text_part("", &[])}),
            );
            self.open = Open::Message {
                id,
                text: String::new(),
                logprobs: Vec::new(),
            };
        }
        let i = self.index();
        let delta_logprobs = std::mem::take(&mut self.pending);
        if let Open::Message { id, text, logprobs } = &mut self.open {
            text.push_str(&t);
            logprobs.extend(delta_logprobs.iter().cloned());
            let data = json!({"item_id": id, "output_index": i, "content_index": 0,
                              "delta": t, "logprobs": delta_logprobs});
            self.event(out, "response.output_text.delta", data);
        }
    }

    fn call(&mut self, out: &mut String, c: ToolCall) {
        self.pending.clear();
        self.close(out);
        let (id, call_id) = (new_id("fc_"), new_id("call_"));
        let i = self.index();
        let args = Value::Object(c.arguments.clone()).to_string();
        self.event(
            out,
            "response.output_item.added",
            json!({"output_index": i, "item": call_item(&id, &call_id, &c, "", false)}),
        );
        self.event(
            out,
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": i, "delta": args}),
        );
        self.event(
            out,
            "response.function_call_arguments.done",
            json!({"item_id": id, "output_index": i, "arguments": args, "name": c.name}),
        );
        let item = call_item(&id, &call_id, &c, &args, true);
        self.event(
            out,
            "response.output_item.done",
            json!({"output_index": i, "item": item}),
        );
        self.output.push(item);
    }

    fn fail(&mut self, out: &mut String, msg: &str) {
        let mut r = self.echo.response(&self.output, None);
        r["status"] = "failed".into();
        r["error"] = json!({"code": "server_error", "message": msg});
        self.event(out, "response.failed", json!({"response": r}));
    }
}

impl EventSource for Stream {
    /// The next piece of the body; `false` when it ended.
    async fn next(&mut self, out: &mut String) -> bool {
        if !self.started {
            self.started = true;
            let r = self.echo.response(&[], None);
            self.event(out, "response.created", json!({"response": r.clone()}));
            self.event(out, "response.in_progress", json!({"response": r}));
            return true;
        }
        match self.rx.recv().await {
            Some(Out::Logprob(lp)) => self.pending.push(infer::logprob_json(&lp)),
            Some(Out::Thinking(t)) => self.thinking(out, t),
            Some(Out::Text(t)) => self.text(out, t),
            Some(Out::ToolCall(c)) => self.call(out, c),
            Some(Out::Done(f)) => {
                if self.output.is_empty() && matches!(self.open, Open::None) {
                    // An empty answer is still a message.
                    self.text(out, String::new());
                }
                self.close(out);
                let r = self.echo.response(&self.output, Some(&f));
                let kind = if f.reason == "length" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                self.event(out, kind, json!({"response": r}));
                return false;
            }
            Some(Out::Error(e)) => {
                self.fail(out, &e);
                return false;
            }
            None => {
                self.fail(out, "generation ended unexpectedly");
                return false;
            }
        }
        true
    }
}

fn sse(echo: Echo, rx: mpsc::Receiver<Out>) -> Response {
    events_from(Stream {
        rx,
        echo,
        seq: 0,
        output: Vec::new(),
        open: Open::None,
        started: false,
        pending: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_items_become_a_conversation() {
        let input = json!([
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{\"city\": \"Oslo\"}"},
            {"type": "function_call", "call_id": "c2", "name": "time", "arguments": ""},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ]);
        let mut sources = Vec::new();
        let m = conversation(Some(&json!("Sys")), Some(&input), &mut sources).unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "Sys"}));
        assert_eq!(m[1], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(m[2], json!({"role": "user", "content": "Weather?"}));
        assert_eq!(m[3]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(
            m[3]["tool_calls"][0]["function"]["arguments"],
            json!({"city": "Oslo"})
        );
        assert_eq!(m[4]["name"], "weather");
        assert_eq!(m.len(), 5);
        for bad in [
            json!([{"type": "item_reference", "id": "x"}]),
            json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
            json!([{"role": "assistant", "content": [{"type": "input_image", "image_url": "data:image/png;base64,aGk="}]}]),
            json!([{"role": "wizard", "content": "hi"}]),
            json!(3),
        ] {
            assert!(
                conversation(None, Some(&bad), &mut sources).is_err(),
                "{bad}"
            );
        }
        assert!(conversation(None, None, &mut sources).is_err());
        let with_image = json!([{"role": "user", "content": [
            {"type": "input_text", "text": "Look:"},
            {"type": "input_image", "image_url": "data:image/png;base64,aGk="}]}]);
        let mut sources = Vec::new();
        let m = conversation(None, Some(&with_image), &mut sources).unwrap();
        assert_eq!(m[0]["content"], "Look:\u{FFFC}");
        assert!(matches!(&sources[..], [images::Source::Bytes(b)] if b == b"hi"));
    }

    #[test]
    fn only_function_tools() {
        let t = chat_tools(Some(&vec![json!({"type": "function", "name": "f",
                                             "parameters": {"type": "object"}})]))
        .unwrap()
        .unwrap();
        assert_eq!(t[0]["function"]["name"], "f");
        assert!(chat_tools(Some(&vec![json!({"type": "web_search"})])).is_err());
    }
}
