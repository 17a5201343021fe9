//! Tool calls from real model output: the Qwen2.5-coder GGUF behind `wick serve` on loopback,
//! offered a weather tool through both dialects. Its `<tool_call>` replies must arrive as
//! parsed calls (Ollama's `message.tool_calls`, OpenAI's `tool_calls` with string
//! arguments), tool results without a name (as LobeChat sends them) must be accepted, and
//! plain answers must still stream as text while tools are offered.

use crate::common;

use std::sync::OnceLock;

use crate::api_common::{config, import, ndjson_lines, spawn_server, sse_events, store_dir};
use serde_json::{json, Value};

const MODEL: &str = "qwen-coder:0.5b";

fn server() -> &'static str {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = store_dir("tools");
        import(&dir, MODEL, &common::test_model(common::QWEN_GGUF));
        let cfg = config(dir, &[("WICK_KV_CACHE_BYTES", "268435456")]);
        format!("http://{}", spawn_server(cfg).0)
    })
}

async fn post(path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", server()))
        .json(&body)
        .send()
        .await
        .expect("request")
}

fn weather_tool() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city name"}},
                "required": ["city"],
            },
        },
    }])
}

fn weather_question() -> Value {
    json!([{"role": "user", "content": "What is the weather like in Tokyo right now?"}])
}

fn greedy() -> Value {
    json!({"temperature": 0, "num_predict": 60})
}

/// Checks one Ollama-shaped call and returns its arguments.
fn ollama_call(call: &Value) -> &serde_json::Map<String, Value> {
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")),
        "{call}"
    );
    assert_eq!(call["function"]["name"], "get_current_weather", "{call}");
    call["function"]["arguments"]
        .as_object()
        .unwrap_or_else(|| panic!("arguments are an object: {call}"))
}

#[tokio::test]
async fn ollama_chat_stream_parses_the_call() {
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "messages": weather_question(), "tools": weather_tool(),
               "options": greedy()}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let lines = ndjson_lines(resp).await;
    let calls: Vec<&Value> = lines
        .iter()
        .filter_map(|l| l["message"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1, "{lines:?}");
    let args = ollama_call(calls[0]);
    assert!(
        args["city"].as_str().is_some_and(|c| c.contains("Tokyo")),
        "{args:?}"
    );
    for l in &lines {
        assert_eq!(l["message"]["role"], "assistant");
        assert!(l["message"]["content"].is_string());
        assert!(
            !l["message"]["content"]
                .as_str()
                .unwrap_or("")
                .contains("<tool_call>"),
            "raw tags leaked: {l}"
        );
    }
    let done = lines.last().unwrap();
    assert_eq!(done["done"], true);
    assert_eq!(done["done_reason"], "stop");
}

#[tokio::test]
async fn ollama_chat_non_stream_collects_calls_and_takes_unnamed_results() {
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "messages": weather_question(), "tools": weather_tool(),
               "options": greedy(), "stream": false}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let calls = v["message"]["tool_calls"].as_array().expect("tool_calls");
    let args = ollama_call(&calls[0]).clone();

    // LobeChat's next turn: the assistant's call and a tool result with no tool_name.
    let mut history = weather_question().as_array().unwrap().clone();
    history.push(json!({"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_current_weather", "arguments": args}}]}));
    history.push(json!({"role": "tool", "content": "{\"temperature_c\": 31, \"sky\": \"sunny\"}"}));
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "messages": history, "tools": weather_tool(),
               "options": greedy(), "stream": false}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let answer = v["message"]["content"].as_str().unwrap();
    assert!(
        answer.contains("31") || answer.to_lowercase().contains("sunny"),
        "{v}"
    );
}

#[tokio::test]
async fn openai_stream_and_non_stream_calls() {
    let body = json!({"model": MODEL, "messages": weather_question(), "tools": weather_tool(),
                      "temperature": 0, "max_tokens": 60});
    let resp = post("/v1/chat/completions", body.clone()).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["index"], 0);
    assert_eq!(call["function"]["name"], "get_current_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .expect("arguments are a JSON string");
    assert!(args["city"].as_str().unwrap().contains("Tokyo"));

    let mut body = body;
    body["stream"] = true.into();
    let events = sse_events(post("/v1/chat/completions", body).await).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1);
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");

    // The follow-up turn as the OpenAI SDK sends it: the result names its call by id only.
    let id = calls[0]["id"].as_str().unwrap();
    let mut history = weather_question().as_array().unwrap().clone();
    history.push(json!({"role": "assistant", "content": null, "tool_calls": [calls[0]]}));
    history.push(json!({"role": "tool", "tool_call_id": id,
                        "content": "{\"temperature_c\": 31, \"sky\": \"sunny\"}"}));
    let resp = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": history, "tools": weather_tool(),
               "temperature": 0, "max_tokens": 60}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        answer.contains("31") || answer.to_lowercase().contains("sunny"),
        "{v}"
    );
}

#[tokio::test]
async fn plain_answers_stream_as_text_while_tools_are_offered() {
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "tools": weather_tool(), "options": greedy(),
               "messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}]}),
    )
    .await;
    let lines = ndjson_lines(resp).await;
    let text_chunks = lines
        .iter()
        .filter(|l| !l["message"]["content"].as_str().unwrap_or("").is_empty())
        .count();
    assert!(text_chunks > 5, "the answer streams in pieces: {lines:?}");
    let text: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    // (This small model answers with a code block rather than a call.)
    assert!(text.contains("add"), "{text}");
    assert!(lines
        .iter()
        .all(|l| l["message"].get("tool_calls").is_none()));
}

