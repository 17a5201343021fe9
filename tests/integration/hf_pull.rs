//! Hugging Face safetensors pulls over real HTTP against a Hub on loopback
//! (tests/integration/common/hub.rs): the real SmolLM2 weights as a sharded safetensors
//! repository pulled as `hf.co/<user>/<repo>`, listed, shown, chatted with, copied, built
//! on with `/api/create` and deleted; a pull interrupted mid-shard that resumes; a corrupt
//! shard refused; catalog entries from a user catalog directory (always, fallback on a 404
//! or an unreachable registry, the registry winning when it has the name); a gated
//! repository with and without `HF_TOKEN`; and hf-hub's own client downloading from the
//! loopback Hub, which pins the Hub down.

use crate::api_common;
use crate::common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::api_common::{assert_store_clean, blob_files, config, post, pull, sha, store_dir, tags};
use crate::common::hub::{is_lfs, HubFaults, TestHub};
use crate::common::registry::TestRegistry;
use axum::body::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};

const REPO: &str = "testorg/SmolLM2-135M-Instruct";
const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

/// SmolLM2-135M-Instruct as its Hugging Face repository holds it, made from the real test
/// GGUF: its weights converted to f32 safetensors and split into two shards with an index,
/// its tokenizer (rebuilt from the GGUF) as tokenizer.json, and tokenizer_config.json with
/// its chat template.
struct Smol {
    files: Vec<(String, Bytes)>,
    parameters: u64,
    template: String,
}

fn smol() -> &'static Smol {
    static SMOL: OnceLock<Smol> = OnceLock::new();
    SMOL.get_or_init(build_smol)
}

fn build_smol() -> Smol {
    let gguf = common::test_model(common::SMOLLM2_GGUF);
    let hf = common::test_gguf_hf_dir(common::SMOLLM2_GGUF, None);
    let mut file = std::fs::File::open(&gguf).expect("opening the GGUF");
    let ct = candle_core::quantized::gguf_file::Content::read(&mut file).expect("GGUF header");
    let template = ct.metadata["tokenizer.chat_template"]
        .to_string()
        .expect("chat template")
        .clone();
    let tok_dir = common::ScratchDir::new("hf-smol-tok");
    candlewick::model::Tokenizer::from_gguf(&ct.metadata)
        .expect("tokenizer from GGUF")
        .save(&tok_dir.path().join("tokenizer.json"))
        .expect("saving the tokenizer");
    let tokenizer = std::fs::read(tok_dir.path().join("tokenizer.json")).expect("tokenizer");
    let tokenizer_config = json!({
        "add_bos_token": false, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer", "chat_template": template,
    });

    let weights = std::fs::read(hf.join("model.safetensors")).expect("converted weights");
    let st = safetensors::SafeTensors::deserialize(&weights).expect("safetensors");
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let total: usize = tensors.iter().map(|(_, t)| t.data().len()).sum();
    let parameters: u64 = tensors
        .iter()
        .map(|(_, t)| t.shape().iter().product::<usize>() as u64)
        .sum();
    let mut shards: [Vec<(String, safetensors::tensor::TensorView)>; 2] = [vec![], vec![]];
    let mut weight_map = serde_json::Map::new();
    let mut so_far = 0;
    for (name, view) in tensors {
        let i = usize::from(so_far >= total / 2);
        so_far += view.data().len();
        weight_map.insert(name.clone(), json!([SHARD1, SHARD2][i]));
        shards[i].push((name, view));
    }
    let meta = Some([("format".to_string(), "pt".to_string())].into());
    let [a, b] = shards.map(|s| {
        Bytes::from(safetensors::tensor::serialize(s, meta.clone()).expect("serializing a shard"))
    });
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let files = vec![
        (
            "README.md".into(),
            Bytes::from_static(b"# SmolLM2 for tests\n"),
        ),
        (
            "config.json".into(),
            Bytes::from(std::fs::read(hf.join("config.json")).unwrap()),
        ),
        (
            "generation_config.json".into(),
            Bytes::from(r#"{"bos_token_id": 1, "eos_token_id": 2}"#),
        ),
        ("tokenizer.json".into(), Bytes::from(tokenizer)),
        (
            "tokenizer_config.json".into(),
            Bytes::from(tokenizer_config.to_string()),
        ),
        (
            "model.safetensors.index.json".into(),
            Bytes::from(index.to_string()),
        ),
        (SHARD1.into(), a),
        (SHARD2.into(), b),
    ];
    Smol {
        files,
        parameters,
        template,
    }
}

fn file<'a>(files: &'a [(String, Bytes)], name: &str) -> &'a Bytes {
    &files
        .iter()
        .find(|(n, _)| n == name)
        .expect("fixture file")
        .1
}

