//! Hugging Face chat templates, rendered with minijinja so that the prompt is byte-for-byte
//! what Python `transformers` (`tokenizer.apply_chat_template(..., tokenize=False)`) makes.
//!
//! transformers renders with jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)` plus loop controls, a `{% generation %}` tag, its own `tojson`
//! (`json.dumps` with `ensure_ascii=False` and the keys in insertion order) and the globals
//! `raise_exception` and `strftime_now`. This module rebuilds that environment on minijinja
//! and papers over the differences that change output:
//!
//! * `tojson` is replaced by a `json.dumps` look-alike: `", "`/`": "` separators, no HTML
//!   escaping, keys in insertion order, Python float spelling (`1e-07`, `1e+21`, `1.0`), and
//!   the same `ensure_ascii`/`indent`/`separators`/`sort_keys` arguments.
//! * JSON objects enter the template as an insertion-ordered map object, so key order
//!   survives `tojson`, `items()` and `for k, v in ...` (it still depends on serde_json's
//!   `preserve_order` feature for the order to reach us at all).
//! * `{{ value }}` and `|string` print values the way Python's `str()` does (`True`, `None`,
//!   `{'a': 1}`), not minijinja's spelling (`true`, `none`, `{"a": 1}`).
//! * Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, `.get()` ...) come
//!   from minijinja-contrib's pycompat layer.
//! * `{% generation %}` blocks are kept as always-true `if` blocks.
//!
//! Known remaining differences: `~` concatenation and `join` print booleans, `none` and
//! lists the minijinja way (`true`, not `True`; JSON objects do print as Python dicts);
//! dict literals written in the template keep their key order only with minijinja's
//! `preserve_order` feature; `%`-formatting of strings is not supported; Python's
//! `str.isprintable` is approximated when printing dict/list reprs.

use std::fmt::Write as _;
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Rest, ValueKind};
use minijinja::{Environment, ErrorKind, State, UndefinedBehavior, Value};

use super::{Error, Result};

/// The chat template of a family whose turn format is fixed, for model files that carry
/// none (Gemma 3 GGUFs as converted for Ollama and by llama.cpp from base checkpoints).
pub fn builtin(family: super::Family) -> Option<&'static str> {
    match family {
        super::Family::Gemma3 => Some(include_str!("templates/gemma3.jinja")),
        _ => None,
    }
}

/// The name the template is registered under; it shows up in error messages.
const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template. Cheap to share: rendering takes `&self`, and the type is
/// `Send + Sync`.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token`/`eos_token` become the template variables of the same
    /// name; `None` leaves them undefined, as transformers does for unset special tokens.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // jinja2 drops a single trailing newline of the source too.
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson_filter);
        env.add_filter("string", |value: &Value| Value::from(py_str(value)));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // A bound on the work one render may do: templates come from model files and
        // Modelfiles, conversations from clients; neither may tie up a thread for long.
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))
            .map_err(template_error)?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token,
            eos_token,
        })
    }

    /// Renders a conversation. `messages` and `tools` are OpenAI-style JSON (tool-call
    /// arguments as objects); `extra` adds template variables such as `enable_thinking` or
    /// `date_string`, and may override `bos_token`/`eos_token` and `documents` (none by
    /// default) but not `messages`, `tools` or `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        const CORE: [&str; 3] = ["messages", "tools", "add_generation_prompt"];
        let mut ctx: Vec<(String, Value)> = Vec::with_capacity(extra.len() + 6);
        // transformers always passes `documents` (RAG templates); None unless given.
        ctx.push(("documents".into(), Value::from(())));
        if let Some(bos) = &self.bos_token {
            ctx.push(("bos_token".into(), Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            ctx.push(("eos_token".into(), Value::from(eos.as_str())));
        }
        for (key, value) in extra {
            if !CORE.contains(&key.as_str()) {
                ctx.push((key.clone(), json_to_value(value)));
            }
        }
        ctx.push((
            "messages".into(),
            Value::from(messages.iter().map(json_to_value).collect::<Vec<_>>()),
        ));
        ctx.push((
            "tools".into(),
            match tools {
                Some(tools) => Value::from(tools.iter().map(json_to_value).collect::<Vec<_>>()),
                None => Value::from(()),
            },
        ));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        // Later entries win, so the core variables override anything in `extra`.
        let ctx: Value = ctx.into_iter().collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        template.render(ctx).map_err(template_error)
    }

    /// The template source as given to [`ChatTemplate::new`].
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// Template instructions one render may execute: far more than any real conversation needs
/// (a 16,000-message chat renders in under 2% of it), and about a second of work at most.
const RENDER_FUEL: u64 = 50_000_000;

/// Marks errors raised by the template itself through `raise_exception`, so that their
/// message is passed on verbatim.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

fn template_error(err: minijinja::Error) -> Error {
    let raised = std::error::Error::source(&err).is_some_and(|s| s.is::<Raised>());
    match (raised, err.detail()) {
        (true, Some(detail)) => Error::TemplateRaised(detail.to_owned()),
        _ if err.kind() == ErrorKind::OutOfFuel => Error::TemplateRaised(
            "the conversation is too large for the chat template to render".into(),
        ),
        _ => Error::Template(err.to_string()),
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message).with_source(Raised))
}

fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let mut out = String::new();
    // chrono reports an invalid format as a fmt::Error; `to_string()` would panic on it.
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format string {format:?}"),
        )
    })?;
    Ok(Value::from(out))
}

/// Replaces `{% generation %}` / `{% endgeneration %}` (transformers' assistant-mask tag,
/// unknown to minijinja) with `{% if true %}` / `{% endif %}`, keeping the whitespace-control
/// markers so that trimming is unchanged.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some((len, open_ctl, is_end, close_ctl)) => {
                out.push_str("{%");
                out.push_str(open_ctl);
                out.push_str(if is_end { " endif " } else { " if true " });
                out.push_str(close_ctl);
                out.push_str("%}");
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Parses `{%[-+]? (end)?generation [-+]?%}` at the start of `s`: returns its length, the
/// opening and closing whitespace-control markers and whether it is the end tag.
fn parse_generation_tag(s: &str) -> Option<(usize, &'static str, bool, &'static str)> {
    let body = s.strip_prefix("{%")?;
    let (open_ctl, body) = control_marker(body);
    let body = body.trim_start();
    let (is_end, body) = match body.strip_prefix("endgeneration") {
        Some(rest) => (true, rest),
        None => (false, body.strip_prefix("generation")?),
    };
    // The keyword must end here (not e.g. `generation_prompt`).
    if body.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let body = body.trim_start();
    let (close_ctl, body) = match body.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => match body.strip_prefix('+') {
            Some(rest) => ("+", rest),
            None => ("", body),
        },
    };
    let after = body.strip_prefix("%}")?;
    Some((s.len() - after.len(), open_ctl, is_end, close_ctl))
}

fn control_marker(s: &str) -> (&'static str, &str) {
    if let Some(rest) = s.strip_prefix('-') {
        ("-", rest)
    } else if let Some(rest) = s.strip_prefix('+') {
        ("+", rest)
    } else {
        ("", s)
    }
}

// ---------------------------------------------------------------------------------------
// JSON -> template values
// ---------------------------------------------------------------------------------------

/// Converts JSON into a template value. Objects become [`JsonMap`]s so that their key order
/// is kept (minijinja's own maps are sorted unless its `preserve_order` feature is on).
fn json_to_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => {
            Value::from(items.iter().map(json_to_value).collect::<Vec<_>>())
        }
        serde_json::Value::Object(map) => Value::from_object(JsonMap {
            entries: map
                .iter()
                .map(|(k, v)| (Value::from(k.as_str()), json_to_value(v)))
                .collect(),
        }),
    }
}

/// A JSON object as the template sees it: a map whose iteration order is insertion order.
#[derive(Debug)]
struct JsonMap {
    entries: Vec<(Value, Value)>,
}

impl Object for JsonMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        // Chat messages have a handful of keys; a linear scan beats hashing here.
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.entries.iter().map(|(k, _)| k.clone()).collect())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.entries.len())
    }

    fn is_true(self: &Arc<Self>) -> bool {
        !self.entries.is_empty()
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Display is what `~` and `join` use; Python would print the dict's repr there.
        let mut out = String::from("{");
        for (i, (k, v)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            py_repr(k, &mut out);
            out.push_str(": ");
            py_repr(v, &mut out);
        }
        out.push('}');
        f.write_str(&out)
    }
}

// ---------------------------------------------------------------------------------------
// Python's str() / repr()
// ---------------------------------------------------------------------------------------

/// `{{ value }}` output: Python's `str(value)`; undefined prints nothing, as in jinja2.
fn python_formatter(
    out: &mut minijinja::Output,
    _state: &State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    if value.is_undefined() {
        return Ok(());
    }
    if let Some(s) = value.as_str() {
        return out.write_str(s).map_err(minijinja::Error::from);
    }
    out.write_str(&py_str(value))
        .map_err(minijinja::Error::from)
}

