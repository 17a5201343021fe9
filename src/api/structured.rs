//! Structured output as each dialect asks for it, read into one [`Grammar`]: Ollama's
//! `format` (`"json"` or a JSON schema) and its `options` spelling (`regex`, `grammar`,
//! `choice`, `json_schema`); OpenAI's `response_format` (`json_object`, `json_schema` with
//! `strict`); and vLLM's extensions (`structured_outputs`, `guided_json`, `guided_regex`,
//! `guided_grammar`, `guided_choice`, `guided_whitespace_pattern`). A request may ask for
//! one constraint; two different ones are a 400, as is anything malformed. Whether the
//! grammar compiles is decided later, by the engine, with the model's vocabulary.
//!
//! Tool choice lives here too: `tool_choice: "required"` or a named function becomes a
//! grammar of the model's own tool-call syntax ([`ToolSyntax::calls_grammar`]) whose
//! arguments follow each tool's parameter schema; `"auto"` leaves calls free (beside a JSON
//! answer constraint, calls stay possible); `"none"` takes the tools away.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::engine::Grammar;
use crate::model::ToolSyntax;

use super::error::ApiError;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

/// Ollama's `format`: `"json"`, a JSON schema object, or `""`/null for none.
pub fn ollama_format(v: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(Grammar::JsonObject)),
        Some(Value::Object(_)) => Ok(v.cloned().map(Grammar::JsonSchema)),
        Some(v) => Err(bad(format!(
            "invalid format: {v} (expected \"json\" or a JSON schema object)"
        ))),
    }
}

/// Option keys of Ollama's `options` object that ask for a constraint (our extension:
/// Ollama itself only has `format`).
pub const OPTION_KEYS: &[&str] = &["regex", "grammar", "choice", "json_schema"];

