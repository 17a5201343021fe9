//! Splits a model's raw reply into thinking, answer text and tool calls while it streams.
//!
//! The syntax comes from the chat template: Qwen2.5/Qwen3 (Hermes style) wrap each call in
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, Llama 3.x answers a call with a
//! bare `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`), and thinking
//! models put their reasoning in `<think>...</think>`. Text is released as soon as it cannot
//! be the start of a tag, so plain answers keep streaming while tools are offered.

use serde_json::{Map, Value};

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

/// How a model writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSyntax {
    /// The template never mentions tools.
    None,
    /// `<tool_call>` JSON `</tool_call>` blocks anywhere in the reply (Qwen, Hermes), or
    /// a reply that is one bare JSON call.
    Tagged,
    /// A reply that is nothing but one JSON call, or several separated by `;` (Llama 3.x).
    BareJson,
}

/// What a model's chat template says about its replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyFormat {
    pub tools: ToolSyntax,
    /// The model reasons inside `<think>` tags (Qwen3, DeepSeek-R1 distills).
    pub thinking: bool,
}

impl ReplyFormat {
    /// Reads the conventions off a chat template's source.
    pub fn from_template(source: &str) -> ReplyFormat {
        let tools = if source.contains(CALL_OPEN) {
            ToolSyntax::Tagged
        } else if source.contains("tools") {
            ToolSyntax::BareJson
        } else {
            ToolSyntax::None
        };
        ReplyFormat {
            tools,
            thinking: source.contains(THINK_OPEN),
        }
    }

    /// No tools, no thinking: everything is answer text.
    pub fn plain() -> ReplyFormat {
        ReplyFormat {
            tools: ToolSyntax::None,
            thinking: false,
        }
    }
}

