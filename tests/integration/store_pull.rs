//! The store's write side over real HTTP: `/api/pull` from a registry on loopback
//! (tests/integration/common/registry.rs) that serves the real SmolLM2 GGUF with `Range`,
//! redirects, dropped connections, stalls and corruption; resuming interrupted pulls; two
//! `wick serve` processes pulling into one directory; a store laid out by hand exactly as
//! Ollama writes it; and `/api/blobs`, `/api/create`, `/api/copy`, `/api/delete`.

use crate::api_common;
use crate::common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::api_common::{
    assert_store_clean, blob_files, config, ok_lines, post, pull, sha, store_dir, tags, WickProcess,
};
use crate::common::registry::{Faults, TestRegistry};
use axum::body::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};

const QUESTION: &str = "What is the capital of Germany?";
/// The Go template Ollama's library ships for SmolLM2-style ChatML models (shortened).
const GO_TEMPLATE: &str = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";
const PARAMS: &str = r#"{"stop":["<|im_start|>","<|im_end|>"],"temperature":0}"#;

fn gguf() -> Bytes {
    static GGUF: OnceLock<Bytes> = OnceLock::new();
    GGUF.get_or_init(|| {
        let path = common::test_model(common::SMOLLM2_GGUF);
        Bytes::from(std::fs::read(path).expect("reading the SmolLM2 GGUF"))
    })
    .clone()
}

fn gguf_digest() -> String {
    static D: OnceLock<String> = OnceLock::new();
    D.get_or_init(|| sha(&gguf())).clone()
}

/// An empty scratch store under cargo's target tmp dir.
fn scratch(tag: &str) -> PathBuf {
    store_dir(&format!("pull-{tag}"))
}

/// `wick serve`'s router in this process; its base URL.
fn spawn_server(models: &Path) -> String {
    let settings = [("WICK_KV_CACHE_BYTES", "268435456")];
    let (addr, _) = api_common::spawn_server(config(models.to_path_buf(), &settings));
    format!("http://{addr}")
}

fn spawn_wick(models: &Path) -> WickProcess {
    WickProcess::start(models, &[])
}

fn publish_smollm2(reg: &TestRegistry) -> Vec<u8> {
    reg.add_model(
        "library/smollm2",
        "135m",
        gguf(),
        &[
            ("template", GO_TEMPLATE.as_bytes()),
            ("params", PARAMS.as_bytes()),
        ],
    )
}

fn layer_lines<'a>(lines: &'a [Value], digest: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["digest"] == digest).collect()
}

