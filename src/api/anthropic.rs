//! Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.
//! `system` (a string or text blocks), `messages` whose content is a string or blocks
//! (`text`, `tool_use` in assistant turns, `tool_result` in user turns, `thinking`),
//! `tools` with `input_schema` and `tool_choice` (`auto`, `any`, `tool`, `none`),
//! `thinking`, `stop_sequences`, `output_config.format` (a JSON schema); answered as one
//! message or as the event stream the `anthropic` SDK reads: `message_start`, per block
//! `content_block_start` / `content_block_delta` / `content_block_stop`, `message_delta`
//! with the stop reason and usage, `message_stop`. Errors are
//! `{"type": "error", "error": {"type", "message"}}`. Keys come as `x-api-key` (see
//! `edge::auth`).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::model::ToolCall;

use super::error::{json_response, AnthropicError, ApiError};
use super::images;
use super::infer::{self, Finished, InferRequest, Input, Options, Out};
use super::structured::{self, ToolChoice};
use super::{events_from, named_event, parse_body, AppState, EventSource};

type Result<T, E = AnthropicError> = std::result::Result<T, E>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

#[derive(Deserialize)]
struct MessagesRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    thinking: Option<Value>,
    #[serde(default)]
    output_config: Option<Value>,
    /// Ollama extensions.
    #[serde(default)]
    options: Option<Map<String, Value>>,
    #[serde(default)]
    keep_alive: Option<Value>,
}

fn new_id(prefix: &str) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let tail: String = (0..24)
        .map(|_| char::from(CHARS[rand::random_range(0..CHARS.len())]))
        .collect();
    format!("{prefix}{tail}")
}

/// Text of a string or a list of `text` blocks (`system`, `tool_result` content).
fn block_text(v: &Value, what: &str) -> Result<String, ApiError> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => Ok(b.get("text").and_then(Value::as_str).unwrap_or_default()),
                Some(t) => Err(bad(format!("{what}: {t} blocks are not supported here"))),
                None => Err(bad(format!("{what}: a block without a type"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|t| t.join("\n\n")),
        v => Err(bad(format!(
            "{what}: expected a string or text blocks, got {v}"
        ))),
    }
}