impl ToolSyntax {
    /// A Lark grammar (for llguidance) whose `calls` rule matches this syntax's tool calls,
    /// each naming one of `tools` (name, JSON schema of the arguments) with arguments valid
    /// against its schema: `<tool_call>` blocks (several, on their own lines, unless `one`)
    /// for [`ToolSyntax::Tagged`], one bare `{"name": ..., "parameters": ...}` object for
    /// [`ToolSyntax::BareJson`]. `json_options` goes into each call's schema as its
    /// `x-guidance` (whitespace). `None` when the model has no tool syntax or no tools.
    pub fn calls_grammar(
        self,
        tools: &[(String, Value)],
        one: bool,
        json_options: &Value,
    ) -> Option<String> {
        let args_key = match self {
            ToolSyntax::None => return None,
            ToolSyntax::Tagged => "arguments",
            ToolSyntax::BareJson => "parameters",
        };
        if tools.is_empty() {
            return None;
        }
        let variants: Vec<Value> = tools
            .iter()
            .map(|(name, params)| {
                let params = match params {
                    Value::Null => serde_json::json!({"type": "object"}),
                    p => p.clone(),
                };
                serde_json::json!({
                    "type": "object",
                    "properties": {"name": {"const": name}, args_key: params},
                    "required": ["name", args_key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = match <[Value; 1]>::try_from(variants) {
            Ok([one_tool]) => one_tool,
            Err(many) => serde_json::json!({"anyOf": many}),
        };
        if let Value::Object(m) = &mut schema {
            m.insert("x-guidance".into(), json_options.clone());
        }
        Some(match self {
            ToolSyntax::Tagged => {
                let open = Value::from(format!("{CALL_OPEN}\n"));
                let close = Value::from(format!("\n{CALL_CLOSE}"));
                let more = if one { "" } else { " (\"\\n\" call)*" };
                format!("calls: call{more}\ncall: {open} call_json {close}\ncall_json: %json {schema}\n")
            }
            _ => format!("calls: %json {schema}\n"),
        })
    }
}

/// A tool call with its arguments as a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Map<String, Value>,
}

/// One piece of a parsed reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Thinking(String),
    Content(String),
    ToolCall(ToolCall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first visible character: a `<think>` or a bare JSON call may open here.
    Start,
    Thinking,
    /// Answer text right after `</think>`: its leading whitespace is dropped.
    AfterThinking,
    Content,
    InCall,
    /// The reply began like a bare JSON call; held until the end to decide.
    BareCall,
}

/// The incremental parser for one reply.
#[derive(Debug)]
pub struct ReplyParser {
    format: ReplyFormat,
    /// The offered tools' names: only calls to these are calls (small models invent some).
    tools: Vec<String>,
    state: State,
    buf: String,
    /// Nothing of the current thinking block has been seen yet.
    fresh: bool,
}

impl ReplyParser {
    /// `thinking`: split out `<think>` blocks (the request did not turn thinking off);
    /// `in_thinking`: the prompt already opened the `<think>` block; `tools`: the request
    /// names of the tools the request offered; calls to them are parsed out of the text.
    pub fn new(format: ReplyFormat, thinking: bool, in_thinking: bool, tools: Vec<String>) -> Self {
        let thinking = thinking && format.thinking;
        ReplyParser {
            format: ReplyFormat { thinking, ..format },
            tools: if format.tools == ToolSyntax::None {
                Vec::new()
            } else {
                tools
            },
            state: if thinking && in_thinking {
                State::Thinking
            } else {
                State::Start
            },
            buf: String::new(),
            fresh: true,
        }
    }

    /// Feeds the next piece of text; finished pieces go to `out`.
    pub fn push(&mut self, text: &str, out: &mut Vec<Piece>) {
        self.buf.push_str(text);
        while self.step(out, false) {}
    }

    /// The reply ended: everything still held goes out.
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        while self.step(out, true) {}
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Thinking => emit(out, Piece::Thinking, rest.trim_end()),
            State::InCall => match self.calls(&rest) {
                Some(calls) => out.extend(calls.into_iter().map(Piece::ToolCall)),
                None => emit(out, Piece::Content, &format!("{CALL_OPEN}{rest}")),
            },
            State::BareCall => {
                let json = rest.trim_start().trim_start_matches(PYTHON_TAG);
                match self.calls(json) {
                    Some(calls) => out.extend(calls.into_iter().map(Piece::ToolCall)),
                    None => emit(out, Piece::Content, &rest),
                }
            }
            State::Start | State::AfterThinking | State::Content => {
                emit(out, Piece::Content, &rest)
            }
        }
    }

    /// Makes what progress the buffer allows; `false` when it must wait for more text.
    fn step(&mut self, out: &mut Vec<Piece>, at_end: bool) -> bool {
        match self.state {
            State::Start => {
                let visible = self.buf.trim_start();
                if visible.is_empty() {
                    return false;
                }
                let may_open = |tag: &str| tag.starts_with(visible) && !at_end;
                if self.format.thinking && visible.starts_with(THINK_OPEN) {
                    self.buf = visible[THINK_OPEN.len()..].to_string();
                    self.state = State::Thinking;
                    self.fresh = true;
                } else if self.format.thinking && may_open(THINK_OPEN) {
                    return false;
                } else if !self.tools.is_empty() {
                    // Tagged models also answer with a bare call now and then (Qwen2.5-coder).
                    let bare = self.format.tools == ToolSyntax::BareJson;
                    if visible.starts_with('{') || (bare && visible.starts_with(PYTHON_TAG)) {
                        self.state = State::BareCall;
                        return false;
                    }
                    if bare && may_open(PYTHON_TAG) {
                        return false;
                    }
                    self.state = State::Content;
                } else {
                    self.state = State::Content;
                }
                true
            }
            State::Thinking => {
                // Reasoning starts after the tag's newline.
                if self.fresh {
                    let visible = self.buf.trim_start().len();
                    self.buf.drain(..self.buf.len() - visible);
                    if self.buf.is_empty() {
                        return false;
                    }
                    self.fresh = false;
                }
                self.until(
                    THINK_CLOSE,
                    out,
                    Piece::Thinking,
                    State::AfterThinking,
                    at_end,
                )
            }
            State::AfterThinking => {
                let visible = self.buf.trim_start().len();
                self.buf.drain(..self.buf.len() - visible);
                if self.buf.is_empty() {
                    return false;
                }
                self.state = State::Start;
                true
            }
            State::Content => {
                if !self.tools.is_empty() && self.format.tools == ToolSyntax::Tagged {
                    self.until(CALL_OPEN, out, Piece::Content, State::InCall, at_end)
                } else {
                    let text = std::mem::take(&mut self.buf);
                    emit(out, Piece::Content, &text);
                    false
                }
            }
            State::InCall => {
                let Some(end) = self.buf.find(CALL_CLOSE) else {
                    return false;
                };
                let body: String = self.buf.drain(..end + CALL_CLOSE.len()).collect();
                let body = &body[..end];
                match self.calls(body) {
                    Some(calls) => out.extend(calls.into_iter().map(Piece::ToolCall)),
                    // Not a call after all: the model's text, tags and all.
                    None => emit(
                        out,
                        Piece::Content,
                        &format!("{CALL_OPEN}{body}{CALL_CLOSE}"),
                    ),
                }
                self.state = State::Content;
                true
            }
            State::BareCall => false,
        }
    }

    /// The calls in `text` if it is nothing else and names only offered tools.
    fn calls(&self, text: &str) -> Option<Vec<ToolCall>> {
        parse_calls(text).filter(|calls| calls.iter().all(|c| self.tools.contains(&c.name)))
    }

    /// Releases text up to `tag` as `piece`, then moves to `next`. Without the tag, holds
    /// back only a tail that could be its beginning (and, for thinking, trailing
    /// whitespace, which is trimmed before the close tag).
    fn until(
        &mut self,
        tag: &str,
        out: &mut Vec<Piece>,
        piece: fn(String) -> Piece,
        next: State,
        at_end: bool,
    ) -> bool {
        let thinking = self.state == State::Thinking;
        if let Some(i) = self.buf.find(tag) {
            let before: String = self.buf.drain(..i + tag.len()).collect();
            let before = &before[..i];
            emit(
                out,
                piece,
                if thinking { before.trim_end() } else { before },
            );
            self.state = next;
            return true;
        }
        if at_end {
            return false;
        }
        let mut keep = partial_suffix(&self.buf, tag);
        if thinking {
            let body = &self.buf[..self.buf.len() - keep];
            keep += body.len() - body.trim_end().len();
        }
        let release = self.buf.len() - keep;
        let text: String = self.buf.drain(..release).collect();
        emit(out, piece, &text);
        false
    }
}

fn emit(out: &mut Vec<Piece>, piece: fn(String) -> Piece, text: &str) {
    if !text.is_empty() {
        out.push(piece(text.to_string()));
    }
}

/// The length of the longest tail of `s` that is a proper prefix of `tag`.
fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

/// One call object, an array of them, or several separated by whitespace or `;`.
fn parse_calls(text: &str) -> Option<Vec<ToolCall>> {
    let text = text.trim();
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return match v {
            Value::Array(items) => items.iter().map(call_from_json).collect(),
            v => call_from_json(&v).map(|c| vec![c]),
        };
    }
    let values: Option<Vec<Value>> = serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map(Result::ok)
        .collect();
    let values = values.or_else(|| {
        text.split(';')
            .map(|part| serde_json::from_str(part.trim()).ok())
            .collect()
    })?;
    if values.is_empty() {
        return None;
    }
    values.iter().map(call_from_json).collect()
}

/// `{"name": ..., "arguments"|"parameters": {...} or "<json>"}`.
fn call_from_json(v: &Value) -> Option<ToolCall> {
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?.to_string();
    let args = obj.get("arguments").or_else(|| obj.get("parameters"));
    let arguments = match args {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s).ok()? {
            Value::Object(m) => m,
            _ => return None,
        },
        Some(_) => return None,
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const QWEN: ReplyFormat = ReplyFormat {
        tools: ToolSyntax::Tagged,
        thinking: true,
    };
    const LLAMA: ReplyFormat = ReplyFormat {
        tools: ToolSyntax::BareJson,
        thinking: false,
    };

    fn tools() -> Vec<String> {
        ["get_weather", "now", "a", "b"].map(String::from).to_vec()
    }

    /// Feeds `text` in pieces of `n` bytes (on char boundaries) and merges neighbours.
    fn parse(p: &mut ReplyParser, text: &str, n: usize) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = n.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            p.push(&rest[..cut], &mut out);
            rest = &rest[cut..];
        }
        p.finish(&mut out);
        let mut merged: Vec<Piece> = Vec::new();
        for piece in out {
            match (merged.last_mut(), piece) {
                (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
                (Some(Piece::Thinking(a)), Piece::Thinking(b)) => a.push_str(&b),
                (_, p) => merged.push(p),
            }
        }
        merged
    }