async fn chat_answer(base: &str, model: &str) -> String {
    let resp = post(
        base,
        "/api/chat",
        json!({"model": model, "stream": false,
               "messages": [{"role": "user", "content": QUESTION}],
               "options": {"temperature": 0, "num_predict": 30}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("chat JSON");
    v["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn pull_through_a_redirect_then_list_and_chat() {
    let reg = TestRegistry::start(true);
    let manifest = publish_smollm2(&reg);
    let dir = scratch("redirect");
    let base = spawn_server(&dir);
    let name = format!("{}/library/smollm2:135m", reg.host);

    // `name` is the field ollama-js sends.
    let lines = pull(&base, json!({"name": name, "insecure": true})).await;
    assert_eq!(lines[0], json!({"status": "pulling manifest"}), "{lines:?}");
    let n = lines.len();
    assert_eq!(
        lines[n - 3..],
        [
            json!({"status": "verifying sha256 digest"}),
            json!({"status": "writing manifest"}),
            json!({"status": "success"})
        ],
        "{lines:?}"
    );
    let d = gguf_digest();
    let total = gguf().len() as u64;
    let model_lines = layer_lines(&lines, &d);
    assert_eq!(
        *model_lines[0],
        json!({"status": format!("pulling {}", &d[7..19]), "digest": d, "total": total})
    );
    let completed: Vec<u64> = model_lines
        .iter()
        .map(|l| l["completed"].as_u64().unwrap_or(0))
        .collect();
    assert!(completed.windows(2).all(|w| w[0] <= w[1]), "{completed:?}");
    assert_eq!(completed.last(), Some(&total));
    // Every layer and the config, each reported, each served exactly once (via the
    // redirect to the second host).
    let m: Value = serde_json::from_slice(&manifest).unwrap();
    let mut digests: Vec<String> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    digests.push(m["config"]["digest"].as_str().unwrap().to_string());
    for (i, dg) in digests.iter().enumerate() {
        let first = lines.iter().position(|l| l["digest"] == *dg);
        assert!(first.is_some(), "no progress for {dg}");
        if i > 0 {
            let prev = lines.iter().position(|l| l["digest"] == digests[i - 1]);
            assert!(prev < first, "layers in manifest order, then the config");
        }
        let size = reg_size(&m, dg);
        assert_eq!(reg.served(dg), size, "{dg} served once");
    }
    assert!(
        reg.gets(&d) >= 2,
        "ranged requests went through the redirect"
    );

    // The manifest is stored verbatim; nothing partial is left.
    let stored = std::fs::read(
        dir.join("manifests")
            .join(&reg.host)
            .join("library/smollm2/135m"),
    )
    .expect("manifest file");
    assert_eq!(stored, manifest);
    assert_store_clean(&dir);
    assert_eq!(blob_files(&dir).len(), 4);

    let listed = tags(&base).await;
    let entry = listed
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {listed:?}"));
    assert_eq!(entry["digest"], sha(&manifest)[7..]);
    assert_eq!(entry["details"]["family"], "llama");
    let answer = chat_answer(&base, &name).await;
    assert!(answer.contains("Berlin"), "{answer}");

    // Pulling again re-reads the manifest and downloads nothing.
    let served = reg.served(&d);
    let resp = post(
        &base,
        "/api/pull",
        json!({"model": name, "insecure": true, "stream": false}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"status": "success"})
    );
    assert_eq!(reg.served(&d), served);
    let _ = std::fs::remove_dir_all(&dir);
}

fn reg_size(manifest: &Value, digest: &str) -> u64 {
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(std::iter::once(&manifest["config"]))
        .find(|l| l["digest"] == digest)
        .and_then(|l| l["size"].as_u64())
        .unwrap()
}

#[tokio::test]
async fn unknown_models_bad_names_and_plain_http() {
    let reg = TestRegistry::start(false);
    publish_smollm2(&reg);
    let dir = scratch("errors");
    let base = spawn_server(&dir);

    let missing = format!("{}/library/nope:1", reg.host);
    let lines = pull(&base, json!({"model": missing, "insecure": true})).await;
    assert_eq!(
        lines,
        [
            json!({"status": "pulling manifest"}),
            json!({"error": "pull model manifest: file does not exist"})
        ]
    );
    let resp = post(
        &base,
        "/api/pull",
        json!({"model": missing, "insecure": true, "stream": false}),
    )
    .await;
    assert_eq!(resp.status(), 500);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error": "pull model manifest: file does not exist"})
    );

    for bad in ["../../etc/passwd", "a/b/c/d", ""] {
        for (path, body) in [
            ("/api/pull", json!({"model": bad})),
            ("/api/create", json!({"model": bad, "from": "x"})),
        ] {
            let resp = post(&base, path, body).await;
            assert_eq!(resp.status(), 400, "{path} {bad:?}");
            assert_eq!(
                resp.json::<Value>().await.unwrap(),
                json!({"error": "invalid model name"})
            );
        }
        let resp = reqwest::Client::new()
            .delete(format!("{base}/api/delete"))
            .json(&json!({"model": bad}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "delete {bad:?}");
    }

    // Plain HTTP needs `insecure`; without it the registry is spoken to over TLS, which
    // this one does not speak.
    let name = format!("{}/library/smollm2:135m", reg.host);
    let lines = pull(&base, json!({"model": format!("http://{name}")})).await;
    assert!(
        lines.last().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("insecure"),
        "{lines:?}"
    );
    let lines = pull(&base, json!({"model": name})).await;
    assert!(lines.last().unwrap()["error"].is_string(), "{lines:?}");
    assert_eq!(reg.served(&gguf_digest()), 0);
    assert!(tags(&base).await.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_dropped_connection_is_continued_within_the_pull() {
    let reg = TestRegistry::start(false);
    publish_smollm2(&reg);
    reg.set_faults(Faults {
        drop_once_after: Some(5 << 20),
        ..Faults::default()
    });
    let dir = scratch("drop");
    let base = spawn_server(&dir);
    let name = format!("{}/library/smollm2:135m", reg.host);
    let lines = pull(&base, json!({"model": name, "insecure": true})).await;
    assert_eq!(
        lines.last().unwrap(),
        &json!({"status": "success"}),
        "{lines:?}"
    );
    let total = gguf().len() as u64;
    let served = reg.served(&gguf_digest());
    // Continued with Range from where the connection broke, not from the start.
    assert!(
        served >= total && served < total + (5 << 20),
        "served {served} of {total}"
    );
    assert_store_clean(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_interrupted_pull_resumes_where_it_stopped() {
    let reg = TestRegistry::start(true);
    publish_smollm2(&reg);
    let total = gguf().len() as u64;
    let d = gguf_digest();
    // The registry sends half of the weights, then goes quiet.
    reg.set_faults(Faults {
        limit: Some(total / 2),
        stall_at_limit: true,
        ..Faults::default()
    });
    let dir = scratch("resume");
    let base = spawn_server(&dir);
    let name = format!("{}/library/smollm2:135m", reg.host);

    let resp = post(&base, "/api/pull", json!({"model": name, "insecure": true})).await;
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut seen = 0;
    'read: while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.expect("chunk"));
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Value = serde_json::from_slice(&buf[..nl]).expect("line");
            buf.drain(..=nl);
            assert!(line.get("error").is_none(), "{line}");
            if line["digest"] == d {
                seen = line["completed"].as_u64().unwrap_or(0);
                if seen >= total * 2 / 5 {
                    break 'read;
                }
            }
        }
    }
    assert!(seen >= total * 2 / 5, "progress reached {seen}");
    // The client goes away: the pull stops and keeps what it has.
    drop(body);
    let hex = &d[7..];
    let partial = dir.join("blobs").join(format!("sha256-{hex}-partial"));
    let start = Instant::now();
    while !blob_files(&dir)
        .iter()
        .any(|f| f.ends_with("-partial.json"))
    {
        assert!(start.elapsed() < Duration::from_secs(10), "no resume state");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(partial.is_file());
    assert!(!dir.join("blobs").join(format!("sha256-{hex}")).exists());
    assert!(
        tags(&base).await.is_empty(),
        "no manifest before the blobs are complete"
    );
    let first = reg.served(&d);

    reg.set_faults(Faults::default());
    reg.reset_counts();
    let lines = pull(&base, json!({"model": name, "insecure": true})).await;
    assert_eq!(
        lines.last().unwrap(),
        &json!({"status": "success"}),
        "{lines:?}"
    );
    let second = reg.served(&d);
    assert!(
        second <= total - total * 7 / 20,
        "the second pull fetched {second} of {total} bytes (first: {first})"
    );
    assert!(second + first >= total);
    assert!(!partial.exists());
    assert_store_clean(&dir);
    assert_eq!(tags(&base).await.len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_corrupt_blob_is_rejected_and_not_kept() {
    let reg = TestRegistry::start(false);
    publish_smollm2(&reg);
    reg.set_faults(Faults {
        corrupt: true,
        ..Faults::default()
    });
    let dir = scratch("corrupt");
    let base = spawn_server(&dir);
    let name = format!("{}/library/smollm2:135m", reg.host);
    let lines = pull(&base, json!({"model": name, "insecure": true})).await;
    let err = lines.last().unwrap()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let d = gguf_digest();
    assert!(
        err.starts_with(&format!(
            "digest mismatch, file must be downloaded again: want {d}, got sha256:"
        )),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l["status"] == "success"));
    assert!(
        !blob_files(&dir).iter().any(|f| f.contains(&d[7..])),
        "{:?}",
        blob_files(&dir)
    );
    assert_store_clean(&dir);
    assert!(tags(&base).await.is_empty());

    reg.set_faults(Faults::default());
    let lines = pull(&base, json!({"model": name, "insecure": true})).await;
    assert_eq!(lines.last().unwrap(), &json!({"status": "success"}));
    assert_store_clean(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn concurrent_pulls_in_two_processes_download_each_blob_once() {
    let reg = TestRegistry::start(true);
    let manifest = publish_smollm2(&reg);
    let dir = scratch("two-procs");
    let a = spawn_wick(&dir);
    let b = spawn_wick(&dir);
    let name = format!("{}/library/smollm2:135m", reg.host);
    // Hold every blob until all three pulls are under way.
    reg.set_gate(false);
    let body = json!({"model": name, "insecure": true});
    let pulls: Vec<_> = [&a.base, &a.base, &b.base]
        .into_iter()
        .map(|base| tokio::spawn(pull_owned(base.clone(), body.clone())))
        .collect();
    let start = Instant::now();
    while reg.manifest_gets() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "pulls did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    reg.set_gate(true);
    let total = gguf().len() as u64;
    for p in pulls {
        let lines = p.await.expect("pull task");
        assert_eq!(
            lines.last().unwrap(),
            &json!({"status": "success"}),
            "{lines:?}"
        );
        let last = layer_lines(&lines, &gguf_digest());
        assert_eq!(last.last().unwrap()["completed"], total);
    }
    let m: Value = serde_json::from_slice(&manifest).unwrap();
    for l in m["layers"].as_array().unwrap().iter().chain([&m["config"]]) {
        let dg = l["digest"].as_str().unwrap();
        assert_eq!(
            reg.served(dg),
            l["size"].as_u64().unwrap(),
            "{dg} downloaded once"
        );
    }
    assert_store_clean(&dir);
    assert_eq!(blob_files(&dir).len(), 4);
    for base in [&a.base, &b.base] {
        let listed = tags(base).await;
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0]["digest"], sha(&manifest)[7..]);
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

async fn pull_owned(base: String, body: Value) -> Vec<Value> {
    pull(&base, body).await
}

/// Lays out a store by hand exactly as Ollama writes one: GGUF, template, system,
/// params and license layers, config blob, manifest under registry.ollama.ai/library.
fn ollama_layout(dir: &Path) -> Vec<u8> {
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = sha(bytes);
        std::fs::write(blobs.join(d.replace(':', "-")), bytes).unwrap();
        json!({"digest": d, "size": bytes.len()})
    };
    let layer = |media: &str, bytes: &[u8]| {
        let mut l = put(bytes);
        l["mediaType"] = format!("application/vnd.ollama.image.{media}").into();
        l
    };
    let config = br#"{"model_format":"gguf","model_family":"llama","model_families":["llama"],"model_type":"135M","file_type":"Q4_1","architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let mut cfg = put(config);
    cfg["mediaType"] = "application/vnd.docker.container.image.v1+json".into();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": cfg,
        "layers": [
            layer("model", &gguf()),
            layer("template", GO_TEMPLATE.as_bytes()),
            layer("system", b"You answer geography questions in one short sentence."),
            layer("params", PARAMS.as_bytes()),
            layer("license", b"Apache License 2.0"),
        ],
    }))
    .unwrap();
    let mdir = dir.join("manifests/registry.ollama.ai/library/smollm2");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(mdir.join("135m"), &manifest).unwrap();
    manifest
}

#[tokio::test]
async fn a_store_written_by_ollama_is_listed_and_served() {
    let dir = scratch("ollama-layout");
    let manifest = ollama_layout(&dir);
    let base = spawn_server(&dir);
    let listed = tags(&base).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let t = &listed[0];
    assert_eq!(t["name"], "smollm2:135m");
    assert_eq!(t["digest"], sha(&manifest)[7..]);
    assert_eq!(t["details"]["parameter_size"], "135M");
    assert_eq!(t["details"]["quantization_level"], "Q4_1");

    let show: Value = post(&base, "/api/show", json!({"model": "smollm2:135m"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(show["template"], GO_TEMPLATE);
    assert_eq!(show["license"], "Apache License 2.0");
    assert!(show["system"]
        .as_str()
        .unwrap()
        .starts_with("You answer geography"));
    assert!(
        show["parameters"].as_str().unwrap().contains("stop"),
        "{show}"
    );
    let answer = chat_answer(&base, "smollm2:135m").await;
    assert!(answer.contains("Berlin"), "{answer}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn blobs_create_copy_and_delete() {
    let dir = scratch("create");
    let base = spawn_server(&dir);
    let http = reqwest::Client::new();
    let d = gguf_digest();
    let blob_url = |digest: &str| format!("{base}/api/blobs/{digest}");

    let r = http.head(blob_url("sha256:xyz")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(blob_url("md5:00"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "invalid digest format"})
    );
    assert_eq!(http.head(blob_url(&d)).send().await.unwrap().status(), 404);

    let r = http
        .post(blob_url(&d))
        .body("not the model")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": format!("digest mismatch, expected \"{d}\", got \"{}\"", sha(b"not the model"))})
    );
    assert!(blob_files(&dir).is_empty(), "{:?}", blob_files(&dir));

    let r = http.post(blob_url(&d)).body(gguf()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(http.head(blob_url(&d)).send().await.unwrap().status(), 200);
    let r = http
        .post(blob_url(&d.replace(':', "-")))
        .body(gguf())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "already there");

    let lines = ok_lines(
        post(
            &base,
            "/api/create",
            json!({"model": "mine:1", "files": {"smol.gguf": d},
                   "template": GO_TEMPLATE, "system": "Be brief.", "license": "MIT",
                   "parameters": {"temperature": 0.1, "stop": "<|im_end|>"}}),
        )
        .await,
    )
    .await;
    let statuses: Vec<&str> = lines.iter().filter_map(|l| l["status"].as_str()).collect();
    assert_eq!(statuses[0], "parsing GGUF", "{lines:?}");
    assert!(
        statuses.contains(&format!("using existing layer {d}").as_str()),
        "{statuses:?}"
    );
    assert!(statuses
        .iter()
        .any(|s| s.starts_with("creating new layer sha256:")));
    assert_eq!(
        statuses[statuses.len() - 2..],
        ["writing manifest", "success"]
    );

    let show: Value = post(&base, "/api/show", json!({"model": "mine:1"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(show["system"], "Be brief.");
    assert_eq!(show["license"], "MIT");
    assert_eq!(show["template"], GO_TEMPLATE);
    assert_eq!(show["details"]["family"], "llama");
    assert_eq!(show["details"]["quantization_level"], "Q4_1");
    let params = show["parameters"].as_str().unwrap();
    assert!(
        params.contains("temperature") && params.contains("<|im_end|>"),
        "{params}"
    );

    let r = post(
        &base,
        "/api/create",
        json!({"model": "mine:2", "from": "mine:1", "system": "Be verbose.", "stream": false}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"status": "success"})
    );
    let show2: Value = post(&base, "/api/show", json!({"model": "mine:2"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(show2["system"], "Be verbose.");
    assert_eq!(show2["template"], GO_TEMPLATE);
    assert_eq!(show2["parameters"], show["parameters"]);

    let r = post(&base, "/api/create", json!({"model": "x", "from": "nope"})).await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "model \"nope\" not found"})
    );
    let r = post(&base, "/api/create", json!({"model": "x"})).await;
    assert_eq!(r.status(), 400);

    let r = post(
        &base,
        "/api/copy",
        json!({"source": "mine:1", "destination": "copied"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");
    let r = post(
        &base,
        "/api/copy",
        json!({"source": "nope", "destination": "x"}),
    )
    .await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "model \"nope\" not found"})
    );
    let r = post(
        &base,
        "/api/copy",
        json!({"source": "mine:1", "destination": "a/b/c/d"}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "destination \"a/b/c/d\" is invalid"})
    );
    let names: Vec<String> = tags(&base)
        .await
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.contains(&"copied:latest".to_string()));

    let delete = |model: &str| {
        http.delete(format!("{base}/api/delete"))
            .json(&json!({"model": model}))
            .send()
    };
    let model_blob = dir.join("blobs").join(d.replace(':', "-"));
    assert_eq!(delete("copied").await.unwrap().status(), 200);
    assert_eq!(delete("mine:1").await.unwrap().status(), 200);
    assert!(model_blob.exists(), "mine:2 still uses the weights");
    let r = delete("mine:1").await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "model 'mine:1' not found"})
    );
    assert_eq!(delete("mine:2").await.unwrap().status(), 200);
    assert!(!model_blob.exists());
    assert!(blob_files(&dir).is_empty(), "{:?}", blob_files(&dir));
    assert!(tags(&base).await.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_killed_server_leaves_a_pull_the_next_one_continues() {
    let reg = TestRegistry::start(false);
    publish_smollm2(&reg);
    let total = gguf().len() as u64;
    let d = gguf_digest();
    reg.set_faults(Faults {
        limit: Some(total / 2),
        stall_at_limit: true,
        ..Faults::default()
    });
    let dir = scratch("killed");
    let mut a = spawn_wick(&dir);
    let name = format!("{}/library/smollm2:135m", reg.host);
    let pulling = tokio::spawn(pull_owned(
        a.base.clone(),
        json!({"model": name, "insecure": true}),
    ));
    // Wait until the saved state vouches for at least 40% of the weights, then SIGKILL.
    let state = dir
        .join("blobs")
        .join(format!("sha256-{}-partial.json", &d[7..]));
    let start = Instant::now();
    loop {
        let saved: u64 = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| {
                v["parts"]
                    .as_array()
                    .map(|ps| ps.iter().filter_map(|p| p["completed"].as_u64()).sum())
            })
            .unwrap_or(0);
        if saved >= total * 2 / 5 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "saved {saved}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.kill();
    let _ = pulling.await;
    let first = reg.served(&d);

    reg.set_faults(Faults::default());
    reg.reset_counts();
    let b = spawn_wick(&dir);
    let lines = pull(&b.base, json!({"model": name, "insecure": true})).await;
    assert_eq!(
        lines.last().unwrap(),
        &json!({"status": "success"}),
        "{lines:?}"
    );
    let second = reg.served(&d);
    assert!(
        second <= total - total * 7 / 20,
        "after the kill the pull fetched {second} of {total} bytes (first: {first})"
    );
    assert_store_clean(&dir);
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_unwritable_store_fails_cleanly() {
    let reg = TestRegistry::start(false);
    publish_smollm2(&reg);
    let dir = scratch("unwritable");
    // `blobs` is a file, so nothing can be created under it (running as root, permission
    // bits would not stop us).
    std::fs::write(dir.join("blobs"), b"in the way").unwrap();
    let base = spawn_server(&dir);
    let name = format!("{}/library/smollm2:135m", reg.host);
    let lines = pull(&base, json!({"model": name, "insecure": true})).await;
    let err = lines.last().unwrap()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("blobs") && err.contains("os error"),
        "{lines:?}"
    );
    assert!(!dir.join("manifests").exists(), "no manifest without blobs");
    assert_eq!(std::fs::read(dir.join("blobs")).unwrap(), b"in the way");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn pulling_a_changed_tag_removes_the_layers_it_no_longer_uses() {
    let reg = TestRegistry::start(false);
    let v1 = reg.add_model(
        "library/smollm2",
        "135m",
        gguf(),
        &[("template", b"old {{ .Prompt }}")],
    );
    let dir = scratch("update");
    let base = spawn_server(&dir);
    let name = format!("{}/library/smollm2:135m", reg.host);
    let lines = pull(&base, json!({"model": name, "insecure": true})).await;
    assert_eq!(lines.last().unwrap(), &json!({"status": "success"}));
    assert!(!lines
        .iter()
        .any(|l| l["status"] == "removing unused layers"));

    let v2 = reg.add_model(
        "library/smollm2",
        "135m",
        gguf(),
        &[("template", b"new {{ .Prompt }}")],
    );
    assert_ne!(v1, v2);
    let served = reg.served(&gguf_digest());
    let lines = pull(&base, json!({"model": name, "insecure": true})).await;
    let statuses: Vec<&str> = lines.iter().filter_map(|l| l["status"].as_str()).collect();
    let n = statuses.len();
    assert_eq!(
        statuses[n - 3..],
        ["writing manifest", "removing unused layers", "success"],
        "{lines:?}"
    );
    // The weights were already there: one complete line, nothing downloaded.
    let d = gguf_digest();
    let weights = layer_lines(&lines, &d);
    assert_eq!(weights.len(), 1);
    assert_eq!(weights[0]["completed"], gguf().len() as u64);
    assert_eq!(reg.served(&d), served);
    let blobs = dir.join("blobs");
    assert!(!blobs
        .join(sha(b"old {{ .Prompt }}").replace(':', "-"))
        .exists());
    assert!(blobs
        .join(sha(b"new {{ .Prompt }}").replace(':', "-"))
        .exists());
    assert!(blobs.join(d.replace(':', "-")).exists());
    let show: Value = post(&base, "/api/show", json!({"model": name}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(show["template"], "new {{ .Prompt }}");
    let _ = std::fs::remove_dir_all(&dir);
}