#[tokio::test]
async fn thinking_is_refused_on_a_model_without_it() {
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "messages": weather_question(), "think": true}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], format!("\"{MODEL}\" does not support thinking"));
    // `think: false` is always fine.
    let resp = post(
        "/api/generate",
        json!({"model": MODEL, "prompt": "Say hi.", "think": false, "stream": false,
               "options": {"num_predict": 3}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn json_mode_gives_a_complete_object() {
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "format": "json", "stream": false,
               "options": {"temperature": 0, "num_predict": 80},
               "messages": [{"role": "user", "content":
                   "Give the name and capital of Germany as JSON with keys country and capital."}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["done_reason"], "stop", "{v}");
    let content = v["message"]["content"].as_str().unwrap();
    let parsed: Value =
        serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
    assert_eq!(parsed["capital"], "Berlin", "{parsed}");
}

#[tokio::test]
async fn suffix_fills_in_the_middle() {
    for path in ["/api/generate", "/v1/completions"] {
        let body = if path == "/api/generate" {
            json!({"model": MODEL, "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(2, 3))\n",
                   "stream": false, "options": {"temperature": 0, "num_predict": 16}})
        } else {
            json!({"model": MODEL, "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(2, 3))\n",
                   "temperature": 0, "max_tokens": 16})
        };
        let resp = post(path, body).await;
        assert_eq!(resp.status(), 200, "{path}");
        let v: Value = resp.json().await.unwrap();
        let text = v["response"]
            .as_str()
            .or(v["choices"][0]["text"].as_str())
            .unwrap();
        assert!(text.contains("return a + b"), "{path}: {text:?}");
    }
}

/// Two tools whose arguments have constraints a free answer would not meet by chance.
fn two_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}}},
        {"type": "function", "function": {
            "name": "book_table",
            "description": "Book a restaurant table",
            "parameters": {"type": "object", "properties": {
                "restaurant": {"type": "string", "maxLength": 30},
                "people": {"type": "integer", "minimum": 1, "maximum": 12}},
                "required": ["restaurant", "people"]}}},
    ])
}

/// Checks a call's arguments against its tool's schema.
fn assert_valid_args(name: &str, args: &Value) {
    let tools = two_tools();
    let schema = tools
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == name)
        .map(|t| t["function"]["parameters"].clone())
        .unwrap_or_else(|| panic!("no tool {name}"));
    let validator = jsonschema::validator_for(&schema).expect("schema");
    let errors: Vec<String> = validator.iter_errors(args).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{name}({args}): {errors:?}");
}

#[tokio::test]
async fn tool_choice_required_forces_a_valid_call_on_ollama_streamed() {
    // A question no tool answers: left alone, the model would write prose.
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "tools": two_tools(), "tool_choice": "required",
               "options": {"temperature": 0, "num_predict": 80},
               "messages": [{"role": "user", "content": "Tell me a joke about cats."}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let lines = ndjson_lines(resp).await;
    let calls: Vec<&Value> = lines
        .iter()
        .filter_map(|l| l["message"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert!(!calls.is_empty(), "{lines:?}");
    for c in &calls {
        let name = c["function"]["name"].as_str().expect("name");
        assert_valid_args(name, &c["function"]["arguments"]);
    }
    let text: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    assert!(text.trim().is_empty(), "only calls: {text:?}");
    assert_eq!(lines.last().unwrap()["done_reason"], "stop");
}

#[tokio::test]
async fn named_tool_choice_forces_that_function_on_openai_streamed() {
    let body = json!({"model": MODEL, "messages": weather_question(), "tools": two_tools(),
                      "tool_choice": {"type": "function", "function": {"name": "book_table"}},
                      "temperature": 0, "max_tokens": 80, "stream": true});
    let resp = post("/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp).await;
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0]["function"]["name"], "book_table");
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_valid_args("book_table", &args);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn tool_choice_none_forbids_calls_and_auto_stays_free() {
    for path in ["/api/chat", "/v1/chat/completions"] {
        let body = json!({"model": MODEL, "messages": weather_question(), "tools": two_tools(),
                          "tool_choice": "none", "stream": false, "temperature": 0,
                          "max_tokens": 40, "options": greedy()});
        let resp = post(path, body).await;
        assert_eq!(resp.status(), 200, "{path}");
        let v: Value = resp.json().await.unwrap();
        let message = if path == "/api/chat" {
            v["message"].clone()
        } else {
            assert_ne!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
            v["choices"][0]["message"].clone()
        };
        assert!(message.get("tool_calls").is_none(), "{path}: {v}");
        let text = message["content"].as_str().unwrap();
        assert!(!text.contains("<tool_call>"), "{path}: {text}");
    }
    // "auto" with a question a tool answers: the model's own call, as before.
    let resp = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": weather_question(), "tools": weather_tool(),
               "tool_choice": "auto", "temperature": 0, "max_tokens": 60}),
    )
    .await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
}

#[tokio::test]
async fn bad_tool_choices_are_400s() {
    let cases = [
        (
            json!({"type": "function", "function": {"name": "fly"}}),
            two_tools(),
            "fly",
        ),
        (json!("required"), json!([]), "no tools"),
        (json!("sometimes"), two_tools(), "tool_choice"),
        (json!({"type": "function"}), two_tools(), "tool_choice"),
    ];
    for (choice, tools, needle) in cases {
        let resp = post(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": weather_question(), "tools": tools,
                   "tool_choice": choice}),
        )
        .await;
        assert_eq!(resp.status(), 400, "{choice}");
        let v: Value = resp.json().await.unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{choice}: {msg}");
    }
    // A parameter schema we cannot enforce, when a call is forced.
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "format": "isbn"}}}}}]);
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "messages": weather_question(), "tools": tools,
               "tool_choice": "required", "stream": false}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("isbn"), "{v}");
}
