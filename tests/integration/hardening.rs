//! The server as an attacker or a noisy neighbour meets it, over real HTTP on loopback with
//! the real SmolLM2 model: `Host` checks against DNS rebinding, bearer schemes, bounded
//! queues for generation and embeddings, validation before any model loads, a model manager
//! that loads per model and survives a panicking engine, template refusals as 400s, linear
//! request parsing, slow clients, and streams that end cleanly at shutdown.

use crate::api_common;
use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candlewick::api::AppState;
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::api_common::{config, ndjson_lines, post, sse_events, store_dir};

const SMOL: &str = "smollm2:135m";

fn smol_store(tag: &str) -> PathBuf {
    let dir = store_dir(tag);
    api_common::import(
        &dir,
        SMOL,
        &common::test_model("SmolLM2-135M-Instruct.Q4_1.gguf"),
    );
    dir
}

/// A server on loopback with the SmolLM2 store and `extra` settings.
fn server(tag: &str, extra: &[(&str, &str)]) -> (String, AppState) {
    let mut env = vec![("WICK_KV_CACHE_BYTES", "67108864")];
    env.extend_from_slice(extra);
    let (addr, state) = api_common::spawn_server(config(smol_store(tag), &env));
    (format!("http://{addr}"), state)
}

fn ask(prompt: &str, num_predict: i64) -> Value {
    json!({"model": SMOL, "prompt": prompt, "stream": false,
           "options": {"temperature": 0, "num_predict": num_predict}})
}

#[tokio::test]
async fn rebinding_hosts_get_403_on_loopback() {
    let (base, _) = server("hosts", &[("WICK_ALLOWED_HOSTS", "chat.example.com")]);
    let port = base.rsplit(':').next().expect("port");
    let client = reqwest::Client::new();
    let evil = format!("rebind.evil.example:{port}");
    let routes = [
        ("GET", "/api/tags", Value::Null),
        ("POST", "/api/chat", json!({"model": SMOL, "messages": []})),
        ("POST", "/api/pull", json!({"model": "x"})),
        ("DELETE", "/api/delete", json!({"model": SMOL})),
        ("GET", "/v1/models", Value::Null),
    ];
    for (method, path, body) in routes {
        let mut req = client
            .request(method.parse().expect("method"), format!("{base}{path}"))
            .header("Host", &evil);
        if !body.is_null() {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status(), 403, "{method} {path}");
        let v: Value = resp.json().await.expect("a JSON error");
        let msg = if path.starts_with("/v1/") {
            v["error"]["message"].as_str()
        } else {
            v["error"].as_str()
        };
        assert!(msg.is_some_and(|m| m.contains("not allowed")), "{v}");
    }
    // The model survived the refused delete.
    assert_eq!(api_common::tags(&base).await.len(), 1);
    for ok in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "chat.example.com".to_string(),
    ] {
        let resp = client
            .get(format!("{base}/api/tags"))
            .header("Host", &ok)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "{ok}");
    }
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive() {
    let (base, _) = server("bearer", &[("WICK_API_KEYS", "k1")]);
    let client = reqwest::Client::new();
    for (auth, want) in [
        ("Bearer k1", 200),
        ("bearer k1", 200),
        ("BEARER k1", 200),
        ("BeArEr  k1", 200),
        ("Bearer k2", 401),
        ("Basic k1", 401),
    ] {
        let resp = client
            .get(format!("{base}/api/tags"))
            .header("Authorization", auth)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), want, "{auth}");
    }
}

#[tokio::test]
async fn bad_requests_load_nothing() {
    let (base, _) = server("validate", &[]);
    for options in [
        json!({"temperature": -1}),
        json!({"top_p": 2}),
        json!({"temperature": "hot"}),
    ] {
        let body = json!({"model": SMOL, "prompt": "hi", "stream": false, "options": options});
        let resp = post(&base, "/api/generate", body).await;
        assert_eq!(resp.status(), 400, "{options}");
    }
    assert!(api_common::ps(&base).await.is_empty(), "nothing was loaded");
}