/// The files a pull is expected to store (the README is not part of a model).
fn model_files(files: &[(String, Bytes)]) -> Vec<&(String, Bytes)> {
    files.iter().filter(|(n, _)| n != "README.md").collect()
}

/// `wick serve`'s router in this process with `extra` settings; its base URL.
fn spawn_server(models: &Path, extra: &[(&str, &str)]) -> String {
    let mut settings = vec![("WICK_KV_CACHE_BYTES", "268435456")];
    settings.extend_from_slice(extra);
    let (addr, _) = api_common::spawn_server(config(models.to_path_buf(), &settings));
    format!("http://{addr}")
}

async fn show(base: &str, model: &str) -> Value {
    let resp = post(base, "/api/show", json!({"model": model})).await;
    assert_eq!(resp.status(), 200, "show {model}");
    resp.json().await.expect("show JSON")
}

fn assert_success(lines: &[Value]) {
    let n = lines.len();
    assert!(n >= 4, "{lines:?}");
    assert_eq!(lines[0], json!({"status": "pulling manifest"}), "{lines:?}");
    assert_eq!(
        lines[n - 3..],
        [
            json!({"status": "verifying sha256 digest"}),
            json!({"status": "writing manifest"}),
            json!({"status": "success"})
        ],
        "{lines:?}"
    );
}

fn error_of(lines: &[Value]) -> String {
    assert!(!lines.iter().any(|l| l["status"] == "success"), "{lines:?}");
    lines.last().unwrap()["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error line: {lines:?}"))
        .to_string()
}

/// Each model file of `files` is a layer of manifest `m`, named after it, over its blob.
fn assert_file_layers(m: &Value, files: &[(String, Bytes)]) {
    let layers = m["layers"].as_array().unwrap();
    for (fname, bytes) in model_files(files) {
        let l = layers
            .iter()
            .find(|l| l["name"] == fname.as_str())
            .unwrap_or_else(|| panic!("no layer for {fname} in {m}"));
        assert_eq!(l["digest"], sha(bytes));
        assert_eq!(l["size"], bytes.len() as u64);
        let media = if fname.ends_with(".safetensors") {
            "application/vnd.candlewick.image.safetensors"
        } else {
            "application/vnd.ollama.image.json"
        };
        assert_eq!(l["mediaType"], media, "{fname}");
    }
}

fn manifest_of(models: &Path, rel: &str) -> Value {
    let bytes = std::fs::read(models.join("manifests").join(rel)).expect("manifest file");
    serde_json::from_slice(&bytes).expect("manifest JSON")
}