/// The conversation in the chat template's shape, and the sources of its images (each one
/// an [`images::MARKER`] in its message's text).
fn conversation(
    system: Option<&Value>,
    messages: &[Value],
    image_sources: &mut Vec<images::Source>,
) -> Result<Vec<Value>, ApiError> {
    let mut out: Vec<Value> = Vec::new();
    // The function each earlier call id named, for the results that answer them.
    let mut call_names: HashMap<String, String> = HashMap::new();
    if let Some(s) = system {
        let text = block_text(s, "system")?;
        if !text.is_empty() {
            out.push(json!({"role": "system", "content": text}));
        }
    }
    for (n, m) in messages.iter().enumerate() {
        let what = format!("messages.{n}");
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("user" | "assistant")) => r,
            Some(r) => {
                return Err(bad(format!(
                    "{what}.role: {r:?} is not \"user\" or \"assistant\" (the system prompt goes in system)"
                )))
            }
            None => return Err(bad(format!("{what}.role: Field required"))),
        };
        let blocks = match m.get("content") {
            Some(Value::String(s)) => {
                out.push(json!({"role": role, "content": s}));
                continue;
            }
            Some(Value::Array(b)) => b,
            _ => return Err(bad(format!("{what}.content: a string or a list of blocks"))),
        };
        let mut text = images::PartsText::default();
        let (mut thinking, mut calls) = (String::new(), Vec::new());
        for b in blocks {
            match (b.get("type").and_then(Value::as_str), role) {
                (Some("text"), _) => {
                    text.text(b.get("text").and_then(Value::as_str).unwrap_or_default())
                }
                (Some("image"), "user") => {
                    let source = b.get("source").unwrap_or(&Value::Null);
                    let field = |k: &str| source.get(k).and_then(Value::as_str);
                    image_sources.push(match field("type") {
                        Some("base64") => images::Source::Bytes(images::from_base64(
                            field("data").unwrap_or_default(),
                        )?),
                        Some("url") => images::from_url(field("url").unwrap_or_default())?,
                        _ => return Err(bad(format!("{what}: an image source is base64 or url"))),
                    });
                    text.image();
                }
                (Some("thinking"), "assistant") => thinking.push_str(
                    b.get("thinking")
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                ),
                (Some("redacted_thinking"), "assistant") => {}
                (Some("tool_use"), "assistant") => {
                    let name = b.get("name").and_then(Value::as_str).unwrap_or_default();
                    let id = b.get("id").and_then(Value::as_str).unwrap_or_default();
                    let input = match b.get("input") {
                        Some(v @ Value::Object(_)) => v.clone(),
                        _ => json!({}),
                    };
                    call_names.insert(id.to_string(), name.to_string());
                    calls.push(json!({"id": id, "type": "function",
                                      "function": {"name": name, "arguments": input}}));
                }
                (Some("tool_result"), "user") => {
                    // Tool results become tool turns, before any text of this message.
                    let id = b
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let content = block_text(b.get("content").unwrap_or(&Value::Null), &what)?;
                    out.push(infer::tool_turn(content, id, call_names.get(id)));
                }
                (Some(t @ "document"), _) => {
                    return Err(bad(format!(
                        "{what}: {t} blocks are not supported; send text"
                    )))
                }
                (Some(t), r) => {
                    return Err(bad(format!(
                        "{what}: a {t} block cannot be in a {r} message"
                    )))
                }
                (None, _) => return Err(bad(format!("{what}: a block without a type"))),
            }
        }
        if text.is_empty() && calls.is_empty() && thinking.is_empty() {
            continue;
        }
        let mut msg = json!({"role": role, "content": text.finish()});
        if !calls.is_empty() {
            msg["tool_calls"] = calls.into();
        }
        if !thinking.is_empty() {
            msg["reasoning_content"] = thinking.into();
        }
        out.push(msg);
    }
    if !out.iter().any(|m| m["role"] != "system") {
        return Err(bad("messages: at least one message is required"));
    }
    Ok(out)
}

/// Anthropic tools (`name`, `description`, `input_schema`) in the chat shape.
fn chat_tools(tools: Option<&Vec<Value>>) -> Result<Option<Vec<Value>>, ApiError> {
    let Some(tools) = tools.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    tools
        .iter()
        .map(|t| {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("custom");
            if kind != "custom" {
                return Err(bad(format!(
                    "tool type {kind} is not supported; only custom tools (name, input_schema) are"
                )));
            }
            let name = t.get("name").and_then(Value::as_str).unwrap_or_default();
            if name.is_empty() {
                return Err(bad("tools: a tool needs a name"));
            }
            let mut f = json!({"name": name,
                               "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"}))});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            Ok(json!({"type": "function", "function": f}))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `tool_choice`: `auto`, `any` (a call is required), `tool` (that one), `none`; and whether
/// parallel calls are off.
fn tool_choice(v: Option<&Value>) -> Result<(ToolChoice, bool), ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok((ToolChoice::Auto, false));
    };
    let one = v.get("disable_parallel_tool_use") == Some(&Value::Bool(true));
    let choice = match v.get("type").and_then(Value::as_str) {
        Some("auto") => ToolChoice::Auto,
        Some("any") => ToolChoice::Required,
        Some("none") => ToolChoice::None,
        Some("tool") => match v.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => ToolChoice::Named(n.to_string()),
            _ => return Err(bad("tool_choice of type tool needs a name")),
        },
        _ => {
            return Err(bad(format!(
                "invalid tool_choice {v}: type must be auto, any, tool or none"
            )))
        }
    };
    Ok((choice, one))
}

