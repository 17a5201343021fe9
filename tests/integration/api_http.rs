//! The HTTP API over real loopback HTTP: a server started in-process on 127.0.0.1 with a
//! scratch model store into which the real SmolLM2 GGUF is imported, driven with reqwest.
//! Covers both dialects' success and error shapes, streaming framing, and CORS.

use crate::common;

use std::net::SocketAddr;
use std::sync::OnceLock;

use crate::api_common::{config, import, ndjson_lines, spawn_server, store_dir};
use candlewick::api::AppState;
use futures_util::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "smollm2:135m";
const QUESTION: &str = "What is the capital of Germany?";

/// The shared server with the model imported.
fn server() -> String {
    format!("http://{}", shared().0)
}

fn shared() -> &'static (SocketAddr, AppState) {
    static SERVER: OnceLock<(SocketAddr, AppState)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = store_dir("http-main");
        import(&dir, MODEL, &common::test_model(common::SMOLLM2_GGUF));
        // A small KV cache keeps the test light.
        spawn_server(config(dir, &[("WICK_KV_CACHE_BYTES", "268435456")]))
    })
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post(path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", server()))
        .json(&body)
        .send()
        .await
        .expect("request")
}

async fn get(base: &str, path: &str) -> reqwest::Response {
    client()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("request")
}

async fn post_raw(path: &str, body: &'static str) -> reqwest::Response {
    client()
        .post(format!("{}{path}", server()))
        // curl -d's content type: the body must still be read as JSON.
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("request")
}

async fn json_of(resp: reqwest::Response) -> Value {
    resp.json().await.expect("JSON body")
}

fn question() -> Value {
    json!([{"role": "user", "content": QUESTION}])
}

fn assert_metrics(done: &Value) {
    for key in [
        "total_duration",
        "prompt_eval_count",
        "eval_count",
        "eval_duration",
    ] {
        assert!(done[key].as_u64().is_some_and(|n| n > 0), "{key} in {done}");
    }
    let created = done["created_at"].as_str().expect("created_at");
    assert!(created.ends_with('Z'), "{created}");
    assert!(chrono::DateTime::parse_from_rfc3339(created).is_ok());
}

#[tokio::test]
async fn root_version_and_unknown_paths() {
    let base = server();
    let resp = get(&base, "").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "Ollama is running");
    let head = client().head(&base).send().await.unwrap();
    assert_eq!(head.status(), 200);

    let v = json_of(get(&base, "/api/version").await).await;
    let version = v["version"].as_str().expect("version string");
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    assert!(parts >= vec![0, 6, 4], "{version}");

    let resp = get(&base, "/no/such/path").await;
    assert_eq!(resp.status(), 404);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(resp.text().await.unwrap(), "404 page not found");
}

#[tokio::test]
async fn tags_lists_the_imported_model() {
    let base = server();
    let v = json_of(get(&base, "/api/tags").await).await;
    let models = v["models"].as_array().expect("models array");
    let m = models
        .iter()
        .find(|m| m["name"] == MODEL)
        .unwrap_or_else(|| panic!("{MODEL} in {v}"));
    assert_eq!(m["model"], MODEL);
    assert_eq!(m["digest"].as_str().map(str::len), Some(64));
    assert!(m["size"].as_u64().unwrap() > 90_000_000);
    assert!(chrono::DateTime::parse_from_rfc3339(m["modified_at"].as_str().unwrap()).is_ok());
    let d = &m["details"];
    assert_eq!(d["format"], "gguf");
    assert_eq!(d["family"], "llama");
    assert_eq!(d["families"], json!(["llama"]));
    assert_eq!(d["parameter_size"], "134.52M");
    assert_eq!(d["quantization_level"], "Q4_1");
    assert_eq!(d["parent_model"], "");
}

