//! Structured output over real HTTP on loopback with the real SmolLM2 model: a corpus of
//! 131 JSON schemas (tests/fixtures/structured/schema-corpus.json, written by
//! scripts/gen-schema-corpus.py) sent through Ollama's `format` and OpenAI's
//! `response_format`, every answer checked against its schema with a JSON-schema validator
//! (formats included); JSON mode, regexes, Lark grammars and choices through each spelling
//! (Ollama `format` and `options`, OpenAI `response_format`, vLLM's `structured_outputs` and
//! `guided_*`), streamed and not; and clear 400s for what cannot be compiled.

use crate::common;

use std::sync::OnceLock;

use crate::api_common::{config, import, ndjson_lines, spawn_server, sse_events, store_dir};
use futures_util::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "smollm2:135m";

fn server() -> &'static str {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = store_dir("structured");
        import(&dir, MODEL, &common::test_model(common::SMOLLM2_GGUF));
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

async fn post_json(path: &str, body: Value) -> (u16, Value) {
    let resp = post(path, body).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

fn corpus() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/structured/schema-corpus.json"
    );
    let text = std::fs::read_to_string(path).expect("schema corpus");
    serde_json::from_str::<Vec<Value>>(&text).expect("corpus JSON")
}

/// Errors of `instance` against `schema`, formats checked; empty when valid.
fn violations(schema: &Value, instance: &Value) -> Vec<String> {
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("the corpus schema does not build: {e}\n{schema}"));
    validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect()
}

fn messages(prompt: &str) -> Value {
    json!([
        {"role": "system", "content": "You answer with JSON only."},
        {"role": "user", "content": prompt},
    ])
}

/// One corpus entry through one dialect; returns the answer text.
async fn ask(i: usize, entry: &Value, temperature: f64) -> String {
    let schema = &entry["schema"];
    let prompt = entry["prompt"].as_str().expect("prompt");
    if i.is_multiple_of(2) {
        let (status, v) = post_json(
            "/api/chat",
            json!({"model": MODEL, "messages": messages(prompt), "format": schema,
                   "stream": false,
                   "options": {"temperature": temperature, "seed": i, "num_predict": 400}}),
        )
        .await;
        assert_eq!(status, 200, "{}: {v}", entry["name"]);
        v["message"]["content"]
            .as_str()
            .expect("content")
            .to_string()
    } else {
        let (status, v) = post_json(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": messages(prompt),
                   "temperature": temperature, "seed": i, "max_tokens": 400,
                   "response_format": {"type": "json_schema", "json_schema": {
                       "name": entry["name"], "strict": true, "schema": schema}}}),
        )
        .await;
        assert_eq!(status, 200, "{}: {v}", entry["name"]);
        v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content")
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corpus_answer_validates_against_its_schema() {
    let entries = corpus();
    assert!(entries.len() >= 100, "the corpus has {}", entries.len());
    // Eight at a time, as clients would send them: the engine batches them.
    let results: Vec<(usize, String)> = futures_util::stream::iter(entries.iter().enumerate())
        .map(|(i, e)| async move { (i, ask(i, e, 0.0).await) })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut failures = Vec::new();
    for (i, text) in results {
        let e = &entries[i];
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => {
                let errs = violations(&e["schema"], &v);
                if !errs.is_empty() {
                    failures.push(format!("{}: {text} -> {errs:?}", e["name"]));
                }
            }
            Err(err) => failures.push(format!("{}: not JSON ({err}): {text:?}", e["name"])),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} answers are invalid:\n{}",
        failures.len(),
        entries.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn sampled_answers_validate_too() {
    let entries = corpus();
    // A spread of the corpus at temperature 1, different seeds.
    for (i, e) in entries.iter().enumerate().step_by(13) {
        let text = ask(i, e, 1.0).await;
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("{}: not JSON ({err}): {text:?}", e["name"]));
        let errs = violations(&e["schema"], &v);
        assert!(errs.is_empty(), "{}: {text} -> {errs:?}", e["name"]);
    }
}

