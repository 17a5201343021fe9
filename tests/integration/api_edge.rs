//! The production edge of `wick serve` over loopback HTTP with the real SmolLM2 model:
//! a table of bad inputs and the status and message each gets (the server stays up),
//! API keys, request ids, `/metrics`, the queue bound (503) and oversized bodies (413).

use crate::common;

use std::sync::OnceLock;

use crate::api_common::{config, import, ndjson_lines, spawn_server, store_dir};
use futures_util::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "smollm2:135m";

/// A server with SmolLM2 under `tag`'s scratch store and `env` settings.
fn start(tag: &str, env: &[(&str, &str)]) -> String {
    let dir = store_dir(tag);
    import(&dir, MODEL, &common::test_model(common::SMOLLM2_GGUF));
    let mut settings = vec![("WICK_KV_CACHE_BYTES", "134217728")];
    settings.extend_from_slice(env);
    format!("http://{}", spawn_server(config(dir, &settings)).0)
}

fn server() -> &'static str {
    static SERVER: OnceLock<String> = OnceLock::new();
    SERVER.get_or_init(|| start("edge", &[]))
}

fn hi() -> Value {
    json!([{"role": "user", "content": "Hi"}])
}

async fn send(base: &str, path: &str, body: reqwest::Body) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .body(body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, v)
}

