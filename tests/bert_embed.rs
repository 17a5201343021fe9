//! BERT embedding models on real weights: all-MiniLM-L6-v2 in the sentence-transformers
//! layout (scripts/fetch-test-models.sh). The reference is candle-transformers' BertModel run
//! directly on the same weights, one sentence at a time without padding, mean-pooled and
//! normalised as the model's modules.json and 1_Pooling/config.json say. The served path
//! is the real one: `wick create all-minilm -f Modelfile` (`FROM` the directory) against
//! `wick serve` on loopback, then the three embedding endpoints over HTTP, with the official
//! Python `ollama` and `openai` clients too.

mod api_common;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use candlewick::model::bert::Pooling;
use candlewick::model::Embedder;
use serde_json::{json, Value};

const MINILM: &str = "all-MiniLM-L6-v2";

const SENTENCES: [&str; 5] = [
    "The cat sat on the mat.",
    "A cat was sitting on the mat.",
    "Interest rates rose by half a percent in the bond market.",
    "Where is the nearest train station?",
    "",
];

fn minilm_dir() -> PathBuf {
    let dir = common::test_models_dir().join(MINILM);
    assert!(
        dir.join("1_Pooling/config.json").is_file(),
        "{} is missing; run scripts/fetch-test-models.sh",
        dir.display()
    );
    dir
}

/// candle-transformers' BERT on one input, unpadded: mean over its tokens, then unit length.
struct Reference {
    bert: BertModel,
    tokenizer: tokenizers::Tokenizer,
}