#[tokio::test]
async fn show_has_model_info_and_capabilities() {
    // `name` is the deprecated alias of `model`; casing of stored names is ignored.
    let v = json_of(post("/api/show", json!({"name": "SmolLM2:135M"})).await).await;
    let info = &v["model_info"];
    assert_eq!(info["general.architecture"], "llama");
    assert_eq!(info["llama.context_length"], 8192);
    assert_eq!(info["llama.embedding_length"], 576);
    assert!(info.get("general.name").is_none());
    assert!(info.get("tokenizer.chat_template").is_none());
    // Long arrays are emptied unless verbose.
    assert_eq!(info["tokenizer.ggml.tokens"], json!([]));
    assert!(v["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("completion")));
    assert!(v["template"].as_str().unwrap().contains("<|im_start|>"));
    assert_eq!(v["details"]["family"], "llama");

    let resp = post("/api/show", json!({"model": "nope"})).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        json_of(resp).await,
        json!({"error": "model 'nope:latest' not found"})
    );
}

#[tokio::test]
async fn chat_stream_answers_berlin() {
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "messages": question(), "options": {"temperature": 0, "num_predict": 40}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let lines = ndjson_lines(resp).await;
    assert!(lines.len() >= 3, "{lines:?}");
    let mut text = String::new();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["model"], MODEL);
        assert_eq!(l["message"]["role"], "assistant", "{l}");
        let content = l["message"]["content"].as_str().expect("content string");
        text.push_str(content);
        assert_eq!(l["done"], i + 1 == lines.len(), "{l}");
    }
    let done = lines.last().unwrap();
    assert!(matches!(
        done["done_reason"].as_str(),
        Some("stop" | "length")
    ));
    assert_metrics(done);
    assert!(text.contains("Berlin"), "{text}");
}

#[tokio::test]
async fn chat_non_stream_answers_berlin() {
    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "stream": false, "messages": question(), "options": {"temperature": 0}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v = json_of(resp).await;
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "stop");
    assert_eq!(v["message"]["role"], "assistant");
    assert!(
        v["message"]["content"].as_str().unwrap().contains("Berlin"),
        "{v}"
    );
    assert_metrics(&v);
}

#[tokio::test]
async fn generate_stream_non_stream_and_preload() {
    // Omitted `stream` streams; the body is JSON even when labelled as a form.
    let resp = post_raw(
        "/api/generate",
        r#"{"model":"smollm2:135m","prompt":"Name a color.","options":{"temperature":0,"num_predict":8}}"#,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let lines = ndjson_lines(resp).await;
    for l in &lines {
        assert!(l["response"].is_string(), "{l}");
    }
    let done = lines.last().unwrap();
    assert_eq!(done["done"], true);
    assert!(done["context"].is_array());
    assert_metrics(done);

    let v = json_of(
        post(
            "/api/generate",
            json!({"model": MODEL, "prompt": QUESTION, "stream": false, "options": {"temperature": 0, "num_predict": 3}}),
        )
        .await,
    )
    .await;
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "length");
    assert_eq!(v["eval_count"], 3);

    // No prompt: load the model and say so.
    let v = json_of(post("/api/generate", json!({"model": MODEL, "stream": false})).await).await;
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "load");
    assert_eq!(v["response"], "");
}

#[tokio::test]
async fn unknown_model_is_404_with_the_pull_hint() {
    for path in ["/api/chat", "/api/generate"] {
        let resp = post(
            path,
            json!({"model": "nosuchmodel:7b", "prompt": "x", "messages": question()}),
        )
        .await;
        assert_eq!(resp.status(), 404, "{path}");
        assert_eq!(
            json_of(resp).await,
            json!({"error": "model \"nosuchmodel:7b\" not found, try pulling it first"})
        );
    }
}