async fn chat_answer(base: &str, model: &str) -> String {
    let resp = post(
        base,
        "/api/chat",
        json!({"model": model, "stream": false,
               "messages": [{"role": "user", "content": "What is the capital of Germany?"}],
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
async fn a_safetensors_repo_pulls_lists_shows_chats_copies_and_deletes() {
    let smol = smol();
    let hub = TestHub::start();
    hub.add_repo(REPO, smol.files.clone());
    let dir = store_dir("hf-pull");
    let base = spawn_server(&dir, &[("HF_ENDPOINT", &hub.endpoint)]);
    let name = format!("hf.co/{REPO}");

    let lines = pull(&base, json!({"model": name})).await;
    assert_success(&lines);
    // One progress stream per file: LFS files start without `completed` and end complete;
    // files kept in git are one complete line.
    for (fname, bytes) in model_files(&smol.files) {
        let d = sha(bytes);
        let mine: Vec<&Value> = lines.iter().filter(|l| l["digest"] == d).collect();
        let total = bytes.len() as u64;
        assert!(!mine.is_empty(), "no progress for {fname}");
        assert_eq!(mine[0]["status"], format!("pulling {}", &d[7..19]));
        assert_eq!(mine[0]["total"], total, "{fname}");
        assert_eq!(mine.last().unwrap()["completed"], total, "{fname}");
        if is_lfs(fname, bytes.len()) {
            assert!(mine[0].get("completed").is_none(), "{fname}: {:?}", mine[0]);
        }
    }
    // Every file was downloaded once, shards straight from the CDN.
    for shard in [SHARD1, SHARD2] {
        let b = file(&smol.files, shard);
        assert_eq!(hub.served_lfs(b), b.len() as u64, "{shard}");
    }
    assert_eq!(hub.served_file("README.md"), 0);

    // One manifest in Ollama's layout, each file a named layer over its blob.
    let m = manifest_of(&dir, &format!("hf.co/{REPO}/latest"));
    let layers = m["layers"].as_array().unwrap();
    assert_file_layers(&m, &smol.files);
    assert_eq!(layers.len(), 7, "{m}");
    assert_store_clean(&dir);
    assert_eq!(blob_files(&dir).len(), 8, "seven files and the config");

    let listed = tags(&base).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let t = &listed[0];
    assert_eq!(t["name"], format!("{name}:latest"));
    let params = candlewick::store::human_params(smol.parameters);
    assert_eq!(
        t["details"],
        json!({"parent_model": "", "format": "safetensors", "family": "llama",
               "families": ["llama"], "parameter_size": params, "quantization_level": "F32"})
    );
    let sizes: u64 = layers
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum::<u64>()
        + m["config"]["size"].as_u64().unwrap();
    assert_eq!(t["size"], sizes);

    let s = show(&base, &name).await;
    assert_eq!(s["template"], smol.template.as_str());
    let info = &s["model_info"];
    assert_eq!(info["general.architecture"], "llama");
    assert_eq!(info["general.parameter_count"], smol.parameters);
    assert_eq!(info["llama.context_length"], 8192);
    assert_eq!(info["llama.embedding_length"], 576);
    assert_eq!(info["llama.block_count"], 30);
    assert_eq!(info["llama.attention.head_count_kv"], 3);
    assert_eq!(s["details"]["format"], "safetensors");
    assert!(s["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("completion")));

    let answer = chat_answer(&base, &name).await;
    assert!(answer.contains("Berlin"), "{answer}");
    // The directory of links the model was loaded from is gone again.
    let links = std::env::temp_dir().join(format!("wick-{}", std::process::id()));
    let digest = t["digest"].as_str().unwrap();
    let left: Vec<String> = std::fs::read_dir(&links)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&digest[..12]))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // Pulling again lists the repository again and downloads no weights.
    let served = hub.served_lfs(file(&smol.files, SHARD1));
    let resp = post(&base, "/api/pull", json!({"model": name, "stream": false})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"status": "success"})
    );
    assert_eq!(hub.served_lfs(file(&smol.files, SHARD1)), served);

    // Copy and delete: blobs are shared by the copy and go with the last user.
    let r = post(
        &base,
        "/api/copy",
        json!({"source": name, "destination": "smol-copy"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        show(&base, "smol-copy").await["model_info"],
        s["model_info"]
    );
    let delete = |model: &str| {
        reqwest::Client::new()
            .delete(format!("{base}/api/delete"))
            .json(&json!({"model": model}))
            .send()
    };
    // A model made from it with /api/create keeps its files and adds a layer.
    let r = post(
        &base,
        "/api/create",
        json!({"model": "smol-brief", "from": name, "system": "Be brief.", "stream": false}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let brief = show(&base, "smol-brief").await;
    assert_eq!(brief["system"], "Be brief.");
    assert_eq!(brief["details"], s["details"]);
    assert_eq!(brief["template"], smol.template.as_str());
    assert_eq!(blob_files(&dir).len(), 9);
    assert_eq!(delete(&name).await.unwrap().status(), 200);
    assert_eq!(delete("smol-copy").await.unwrap().status(), 200);
    assert_eq!(blob_files(&dir).len(), 9, "smol-brief keeps every blob");
    assert_eq!(delete("smol-brief").await.unwrap().status(), 200);
    assert!(blob_files(&dir).is_empty(), "{:?}", blob_files(&dir));
    assert!(tags(&base).await.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_pull_interrupted_mid_shard_resumes_and_verifies() {
    let smol = smol();
    let hub = TestHub::start();
    hub.add_repo(REPO, smol.files.clone());
    let shard = file(&smol.files, SHARD1);
    let total = shard.len() as u64;
    let d = sha(shard);
    // The CDN sends half of the first shard, then goes quiet.
    hub.set_faults(HubFaults {
        limit: Some(total / 2),
        stall_at_limit: true,
        ..HubFaults::default()
    });
    let dir = store_dir("hf-resume");
    let base = spawn_server(&dir, &[("HF_ENDPOINT", &hub.endpoint)]);
    let name = format!("hf.co/{REPO}");

    let resp = post(&base, "/api/pull", json!({"model": name})).await;
    let mut body = resp.bytes_stream();
    let (mut buf, mut seen) = (Vec::new(), 0);
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
    let state = dir
        .join("blobs")
        .join(format!("sha256-{}-partial.json", &d[7..]));
    let start = Instant::now();
    while !state.is_file() {
        assert!(start.elapsed() < Duration::from_secs(10), "no resume state");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!dir
        .join("blobs")
        .join(format!("sha256-{}", &d[7..]))
        .exists());
    assert!(
        tags(&base).await.is_empty(),
        "no manifest before the shards are in"
    );
    let first = hub.served_lfs(shard);

    hub.set_faults(HubFaults::default());
    hub.reset_counts();
    let lines = pull(&base, json!({"model": name})).await;
    assert_success(&lines);
    let second = hub.served_lfs(shard);
    assert!(
        second <= total - total * 7 / 20,
        "the second pull fetched {second} of {total} bytes (first: {first})"
    );
    assert!(first + second >= total);
    let other = file(&smol.files, SHARD2);
    assert_eq!(hub.served_lfs(other), other.len() as u64);
    assert_store_clean(&dir);
    assert_eq!(tags(&base).await.len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_corrupt_shard_is_refused_and_nothing_becomes_visible() {
    let smol = smol();
    let hub = TestHub::start();
    hub.add_repo(REPO, smol.files.clone());
    hub.set_faults(HubFaults {
        corrupt: true,
        ..HubFaults::default()
    });
    let dir = store_dir("hf-corrupt");
    let base = spawn_server(&dir, &[("HF_ENDPOINT", &hub.endpoint)]);
    let name = format!("hf.co/{REPO}");
    let lines = pull(&base, json!({"model": name})).await;
    let d = sha(file(&smol.files, SHARD1));
    let err = error_of(&lines);
    assert!(
        err.starts_with(&format!(
            "digest mismatch, file must be downloaded again: want {d}, got sha256:"
        )),
        "{err}"
    );
    assert!(!dir.join("manifests").exists(), "no manifest");
    assert!(
        !blob_files(&dir).iter().any(|f| f.contains(&d[7..])),
        "{:?}",
        blob_files(&dir)
    );
    assert_store_clean(&dir);
    assert!(tags(&base).await.is_empty());

    hub.set_faults(HubFaults::default());
    assert_success(&pull(&base, json!({"model": name})).await);
    assert_store_clean(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn catalog_entries_pull_by_their_short_names() {
    let smol = smol();
    let hub = TestHub::start();
    hub.add_repo(REPO, smol.files.clone());
    hub.add_repo(
        "testorg/just-a-readme",
        vec![("README.md".into(), Bytes::from_static(b"nothing to run"))],
    );
    // A registry that has smollm2:135m (as GGUF) but not smol-fallback.
    let reg = TestRegistry::start(false);
    let gguf = Bytes::from(std::fs::read(common::test_model(common::SMOLLM2_GGUF)).unwrap());
    reg.add_model("library/smollm2", "135m", gguf, &[]);
    // Nothing listens on port 1: that registry cannot be reached.
    let host = &reg.host;
    let catalog = store_dir("hf-catalog-files");
    std::fs::write(
        catalog.join("mine.toml"),
        format!(
            r#"
[[model]]
name = "smol-hf:135m"
repo = "{REPO}"
parameters = {{ temperature = 0, num_ctx = 2048, stop = ["<|im_end|>"] }}

[[model]]
name = "{host}/library/smol-fallback:1"
repo = "{REPO}"
use = "fallback"

[[model]]
name = "{host}/library/smollm2:135m"
repo = "{REPO}"
use = "fallback"

[[model]]
name = "127.0.0.1:1/library/offline:1"
repo = "{REPO}"
use = "fallback"

[[model]]
name = "ghost:1"
repo = "testorg/does-not-exist"
"#
        ),
    )
    .unwrap();
    std::fs::write(catalog.join("README"), "not a catalog file").unwrap();
    let dir = store_dir("hf-catalog");
    let catalog_dir = catalog.display().to_string();
    let base = spawn_server(
        &dir,
        &[
            ("HF_ENDPOINT", &hub.endpoint),
            ("WICK_CATALOG", &catalog_dir),
        ],
    );

    // `use` left out: the entry is used without asking registry.ollama.ai.
    let lines = pull(&base, json!({"model": "smol-hf:135m"})).await;
    assert_success(&lines);
    let m = manifest_of(&dir, "registry.ollama.ai/library/smol-hf/135m");
    let params = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.ollama.image.params")
        .expect("a params layer");
    let d = params["digest"].as_str().unwrap();
    let p: Value = serde_json::from_slice(
        &std::fs::read(dir.join("blobs").join(d.replace(':', "-"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        p,
        json!({"temperature": 0, "num_ctx": 2048, "stop": ["<|im_end|>"]})
    );
    let s = show(&base, "smol-hf:135m").await;
    let shown = s["parameters"].as_str().unwrap();
    assert!(
        shown.contains("num_ctx") && shown.contains("2048"),
        "{shown}"
    );
    assert_eq!(s["details"]["format"], "safetensors");
    assert_eq!(reg.manifest_gets(), 0);
    let listed = tags(&base).await;
    assert_eq!(listed[0]["name"], "smol-hf:135m");

    // `fallback`: the registry does not have it, so the entry's repository gives it; the
    // blobs are already here, so nothing is downloaded again.
    hub.reset_counts();
    let lines = pull(
        &base,
        json!({"model": format!("{host}/library/smol-fallback:1"), "insecure": true}),
    )
    .await;
    assert_success(&lines);
    assert_eq!(reg.manifest_gets(), 1);
    assert_eq!(hub.served_lfs(file(&smol.files, SHARD1)), 0);
    // ...and when the registry cannot be reached at all.
    let lines = pull(
        &base,
        json!({"model": "127.0.0.1:1/library/offline:1", "insecure": true}),
    )
    .await;
    assert_success(&lines);
    // The registry has this one: it wins, as GGUF.
    let name = format!("{host}/library/smollm2:135m");
    let lines = pull(&base, json!({"model": name, "insecure": true})).await;
    assert_success(&lines);
    assert_eq!(show(&base, &name).await["details"]["format"], "gguf");
    assert_eq!(tags(&base).await.len(), 4);

    // Unknown repositories, behind a catalog name or an hf.co name, read as in Ollama.
    for model in ["ghost:1", "hf.co/testorg/nothing-here"] {
        let lines = pull(&base, json!({"model": model})).await;
        assert_eq!(
            lines,
            [
                json!({"status": "pulling manifest"}),
                json!({"error": "pull model manifest: file does not exist"})
            ],
            "{model}"
        );
    }
    let resp = post(
        &base,
        "/api/pull",
        json!({"model": "ghost:1", "stream": false}),
    )
    .await;
    assert_eq!(resp.status(), 500);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error": "pull model manifest: file does not exist"})
    );
    // A repository that is no model keeps the registry shim's answer.
    let err = error_of(&pull(&base, json!({"model": "hf.co/testorg/just-a-readme"})).await);
    assert!(err.starts_with("pull model manifest: 400: "), "{err}");

    // A broken catalog file fails pulls with a message naming it.
    std::fs::write(catalog.join("zz-broken.toml"), "[[model]]\nname = \"x\"\n").unwrap();
    let err = error_of(&pull(&base, json!({"model": "smol-hf:135m"})).await);
    assert!(
        err.contains("zz-broken.toml") && err.contains("repo"),
        "{err}"
    );
    assert_store_clean(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&catalog);
}

/// A tiny random Qwen2 model with the real Qwen tokenizer: one `model.safetensors` and an
/// 11 MB tokenizer.json, both in LFS.
fn tiny_files() -> Vec<(String, Bytes)> {
    let dir = common::ScratchDir::new("hf-tiny");
    common::write_tiny_model(common::TinyArch::Qwen2, dir.path(), 7);
    let mut files: Vec<(String, Bytes)> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, Bytes::from(std::fs::read(e.path()).unwrap()))
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

#[tokio::test]
async fn a_gated_repo_needs_hf_token_and_the_hub_fixture_serves_hf_hub() {
    let files = tiny_files();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let hub = TestHub::start();
    let token = "hf_loopback_token";
    hub.add_gated_repo("testorg/tiny-qwen", files.clone(), token);
    let name = "hf.co/testorg/tiny-qwen";

    let dir = store_dir("hf-gated-anon");
    let base = spawn_server(&dir, &[("HF_ENDPOINT", &hub.endpoint)]);
    let err = error_of(&pull(&base, json!({"model": name})).await);
    assert!(
        err.contains("restricted") && err.contains("HF_TOKEN"),
        "{err}"
    );
    assert!(tags(&base).await.is_empty());

    let dir = store_dir("hf-gated");
    let base = spawn_server(&dir, &[("HF_ENDPOINT", &hub.endpoint), ("HF_TOKEN", token)]);
    assert_success(&pull(&base, json!({"model": name})).await);
    let t = &tags(&base).await[0];
    assert_eq!(t["details"]["family"], "qwen2");
    assert_eq!(t["details"]["quantization_level"], "F32");
    // One model.safetensors, loaded through the links like the shards were.
    let resp = post(
        &base,
        "/api/generate",
        json!({"model": name, "prompt": "Hello", "raw": true, "stream": false,
               "options": {"num_predict": 3, "temperature": 0}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["done"], true, "{v}");

    // hf-hub's own client, pointed at the loopback Hub, gets the same bytes: the fixture
    // speaks the protocol the crate expects (ranged GETs, x-repo-commit, x-linked-etag,
    // redirects to the CDN).
    let cache = common::ScratchDir::new("hf-hub-cache");
    let api = hf_hub::api::tokio::ApiBuilder::new()
        .with_endpoint(hub.endpoint.clone())
        .with_cache_dir(PathBuf::from(cache.path()))
        .with_token(Some(token.into()))
        .with_progress(false)
        .build()
        .unwrap();
    let repo = api.model("testorg/tiny-qwen".into());
    let info = repo.info().await.unwrap();
    assert_eq!(info.siblings.len(), 4);
    for f in ["config.json", "tokenizer.json"] {
        let path = repo
            .get(f)
            .await
            .unwrap_or_else(|e| panic!("hf-hub get {f}: {e}"));
        assert_eq!(std::fs::read(path).unwrap(), *file(&files, f), "{f}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `wick create NAME -f Modelfile` with `FROM <safetensors directory>`: the real CLI uploads
/// each model file as a blob (the README stays behind) and the server stores them as the
/// Hugging Face pull does, with the Modelfile's layers on top; then it lists, shows and
/// chats. File sets that are not a loadable model are a 400.
#[tokio::test]
async fn create_from_a_safetensors_directory_with_the_cli() {
    let smol = smol();
    let dir = store_dir("hf-create-dir");
    let base = spawn_server(&dir, &[]);
    let work = dir.join("work");
    let model_dir = work.join("SmolLM2-135M-Instruct");
    std::fs::create_dir_all(&model_dir).unwrap();
    for (name, bytes) in &smol.files {
        std::fs::write(model_dir.join(name), bytes).unwrap();
    }
    std::fs::write(
        work.join("Modelfile"),
        // The system prompt is the one SmolLM2's template uses when there is none, so the
        // greedy answer is the same as the pulled model's.
        "FROM ./SmolLM2-135M-Instruct\nPARAMETER temperature 0\n\
         SYSTEM You are a helpful AI assistant named SmolLM, trained by Hugging Face\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["create", "smol-st", "-f", "Modelfile"])
        .env("OLLAMA_HOST", base.trim_start_matches("http://"))
        .current_dir(&work)
        .output()
        .expect("running wick create");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.matches("copying file sha256:").count(),
        7,
        "every model file, not the README: {text}"
    );
    assert!(text.trim_end().ends_with("success"), "{text}");

    let m = manifest_of(&dir, "registry.ollama.ai/library/smol-st/latest");
    let layers = m["layers"].as_array().unwrap();
    assert_file_layers(&m, &smol.files);
    let media: Vec<&str> = layers
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    assert!(
        media.contains(&"application/vnd.ollama.image.system"),
        "{m}"
    );
    assert!(
        media.contains(&"application/vnd.ollama.image.params"),
        "{m}"
    );
    assert_eq!(layers.len(), 9, "seven files, system and params: {m}");
    assert_store_clean(&dir);

    let listed = tags(&base).await;
    let t = listed
        .iter()
        .find(|t| t["name"] == "smol-st:latest")
        .unwrap_or_else(|| panic!("{listed:?}"));
    let params = candlewick::store::human_params(smol.parameters);
    assert_eq!(
        t["details"],
        json!({"parent_model": "", "format": "safetensors", "family": "llama",
               "families": ["llama"], "parameter_size": params, "quantization_level": "F32"})
    );
    let s = show(&base, "smol-st").await;
    assert_eq!(s["details"]["format"], "safetensors");
    assert_eq!(s["template"], smol.template.as_str());
    assert_eq!(
        s["system"],
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    );
    assert_eq!(s["model_info"]["general.parameter_count"], smol.parameters);
    let answer = chat_answer(&base, "smol-st").await;
    assert!(answer.contains("Berlin"), "{answer}");

    // Sets that cannot be loaded are refused before anything is written.
    let digest = |name: &str| sha(file(&smol.files, name));
    let mut all: serde_json::Map<String, Value> = model_files(&smol.files)
        .into_iter()
        .map(|(n, b)| (n.clone(), sha(b).into()))
        .collect();
    let refuse = |files: serde_json::Map<String, Value>, want: &'static str| {
        let base = base.clone();
        async move {
            let resp = post(
                &base,
                "/api/create",
                json!({"model": "bad", "files": files}),
            )
            .await;
            assert_eq!(resp.status(), 400, "{want}");
            let v: Value = resp.json().await.unwrap();
            let e = v["error"].as_str().unwrap_or_default().to_string();
            assert!(e.contains(want), "{want:?} in {e:?}");
        }
    };
    let mut no_config = all.clone();
    no_config.remove("config.json");
    refuse(no_config, "no config.json").await;
    let mut no_weights = all.clone();
    no_weights.remove("model.safetensors.index.json");
    refuse(no_weights, "no weights").await;
    let mut missing_shard = all.clone();
    missing_shard.remove(SHARD2);
    refuse(missing_shard, SHARD2).await;
    let mut dotdot = all.clone();
    dotdot.insert("../config.json".into(), digest("config.json").into());
    refuse(dotdot, "invalid file name").await;
    // One folder deep is a model file (`1_Pooling/config.json`, as Ollama's CLI sends
    // it); two are not.
    all.insert("a/b/tokenizer.json".into(), digest("tokenizer.json").into());
    refuse(all, "invalid file name").await;
    assert!(!tags(&base).await.iter().any(|t| t["name"] == "bad:latest"));
}
