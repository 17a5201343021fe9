//! BERT embedding models on real weights: all-MiniLM-L6-v2 in the sentence-transformers
//! layout (scripts/fetch-test-models.sh). The reference is candle-transformers' BertModel run
//! directly on the same weights, one sentence at a time without padding, mean-pooled and
//! normalised as the model's modules.json and 1_Pooling/config.json say. The served path
//! is the real one: `wick create all-minilm -f Modelfile` (`FROM` the directory) against
//! `wick serve` on loopback, then the three embedding endpoints over HTTP, with the official
//! Python `ollama` and `openai` clients too.

use crate::api_common;
use crate::common;

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

/// A sentence-transformers repository pulled from a Hub (the loopback one of
/// tests/integration/common/hub.rs, serving the package's files as the real Hub lays them
/// out, pooling config one folder deep): it becomes an embedding model with the
/// repository's pooling and normalisation, and its vectors are the reference's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_from_a_hugging_face_repository() {
    let src = minilm_dir();
    let files: Vec<(String, axum::body::Bytes)> = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "vocab.txt",
    ]
    .iter()
    .map(|f| (f.to_string(), std::fs::read(src.join(f)).unwrap().into()))
    .collect();
    let hub = common::hub::TestHub::start();
    hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", files);
    let models = api_common::store_dir("bert-hf-pull");
    let server = api_common::WickProcess::start(&models, &[("HF_ENDPOINT", &hub.endpoint)]);
    let name = "hf.co/sentence-transformers/all-MiniLM-L6-v2";
    let lines = api_common::pull(&server.base, json!({"model": name})).await;
    assert_eq!(
        lines.last().map(|l| l["status"].clone()),
        Some(json!("success")),
        "{lines:?}"
    );
    let pooling = std::fs::metadata(src.join("1_Pooling/config.json"))
        .unwrap()
        .len();
    assert_eq!(
        hub.served_file("1_Pooling/config.json"),
        pooling,
        "bytes served"
    );

    let show = api_common::post(&server.base, "/api/show", json!({"model": name}))
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(show["capabilities"], json!(["embedding"]), "{show}");
    let r = Reference::load(&src);
    let texts = &SENTENCES[..3];
    let v: Value = api_common::post(
        &server.base,
        "/api/embed",
        json!({"model": name, "input": texts}),
    )
    .await
    .json()
    .await
    .unwrap();
    let vecs = v["embeddings"].as_array().expect("embeddings");
    assert_eq!(vecs.len(), texts.len(), "{v}");
    for (got, s) in vecs.iter().zip(texts) {
        assert_close(&floats(got), &r.embed(s), s);
    }
}

/// Texts for the WordPiece comparison: accents, casing, CJK, punctuation, unknown characters,
/// long words, the special tokens written out.
const TOKENIZER_TEXTS: [&str; 8] = [
    "Héllo, Wörld! Ça va? naïve café",
    "THE QUICK BROWN FOX jumps over 13 lazy dogs...",
    "北京欢迎你，東京も。 Seoul 서울",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "emoji 🙂 and tabs\tand\nnewlines",
    "e-mail: someone@example.com (see https://example.com/a?b=c)",
    "[CLS] written out [SEP] and [MASK]",
    "",
];

/// A tokenizer.json's WordPiece vocabulary as llama.cpp's GGUFs keep it ("phantom space"
/// form: word starts prefixed with `▁`, continuations without `##`, bracketed names as they
/// are).
fn phantom_vocab(tok: &Value) -> Vec<String> {
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        let phantom = if t.starts_with('[') && t.ends_with(']') {
            t.clone()
        } else if let Some(cont) = t.strip_prefix("##") {
            cont.to_string()
        } else {
            format!("\u{2581}{t}")
        };
        tokens[id.as_u64().unwrap() as usize] = phantom;
    }
    tokens
}

