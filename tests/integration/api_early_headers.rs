//! A streamed request for a model that is not loaded yet gets its response headers at once,
//! before the load ends (so a gateway's first-byte timeout does not fire during a cold
//! start), and the body is still exactly the dialect's stream: NDJSON objects on
//! `/api/chat`, SSE events ending in `[DONE]` on `/v1/chat/completions`. A load that fails
//! after the headers went out ends the stream with the dialect's error item; unknown
//! models are still refused with a 404 before anything streams.

use crate::api_common;
use crate::common;

use std::time::{Duration, Instant};

use crate::api_common::{config, import, ndjson_lines, spawn_server, store_dir};
use futures_util::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "qwen:0.5b";

async fn loaded(base: &str) -> Vec<String> {
    api_common::ps(base)
        .await
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_string))
        .collect()
}

async fn unload(base: &str) {
    let start = Instant::now();
    // The last request may still hold the model for a moment after its stream ended.
    loop {
        let resp = reqwest::Client::new()
            .post(format!("{base}/api/generate"))
            .json(&json!({"model": MODEL, "keep_alive": 0}))
            .send()
            .await
            .expect("unload");
        assert_eq!(resp.status(), 200);
        if loaded(base).await.is_empty() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never unloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn headers_go_out_before_a_cold_model_loads() {
    let dir = store_dir("early-headers");
    import(&dir, MODEL, &common::test_model(common::QWEN_GGUF));
    // A model whose header reads but whose weights are cut short: its load fails late.
    let whole = std::fs::read(common::test_model(common::SMOLLM2_GGUF)).expect("GGUF");
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &whole[..whole.len() / 3]).expect("writing the cut GGUF");
    import(&dir, "broken:1", &cut);
    let (addr, _) = spawn_server(config(
        dir.clone(),
        &[("WICK_KV_CACHE_BYTES", &(64usize << 20).to_string())],
    ));
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let chat = |model: &str| {
        json!({"model": model, "messages": [{"role": "user", "content": "Say hi."}],
               "options": {"num_predict": 4, "temperature": 0}})
    };

    // Ollama dialect.
    let t0 = Instant::now();
    let resp = client
        .post(format!("{base}/api/chat"))
        .json(&chat(MODEL))
        .send()
        .await
        .expect("chat");
    let headers_at = t0.elapsed();
    assert_eq!(resp.status(), 200);
    let lines = ndjson_lines(resp).await;
    let done = lines.last().expect("final object");
    assert_eq!(done["done"], true, "{lines:?}");
    let load = Duration::from_nanos(done["load_duration"].as_u64().expect("load_duration"));
    assert!(
        load > Duration::from_millis(50) && headers_at < load / 2,
        "headers after {headers_at:?}, the load took {load:?}"
    );
    assert!(lines[..lines.len() - 1]
        .iter()
        .all(|l| l["done"] == false && l["message"]["role"] == "assistant"));

    // OpenAI dialect, cold again.
    unload(&base).await;
    let t0 = Instant::now();
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": MODEL, "stream": true, "max_tokens": 4,
                      "messages": [{"role": "user", "content": "Say hi."}]}))
        .send()
        .await
        .expect("chat completions");
    let headers_at = t0.elapsed();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first event").expect("body");
    let first_at = t0.elapsed();
    assert!(
        headers_at < load / 2 && first_at > load / 2,
        "headers after {headers_at:?}, first event after {first_at:?}, a load takes {load:?}"
    );
    let mut text = String::from_utf8(first.to_vec()).expect("utf-8");
    while let Some(chunk) = body.next().await {
        text.push_str(std::str::from_utf8(&chunk.expect("body")).expect("utf-8"));
    }
    let events: Vec<String> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data event").to_string())
        .collect();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("event JSON");
        assert_eq!(v["object"], "chat.completion.chunk", "{v}");
    }

    // A load that fails after the headers: the stream's own error item.
    let resp = client
        .post(format!("{base}/api/chat"))
        .json(&chat("broken:1"))
        .send()
        .await
        .expect("chat");
    assert_eq!(resp.status(), 200);
    let lines = ndjson_lines(resp).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let err = lines[0]["error"].as_str().expect("an error line");
    assert!(err.contains("loading the model"), "{err}");

    // Unknown models are refused before anything streams.
    let resp = client
        .post(format!("{base}/api/chat"))
        .json(&chat("nosuch:1"))
        .send()
        .await
        .expect("chat");
    assert_eq!(resp.status(), 404);
    let _ = std::fs::remove_dir_all(&dir);
}