/// Everything but the answer: the engine request for a messages body (image URLs fetched
/// when `fetch_images` allows).
async fn infer_request(
    req: &MessagesRequest,
    fetch_images: bool,
) -> Result<InferRequest, ApiError> {
    let mut sources = Vec::new();
    let messages = conversation(req.system.as_ref(), &req.messages, &mut sources)?;
    let tools = chat_tools(req.tools.as_ref())?;
    let f = |v: Option<f64>| v.map(|v| v as f32);
    let options = Options {
        temperature: f(req.temperature),
        top_p: f(req.top_p),
        top_k: req.top_k,
        num_predict: req.max_tokens,
        stop: req.stop_sequences.clone(),
        ..Options::default()
    }
    .over_map(req.options.as_ref())?;
    let think = match req
        .thinking
        .as_ref()
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
    {
        None => None,
        Some("enabled" | "adaptive") => Some(true),
        Some("disabled") => Some(false),
        Some(t) => {
            return Err(bad(format!(
                "thinking.type {t:?} must be enabled or disabled"
            )))
        }
    };
    let format = match req.output_config.as_ref().and_then(|c| c.get("format")) {
        None | Some(Value::Null) => None,
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("json_schema") => {
                let wrapped = json!({"type": "json_schema", "json_schema": f});
                structured::openai_response_format(Some(&wrapped))?
            }
            _ => return Err(bad("output_config.format.type must be json_schema")),
        },
    };
    let format = structured::with_options("output_config.format", format, req.options.as_ref())?;
    let (choice, one_call) = tool_choice(req.tool_choice.as_ref())?;
    let keep_alive = infer::parse_keep_alive(req.keep_alive.as_ref())?;
    Ok(InferRequest {
        model: req.model.clone(),
        input: Input::Chat { messages, tools },
        images: images::resolve(sources, fetch_images).await?,
        options,
        keep_alive,
        think,
        format,
        tool_choice: choice,
        one_call,
        // The Messages API has no token probabilities.
        logprobs: None,
    })
}

pub async fn messages(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let req: MessagesRequest = parse_body(&body)?;
    match req.max_tokens {
        None => return Err(bad("max_tokens: Field required").into()),
        Some(n) if n < 1 => return Err(bad("max_tokens: must be at least 1").into()),
        _ => {}
    }
    let infer_req = infer_request(&req, state.config.fetch_images).await?;
    let rx = infer::start_stream(&state, infer_req).await?;
    let meta = Meta {
        id: new_id("msg_"),
        model: req.model.clone(),
    };
    if req.stream.unwrap_or(false) {
        Ok(sse(meta, rx))
    } else {
        collect(meta, rx).await
    }
}

/// `POST /v1/messages/count_tokens`: the prompt's length in tokens, as it would be sent.
pub async fn count_tokens(State(state): State<AppState>, body: Bytes) -> Result<Response> {
    let mut req: MessagesRequest = parse_body(&body)?;
    req.max_tokens = Some(1);
    let infer_req = infer_request(&req, state.config.fetch_images).await?;
    let n = infer::count_prompt_tokens(&state, infer_req).await?;
    Ok(json_response(StatusCode::OK, &json!({"input_tokens": n})))
}

struct Meta {
    id: String,
    model: String,
}

impl Meta {
    fn message(&self, content: Value, stop: Option<(&str, Value)>, usage: Value) -> Value {
        let (reason, seq) = match stop {
            Some((r, s)) => (Value::from(r), s),
            None => (Value::Null, Value::Null),
        };
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": seq,
            "usage": usage,
        })
    }

    /// `stop_reason` and `stop_sequence`: `tool_use` after calls, `max_tokens` at the
    /// limit, `stop_sequence` with the sequence when one of the request's ended it.
    fn stop(&self, f: &Finished, called: bool) -> (&'static str, Value) {
        if f.reason == "length" {
            return ("max_tokens", Value::Null);
        }
        if called {
            return ("tool_use", Value::Null);
        }
        match &f.summary.stop_string {
            Some(s) => ("stop_sequence", Value::String(s.clone())),
            None => ("end_turn", Value::Null),
        }
    }
}