    fn call(name: &str, args: Value) -> Piece {
        Piece::ToolCall(ToolCall {
            name: name.into(),
            arguments: args.as_object().cloned().unwrap_or_default(),
        })
    }

    #[test]
    fn formats_come_from_templates() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/templates/");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}{f}")).unwrap();
        assert_eq!(ReplyFormat::from_template(&read("qwen3.jinja")), QWEN);
        let qwen25 = ReplyFormat::from_template(&read("qwen2.5.jinja"));
        assert_eq!(qwen25.tools, ToolSyntax::Tagged);
        assert!(!qwen25.thinking);
        assert_eq!(ReplyFormat::from_template(&read("llama3.1.jinja")), LLAMA);
        let smol = ReplyFormat::from_template(&read("smollm2.jinja"));
        assert_eq!(smol, ReplyFormat::plain());
    }

    #[test]
    fn thinking_then_answer_at_every_split() {
        let text = "<think>\nThe user greets me.\n</think>\n\nHello! 你好 👋";
        for n in 1..text.len() {
            let mut p = ReplyParser::new(QWEN, true, false, vec![]);
            assert_eq!(
                parse(&mut p, text, n),
                vec![
                    Piece::Thinking("The user greets me.".into()),
                    Piece::Content("Hello! 你好 👋".into()),
                ],
                "split {n}"
            );
        }
    }

    #[test]
    fn thinking_opened_by_the_prompt_or_turned_off() {
        let mut p = ReplyParser::new(QWEN, true, true, vec![]);
        assert_eq!(
            parse(&mut p, "hmm</think>ok", 3),
            vec![Piece::Thinking("hmm".into()), Piece::Content("ok".into())]
        );
        let mut p = ReplyParser::new(QWEN, false, false, vec![]);
        assert_eq!(
            parse(&mut p, "<think>x</think>y", 2),
            vec![Piece::Content("<think>x</think>y".into())]
        );
    }

    #[test]
    fn tagged_calls_between_text() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Tokyo\", \"unit\": \"c\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        for n in [1, 2, 5, 11, 1000] {
            let mut p = ReplyParser::new(QWEN, true, false, tools());
            let got = parse(&mut p, text, n);
            assert_eq!(
                got,
                vec![
                    Piece::Content("Let me check.\n".into()),
                    call("get_weather", json!({"city": "Tokyo", "unit": "c"})),
                    Piece::Content("\n".into()),
                    call("now", json!({})),
                ],
                "split {n}"
            );
            // Argument order is kept.
            if let Piece::ToolCall(c) = &got[1] {
                assert_eq!(c.arguments.keys().collect::<Vec<_>>(), ["city", "unit"]);
            }
        }
    }

    #[test]
    fn text_streams_while_tools_are_offered() {
        let mut p = ReplyParser::new(QWEN, true, false, tools());
        let mut out = Vec::new();
        p.push("The answer is 4 <", &mut out);
        assert_eq!(out, vec![Piece::Content("The answer is 4 ".into())]);
        p.push("b>", &mut out);
        assert_eq!(out[1], Piece::Content("<b>".into()));
    }

    #[test]
    fn broken_calls_stay_text() {
        let mut p = ReplyParser::new(QWEN, false, false, tools());
        let text = "<tool_call>{not json}</tool_call> and <tool_call>{\"name\"";
        assert_eq!(
            parse(&mut p, text, 4),
            vec![Piece::Content(
                "<tool_call>{not json}</tool_call> and <tool_call>{\"name\"".into()
            )]
        );
        // A tagged model's bare call, and a JSON answer that is not one.
        let mut p = ReplyParser::new(QWEN, false, false, tools());
        let bare = "{\"name\": \"now\", \"arguments\": {}}";
        assert_eq!(parse(&mut p, bare, 3), vec![call("now", json!({}))]);
        let mut p = ReplyParser::new(QWEN, false, false, tools());
        assert_eq!(
            parse(&mut p, "{\"x\": 1}", 3),
            vec![Piece::Content("{\"x\": 1}".into())]
        );
        // A call to a tool nobody offered is text.
        let mut p = ReplyParser::new(QWEN, false, false, tools());
        let made_up = "{\"name\": \"hello\", \"arguments\": {}}";
        assert_eq!(
            parse(&mut p, made_up, 3),
            vec![Piece::Content(made_up.into())]
        );
        // Without tools in the request the tags are plain text.
        let mut p = ReplyParser::new(QWEN, false, false, vec![]);
        let text = "<tool_call>{\"name\": \"x\"}</tool_call>";
        assert_eq!(parse(&mut p, text, 3), vec![Piece::Content(text.into())]);
    }

    #[test]
    fn llama_bare_json_calls() {
        let text = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        for prefix in ["", "<|python_tag|>", "\n"] {
            let mut p = ReplyParser::new(LLAMA, true, false, tools());
            assert_eq!(
                parse(&mut p, &format!("{prefix}{text}"), 3),
                vec![call("get_weather", json!({"city": "Paris"}))]
            );
        }
        let mut p = ReplyParser::new(LLAMA, true, false, tools());
        let two = "{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"arguments\": \"{\\\"x\\\": 1}\"}";
        assert_eq!(
            parse(&mut p, two, 7),
            vec![call("a", json!({})), call("b", json!({"x": 1}))]
        );
        // A JSON answer that is not a call is the answer.
        let mut p = ReplyParser::new(LLAMA, true, false, tools());
        assert_eq!(
            parse(&mut p, "{\"x\": 1}", 2),
            vec![Piece::Content("{\"x\": 1}".into())]
        );
        let mut p = ReplyParser::new(LLAMA, true, false, tools());
        assert_eq!(
            parse(&mut p, "Sure, here", 2),
            vec![Piece::Content("Sure, here".into())]
        );
    }
}