/// all-MiniLM written as llama.cpp's converter writes it for Ollama's `all-minilm` GGUF: the
/// `bert.*` hyperparameters, llama.cpp's tensor names (the pooler dropped), 2-D weights in
/// `dtype` and the rest in f32, and the vocabulary in "phantom space" form (word starts
/// prefixed with `▁`, continuations without `##`, bracketed names as they are).
fn write_minilm_gguf(dir: &Path, out: &Path, dtype: candle_core::quantized::GgmlDType) {
    use candle_core::quantized::{gguf_file, QTensor};
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tok: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let tokens = phantom_vocab(&tok);
    let weights =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors = Vec::new();
    for (name, t) in &weights {
        let name = name.strip_prefix("bert.").unwrap_or(name);
        if name.starts_with("pooler.") || name.ends_with("position_ids") {
            continue;
        }
        let (stem, kind) = name.rsplit_once('.').unwrap();
        let gguf = match stem {
            "embeddings.word_embeddings" => "token_embd".to_string(),
            "embeddings.position_embeddings" => "position_embd".to_string(),
            "embeddings.token_type_embeddings" => "token_types".to_string(),
            "embeddings.LayerNorm" => "token_embd_norm".to_string(),
            s => {
                let rest = s.strip_prefix("encoder.layer.").unwrap();
                let (layer, part) = rest.split_once('.').unwrap();
                let part = match part {
                    "attention.self.query" => "attn_q",
                    "attention.self.key" => "attn_k",
                    "attention.self.value" => "attn_v",
                    "attention.output.dense" => "attn_output",
                    "attention.output.LayerNorm" => "attn_output_norm",
                    "intermediate.dense" => "ffn_up",
                    "output.dense" => "ffn_down",
                    "output.LayerNorm" => "layer_output_norm",
                    other => panic!("unexpected tensor {other}"),
                };
                format!("blk.{layer}.{part}")
            }
        };
        let ty = if t.rank() == 2 {
            dtype
        } else {
            candle_core::quantized::GgmlDType::F32
        };
        let t = t.to_dtype(DType::F32).unwrap();
        tensors.push((format!("{gguf}.{kind}"), QTensor::quantize(&t, ty).unwrap()));
    }
    use gguf_file::Value as V;
    let u = |k: &str| V::U32(config[k].as_u64().unwrap() as u32);
    let metadata = vec![
        ("general.architecture", V::String("bert".into())),
        ("general.name", V::String("all-MiniLM-L6-v2".into())),
        ("bert.context_length", u("max_position_embeddings")),
        ("bert.embedding_length", u("hidden_size")),
        ("bert.feed_forward_length", u("intermediate_size")),
        ("bert.attention.head_count", u("num_attention_heads")),
        ("bert.block_count", u("num_hidden_layers")),
        (
            "bert.attention.layer_norm_epsilon",
            V::F32(config["layer_norm_eps"].as_f64().unwrap() as f32),
        ),
        ("bert.attention.causal", V::Bool(false)),
        ("bert.pooling_type", V::U32(1)),
    ];
    write_wordpiece_gguf(out, metadata, tokens, &tensors);
}