fn usage(f: &Finished) -> Value {
    json!({
        "input_tokens": f.summary.prompt_eval_count,
        "output_tokens": f.summary.eval_count,
        "cache_read_input_tokens": f.summary.prompt_cached,
        "cache_creation_input_tokens": 0,
    })
}

fn tool_use(c: &ToolCall) -> Value {
    json!({"type": "tool_use", "id": new_id("toolu_"), "name": c.name,
           "input": Value::Object(c.arguments.clone())})
}

async fn collect(meta: Meta, mut rx: mpsc::Receiver<Out>) -> Result<Response> {
    let (mut text, mut thinking, mut calls) = (String::new(), String::new(), Vec::new());
    loop {
        match rx.recv().await {
            Some(Out::Text(t)) => text.push_str(&t),
            Some(Out::Thinking(t)) => thinking.push_str(&t),
            Some(Out::ToolCall(c)) => calls.push(c),
            // Never asked for (see `logprobs: None` above).
            Some(Out::Logprob(_)) => {}
            Some(Out::Done(f)) => {
                let mut content = Vec::new();
                if !thinking.is_empty() {
                    content
                        .push(json!({"type": "thinking", "thinking": thinking, "signature": ""}));
                }
                if !text.is_empty() || calls.is_empty() {
                    content.push(json!({"type": "text", "text": text}));
                }
                content.extend(calls.iter().map(tool_use));
                let stop = meta.stop(&f, !calls.is_empty());
                let m = meta.message(content.into(), Some(stop), usage(&f));
                return Ok(json_response(StatusCode::OK, &m));
            }
            Some(Out::Error(e)) => return Err(ApiError::Internal(e).into()),
            None => return Err(ApiError::Internal("generation ended unexpectedly".into()).into()),
        }
    }
}

#[derive(PartialEq)]
enum Block {
    None,
    Thinking,
    Text,
}

struct Stream {
    rx: mpsc::Receiver<Out>,
    meta: Meta,
    started: bool,
    open: Block,
    /// Index of the next block.
    index: usize,
    calls: usize,
}

impl Stream {
    fn close(&mut self, out: &mut String) {
        if self.open == Block::None {
            return;
        }
        if self.open == Block::Thinking {
            // Our reasoning carries no signature; clients that check for the delta get one.
            named_event(
                out,
                "content_block_delta",
                json!({"index": self.index, "delta": {"type": "signature_delta", "signature": ""}}),
            );
        }
        named_event(out, "content_block_stop", json!({"index": self.index}));
        self.index += 1;
        self.open = Block::None;
    }

    fn open(&mut self, out: &mut String, kind: Block) {
        if self.open == kind {
            return;
        }
        self.close(out);
        let block = match kind {
            Block::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
            _ => json!({"type": "text", "text": ""}),
        };
        named_event(
            out,
            "content_block_start",
            json!({"index": self.index, "content_block": block}),
        );
        self.open = kind;
    }
}