/// Python's `str()` of a template value.
fn py_str(value: &Value) -> String {
    match value.as_str() {
        Some(s) => s.to_owned(),
        None if value.is_undefined() => String::new(),
        None => {
            let mut out = String::new();
            py_repr(value, &mut out);
            out
        }
    }
}

/// A real mapping (minijinja also reports kwargs and plain objects as maps).
fn is_map(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|o| o.repr() == ObjectRepr::Map)
}

/// Python's `repr()` of a template value (strings quoted, containers recursive).
fn py_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => push_number(value, out),
        ValueKind::String => py_repr_str(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            if let Ok(iter) = value.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map if is_map(value) => {
            out.push('{');
            if let Ok(keys) = value.try_iter() {
                for (i, key) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&key, out);
                    out.push_str(": ");
                    py_repr(&value.get_item(&key).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        // Loop state, namespaces, macros, iterators: no Python spelling worth copying.
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

fn push_number(value: &Value, out: &mut String) {
    if value.is_integer() {
        let _ = write!(out, "{value}");
    } else {
        match f64::try_from(value.clone()) {
            Ok(f) => push_py_float(f, out),
            Err(_) => {
                let _ = write!(out, "{value}");
            }
        }
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, in positional notation when the
/// decimal exponent is in -4..16 and scientific (`1e-07`, `1.5e+16`) otherwise.
fn push_py_float(f: f64, out: &mut String) {
    if f.is_nan() {
        out.push_str("nan");
        return;
    }
    if f.is_infinite() {
        out.push_str(if f > 0.0 { "inf" } else { "-inf" });
        return;
    }
    // Rust's `{:e}` yields the same shortest round-trip digits Python uses.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if negative {
        out.push('-');
    }
    if !(-4..16).contains(&exp) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    } else if exp < 0 {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(&digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            out.push_str(&digits);
            for _ in digits.len()..int_len {
                out.push('0');
            }
            out.push_str(".0");
        } else {
            out.push_str(&digits[..int_len]);
            out.push('.');
            out.push_str(&digits[int_len..]);
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`.
fn py_repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => {
                let cp = c as u32;
                let _ = if cp < 0x100 {
                    write!(out, "\\x{cp:02x}")
                } else if cp < 0x10000 {
                    write!(out, "\\u{cp:04x}")
                } else {
                    write!(out, "\\U{cp:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// An approximation of Python's `str.isprintable` (which needs the Unicode category
/// tables): control, format, separator (except space) and private-use characters.
fn py_printable(c: char) -> bool {
    !matches!(c as u32,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad | 0x1680 | 0x180e | 0x2000..=0x200f
        | 0x2028..=0x202f | 0x205f..=0x206f | 0x3000 | 0xd800..=0xf8ff | 0xfeff
        | 0xfff9..=0xfffb | 0xf0000..=0x10ffff)
}

// ---------------------------------------------------------------------------------------
// tojson == json.dumps
// ---------------------------------------------------------------------------------------

/// How `json.dumps` was asked to format.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, the
/// signature of transformers' filter (positional arguments in that order).
fn tojson_filter(
    value: &Value,
    args: Rest<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    const PARAMS: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > PARAMS.len() {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut params: [Option<Value>; 4] = Default::default();
    for (slot, arg) in params.iter_mut().zip(args.iter()) {
        *slot = Some(arg.clone());
    }
    for (slot, name) in params.iter_mut().zip(PARAMS) {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            if slot.is_some() {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson got multiple values for argument '{name}'"),
                ));
            }
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = params;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => match v.kind() {
                // Python's bool is an int: indent=True is one space.
                ValueKind::Bool => " ".repeat(usize::from(v.is_true())),
                _ => {
                    let n = v.as_i64().ok_or_else(|| {
                        minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            "tojson: indent must be an integer or a string",
                        )
                    })?;
                    " ".repeat(usize::try_from(n).unwrap_or(0))
                }
            },
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(seps) if !seps.is_none() => {
            let parts: Vec<Value> = seps.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => match (a.as_str(), b.as_str()) {
                    (Some(a), Some(b)) => (a.to_owned(), b.to_owned()),
                    _ => return Err(bad_separators()),
                },
                _ => return Err(bad_separators()),
            }
        }
        // json.dumps drops the space after ',' when indenting.
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    write_json(value, &style, 0, &mut out)?;
    Ok(Value::from(out))
}

fn bad_separators() -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        "tojson: separators must be a pair of strings",
    )
}

fn not_serializable(value: &Value) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("Object of type {} is not JSON serializable", value.kind()),
    )
}

/// Nesting deeper than this is a cycle or an attack, not a chat message.
const MAX_JSON_DEPTH: usize = 256;

fn write_json(
    value: &Value,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_json_number(value, out),
        ValueKind::String => write_json_str(value.as_str().unwrap_or_default(), style, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, style, depth, '[', ']', &items, |item, out| {
                write_json(item, style, depth + 1, out)
            })?;
        }
        ValueKind::Map if is_map(value) => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, style, depth, '{', '}', &entries, |(key, item), out| {
                write_json_str(key, style, out);
                out.push_str(&style.key_sep);
                write_json(item, style, depth + 1, out)
            })?;
        }
        _ => return Err(not_serializable(value)),
    }
    Ok(())
}

/// Writes `[a, b]` / `{...}` with json.dumps' layout: empty containers stay `[]`, and with
/// an indent every item goes on its own line.
fn write_container<T>(
    out: &mut String,
    style: &JsonStyle,
    depth: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&T, &mut String) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        newline(out, depth + 1);
        write_item(item, out)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// Dict keys as json.dumps coerces them (str, int, float, bool, None).
fn json_key(key: &Value) -> std::result::Result<String, minijinja::Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
        ValueKind::Number => {
            let mut s = String::new();
            write_json_number(key, &mut s);
            s
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "keys must be str, int, float, bool or None, not {}",
                    key.kind()
                ),
            ))
        }
    })
}

fn write_json_number(value: &Value, out: &mut String) {
    if !value.is_integer() {
        if let Ok(f) = f64::try_from(value.clone()) {
            // json.dumps spells the non-finite floats like JavaScript.
            if f.is_nan() {
                out.push_str("NaN");
            } else if f.is_infinite() {
                out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
            } else {
                push_py_float(f, out);
            }
            return;
        }
    }
    let _ = write!(out, "{value}");
}

/// A JSON string literal as json.dumps writes it: only `"`, `\` and control characters are
/// escaped (no HTML escaping); with `ensure_ascii` everything beyond ASCII becomes
/// `\uXXXX` (surrogate pairs above the BMP).
fn write_json_str(s: &str, style: &JsonStyle, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if style.ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn float(f: f64) -> String {
        let mut s = String::new();
        push_py_float(f, &mut s);
        s
    }

    #[test]
    fn floats_are_spelled_like_python() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (2.5, "2.5"),
            (-3.25, "-3.25"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1e-7, "1e-07"),
            (1.5e-7, "1.5e-07"),
            (123456.0, "123456.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e16, "1.2345e+16"),
            (1e21, "1e+21"),
            (1e300, "1e+300"),
            (39.9042, "39.9042"),
            (f64::INFINITY, "inf"),
        ];
        for (f, want) in cases {
            assert_eq!(float(f), want, "{f:e}");
        }
    }

    #[test]
    fn generation_tags_become_if_blocks() {
        assert_eq!(
            rewrite_generation_tags("a{% generation %}b{%- endgeneration -%}c"),
            "a{% if true %}b{%- endif -%}c"
        );
        assert_eq!(
            rewrite_generation_tags("{%+generation+%}{% generation_x %}{{ '{%' }}"),
            "{%+ if true +%}{% generation_x %}{{ '{%' }}"
        );
    }

    #[test]
    fn python_repr_of_containers() {
        let v = json_to_value(&serde_json::json!({"a": [1, 2.0, null, true], "b": "it's"}));
        assert_eq!(py_str(&v), r#"{'a': [1, 2.0, None, True], 'b': "it's"}"#);
        assert_eq!(py_str(&Value::from("x\u{7}")), "x\u{7}");
        let mut s = String::new();
        py_repr_str("tab\there \u{a0}é\u{200b}", &mut s);
        assert_eq!(s, r"'tab\there \xa0é\u200b'");
    }

    #[test]
    fn chat_template_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }

    #[test]
    fn raise_exception_message_is_kept() {
        let t = ChatTemplate::new("{{ raise_exception('no ' ~ 'way') }}", None, None).unwrap();
        match t.render(&[], None, false, &serde_json::Map::new()) {
            Err(Error::TemplateRaised(msg)) => assert_eq!(msg, "no way"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        assert!(matches!(
            ChatTemplate::new("{% if %}", None, None),
            Err(Error::Template(_))
        ));
    }
}