impl Reference {
    fn load(dir: &Path) -> Reference {
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu).unwrap();
        let bert = BertModel::load(vb, &config).unwrap();
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        tokenizer.with_truncation(None).unwrap();
        tokenizer.with_padding(None);
        Reference { bert, tokenizer }
    }

    fn ids(&self, text: &str) -> Vec<u32> {
        self.tokenizer
            .encode(text, true)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    fn embed_ids(&self, ids: &[u32]) -> Vec<f32> {
        let t = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let states = self
            .bert
            .forward(&t, &t.zeros_like().unwrap(), None)
            .unwrap();
        let mean = states.mean(1).unwrap().squeeze(0).unwrap();
        let mut v = mean.to_vec1::<f32>().unwrap();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    fn embed(&self, text: &str) -> Vec<f32> {
        self.embed_ids(&self.ids(text))
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Within 1e-4 element-wise and cosine >= 0.9999.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "{what}: max difference {worst}");
    let c = cosine(got, want);
    assert!(c >= 0.9999, "{what}: cosine {c}");
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("a vector, got {v}"))
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// A text of well over 512 WordPiece tokens.
fn long_text() -> String {
    (0..300)
        .map(|i| format!("word{i} and"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn reads_pooling_and_normalisation_from_the_model() {
    let e = Embedder::load(&minilm_dir(), &Device::Cpu).unwrap();
    assert_eq!(e.pooling(), &[Pooling::Mean]);
    assert!(e.normalizes(), "modules.json has a Normalize module");
    assert_eq!(e.dim(), 384);
    assert_eq!(e.max_positions(), 512);
    // The tokenizer file's own 128-token truncation and padding are off.
    let ids = e.encode(&long_text()).unwrap();
    assert!(ids.len() > 512, "{} tokens", ids.len());
    assert_eq!(e.encode("").unwrap(), vec![101, 102], "[CLS] [SEP]");
}

#[test]
fn padded_batch_matches_candle_transformers_alone() {
    let dir = minilm_dir();
    let e = Embedder::load(&dir, &Device::Cpu).unwrap();
    let r = Reference::load(&dir);
    let ids: Vec<Vec<u32>> = SENTENCES.iter().map(|s| e.encode(s).unwrap()).collect();
    for (s, i) in SENTENCES.iter().zip(&ids) {
        assert_eq!(i, &r.ids(s), "the tokenizer agrees on {s:?}");
    }
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let got = e.embed(&refs).unwrap();
    for (i, s) in SENTENCES.iter().enumerate() {
        assert_close(&got[i], &r.embed(s), s);
        let norm: f32 = got[i].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
    assert!(cosine(&got[0], &got[1]) > cosine(&got[0], &got[2]) + 0.3);

    // Cut to 512 keeping [CLS] ... and the closing [SEP], as Ollama truncates.
    let mut long = e.encode(&long_text()).unwrap();
    let full = long.clone();
    let dropped = e.fit(&mut long, 512);
    assert_eq!((long.len(), dropped), (512, full.len() - 512));
    assert_eq!(long[..511], full[..511]);
    assert_eq!(long[511], 102);
    let got = e.embed(&[&long]).unwrap();
    assert_close(&got[0], &r.embed_ids(&long), "512 tokens");
}

fn wick(host: &str, dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(args)
        .current_dir(dir)
        .env("OLLAMA_HOST", host)
        .output()
        .expect("running wick");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_by_wick_create_over_http_and_official_clients() {
    let src = minilm_dir();
    let models = api_common::store_dir("bert-embed");
    let work = models.join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("Modelfile"), format!("FROM {}\n", src.display())).unwrap();
    let server = api_common::WickProcess::start(&models, &[("OLLAMA_MAX_QUEUE", "8")]);
    let (ok, out) = wick(
        &server.host,
        &work,
        &["create", "all-minilm", "-f", "Modelfile"],
    );
    assert!(ok, "wick create failed: {out}");
    let base = server.base.clone();
    let r = Reference::load(&src);

    // An embedding model, as Ollama shows one.
    let show = api_common::post(&base, "/api/show", json!({"model": "all-minilm"}))
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(show["capabilities"], json!(["embedding"]));
    assert_eq!(show["details"]["family"], "bert");
    assert_eq!(show["model_info"]["bert.context_length"], 512);

    // Several inputs in one request.
    let texts = &SENTENCES[..4];
    let v: Value = api_common::post(
        &base,
        "/api/embed",
        json!({"model": "all-minilm", "input": texts}),
    )
    .await
    .json()
    .await
    .unwrap();
    let vecs: Vec<Vec<f32>> = v["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    assert_eq!(vecs.len(), 4);
    for (got, s) in vecs.iter().zip(texts) {
        assert_close(got, &r.embed(s), s);
    }
    let tokens: usize = texts.iter().map(|s| r.ids(s).len()).sum();
    assert_eq!(v["prompt_eval_count"], tokens);

    // The legacy endpoint: the model normalises, so its one vector is the same.
    let v: Value = api_common::post(
        &base,
        "/api/embeddings",
        json!({"model": "all-minilm", "prompt": texts[0]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_close(&floats(&v["embedding"]), &vecs[0], "/api/embeddings");

    // OpenAI's shape.
    let v: Value = api_common::post(
        &base,
        "/v1/embeddings",
        json!({"model": "all-minilm", "input": [texts[2], texts[3]]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_close(
        &floats(&v["data"][1]["embedding"]),
        &vecs[3],
        "/v1/embeddings",
    );
    assert_eq!(v["data"][1]["index"], 1);

    // Longer than the 512 positions: cut to them (keeping [SEP]) unless truncate is false.
    let long = long_text();
    let v: Value = api_common::post(
        &base,
        "/api/embed",
        json!({"model": "all-minilm", "input": long}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["prompt_eval_count"], 512);
    let mut ids = r.ids(&long);
    let sep = ids[ids.len() - 1];
    ids.truncate(511);
    ids.push(sep);
    assert_close(
        &floats(&v["embeddings"][0]),
        &r.embed_ids(&ids),
        "truncated",
    );
    let resp = api_common::post(
        &base,
        "/api/embed",
        json!({"model": "all-minilm", "input": long, "truncate": false}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "the input length exceeds the context length"
    );
    // num_ctx shortens the context as for any model.
    let v: Value = api_common::post(
        &base,
        "/api/embed",
        json!({"model": "all-minilm", "input": texts[2], "options": {"num_ctx": 6}}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["prompt_eval_count"], 6);

    // Empty input: Ollama's "just load" answer; OpenAI wants input.
    let v: Value = api_common::post(
        &base,
        "/api/embed",
        json!({"model": "all-minilm", "input": []}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["embeddings"], json!([]));
    for input in [json!([]), json!(""), json!(["a", ""])] {
        let resp = api_common::post(
            &base,
            "/v1/embeddings",
            json!({"model": "all-minilm", "input": input}),
        )
        .await;
        assert_eq!(resp.status(), 400, "input {input}");
        let body: Value = resp.json().await.unwrap();
        assert!(body["error"]["message"].is_string(), "{body}");
    }

    // Not a generator: Ollama's errors, before anything loads.
    for (path, body, what) in [
        (
            "/api/generate",
            json!({"model": "all-minilm", "prompt": "hi"}),
            "generate",
        ),
        ("/api/generate", json!({"model": "all-minilm"}), "generate"),
        (
            "/api/chat",
            json!({"model": "all-minilm", "messages": [{"role": "user", "content": "hi"}]}),
            "chat",
        ),
    ] {
        let resp = api_common::post(&base, path, body).await;
        assert_eq!(resp.status(), 400);
        assert_eq!(
            resp.json::<Value>().await.unwrap()["error"],
            format!("\"all-minilm\" does not support {what}")
        );
    }
    let resp = api_common::post(
        &base,
        "/v1/chat/completions",
        json!({"model": "all-minilm", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 400);

    // The official Python clients.
    let script = r#"
import json, os, sys, ollama, openai
texts = json.loads(sys.argv[1])
a = ollama.Client(host=os.environ["OLLAMA_HOST"]).embed(model="all-minilm", input=texts)
o = openai.OpenAI(base_url="http://" + os.environ["OLLAMA_HOST"] + "/v1", api_key="x")
b = o.embeddings.create(model="all-minilm", input=texts)
print(json.dumps({"ollama": a.embeddings, "openai": [d.embedding for d in b.data]}))
"#;
    let out = Command::new("python3")
        .args(["-c", script, &serde_json::to_string(texts).unwrap()])
        .env("OLLAMA_HOST", &server.host)
        .output()
        .expect("python3 (scripts/test-deps.sh installs the clients)");
    assert!(
        out.status.success(),
        "python clients failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for client in ["ollama", "openai"] {
        for (i, s) in texts.iter().enumerate() {
            assert_close(&floats(&v[client][i]), &vecs[i], &format!("{client}: {s}"));
        }
    }
}