impl EventSource for Stream {
    async fn next(&mut self, out: &mut String) -> bool {
        if !self.started {
            self.started = true;
            let usage = json!({"input_tokens": 0, "output_tokens": 0});
            let m = self.meta.message(json!([]), None, usage);
            named_event(out, "message_start", json!({"message": m}));
            named_event(out, "ping", json!({}));
            return true;
        }
        match self.rx.recv().await {
            Some(Out::Logprob(_)) => {}
            Some(Out::Thinking(t)) => {
                self.open(out, Block::Thinking);
                let delta = json!({"type": "thinking_delta", "thinking": t});
                named_event(
                    out,
                    "content_block_delta",
                    json!({"index": self.index, "delta": delta}),
                );
            }
            Some(Out::Text(t)) => {
                self.open(out, Block::Text);
                let delta = json!({"type": "text_delta", "text": t});
                named_event(
                    out,
                    "content_block_delta",
                    json!({"index": self.index, "delta": delta}),
                );
            }
            Some(Out::ToolCall(c)) => {
                self.close(out);
                let mut block = tool_use(&c);
                block["input"] = json!({});
                named_event(
                    out,
                    "content_block_start",
                    json!({"index": self.index, "content_block": block}),
                );
                let args = Value::Object(c.arguments).to_string();
                let delta = json!({"type": "input_json_delta", "partial_json": args});
                named_event(
                    out,
                    "content_block_delta",
                    json!({"index": self.index, "delta": delta}),
                );
                named_event(out, "content_block_stop", json!({"index": self.index}));
                self.index += 1;
                self.calls += 1;
            }
            Some(Out::Done(f)) => {
                if self.index == 0 && self.open == Block::None {
                    // An empty answer is still one text block.
                    self.open(out, Block::Text);
                }
                self.close(out);
                let (reason, seq) = self.meta.stop(&f, self.calls > 0);
                let u = usage(&f);
                named_event(
                    out,
                    "message_delta",
                    json!({"delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": u}),
                );
                named_event(out, "message_stop", json!({}));
                return false;
            }
            Some(Out::Error(e)) => {
                named_event(out, "error", AnthropicError::body(&ApiError::Internal(e)));
                return false;
            }
            None => {
                let e = ApiError::Internal("generation ended unexpectedly".into());
                named_event(out, "error", AnthropicError::body(&e));
                return false;
            }
        }
        true
    }
}

fn sse(meta: Meta, rx: mpsc::Receiver<Out>) -> Response {
    events_from(Stream {
        rx,
        meta,
        started: false,
        open: Block::None,
        index: 0,
        calls: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_become_a_conversation() {
        let messages = vec![
            json!({"role": "user", "content": "Weather in Oslo?"}),
            json!({"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Use the tool.", "signature": "x"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}]}),
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                {"type": "text", "text": "And tomorrow?"}]}),
        ];
        let mut sources = Vec::new();
        let c = conversation(
            Some(&json!([{"type": "text", "text": "Be brief."}])),
            &messages,
            &mut sources,
        )
        .unwrap();
        assert_eq!(c[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(
            c[2]["tool_calls"][0]["function"]["arguments"],
            json!({"city": "Oslo"})
        );
        assert_eq!(c[2]["reasoning_content"], "Use the tool.");
        assert_eq!(c[3]["role"], "tool");
        assert_eq!(c[3]["name"], "weather");
        assert_eq!(c[3]["content"], "sunny");
        assert_eq!(c[4], json!({"role": "user", "content": "And tomorrow?"}));
        for bad in [
            vec![json!({"role": "system", "content": "x"})],
            vec![json!({"role": "user", "content": [{"type": "image", "source": {}}]})],
            vec![
                json!({"role": "assistant", "content": [{"type": "image", "source": {"type": "base64", "data": "aGk="}}]}),
            ],
            vec![json!({"role": "user", "content": [{"type": "tool_use", "name": "x"}]})],
            vec![],
        ] {
            assert!(conversation(None, &bad, &mut sources).is_err(), "{bad:?}");
        }
        // An image stands where it is among the text blocks.
        let with_image = vec![json!({"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}},
            {"type": "text", "text": "What is it?"}]})];
        let mut sources = Vec::new();
        let c = conversation(None, &with_image, &mut sources).unwrap();
        assert_eq!(c[0]["content"], "Look:\u{FFFC}What is it?");
        assert!(matches!(&sources[..], [images::Source::Bytes(b)] if b == b"hi"));
    }

    #[test]
    fn tool_choices() {
        let tc = |v: Value| tool_choice(Some(&v));
        assert_eq!(
            tc(json!({"type": "any"})).unwrap(),
            (ToolChoice::Required, false)
        );
        assert_eq!(
            tc(json!({"type": "tool", "name": "f", "disable_parallel_tool_use": true})).unwrap(),
            (ToolChoice::Named("f".into()), true)
        );
        assert_eq!(tc(json!({"type": "none"})).unwrap().0, ToolChoice::None);
        assert!(tc(json!({"type": "tool"})).is_err());
        assert!(tc(json!({"type": "sometimes"})).is_err());
    }
}