#[tokio::test]
async fn the_queue_holds_under_a_burst() {
    let (base, _) = server(
        "burst",
        &[("OLLAMA_NUM_PARALLEL", "1"), ("OLLAMA_MAX_QUEUE", "2")],
    );
    // Loaded first, so the burst meets a running engine.
    assert_eq!(
        post(&base, "/api/generate", ask("Hi", 1)).await.status(),
        200
    );
    let burst = (0..12).map(|i| {
        let base = base.clone();
        async move {
            post(&base, "/api/generate", ask(&format!("Count to {i}."), 64))
                .await
                .status()
                .as_u16()
        }
    });
    let statuses = join_all(burst).await;
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let busy = statuses.iter().filter(|&&s| s == 503).count();
    assert_eq!(ok + busy, 12, "{statuses:?}");
    // One running, two waiting: the rest are refused, however close together they come.
    assert!((1..=3).contains(&ok), "{statuses:?}");

    // Embeddings wait in the same queue: one running and two waiting at most.
    let text = "A river flows through the valley and into the sea. ".repeat(20);
    let embeds = (0..10).map(|_| {
        let base = base.clone();
        let text = text.clone();
        async move {
            let resp = post(&base, "/api/embed", json!({"model": SMOL, "input": text})).await;
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.expect("JSON");
            (status, v)
        }
    });
    let results = join_all(embeds).await;
    let ok: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, v)| v)
        .collect();
    let busy = results.iter().filter(|(s, _)| *s == 503).count();
    assert_eq!(ok.len() + busy, 10);
    assert!((1..=3).contains(&ok.len()), "{} served", ok.len());
    // What was served is the same vector a lone request gets.
    let alone: Value = post(&base, "/api/embed", json!({"model": SMOL, "input": text}))
        .await
        .json()
        .await
        .expect("JSON");
    let want = alone["embeddings"][0].as_array().expect("a vector").clone();
    for v in ok {
        let got = v["embeddings"][0].as_array().expect("a vector");
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            let (a, b) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(0.0));
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

#[tokio::test]
async fn a_panicking_engine_fails_its_requests_and_recovers() {
    let (base, state) = server("panic", &[]);
    assert_eq!(
        post(&base, "/api/generate", ask("Hi", 1)).await.status(),
        200
    );
    let engine = state.models.list().await[0].engine.clone();
    // A long stream is running when the next step panics.
    let body = json!({"model": SMOL, "prompt": "Tell me a long story.",
                      "options": {"temperature": 0, "num_predict": 400}});
    let resp = post(&base, "/api/generate", body).await;
    assert_eq!(resp.status(), 200);
    engine.inject_fault();
    let lines = ndjson_lines(resp).await;
    let last = lines.last().expect("lines");
    let err = last["error"].as_str().unwrap_or_default();
    assert!(err.contains("restarted"), "{last}");
    // The engine is still registered and serves the next request.
    let v: Value = post(&base, "/api/generate", ask("Hi", 4))
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(v["done"], true, "{v}");
    assert_eq!(engine.stats().restarts, 1);
    assert_eq!(engine.stats().free_blocks, engine.stats().total_blocks);
}