/// The constraint an Ollama `options` object asks for: `regex` (a regular expression),
/// `grammar` (Lark), `choice` (a list of strings) or `json_schema` (an object).
pub fn ollama_options(map: &Map<String, Value>) -> Result<Option<Grammar>, ApiError> {
    let mut found = Vec::new();
    for key in OPTION_KEYS {
        let Some(v) = map.get(*key).filter(|v| !v.is_null()) else {
            continue;
        };
        let g = match *key {
            "regex" => Grammar::Regex(string(v, "options.regex")?),
            "grammar" => lark(string(v, "options.grammar")?)?,
            "choice" => Grammar::Choice(choices(v, "options.choice")?),
            _ => json_schema(v, "options.json_schema")?,
        };
        found.push((format!("options.{key}"), g));
    }
    only_one(found)
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema` with
/// `json_schema.schema` (`name` and `strict` are accepted; the schema is enforced either
/// way, as vLLM does).
pub fn openai_response_format(v: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let f = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(f) => f,
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let spec = f
                .get("json_schema")
                .ok_or_else(|| bad("response_format of type json_schema needs a json_schema object"))?;
            if let Some(strict) = spec.get("strict") {
                if !(strict.is_boolean() || strict.is_null()) {
                    return Err(bad("response_format.json_schema.strict must be a boolean"));
                }
            }
            match spec.get("schema") {
                // No schema: any JSON object, as OpenAI reads it.
                None | Some(Value::Null) => Ok(Some(Grammar::JsonObject)),
                Some(s) => json_schema(s, "response_format.json_schema.schema").map(Some),
            }
        }
        _ => Err(bad(format!(
            "invalid response_format: {f} (type must be \"text\", \"json_object\" or \"json_schema\")"
        ))),
    }
}

/// vLLM's request extensions on `/v1/chat/completions` and `/v1/completions`: the
/// `structured_outputs` object and the older `guided_*` fields.
#[derive(Deserialize, Default, Debug)]
pub struct VllmFields {
    #[serde(default)]
    pub structured_outputs: Option<Value>,
    #[serde(default)]
    pub guided_json: Option<Value>,
    #[serde(default)]
    pub guided_regex: Option<Value>,
    #[serde(default)]
    pub guided_grammar: Option<Value>,
    #[serde(default)]
    pub guided_choice: Option<Value>,
    #[serde(default)]
    pub guided_whitespace_pattern: Option<Value>,
}

impl VllmFields {
    /// The one constraint these fields ask for.
    pub fn grammar(&self) -> Result<Option<Grammar>, ApiError> {
        let mut found = Vec::new();
        let mut whitespace: Option<Value> = None;
        if let Some(v) = self.guided_json.as_ref().filter(|v| !v.is_null()) {
            found.push(("guided_json".to_string(), json_schema(v, "guided_json")?));
        }
        if let Some(v) = self.guided_regex.as_ref().filter(|v| !v.is_null()) {
            found.push((
                "guided_regex".into(),
                Grammar::Regex(string(v, "guided_regex")?),
            ));
        }
        if let Some(v) = self.guided_grammar.as_ref().filter(|v| !v.is_null()) {
            found.push(("guided_grammar".into(), lark(string(v, "guided_grammar")?)?));
        }
        if let Some(v) = self.guided_choice.as_ref().filter(|v| !v.is_null()) {
            found.push((
                "guided_choice".into(),
                Grammar::Choice(choices(v, "guided_choice")?),
            ));
        }
        if let Some(v) = self
            .guided_whitespace_pattern
            .as_ref()
            .filter(|v| !v.is_null())
        {
            whitespace = Some(json!({
                "whitespace_pattern": string(v, "guided_whitespace_pattern")?
            }));
        }
        match self.structured_outputs.as_ref() {
            None | Some(Value::Null) => {}
            Some(Value::Object(so)) => {
                let field = |k: &str| so.get(k).filter(|v| !v.is_null());
                if let Some(v) = field("json") {
                    let name = "structured_outputs.json";
                    found.push((name.into(), json_schema(v, name)?));
                }
                if let Some(v) = field("regex") {
                    let name = "structured_outputs.regex";
                    found.push((name.into(), Grammar::Regex(string(v, name)?)));
                }
                if let Some(v) = field("grammar") {
                    let name = "structured_outputs.grammar";
                    found.push((name.into(), lark(string(v, name)?)?));
                }
                if let Some(v) = field("choice") {
                    let name = "structured_outputs.choice";
                    found.push((name.into(), Grammar::Choice(choices(v, name)?)));
                }
                match field("json_object") {
                    Some(Value::Bool(true)) => {
                        found.push(("structured_outputs.json_object".into(), Grammar::JsonObject))
                    }
                    Some(Value::Bool(false)) | None => {}
                    Some(_) => {
                        return Err(bad("structured_outputs.json_object must be a boolean"));
                    }
                }
                if let Some(s) = field("structural_tag") {
                    return Err(bad(format!(
                        "structured_outputs.structural_tag is not supported (got {}); use \
                         tools with tool_choice, a Lark grammar or a JSON schema",
                        short(s)
                    )));
                }
                if let Some(v) = field("whitespace_pattern") {
                    let p = string(v, "structured_outputs.whitespace_pattern")?;
                    whitespace = Some(json!({ "whitespace_pattern": p }));
                }
                if field("disable_any_whitespace") == Some(&Value::Bool(true)) {
                    whitespace = Some(json!({ "whitespace_flexible": false }));
                }
            }
            Some(v) => {
                return Err(bad(format!(
                    "structured_outputs must be an object, got {}",
                    short(v)
                )))
            }
        }
        let g = only_one(found)?;
        Ok(match (g, whitespace) {
            (Some(g), Some(ws)) => Some(with_whitespace(g, ws)),
            (g, _) => g,
        })
    }
}

/// A JSON grammar with explicit whitespace settings (`x-guidance`).
fn with_whitespace(g: Grammar, ws: Value) -> Grammar {
    let mut schema = match g {
        Grammar::JsonObject => json!({"type": "object"}),
        Grammar::JsonSchema(s) => s,
        other => return other,
    };
    if let Value::Object(m) = &mut schema {
        m.insert("x-guidance".into(), ws);
    }
    Grammar::JsonSchema(schema)
}

/// At most one constraint per request.
pub fn only_one(found: Vec<(String, Grammar)>) -> Result<Option<Grammar>, ApiError> {
    let mut it = found.into_iter();
    let first = it.next();
    if let Some((second, _)) = it.next() {
        let first_name = first.as_ref().map(|f| f.0.as_str()).unwrap_or_default();
        return Err(bad(format!(
            "conflicting structured output constraints: {first_name} and {second}; give one"
        )));
    }
    Ok(first.map(|f| f.1))
}

/// A dialect's own constraint (`name`) merged with one in Ollama's `options`; at most one
/// of them may be set.
pub fn with_options(
    name: &'static str,
    grammar: Option<Grammar>,
    options: Option<&Map<String, Value>>,
) -> Result<Option<Grammar>, ApiError> {
    let in_options = options.map(ollama_options).transpose()?.flatten();
    merge(vec![(name, grammar), ("options", in_options)])
}

/// Merges the constraints of different fields of one request (`format` and `options`,
/// `response_format` and vLLM's fields), refusing two.
pub fn merge(named: Vec<(&str, Option<Grammar>)>) -> Result<Option<Grammar>, ApiError> {
    only_one(
        named
            .into_iter()
            .filter_map(|(n, g)| g.map(|g| (n.to_string(), g)))
            .collect(),
    )
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

fn string(v: &Value, name: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        Value::String(_) => Err(bad(format!("{name} is empty"))),
        v => Err(bad(format!("{name} must be a string, got {}", short(v)))),
    }
}

fn choices(v: &Value, name: &str) -> Result<Vec<String>, ApiError> {
    let items = v
        .as_array()
        .ok_or_else(|| bad(format!("{name} must be an array of strings")))?;
    if items.is_empty() {
        return Err(bad(format!("{name} is empty")));
    }
    items
        .iter()
        .map(|i| {
            i.as_str().map(str::to_string).ok_or_else(|| {
                bad(format!(
                    "{name} must be an array of strings, got {}",
                    short(i)
                ))
            })
        })
        .collect()
}

/// A schema given as an object, or as a string holding one (vLLM accepts both).
fn json_schema(v: &Value, name: &str) -> Result<Grammar, ApiError> {
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(Grammar::JsonSchema(v.clone())),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(schema @ (Value::Object(_) | Value::Bool(_))) => Ok(Grammar::JsonSchema(schema)),
            Ok(_) => Err(bad(format!("{name} must be a JSON schema object"))),
            Err(e) => Err(bad(format!("{name} is not valid JSON: {e}"))),
        },
        v => Err(bad(format!(
            "{name} must be a JSON schema object, got {}",
            short(v)
        ))),
    }
}

/// A Lark grammar. GBNF (llama.cpp's `::=` rules) is refused by name rather than failing
/// with a Lark syntax error.
fn lark(text: String) -> Result<Grammar, ApiError> {
    let gbnf = text
        .lines()
        .any(|l| l.split('#').next().is_some_and(|code| code.contains("::=")));
    if gbnf {
        return Err(bad(
            "GBNF grammars (rules written with ::=) are not supported; write the grammar in \
             Lark syntax (rule: expansion), as llguidance reads it",
        ));
    }
    Ok(Grammar::Lark(text))
}

/// Whether and how the model must call tools.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides (the default).
    #[default]
    Auto,
    /// No calls: the tools are not shown to the model and its output is not parsed for them.
    None,
    /// At least one call, to any of the tools.
    Required,
    /// Exactly one call, to this tool.
    Named(String),
}

/// OpenAI's `tool_choice` (chat completions and responses): `"auto"`, `"none"`,
/// `"required"`, `{"type": "function", "function": {"name"}}` or, in the Responses API,
/// `{"type": "function", "name"}`. Ollama has no such field; we read the same spelling there.
pub fn openai_tool_choice(v: Option<&Value>) -> Result<ToolChoice, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            other => Err(bad(format!(
                "invalid tool_choice {other:?}: must be \"auto\", \"none\", \"required\" or                  {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
            ))),
        },
        Some(v @ Value::Object(o)) => {
            let name = match o.get("type").and_then(Value::as_str) {
                Some("function") => o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .or_else(|| o.get("name"))
                    .and_then(Value::as_str),
                _ => None,
            };
            match name {
                Some(n) if !n.is_empty() => Ok(ToolChoice::Named(n.to_string())),
                _ => Err(bad(format!(
                    "invalid tool_choice {}: a named choice is {{\"type\": \"function\",                      \"function\": {{\"name\": ...}}}}",
                    short(v)
                ))),
            }
        }
        Some(v) => Err(bad(format!("invalid tool_choice {}", short(v)))),
    }
}

/// Name and parameter schema of each OpenAI-style tool (`{"type": "function", "function":
/// {"name", "parameters"}}`).
pub fn tool_signatures(tools: &[Value]) -> Vec<(String, Value)> {
    tools
        .iter()
        .filter_map(|t| {
            let f = t.get("function").unwrap_or(t);
            let name = f.get("name")?.as_str()?.to_string();
            let mut params = f.get("parameters").cloned().unwrap_or(Value::Null);
            crate::engine::constraint::close_objects(&mut params);
            Some((name, params))
        })
        .collect()
}

/// The grammar the whole output follows, from the answer's constraint and the tool
/// choice, in the model's tool-call `syntax`. `one_call`: at most one call (OpenAI's
/// `parallel_tool_calls: false`).
pub fn output_grammar(
    answer: Option<Grammar>,
    choice: &ToolChoice,
    one_call: bool,
    tools: &[Value],
    syntax: ToolSyntax,
) -> Result<Option<Grammar>, ApiError> {
    let signatures = tool_signatures(tools);
    let calls = |sigs: &[(String, Value)], one: bool| {
        syntax.calls_grammar(sigs, one, &Grammar::default_json_options())
    };
    match choice {
        ToolChoice::None => Ok(answer),
        ToolChoice::Auto => {
            let (Some(answer), Some(rules)) = (answer.as_ref(), calls(&signatures, one_call))
            else {
                return Ok(answer);
            };
            Ok(Some(match answer.as_lark_expr() {
                // A JSON (or regex, or choice) answer, or the calls.
                Some(expr) => {
                    Grammar::Lark(format!("start: answer | calls\nanswer: {expr}\n{rules}"))
                }
                // A whole Lark grammar of the client's: it decides the output alone.
                None => answer.clone(),
            }))
        }
        ToolChoice::Required | ToolChoice::Named(_) => {
            if signatures.is_empty() {
                return Err(bad(
                    "tool_choice requires a call but the request offers no tools",
                ));
            }
            let (sigs, one) = match choice {
                ToolChoice::Named(name) => {
                    let sig = signatures
                        .iter()
                        .find(|(n, _)| n == name)
                        .cloned()
                        .ok_or_else(|| {
                            bad(format!(
                                "tool_choice names the function {name:?}, which is not among the tools"
                            ))
                        })?;
                    (vec![sig], true)
                }
                _ => (signatures, one_call),
            };
            let rules =
                calls(&sigs, one).ok_or_else(|| bad("this model does not support tools"))?;
            Ok(Some(Grammar::Lark(format!("start: calls\n{rules}"))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_format_values() {
        assert_eq!(ollama_format(None).unwrap(), None);
        assert_eq!(ollama_format(Some(&json!(""))).unwrap(), None);
        assert_eq!(
            ollama_format(Some(&json!("json"))).unwrap(),
            Some(Grammar::JsonObject)
        );
        let s = json!({"type": "object"});
        assert_eq!(
            ollama_format(Some(&s)).unwrap(),
            Some(Grammar::JsonSchema(s.clone()))
        );
        assert!(ollama_format(Some(&json!("xml"))).is_err());
        assert!(ollama_format(Some(&json!(3))).is_err());
    }

    #[test]
    fn openai_response_formats() {
        let rf = |v: Value| openai_response_format(Some(&v));
        assert_eq!(rf(json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            rf(json!({"type": "json_object"})).unwrap(),
            Some(Grammar::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            rf(json!({"type": "json_schema",
                      "json_schema": {"name": "x", "strict": true, "schema": schema}}))
            .unwrap(),
            Some(Grammar::JsonSchema(schema))
        );
        assert!(rf(json!({"type": "json_schema"})).is_err());
        assert!(rf(json!({"type": "json_schema", "json_schema": {"strict": "yes"}})).is_err());
        assert!(rf(json!({"type": "yaml"})).is_err());
    }

    #[test]
    fn vllm_fields_and_conflicts() {
        let f: VllmFields = serde_json::from_value(json!({"guided_regex": "[0-9]+"})).unwrap();
        assert_eq!(f.grammar().unwrap(), Some(Grammar::Regex("[0-9]+".into())));
        let f: VllmFields = serde_json::from_value(json!({
            "structured_outputs": {"choice": ["yes", "no"]}
        }))
        .unwrap();
        assert_eq!(
            f.grammar().unwrap(),
            Some(Grammar::Choice(vec!["yes".into(), "no".into()]))
        );
        let f: VllmFields = serde_json::from_value(json!({
            "guided_json": "{\"type\": \"object\"}",
            "guided_whitespace_pattern": " ?"
        }))
        .unwrap();
        assert_eq!(
            f.grammar().unwrap(),
            Some(Grammar::JsonSchema(json!({
                "type": "object", "x-guidance": {"whitespace_pattern": " ?"}
            })))
        );
        let f: VllmFields =
            serde_json::from_value(json!({"guided_regex": "a", "guided_choice": ["a"]})).unwrap();
        let e = f.grammar().unwrap_err().to_string();
        assert!(
            e.contains("guided_regex") && e.contains("guided_choice"),
            "{e}"
        );
        let f: VllmFields =
            serde_json::from_value(json!({"guided_grammar": "root ::= \"a\""})).unwrap();
        assert!(f.grammar().unwrap_err().to_string().contains("GBNF"));
        let f: VllmFields = serde_json::from_value(json!({"guided_json": "{not json"})).unwrap();
        assert!(f
            .grammar()
            .unwrap_err()
            .to_string()
            .contains("not valid JSON"));
    }

    #[test]
    fn ollama_option_spellings() {
        let m = json!({"regex": "a+", "temperature": 0});
        assert_eq!(
            ollama_options(m.as_object().unwrap()).unwrap(),
            Some(Grammar::Regex("a+".into()))
        );
        let m = json!({"grammar": "start: \"x\"", "choice": ["x"]});
        assert!(ollama_options(m.as_object().unwrap()).is_err());
        let m = json!({"choice": []});
        assert!(ollama_options(m.as_object().unwrap()).is_err());
    }
}