#[tokio::test]
async fn bad_inputs_get_clear_errors_and_the_server_stays_up() {
    let big = "x".repeat(65 << 20);
    // (path, body, status, what the error message must contain)
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/api/chat", "{\"model\":".into(), 400, "EOF"),
        ("/api/chat", "".into(), 400, "missing request body"),
        ("/api/chat", json!({"model": MODEL, "messages": "hi"}).to_string(), 400, "invalid type"),
        ("/api/generate", json!({"model": MODEL, "stream": "yes"}).to_string(), 400, "invalid type"),
        ("/api/chat", json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).to_string(), 400, "invalid message role \"wizard\""),
        ("/api/chat", json!({"model": MODEL, "messages": hi(), "options": {"num_predict": "many"}}).to_string(), 400, "option \"num_predict\" must be of type int"),
        ("/api/chat", json!({"model": "nosuch:1b", "messages": hi()}).to_string(), 404, "model \"nosuch:1b\" not found, try pulling it first"),
        ("/api/chat", json!({"model": "../../etc/passwd", "messages": hi()}).to_string(), 400, "invalid model name"),
        ("/api/chat", json!({"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["data:image/png;base64,AAAA"]}]}).to_string(), 400, "illegal base64 data at input byte 4"),
        ("/api/generate", json!({"model": MODEL, "prompt": "x", "images": ["iVBORw0KGgo="]}).to_string(), 400, "does not support image input"),
        ("/api/generate", json!({"model": MODEL, "prompt": "x", "think": "lots"}).to_string(), 400, "invalid think value"),
        ("/api/chat", json!({"model": MODEL, "messages": hi(), "tools": [{"type": "function", "function": {"name": "f"}}]}).to_string(), 400, "does not support tools"),
        ("/api/chat", json!({"model": MODEL, "messages": hi(), "keep_alive": "soon"}).to_string(), 400, "invalid duration"),
        ("/api/chat", big.clone(), 413, "request body too large"),
        ("/v1/chat/completions", big, 413, "request body too large"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": []}).to_string(), 400, "[] is too short - 'messages'"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": hi(), "stop": 5}).to_string(), 400, "stop must be a string"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": hi(), "reasoning_effort": "galaxy"}).to_string(), 400, "invalid reasoning value"),
        ("/v1/completions", json!({"model": MODEL, "prompt": ["a", "b"]}).to_string(), 400, "prompt must be a string"),
        ("/v1/chat/completions", json!({"model": "nosuch:1b", "messages": hi()}).to_string(), 404, "not found"),
    ];
    for (path, body, status, msg) in cases {
        let shown: String = body.chars().take(120).collect();
        let (got, v) = send(server(), path, body.into()).await;
        assert_eq!(got, status, "{path} {shown}: {v}");
        let text = if path.starts_with("/v1/") {
            assert!(v["error"]["type"].is_string(), "OpenAI shape: {v}");
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        } else {
            v["error"].as_str().unwrap_or_default().to_string()
        };
        assert!(text.contains(msg), "{path} {shown}: {text:?} lacks {msg:?}");
    }
    // Still serving, and limits that are not errors behave: an enormous num_predict stops
    // at the context, a num_ctx beyond the model is capped, an empty chat loads the model.
    let (status, v) = send(
        server(),
        "/api/chat",
        json!({"model": MODEL, "messages": hi(), "stream": false,
               "options": {"num_predict": 1_000_000_000_000i64, "num_ctx": 48, "temperature": 0,
                           "stop": []}})
        .to_string()
        .into(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["eval_count"].as_u64().unwrap() <= 48, "{v}");
    let (status, v) = send(
        server(),
        "/api/generate",
        json!({"model": MODEL, "prompt": "Hi", "stream": false,
               "options": {"num_predict": 4, "num_ctx": 100_000_000}})
        .to_string()
        .into(),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = send(
        server(),
        "/api/chat",
        json!({"model": MODEL, "messages": []}).to_string().into(),
    )
    .await;
    assert_eq!(
        (status, v["done_reason"].as_str()),
        (200, Some("load")),
        "{v}"
    );
}

#[tokio::test]
async fn api_keys_guard_everything_but_the_health_check() {
    let base = start("keys", &[("WICK_API_KEYS", "k1, secret-2")]);
    let client = reqwest::Client::new();
    let resp = client.get(format!("{base}/api/tags")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().starts_with("unauthorized"));
    let resp = client
        .get(format!("{base}/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    for key in ["k1", "secret-2"] {
        let resp = client
            .get(format!("{base}/api/tags"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{key}");
    }
    let resp = client.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // A browser's preflight carries no credentials and must still pass.
    let resp = client
        .request(reqwest::Method::OPTIONS, format!("{base}/api/chat"))
        .header("origin", "http://localhost:3210")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
}

#[tokio::test]
async fn request_ids_are_echoed_or_made() {
    let client = reqwest::Client::new();
    let resp = client
        .get(format!("{}/api/version", server()))
        .header("x-fc-request-id", "fc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-fc-request-id"], "fc-123");
    assert_eq!(resp.headers()["x-request-id"], "fc-123");
    let resp = client
        .get(format!("{}/api/version", server()))
        .send()
        .await
        .unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{id}");
    let again = client
        .get(format!("{}/api/version", server()))
        .send()
        .await
        .unwrap();
    assert_ne!(again.headers()["x-request-id"].to_str().unwrap(), id);
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_blocks() {
    let resp = reqwest::Client::new()
        .post(format!("{}/api/chat", server()))
        .json(&json!({"model": MODEL, "messages": hi(), "options": {"num_predict": 5}}))
        .send()
        .await
        .unwrap();
    let lines = ndjson_lines(resp).await;
    let done = lines.last().unwrap();
    let text = reqwest::get(format!("{}/metrics", server()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
    };
    assert!(value("wick_requests_total{route=\"/api/chat\",status=\"200\"}") >= 1.0);
    assert!(value("wick_generated_tokens_total") >= done["eval_count"].as_f64().unwrap());
    assert!(value("wick_prompt_tokens_total") >= done["prompt_eval_count"].as_f64().unwrap());
    assert!(value("wick_time_to_first_token_seconds_count") >= 1.0);
    assert!(value("wick_inter_token_seconds_count") >= 1.0);
    let free = value(&format!("wick_kv_blocks_free{{model=\"{MODEL}\"}}"));
    let used = value(&format!("wick_kv_blocks_used{{model=\"{MODEL}\"}}"));
    assert!(free + used > 0.0);
    assert_eq!(value("wick_loaded_models"), 1.0);
    assert!(text.contains("# TYPE wick_time_to_first_token_seconds histogram"));
}

#[tokio::test]
async fn a_full_queue_answers_503() {
    let base = start(
        "queue",
        &[("OLLAMA_NUM_PARALLEL", "1"), ("OLLAMA_MAX_QUEUE", "1")],
    );
    let client = reqwest::Client::new();
    let long = |n: i64| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Count from 1 to 500."}],
               "options": {"num_predict": n, "temperature": 0, "stop": []}})
    };
    // A runs (its first chunk has arrived), B waits in the queue...
    let a = client
        .post(format!("{base}/api/chat"))
        .json(&long(400))
        .send()
        .await
        .unwrap();
    let mut a_body = a.bytes_stream();
    a_body.next().await.expect("A's first chunk").unwrap();
    let b = client
        .post(format!("{base}/api/chat"))
        .json(&long(5))
        .send()
        .await
        .unwrap();
    assert_eq!(b.status(), 200);
    // ...so C finds the queue full.
    let c = client
        .post(format!("{base}/api/chat"))
        .json(&long(5))
        .send()
        .await
        .unwrap();
    assert_eq!(c.status(), 503);
    let v: Value = c.json().await.unwrap();
    assert_eq!(
        v["error"],
        "server busy, please try again.  maximum pending requests exceeded"
    );
    // Dropping A frees the slot; B then finishes normally.
    drop(a_body);
    let lines = ndjson_lines(b).await;
    assert_eq!(lines.last().unwrap()["done"], true);
}

/// A free loopback port (bound and released; good enough for one test).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[tokio::test]
async fn sigterm_lets_the_stream_in_flight_finish_then_exits_0() {
    let dir = store_dir("sigterm");
    import(&dir, MODEL, &common::test_model(common::SMOLLM2_GGUF));
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .arg("serve")
        .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
        .env("OLLAMA_MODELS", &dir)
        .env("WICK_KV_CACHE_BYTES", (64usize << 20).to_string())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting wick serve");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if client.get(&base).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(up, "wick serve did not come up");
    let resp = client
        .post(format!("{base}/api/generate"))
        .json(&json!({"model": MODEL, "prompt": "Tell me a story.",
                      "options": {"num_predict": 40, "temperature": 0, "stop": []}}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("the stream goes on")).unwrap());
    }
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["done"], true, "{text}");
    assert_eq!(last["eval_count"], 40);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        client.get(&base).send().await.is_err(),
        "no longer listening"
    );
}