#[tokio::test]
async fn a_loading_model_does_not_block_the_others() {
    let dir = smol_store("per-model");
    api_common::import(
        &dir,
        "qwen:coder",
        &common::test_model("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    );
    let (addr, _) = api_common::spawn_server(config(dir, &[("WICK_KV_CACHE_BYTES", "67108864")]));
    let base = format!("http://{addr}");
    assert_eq!(
        post(&base, "/api/generate", ask("Hi", 1)).await.status(),
        200
    );
    let t0 = Instant::now();
    let qwen_load = {
        let base = base.clone();
        tokio::spawn(async move {
            let r = post(&base, "/api/generate", json!({"model": "qwen:coder"})).await;
            (r.status(), t0.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ps = api_common::ps(&base).await;
    let ps_at = t0.elapsed();
    let smol = post(&base, "/api/generate", ask("Hi", 2)).await;
    assert_eq!(smol.status(), 200);
    let smol_at = t0.elapsed();
    let (status, qwen_at) = qwen_load.await.expect("qwen load");
    assert_eq!(status, 200);
    assert!(
        ps_at < qwen_at && smol_at < qwen_at,
        "ps {ps_at:?} and a SmolLM2 answer {smol_at:?} waited for Qwen's load ({qwen_at:?})"
    );
    assert_eq!(ps.len(), 1, "Qwen is not listed while it loads");
    assert_eq!(api_common::ps(&base).await.len(), 2);
}

#[tokio::test]
async fn template_refusals_are_400() {
    // A model whose own chat template refuses more than one user message, as Llama 3.1's
    // refuses parallel tool calls: created over HTTP from a safetensors directory.
    let tiny = common::ScratchDir::new("raising-template");
    common::write_tiny_model(common::TinyArch::Qwen2, tiny.path(), 7);
    std::fs::write(
        tiny.path().join("chat_template.jinja"),
        "{% if messages | length > 1 %}{{ raise_exception('only one message, please') }}{% endif %}\
         {% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    .expect("template");
    let (base, _) = server("raising", &[]);
    let client = reqwest::Client::new();
    let mut files = serde_json::Map::new();
    for entry in std::fs::read_dir(tiny.path()).expect("dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let bytes = std::fs::read(&path).expect("file");
        let digest = api_common::sha(&bytes);
        let resp = client
            .post(format!("{base}/api/blobs/{digest}"))
            .body(bytes)
            .send()
            .await
            .expect("upload");
        assert!(resp.status().is_success(), "{name}: {}", resp.status());
        files.insert(name, digest.into());
    }
    let created = post(
        &base,
        "/api/create",
        json!({"model": "raiser", "files": files, "stream": false}),
    )
    .await;
    assert_eq!(created.status(), 200, "{:?}", created.text().await);
    let chat = |messages: Value| {
        json!({"model": "raiser", "messages": messages, "stream": false,
               "options": {"num_predict": 1}})
    };
    let one = post(
        &base,
        "/api/chat",
        chat(json!([{"role": "user", "content": "a"}])),
    )
    .await;
    assert_eq!(one.status(), 200);
    let two = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    let resp = post(&base, "/api/chat", chat(two.clone())).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.expect("JSON");
    assert_eq!(v["error"], "only one message, please");
    let openai = json!({"model": "raiser", "messages": two, "max_tokens": 1});
    let resp = post(&base, "/v1/chat/completions", openai).await;
    assert_eq!(resp.status(), 400);
}

/// An OpenAI chat of `n` assistant tool calls, each answered by a tool message that names
/// its call only by id.
fn tool_chat(model: &str, n: usize) -> Value {
    let mut messages = vec![json!({"role": "user", "content": "go"})];
    for i in 0..n / 2 {
        messages.push(
            json!({"role": "assistant", "content": null, "tool_calls": [{
            "id": format!("call_{i}"), "type": "function",
            "function": {"name": format!("f{i}"), "arguments": "{}"}}]}),
        );
        messages
            .push(json!({"role": "tool", "tool_call_id": format!("call_{i}"), "content": "ok"}));
    }
    json!({"model": model, "messages": messages})
}

#[tokio::test]
async fn tool_messages_parse_in_linear_time() {
    let (base, _) = server("linear", &[]);
    // An unknown model: all the work is parsing and translating the request. Same-run
    // ratio: 16x the messages takes about 16x the time when linear, 256x when quadratic.
    let time = |n: usize| {
        let base = base.clone();
        async move {
            let body = serde_json::to_vec(&tool_chat("nope", n)).expect("body");
            let t = Instant::now();
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("request");
            assert_eq!(resp.status(), 404);
            t.elapsed()
        }
    };
    time(1000).await;
    let small = time(1000).await;
    let large = time(16000).await;
    let ratio = large.as_secs_f64() / small.as_secs_f64().max(1e-4);
    assert!(
        ratio < 64.0,
        "1k messages {small:?}, 16k {large:?} ({ratio:.0}x)"
    );
}

#[tokio::test]
async fn slow_and_idle_clients_are_let_go() {
    let (base, _) = server("slow", &[("WICK_HEADER_TIMEOUT", "1s")]);
    let addr: SocketAddr = base.trim_start_matches("http://").parse().expect("addr");
    // Headers that never end.
    let mut slow = TcpStream::connect(addr).expect("connect");
    slow.write_all(b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\n")
        .expect("write");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the server waited {:?}",
        t.elapsed()
    );
    // A keep-alive connection left idle after its request is closed too.
    let mut idle = TcpStream::connect(addr).expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = idle.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "idle for {:?}",
        t.elapsed()
    );
}

/// A server whose shutdown the test triggers.
fn stoppable(tag: &str) -> (String, tokio::sync::oneshot::Sender<()>) {
    let cfg = config(
        smol_store(tag),
        &[
            ("WICK_KV_CACHE_BYTES", "67108864"),
            ("WICK_SHUTDOWN_TIMEOUT", "1s"),
        ],
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
    };
    let (addr, _) = api_common::spawn_server_until(cfg, stop);
    (format!("http://{addr}"), stop_tx)
}

#[tokio::test]
async fn streams_past_the_shutdown_deadline_end_with_an_error() {
    let (base, stop) = stoppable("shutdown");
    assert_eq!(
        post(&base, "/api/generate", ask("Hi", 1)).await.status(),
        200
    );
    let long = json!({"options": {"temperature": 0, "num_predict": 2000}});
    let mut ollama = json!({"model": SMOL, "prompt": "Tell me a very long story."});
    ollama["options"] = long["options"].clone();
    let ndjson = post(&base, "/api/generate", ollama).await;
    let openai = post(
        &base,
        "/v1/chat/completions",
        json!({"model": SMOL, "stream": true, "max_tokens": 2000, "temperature": 0,
               "messages": [{"role": "user", "content": "Tell me a very long story."}]}),
    )
    .await;
    assert_eq!(
        (ndjson.status().as_u16(), openai.status().as_u16()),
        (200, 200)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(());
    let lines = ndjson_lines(ndjson).await;
    let last = lines.last().expect("lines");
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("shutting down")),
        "{last}"
    );
    let events = sse_events(openai).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let err: Value = serde_json::from_str(&events[events.len() - 2]).expect("error event");
    assert!(err["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("shutting down")));
}
