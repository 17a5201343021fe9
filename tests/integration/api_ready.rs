//! `WICK_PRELOAD` and `GET /api/ready` on a real `wick serve` process: the port answers
//! liveness (`/`) at once, readiness is 503 (naming what it waits for) until every
//! preloaded model is loaded and 200 after, the models are then loaded for good, and a
//! preload that cannot succeed leaves readiness failing with the reason.

use crate::common;

use std::time::{Duration, Instant};

use crate::api_common::{import, store_dir, WickProcess};
use serde_json::Value;

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

#[tokio::test]
async fn ready_after_the_preloaded_models_load() {
    let dir = store_dir("ready");
    import(&dir, "qwen:0.5b", &common::test_model(common::QWEN_GGUF));
    import(&dir, "smol:135m", &common::test_model(common::SMOLLM2_GGUF));
    let wick = WickProcess::start(
        &dir,
        &[
            ("WICK_PRELOAD", "qwen:0.5b,smol:135m"),
            ("WICK_API_KEYS", "secret"),
        ],
    );
    let base = &wick.base;
    let start = Instant::now();
    let mut seen_loading = Vec::new();
    loop {
        // Probes carry no key: both routes stay open.
        let (live, text) = get(&format!("{base}/")).await;
        assert_eq!((live, text.as_str()), (200, "Ollama is running"));
        let (status, body) = get(&format!("{base}/api/ready")).await;
        let v: Value = serde_json::from_str(&body).expect("readiness JSON");
        if status == 200 {
            assert_eq!(v["status"], "ready");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert_eq!(v["status"], "loading", "{body}");
        seen_loading.push(v["waiting_for"].clone());
        assert!(start.elapsed() < Duration::from_secs(120), "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !seen_loading.is_empty(),
        "readiness was 503 while the models loaded"
    );
    assert_eq!(
        seen_loading[0],
        serde_json::json!(["qwen:0.5b", "smol:135m"])
    );
    // Both are loaded now, and kept: the expiry is the far future.
    let ps: Value = reqwest::Client::new()
        .get(format!("{base}/api/ps"))
        .bearer_auth("secret")
        .send()
        .await
        .expect("ps")
        .json()
        .await
        .expect("ps JSON");
    let models = ps["models"].as_array().expect("models");
    let mut names: Vec<&str> = models.iter().filter_map(|m| m["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["qwen:0.5b", "smol:135m"]);
    for m in models {
        let expires = m["expires_at"].as_str().expect("expires_at");
        let year: i32 = expires[..4].parse().expect("year");
        assert!(year > 2200, "kept loaded: {expires}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_failed_preload_keeps_readiness_failing() {
    let dir = store_dir("ready-fail");
    let wick = WickProcess::start(&dir, &[("WICK_PRELOAD", "nope:1")]);
    let start = Instant::now();
    loop {
        let (status, body) = get(&format!("{}/api/ready", wick.base)).await;
        assert_eq!(status, 503, "{body}");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        if v["status"] == "failed" {
            let e = v["error"].as_str().expect("error");
            assert!(e.contains("nope:1") && e.contains("not found"), "{e}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still alive, and still serving what it can.
    assert_eq!(get(&format!("{}/", wick.base)).await.0, 200);
    assert_eq!(get(&format!("{}/api/tags", wick.base)).await.0, 200);
    let _ = std::fs::remove_dir_all(&dir);
}