#[tokio::test]
async fn bad_requests_are_400() {
    let resp = post_raw("/api/chat", "").await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        json_of(resp).await,
        json!({"error": "missing request body"})
    );

    let resp = post_raw("/api/chat", "{not json").await;
    assert_eq!(resp.status(), 400);
    assert!(json_of(resp).await["error"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));

    let resp = post_raw("/api/generate", r#"{"model":"m","stream":"yes"}"#).await;
    assert_eq!(resp.status(), 400);

    for name in ["../../etc/passwd", "/abs/path", "a/b/c/d", "bad name", ""] {
        let resp = post("/api/chat", json!({"model": name, "messages": question()})).await;
        assert_eq!(resp.status(), 400, "{name:?}");
        assert_eq!(json_of(resp).await, json!({"error": "invalid model name"}));
    }

    let resp = post(
        "/api/chat",
        json!({"model": MODEL, "messages": question(), "options": {"temperature": "hot"}}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        json_of(resp).await,
        json!({"error": "option \"temperature\" must be of type float32"})
    );
}

#[tokio::test]
async fn openai_chat_stream_with_usage() {
    let resp = client()
        .post(format!("{}/v1/chat/completions", server()))
        .bearer_auth("anything")
        .json(&json!({
            "model": MODEL,
            "messages": question(),
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0,
            "max_tokens": 30,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("{e:?}")))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(content.contains("Berlin"), "{content}");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    let usage = &usage_chunk["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
    let finish = &chunks[chunks.len() - 2];
    assert!(finish["choices"][0]["finish_reason"].is_string());
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
    }
}

#[tokio::test]
async fn openai_non_stream_models_and_errors() {
    let v = json_of(
        post(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": question(), "temperature": 0, "max_tokens": 5}),
        )
        .await,
    )
    .await;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    let base = server();
    let v = json_of(get(&base, "/v1/models").await).await;
    assert_eq!(v["object"], "list");
    let m = &v["data"][0];
    assert_eq!(m["id"], MODEL);
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "library");
    assert!(m["created"].as_u64().unwrap() > 1_600_000_000);

    let v = json_of(get(&base, &format!("/v1/models/{MODEL}")).await).await;
    assert_eq!(v["id"], MODEL);

    let resp = get(&base, "/v1/models/nope").await;
    assert_eq!(resp.status(), 404);
    let e = json_of(resp).await;
    assert_eq!(e["error"]["type"], "not_found_error");
    assert!(e["error"]["message"].as_str().unwrap().contains("nope"));

    let resp = post(
        "/v1/chat/completions",
        json!({"model": "nope", "messages": question()}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(json_of(resp).await["error"]["type"], "not_found_error");

    let resp = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        json_of(resp).await["error"]["type"],
        "invalid_request_error"
    );
}

async fn preflight(base: &str, origin: &str) -> reqwest::Response {
    client()
        .request(reqwest::Method::OPTIONS, format!("{base}/api/chat"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type,user-agent")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn cors_default_origins() {
    let base = server();
    let resp = preflight(&base, "http://localhost:3210").await;
    assert_eq!(resp.status(), 204);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "http://localhost:3210");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    for needed in [
        "content-type",
        "user-agent",
        "authorization",
        "x-stainless-os",
    ] {
        assert!(allowed.contains(needed), "{needed} in {allowed}");
    }
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));

    let resp = preflight(&base, "https://evil.example").await;
    assert_eq!(resp.status(), 403);

    // The actual (non-preflight) request carries the origin too.
    let resp = client()
        .get(format!("{base}/api/tags"))
        .header("Origin", "http://localhost:3210")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "http://localhost:3210"
    );
}

#[tokio::test]
async fn cors_star_allows_everyone() {
    let dir = store_dir("cors-star");
    let (addr, _) = spawn_server(config(dir, &[("OLLAMA_ORIGINS", "*")]));
    let base = format!("http://{addr}");
    let resp = preflight(&base, "https://evil.example").await;
    assert_eq!(resp.status(), 204);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    // An empty store still lists `[]`, never null.
    let v = json_of(get(&base, "/api/tags").await).await;
    assert_eq!(v, json!({"models": []}));
    let v = json_of(get(&base, "/v1/models").await).await;
    assert_eq!(v["data"], json!([]));
}