/// A GGUF of `metadata`, a WordPiece vocabulary `tokens` (BERT's special token ids, two token
/// types) and `tensors`.
fn write_wordpiece_gguf(
    out: &Path,
    mut metadata: Vec<(&str, candle_core::quantized::gguf_file::Value)>,
    tokens: Vec<String>,
    tensors: &[(String, candle_core::quantized::QTensor)],
) {
    use candle_core::quantized::{gguf_file, QTensor};
    use gguf_file::Value as V;
    metadata.extend([
        ("tokenizer.ggml.model", V::String("bert".into())),
        (
            "tokenizer.ggml.tokens",
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.token_type_count", V::U32(2)),
        ("tokenizer.ggml.unknown_token_id", V::U32(100)),
        ("tokenizer.ggml.cls_token_id", V::U32(101)),
        ("tokenizer.ggml.seperator_token_id", V::U32(102)),
        ("tokenizer.ggml.padding_token_id", V::U32(0)),
    ]);
    let metadata: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

/// `wick serve` on a new store holding `gguf` as `name` (`wick import`), checked to be an
/// embedding model in `/api/show`.
async fn serve_gguf(tag: &str, name: &str, gguf: &Path) -> api_common::WickProcess {
    let models = api_common::store_dir(tag);
    let out = Command::new(env!("CARGO_BIN_EXE_wick"))
        .args(["import", name])
        .arg(gguf)
        .env("OLLAMA_MODELS", &models)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = api_common::WickProcess::start(&models, &[]);
    let show: Value = api_common::post(&server.base, "/api/show", json!({"model": name}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(show["capabilities"], json!(["embedding"]), "{show}");
    server
}

/// The GGUF form Ollama's registry serves (`all-minilm`): the restored WordPiece tokenizer
/// gives tokenizer.json's ids, an f32 GGUF gives the reference's vectors to 1e-4, the f16
/// one (Ollama's) within f16's rounding, and served through `wick import` it is an
/// embedding model over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gguf_bert_as_ollama_stores_it() {
    use candle_core::quantized::GgmlDType;
    let dir = minilm_dir();
    let r = Reference::load(&dir);
    let scratch = common::ScratchDir::new("bert-gguf");
    let f32_path = scratch.path().join("all-minilm-f32.gguf");
    let f16_path = scratch.path().join("all-minilm-f16.gguf");
    write_minilm_gguf(&dir, &f32_path, GgmlDType::F32);
    write_minilm_gguf(&dir, &f16_path, GgmlDType::F16);

    let e = Embedder::load_gguf(&f32_path, &Device::Cpu).unwrap();
    assert_eq!(e.pooling(), &[Pooling::Mean]);
    assert!(e.normalizes());
    assert_eq!((e.dim(), e.max_positions()), (384, 512));
    for s in TOKENIZER_TEXTS.iter().chain(&SENTENCES) {
        assert_eq!(e.encode(s).unwrap(), r.ids(s), "token ids of {s:?}");
    }
    let ids: Vec<Vec<u32>> = SENTENCES[..4]
        .iter()
        .map(|s| e.encode(s).unwrap())
        .collect();
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    for (got, s) in e.embed(&refs).unwrap().iter().zip(&SENTENCES) {
        assert_close(got, &r.embed(s), s);
    }
    let half = Embedder::load_gguf(&f16_path, &Device::Cpu).unwrap();
    for (got, s) in half.embed(&refs).unwrap().iter().zip(&SENTENCES) {
        let c = cosine(got, &r.embed(s));
        assert!(c > 0.9999, "f16 {s:?}: cosine {c}");
    }

    let server = serve_gguf("bert-gguf", "all-minilm:gguf", &f16_path).await;
    let v: Value = api_common::post(
        &server.base,
        "/v1/embeddings",
        json!({"model": "all-minilm:gguf", "input": SENTENCES[0]}),
    )
    .await
    .json()
    .await
    .unwrap();
    let c = cosine(&floats(&v["data"][0]["embedding"]), &r.embed(SENTENCES[0]));
    assert!(c > 0.9999, "served f16 GGUF: cosine {c}");
}

/// NomicBERT (`nomic-embed-text`) with random weights of its real widths (768 wide, 12 heads,
/// 3072-wide SwiGLU, a 30528-token vocabulary; two layers instead of twelve), all-MiniLM's
/// WordPiece vocabulary, seeded.
fn nomic_weights() -> std::collections::HashMap<String, Tensor> {
    let (hidden, inner, vocab, layers) = (768, 3072, 30528, 2);
    let mut rng = common::SplitMix64::new(11);
    let mut w = std::collections::HashMap::new();
    let mut put = |name: String, dims: &[usize], mean: f32, std: f32| {
        let n = dims.iter().product();
        let t = Tensor::from_vec(rng.normals(n, mean, std), dims, &Device::Cpu).unwrap();
        w.insert(name, t);
    };
    put(
        "embeddings.word_embeddings.weight".into(),
        &[vocab, hidden],
        0.0,
        0.05,
    );
    put(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, hidden],
        0.0,
        0.05,
    );
    put("emb_ln.weight".into(), &[hidden], 1.0, 0.05);
    put("emb_ln.bias".into(), &[hidden], 0.0, 0.02);
    for l in 0..layers {
        let p = format!("encoder.layers.{l}");
        put(
            format!("{p}.attn.Wqkv.weight"),
            &[3 * hidden, hidden],
            0.0,
            0.04,
        );
        put(
            format!("{p}.attn.out_proj.weight"),
            &[hidden, hidden],
            0.0,
            0.04,
        );
        put(format!("{p}.mlp.fc11.weight"), &[inner, hidden], 0.0, 0.04);
        put(format!("{p}.mlp.fc12.weight"), &[inner, hidden], 0.0, 0.04);
        put(format!("{p}.mlp.fc2.weight"), &[hidden, inner], 0.0, 0.02);
        for norm in ["norm1", "norm2"] {
            put(format!("{p}.{norm}.weight"), &[hidden], 1.0, 0.05);
            put(format!("{p}.{norm}.bias"), &[hidden], 0.0, 0.02);
        }
    }
    w
}

/// nomic-embed-text-v1.5's config.json fields for [`nomic_weights`].
fn nomic_config() -> Value {
    json!({"model_type": "nomic_bert", "vocab_size": 30528, "n_embd": 768, "n_head": 12,
           "n_layer": 2, "n_inner": 3072, "n_positions": 2048, "type_vocab_size": 2,
           "layer_norm_epsilon": 1e-12, "rotary_emb_fraction": 1.0, "rotary_emb_base": 1000,
           "rotary_emb_interleaved": false, "qkv_proj_bias": false, "mlp_fc1_bias": false,
           "mlp_fc2_bias": false, "activation_function": "swiglu", "prenorm": false})
}

/// `weights` as llama.cpp's converter writes `nomic-embed-text` for Ollama: `nomic-bert.*`
/// metadata, llama.cpp's tensor names (`fc11` is `ffn_up`, `fc12` `ffn_gate`), f32.
fn write_nomic_gguf(weights: &std::collections::HashMap<String, Tensor>, out: &Path) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let tok: Value = serde_json::from_str(
        &std::fs::read_to_string(minilm_dir().join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let mut tensors = Vec::new();
    for (name, t) in weights {
        let (stem, kind) = name.rsplit_once('.').unwrap();
        let gguf = match stem {
            "embeddings.word_embeddings" => "token_embd".to_string(),
            "embeddings.token_type_embeddings" => "token_types".to_string(),
            "emb_ln" => "token_embd_norm".to_string(),
            s => {
                let (layer, part) = s
                    .strip_prefix("encoder.layers.")
                    .unwrap()
                    .split_once('.')
                    .unwrap();
                let part = match part {
                    "attn.Wqkv" => "attn_qkv",
                    "attn.out_proj" => "attn_output",
                    "norm1" => "attn_output_norm",
                    "mlp.fc11" => "ffn_up",
                    "mlp.fc12" => "ffn_gate",
                    "mlp.fc2" => "ffn_down",
                    "norm2" => "layer_output_norm",
                    other => panic!("unexpected tensor {other}"),
                };
                format!("blk.{layer}.{part}")
            }
        };
        tensors.push((
            format!("{gguf}.{kind}"),
            QTensor::quantize(t, GgmlDType::F32).unwrap(),
        ));
    }
    use gguf_file::Value as V;
    let metadata = vec![
        ("general.architecture", V::String("nomic-bert".into())),
        (
            "general.name",
            V::String("nomic-embed-text-v1.5 (random weights)".into()),
        ),
        ("nomic-bert.context_length", V::U32(2048)),
        ("nomic-bert.embedding_length", V::U32(768)),
        ("nomic-bert.feed_forward_length", V::U32(3072)),
        ("nomic-bert.attention.head_count", V::U32(12)),
        ("nomic-bert.block_count", V::U32(2)),
        ("nomic-bert.attention.layer_norm_epsilon", V::F32(1e-12)),
        ("nomic-bert.attention.causal", V::Bool(false)),
        ("nomic-bert.pooling_type", V::U32(1)),
        ("nomic-bert.rope.freq_base", V::F32(1000.0)),
    ];
    write_wordpiece_gguf(out, metadata, phantom_vocab(&tok), &tensors);
}

/// NomicBERT (`nomic-embed-text`) as Ollama's registry serves it (GGUF `nomic-bert`) and in
/// the sentence-transformers layout: both give candle-transformers' NomicBertModel's vectors
/// (one sentence at a time, unpadded, mean-pooled, unit length) to 1e-4 on the same random
/// weights, and the GGUF served through `wick import` is an embedding model over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomic_bert_gguf_and_safetensors() {
    use candle_transformers::models::nomic_bert::{self, NomicBertModel};
    let weights = nomic_weights();
    let config: nomic_bert::Config = serde_json::from_value(nomic_config()).unwrap();
    let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu);
    let reference = NomicBertModel::load(vb, &config).unwrap();
    let minilm = Reference::load(&minilm_dir());
    let want = |text: &str| -> Vec<f32> {
        let ids = minilm.ids(text);
        let ids = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let states = reference.forward(&ids, None, None).unwrap();
        let mask = ids.ones_like().unwrap().to_dtype(DType::F32).unwrap();
        let pooled = nomic_bert::mean_pooling(&states, &mask).unwrap();
        nomic_bert::l2_normalize(&pooled)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap()
    };

    // The sentence-transformers layout: config.json, the weights, the tokenizer, mean
    // pooling and Normalize.
    let scratch = common::ScratchDir::new("nomic");
    let dir = scratch.path().join("nomic-st");
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    std::fs::write(dir.join("config.json"), nomic_config().to_string()).unwrap();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    std::fs::copy(
        minilm_dir().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("modules.json"),
        json!([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        json!({"word_embedding_dimension": 768, "pooling_mode_mean_tokens": true}).to_string(),
    )
    .unwrap();
    let gguf = scratch.path().join("nomic-embed-text.gguf");
    write_nomic_gguf(&weights, &gguf);

    let ids: Vec<Vec<u32>> = SENTENCES[..4].iter().map(|s| minilm.ids(s)).collect();
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    for (what, e) in [
        ("safetensors", Embedder::load(&dir, &Device::Cpu).unwrap()),
        ("gguf", Embedder::load_gguf(&gguf, &Device::Cpu).unwrap()),
    ] {
        assert_eq!((e.dim(), e.max_positions()), (768, 2048), "{what}");
        assert!(e.normalizes(), "{what}");
        for s in TOKENIZER_TEXTS.iter().chain(&SENTENCES) {
            assert_eq!(
                e.encode(s).unwrap(),
                minilm.ids(s),
                "{what}: token ids of {s:?}"
            );
        }
        // One padded batch against each sentence alone.
        for (got, s) in e.embed(&refs).unwrap().iter().zip(&SENTENCES) {
            assert_close(got, &want(s), &format!("{what} {s:?}"));
        }
    }

    let server = serve_gguf("nomic-gguf", "nomic-embed-text:test", &gguf).await;
    let v: Value = api_common::post(
        &server.base,
        "/api/embed",
        json!({"model": "nomic-embed-text:test", "input": [SENTENCES[0], SENTENCES[2]]}),
    )
    .await
    .json()
    .await
    .unwrap();
    for (i, s) in [SENTENCES[0], SENTENCES[2]].iter().enumerate() {
        assert_close(
            &floats(&v["embeddings"][i]),
            &want(s),
            &format!("served {s:?}"),
        );
    }
}