#[tokio::test]
async fn json_mode_streams_one_object_in_both_dialects() {
    let resp = post(
        "/api/generate",
        json!({"model": MODEL, "format": "json",
               "prompt": "Give the name and age of a dog as JSON with the keys name and age.",
               "options": {"temperature": 0, "num_predict": 200}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let lines = ndjson_lines(resp).await;
    assert!(lines.len() > 2, "streamed: {lines:?}");
    let text: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap_or(""))
        .collect();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(v.is_object(), "{text}");
    assert_eq!(lines.last().unwrap()["done_reason"], "stop");

    let resp = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Give the name and color of a cat as JSON with the keys name and color.", "stream": true,
               "temperature": 0, "max_tokens": 200,
               "response_format": {"type": "json_object"}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp).await;
    let text: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(v.is_object(), "{text}");
}

/// Chat answer text through OpenAI's endpoint with extra request fields.
async fn openai_answer(extra: Value) -> String {
    let mut body = json!({"model": MODEL, "temperature": 0, "max_tokens": 60,
                          "messages": [{"role": "user", "content": "Pick a color and a number."}]});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    let (status, v) = post_json("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

#[tokio::test]
async fn regex_grammar_and_choice_in_every_spelling() {
    let re = regex_lite(r"^(red|green|blue)-[0-9]{2}$");
    for extra in [
        json!({"guided_regex": "(red|green|blue)-[0-9]{2}"}),
        json!({"structured_outputs": {"regex": "(red|green|blue)-[0-9]{2}"}}),
        json!({"options": {"regex": "(red|green|blue)-[0-9]{2}"}}),
    ] {
        let text = openai_answer(extra.clone()).await;
        assert!(re(&text), "{extra}: {text:?}");
    }
    let lark =
        "start: color \" \" NUMBER\ncolor: \"red\" | \"green\" | \"blue\"\nNUMBER: /[1-9][0-9]?/";
    for extra in [
        json!({"guided_grammar": lark}),
        json!({"structured_outputs": {"grammar": lark}}),
    ] {
        let text = openai_answer(extra.clone()).await;
        let (color, number) = text.split_once(' ').unwrap_or_else(|| panic!("{text:?}"));
        assert!(["red", "green", "blue"].contains(&color), "{text:?}");
        assert!(
            number.parse::<u32>().is_ok_and(|n| (1..100).contains(&n)),
            "{text:?}"
        );
    }
    for extra in [
        json!({"guided_choice": ["left", "right"]}),
        json!({"structured_outputs": {"choice": ["left", "right"]}}),
    ] {
        let text = openai_answer(extra.clone()).await;
        assert!(text == "left" || text == "right", "{extra}: {text:?}");
    }
    // Ollama's options spelling, streamed.
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Yes or no?"}],
               "options": {"temperature": 0, "choice": ["yes", "no"]}}),
    )
    .await;
    let lines = ndjson_lines(resp).await;
    let text: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap_or(""))
        .collect();
    assert!(text == "yes" || text == "no", "{text:?}");
    let resp = post(
        "/api/generate",
        json!({"model": MODEL, "prompt": "Write a date.", "stream": false,
               "options": {"temperature": 0, "grammar": "start: /20[0-9]{2}-(0[1-9]|1[0-2])/"}}),
    )
    .await;
    let v: Value = resp.json().await.expect("JSON");
    let text = v["response"].as_str().expect("response");
    assert!(
        regex_lite(r"^20[0-9]{2}-(0[1-9]|1[0-2])$")(text),
        "{text:?}"
    );
}

/// A tiny matcher for the anchored patterns above, so the test does not need a regex crate:
/// alternations of literal prefixes, `[0-9]{n}` and the `(0[1-9]|1[0-2])` month.
fn regex_lite(pattern: &'static str) -> impl Fn(&str) -> bool {
    move |text: &str| match pattern {
        r"^(red|green|blue)-[0-9]{2}$" => text.split_once('-').is_some_and(|(c, n)| {
            ["red", "green", "blue"].contains(&c)
                && n.len() == 2
                && n.bytes().all(|b| b.is_ascii_digit())
        }),
        r"^20[0-9]{2}-(0[1-9]|1[0-2])$" => text.split_once('-').is_some_and(|(y, m)| {
            y.len() == 4
                && y.starts_with("20")
                && y.bytes().all(|b| b.is_ascii_digit())
                && m.parse::<u32>().is_ok_and(|m| (1..=12).contains(&m))
                && m.len() == 2
        }),
        _ => unreachable!("no matcher for {pattern}"),
    }
}

#[tokio::test]
async fn constraints_that_cannot_compile_are_400s_naming_the_part() {
    let chat = |format: Value| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "format": format, "stream": false})
    };
    let cases = [
        (json!({"type": "object", "not": {"type": "null"}}), "not"),
        (json!({"type": "string", "format": "zipcode"}), "zipcode"),
        (json!({"$ref": "#/$defs/nowhere"}), "nowhere"),
        (
            json!({"type": "integer", "minimum": 5, "maximum": 1}),
            "minimum",
        ),
    ];
    for (schema, needle) in &cases {
        let (status, v) = post_json("/api/chat", chat(schema.clone())).await;
        assert_eq!(status, 400, "{schema}: {v}");
        let msg = v["error"].as_str().expect("Ollama error string");
        assert!(msg.contains(needle), "{schema}: {msg}");
        let (status, v) = post_json(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "json_schema",
                                       "json_schema": {"name": "x", "schema": schema}}}),
        )
        .await;
        assert_eq!(status, 400, "{schema}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(msg.contains(needle), "{schema}: {msg}");
    }
    let bad = [
        (json!({"guided_regex": "(a"}), "regex"),
        (
            json!({"guided_grammar": "start: missing_rule"}),
            "missing_rule",
        ),
        (json!({"guided_grammar": "root ::= \"a\""}), "GBNF"),
        (json!({"guided_choice": []}), "empty"),
        (
            json!({"guided_regex": "a", "guided_choice": ["a"]}),
            "conflicting",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}),
            "conflicting",
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format",
        ),
        (json!({"structured_outputs": "json"}), "structured_outputs"),
    ];
    for (extra, needle) in bad {
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = post_json("/v1/chat/completions", body).await;
        assert_eq!(status, 400, "{extra}: {v}");
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(msg.contains(needle), "{extra}: {msg}");
    }
    let (status, v) = post_json("/api/chat", chat(json!("yaml"))).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("format"), "{v}");
}