#[tokio::test]
async fn dropping_the_response_cancels_generation() {
    let resp = post(
        "/api/generate",
        json!({"model": MODEL, "prompt": "Write a very long story about a dragon.",
               "options": {"num_predict": 4000, "temperature": 1, "seed": 7}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.expect("a first chunk").expect("chunk");
    assert!(!first.is_empty());
    drop(stream);

    // The engine should see no running or waiting sequences shortly after.
    let state = &shared().1;
    let start = std::time::Instant::now();
    loop {
        let loaded = state.models.list().await;
        let busy: usize = loaded
            .iter()
            .map(|l| {
                let s = l.engine.stats();
                s.running + s.waiting
            })
            .sum();
        if busy == 0 {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "generation still running 5 s after the client left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("a vector")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

#[tokio::test]
async fn embeddings_in_all_three_shapes() {
    let texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the mat.",
        "Interest rates rose by half a percent in the bond market.",
    ];
    let v = json_of(post("/api/embed", json!({"model": MODEL, "input": texts})).await).await;
    let vecs: Vec<Vec<f64>> = v["embeddings"]
        .as_array()
        .expect("embeddings")
        .iter()
        .map(floats)
        .collect();
    assert_eq!(vecs.len(), 3);
    for e in &vecs {
        assert_eq!(e.len(), 576, "SmolLM2-135M's hidden size");
        assert!((norm(e) - 1.0).abs() < 1e-4);
    }
    assert!(
        cosine(&vecs[0], &vecs[1]) > cosine(&vecs[0], &vecs[2]),
        "paraphrases are closer than unrelated text"
    );
    assert!(v["prompt_eval_count"].as_u64().unwrap() > 10);

    let v = json_of(
        post(
            "/api/embed",
            json!({"model": MODEL, "input": texts[0], "dimensions": 64}),
        )
        .await,
    )
    .await;
    let short = floats(&v["embeddings"][0]);
    assert_eq!(short.len(), 64);
    assert!((norm(&short) - 1.0).abs() < 1e-4);

    // The legacy endpoint: one vector, not normalised, same direction.
    let v = json_of(
        post(
            "/api/embeddings",
            json!({"model": MODEL, "prompt": texts[0]}),
        )
        .await,
    )
    .await;
    let legacy = floats(&v["embedding"]);
    assert!((norm(&legacy) - 1.0).abs() > 1e-2);
    assert!(cosine(&legacy, &vecs[0]) > 0.9999);

    // OpenAI: floats, and base64 little-endian f32 of the same numbers.
    let v = json_of(post("/v1/embeddings", json!({"model": MODEL, "input": texts[0]})).await).await;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "embedding");
    let float = floats(&v["data"][0]["embedding"]);
    let v = json_of(
        post(
            "/v1/embeddings",
            json!({"model": MODEL, "input": [texts[0]], "encoding_format": "base64"}),
        )
        .await,
    )
    .await;
    let b64 = v["data"][0]["embedding"].as_str().expect("a base64 string");
    let bytes = decode_base64(b64);
    let from_b64: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let float: Vec<f32> = float.iter().map(|&x| x as f32).collect();
    assert_eq!(from_b64, float);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    // Empty input loads; OpenAI wants input; truncate:false refuses what does not fit.
    let v = json_of(post("/api/embed", json!({"model": MODEL, "input": []})).await).await;
    assert_eq!(v["embeddings"], json!([]));
    let resp = post("/v1/embeddings", json!({"model": MODEL, "input": []})).await;
    assert_eq!(resp.status(), 400);
    let resp = post(
        "/api/embed",
        json!({"model": MODEL, "input": texts[2], "truncate": false, "options": {"num_ctx": 4}}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        json_of(resp).await["error"],
        "the input length exceeds the context length"
    );
}

fn decode_base64(s: &str) -> Vec<u8> {
    const T: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.chars().filter(|&c| c != '=') {
        bits = (bits << 6) | T.find(c).expect("base64 alphabet") as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// Whether `text` is valid JSON so far: a whole value, or one that only ended early
/// (serde_json tells an input that stops mid-value from one that goes wrong).
fn json_prefix(text: &str) -> bool {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(_) => true,
        Err(e) => e.classify() == serde_json::error::Category::Eof,
    }
}

#[tokio::test]
async fn json_mode_keeps_even_a_rambling_model_valid() {
    // SmolLM2-135M rambles past any limit; what it writes must still be JSON.
    let ask = json!([{"role": "user", "content": "Describe Germany as JSON."}]);
    let v = json_of(
        post(
            "/api/chat",
            json!({"model": MODEL, "messages": ask, "format": "json", "stream": false,
                   "options": {"temperature": 0, "num_predict": 60}}),
        )
        .await,
    )
    .await;
    let content = v["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with('{') && json_prefix(content),
        "{content:?}"
    );
    let v = json_of(
        post(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": ask, "response_format": {"type": "json_object"},
                   "temperature": 0.9, "seed": 7, "max_tokens": 60}),
        )
        .await,
    )
    .await;
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with('{') && json_prefix(content),
        "{content:?}"
    );
    let resp = post(
        "/api/generate",
        json!({"model": MODEL, "prompt": "x", "format": "yaml"}),
    )
    .await;
    assert_eq!(resp.status(), 400);
}
