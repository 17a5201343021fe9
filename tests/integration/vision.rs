//! Vision: Gemma 3's SigLIP tower and projector with random weights of the real widths,
//! written as Ollama's GGUF and as a Hugging Face checkpoint and compared with
//! candle-transformers' `siglip` (the projector's pooling, norm and projection done here
//! with plain tensor ops); image embeddings entering the real Gemma 3 270M decoder; and the
//! whole path over HTTP with a GGUF that carries the 270M text weights and a random tower, as
//! Ollama's registry ships `gemma3` (one file): `/api/show`'s `vision`, Ollama's, OpenAI's
//! and Anthropic's image inputs, prefix reuse keyed on the image, and the refusals.

use crate::api_common;
use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::api_common::{b64, post_json as post, test_png};
use crate::common::gemma::GEMMA3_GGUF;
use crate::common::{rel_diff, SplitMix64};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::siglip;
use candlewick::model::vision::VisionTower;
use candlewick::model::weights::GgufFile;
use candlewick::model::{Batch, CpuKvCache, ImageRows, KvType, Model, IMAGE_ID};
use serde_json::{json, Value};

/// A GGUF file's tensors and metadata, as `gguf_file::write` takes them (owned).
type GgufTensors = Vec<(String, QTensor)>;
type GgufMetadata = Vec<(String, gguf_file::Value)>;

/// A SigLIP tower and Gemma 3 projector's sizes.
#[derive(Clone, Copy)]
struct Shape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    image: usize,
    patch: usize,
    tokens: usize,
    text_hidden: usize,
}

impl Shape {
    /// Gemma 3's SigLIP-so400m widths at 896 pixels (two of its 27 layers: the test's
    /// time goes into a 4096-patch attention as it is).
    fn real(text_hidden: usize) -> Shape {
        Shape {
            hidden: 1152,
            intermediate: 4304,
            layers: 2,
            heads: 16,
            image: 896,
            patch: 14,
            tokens: 256,
            text_hidden,
        }
    }

    /// The same widths over a 224-pixel square pooled to 16 embeddings (for serving tests).
    fn small(text_hidden: usize) -> Shape {
        Shape {
            layers: 1,
            image: 224,
            tokens: 16,
            ..Shape::real(text_hidden)
        }
    }

    fn patches(&self) -> usize {
        self.image / self.patch
    }

    fn siglip(&self) -> siglip::VisionConfig {
        siglip::VisionConfig {
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_channels: 3,
            image_size: self.image,
            patch_size: self.patch,
            hidden_act: candle_nn::Activation::GeluPytorchTanh,
            layer_norm_eps: 1e-6,
        }
    }
}

/// Random weights under SigLIP's Hugging Face names (relative to `vision_model.`), plus the
/// projector's `soft_norm` (as stored: an offset from 1) and `projection`.
struct Tower {
    shape: Shape,
    siglip: Vec<(String, Vec<usize>, Vec<f32>)>,
    soft_norm: Vec<f32>,
    projection: Vec<f32>,
}

impl Tower {
    fn random(shape: Shape, seed: u64) -> Tower {
        let mut rng = SplitMix64::new(seed);
        let (h, i) = (shape.hidden, shape.intermediate);
        let mut siglip = Vec::new();
        let mut add = |name: String, dims: Vec<usize>, mean: f32, std: f32| {
            let n = dims.iter().product();
            siglip.push((name, dims, rng.normals(n, mean, std)));
        };
        add(
            "embeddings.patch_embedding.weight".into(),
            vec![h, 3, shape.patch, shape.patch],
            0.0,
            0.02,
        );
        add("embeddings.patch_embedding.bias".into(), vec![h], 0.0, 0.02);
        add(
            "embeddings.position_embedding.weight".into(),
            vec![shape.patches().pow(2), h],
            0.0,
            0.02,
        );
        for l in 0..shape.layers {
            let p = format!("encoder.layers.{l}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                add(
                    format!("{p}.self_attn.{proj}.weight"),
                    vec![h, h],
                    0.0,
                    0.03,
                );
                add(format!("{p}.self_attn.{proj}.bias"), vec![h], 0.0, 0.02);
            }
            for norm in ["layer_norm1", "layer_norm2"] {
                add(format!("{p}.{norm}.weight"), vec![h], 1.0, 0.1);
                add(format!("{p}.{norm}.bias"), vec![h], 0.0, 0.05);
            }
            add(format!("{p}.mlp.fc1.weight"), vec![i, h], 0.0, 0.03);
            add(format!("{p}.mlp.fc1.bias"), vec![i], 0.0, 0.02);
            add(format!("{p}.mlp.fc2.weight"), vec![h, i], 0.0, 0.03);
            add(format!("{p}.mlp.fc2.bias"), vec![h], 0.0, 0.02);
        }
        add("post_layernorm.weight".into(), vec![h], 1.0, 0.1);
        add("post_layernorm.bias".into(), vec![h], 0.0, 0.05);
        let soft_norm = rng.normals(h, 0.0, 0.1);
        let projection = rng.normals(h * shape.text_hidden, 0.0, 0.05);
        Tower {
            shape,
            siglip,
            soft_norm,
            projection,
        }
    }

    fn tensor(dims: &[usize], values: &[f32]) -> Tensor {
        Tensor::from_slice(values, dims, &Device::Cpu).unwrap()
    }

    /// The GGUF tensors and metadata Ollama's conversion gives a Gemma 3 tower.
    fn gguf_parts(&self) -> (GgufTensors, GgufMetadata) {
        let q = |dims: &[usize], v: &[f32]| {
            QTensor::quantize(&Self::tensor(dims, v), GgmlDType::F32).unwrap()
        };
        let mut tensors = Vec::new();
        for (name, dims, values) in &self.siglip {
            let g = name
                .replace("embeddings.", "")
                .replace("encoder.layers.", "blk.")
                .replace("self_attn.q_proj", "attn_q")
                .replace("self_attn.k_proj", "attn_k")
                .replace("self_attn.v_proj", "attn_v")
                .replace("self_attn.out_proj", "attn_output");
            tensors.push((format!("v.{g}"), q(dims, values)));
        }
        // Ollama stores Gemma's norm weights as they scale (1 + w).
        let scale: Vec<f32> = self.soft_norm.iter().map(|w| 1.0 + w).collect();
        let s = self.shape;
        tensors.push(("mm.mm_soft_emb_norm.weight".into(), q(&[s.hidden], &scale)));
        tensors.push((
            "mm.mm_input_projection.weight".into(),
            q(&[s.hidden, s.text_hidden], &self.projection),
        ));
        use gguf_file::Value as V;
        let md = vec![
            ("gemma3.vision.block_count".into(), V::U32(s.layers as u32)),
            (
                "gemma3.vision.embedding_length".into(),
                V::U32(s.hidden as u32),
            ),
            (
                "gemma3.vision.feed_forward_length".into(),
                V::U32(s.intermediate as u32),
            ),
            (
                "gemma3.vision.attention.head_count".into(),
                V::U32(s.heads as u32),
            ),
            ("gemma3.vision.image_size".into(), V::U32(s.image as u32)),
            ("gemma3.vision.patch_size".into(), V::U32(s.patch as u32)),
            ("gemma3.vision.num_channels".into(), V::U32(3)),
            (
                "gemma3.vision.attention.layer_norm_epsilon".into(),
                V::F32(1e-6),
            ),
            ("gemma3.mm.tokens_per_image".into(), V::U32(s.tokens as u32)),
        ];
        (tensors, md)
    }

    /// A GGUF holding only the tower (for the parity test).
    fn write_gguf(&self, out: &Path) {
        let (tensors, mut md) = self.gguf_parts();
        md.push((
            "general.architecture".into(),
            gguf_file::Value::String("gemma3".into()),
        ));
        write_gguf(out, &md, &tensors);
    }

    /// A Hugging Face Gemma 3 checkpoint's vision half: `config.json` and the tower's
    /// tensors under transformers' names.
    fn write_safetensors(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let s = self.shape;
        let config = json!({
            "model_type": "gemma3",
            "mm_tokens_per_image": s.tokens,
            "vision_config": {
                "model_type": "siglip_vision_model",
                "hidden_size": s.hidden,
                "intermediate_size": s.intermediate,
                "num_hidden_layers": s.layers,
                "num_attention_heads": s.heads,
                "image_size": s.image,
                "patch_size": s.patch,
                "layer_norm_eps": 1e-6,
                "vision_use_head": false,
            },
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let mut tensors: HashMap<String, Tensor> = self
            .siglip
            .iter()
            .map(|(n, d, v)| (format!("vision_tower.vision_model.{n}"), Self::tensor(d, v)))
            .collect();
        tensors.insert(
            "multi_modal_projector.mm_soft_emb_norm.weight".into(),
            Self::tensor(&[s.hidden], &self.soft_norm),
        );
        tensors.insert(
            "multi_modal_projector.mm_input_projection_weight".into(),
            Self::tensor(&[s.hidden, s.text_hidden], &self.projection),
        );
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    }

    /// The reference: candle-transformers' SigLIP, then Gemma 3's projector written out
    /// here: each 4x4 (or k x k) block of patches averaged, an RMS norm scaling by 1 + w,
    /// and `x @ projection`. Returns `[tokens, text_hidden]`.
    fn reference(&self, pixels: &[f32]) -> Vec<f32> {
        let s = self.shape;
        let map: HashMap<String, Tensor> = self
            .siglip
            .iter()
            .map(|(n, d, v)| (n.clone(), Self::tensor(d, v)))
            .collect();
        let vb = VarBuilder::from_tensors(map, DType::F32, &Device::Cpu);
        let model = siglip::VisionModel::new(&s.siglip(), false, vb).unwrap();
        let x = Self::tensor(&[1, 3, s.image, s.image], pixels);
        let out = model.forward(&x).unwrap().squeeze(0).unwrap();
        let (p, side) = (s.patches(), (s.tokens as f64).sqrt() as usize);
        let k = p / side;
        let pooled = out
            .reshape((side, k, side, k, s.hidden))
            .unwrap()
            .mean(3)
            .unwrap()
            .mean(1)
            .unwrap()
            .reshape((s.tokens, s.hidden))
            .unwrap();
        let ms = pooled.sqr().unwrap().mean_keepdim(1).unwrap();
        let normed = pooled
            .broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&(Self::tensor(&[s.hidden], &self.soft_norm) + 1.0).unwrap())
            .unwrap();
        normed
            .matmul(&Self::tensor(&[s.hidden, s.text_hidden], &self.projection))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

fn write_gguf(out: &Path, md: &[(String, gguf_file::Value)], tensors: &[(String, QTensor)]) {
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut file, &md, &tensors).unwrap();
}

fn scratch(tag: &str) -> PathBuf {
    api_common::store_dir(&format!("vision-scratch-{tag}"))
}

#[test]
fn tower_matches_candle_siglip_from_gguf_and_safetensors() {
    let shape = Shape::real(640);
    let tower = Tower::random(shape, 11);
    let dir = scratch("tower");
    let gguf = dir.join("tower.gguf");
    tower.write_gguf(&gguf);
    let st = dir.join("hf");
    tower.write_safetensors(&st);

    let g = GgufFile::open(&gguf).unwrap();
    let gemma = |t: Option<VisionTower>| match t {
        Some(VisionTower::Gemma3(t)) => t,
        _ => panic!("no Gemma 3 tower"),
    };
    let from_gguf = gemma(VisionTower::from_gguf(&g, &Device::Cpu).unwrap());
    let config = std::fs::read_to_string(st.join("config.json")).unwrap();
    let from_st = gemma(VisionTower::from_safetensors(&st, &config, &Device::Cpu).unwrap());
    assert_eq!(from_gguf.tokens_per_image(), 256);
    assert_eq!(from_gguf.side(), 896);

    // A non-square picture, resized to the tower's square by our preprocessing.
    let img = candlewick::model::image::decode(&test_png(300, 200, 1)).unwrap();
    let pixels = from_gguf.preprocess.pixels(&img).unwrap();
    let want = tower.reference(&pixels.data);
    for (what, t) in [("gguf", &from_gguf), ("safetensors", &from_st)] {
        let got: Vec<f32> = t
            .encode(&pixels)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = rel_diff(&got, &want);
        assert!(d < 1e-3, "{what}: relative difference {d}");
    }
}

fn gemma() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(&common::test_model(GEMMA3_GGUF), &Device::Cpu).unwrap())
}

/// Logits of the rows `want` of one prompt run in a fresh f32 cache, with `images`.
fn logits(tokens: &[u32], images: Vec<ImageRows>, want: &[usize]) -> Vec<Vec<f32>> {
    let m = gemma();
    let mut cache = CpuKvCache::with_type(m.config(), 8, 16, KvType::F32);
    let mut batch = Batch::default();
    batch.push_seq(tokens, 0, (0..8).collect(), false);
    batch.logits_indices = want.to_vec();
    batch.images = images;
    let out = m.decoder.forward(&batch, &mut cache).unwrap();
    out.to_vec2().unwrap()
}

/// An image's rows enter the decoder as given (not scaled as token embeddings are), and
/// attend to each other both ways: the real Gemma 3 270M, with an "image" made of a token's
/// own scaled embedding row.
#[test]
fn image_rows_enter_the_decoder() {
    let m = gemma();
    let t = m
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    let hidden = m.config().hidden_size;
    // Token t[3]'s embedding as the decoder sees it: the table row times sqrt(hidden).
    let g = GgufFile::open(&common::test_model(GEMMA3_GGUF)).unwrap();
    let mut file = std::fs::File::open(&g.path).unwrap();
    let table = g
        .content
        .tensor(&mut file, "token_embd.weight", &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    let row = (table.get(t[3] as usize).unwrap() * (hidden as f64).sqrt())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let last = t.len() - 1;
    let plain = logits(&t, Vec::new(), &[last]);
    let mut with_image = t.clone();
    with_image[3] = IMAGE_ID | 99;
    let image = vec![ImageRows {
        row: 3,
        embeds: row.clone(),
        bidirectional: true,
    }];
    let injected = logits(&with_image, image, &[last]);
    let d = rel_diff(&injected[0], &plain[0]);
    assert!(
        d < 1e-4,
        "a one-row image equal to the token's embedding: {d}"
    );

    // Three image rows: the first one's output depends on the third (both ways), the text
    // before the image does not.
    let mut tokens = t.clone();
    tokens.splice(2..2, [IMAGE_ID | 1, IMAGE_ID | 2, IMAGE_ID | 3]);
    let rows = |third: f64| {
        let r3 = (&row * third).unwrap();
        vec![ImageRows {
            row: 2,
            embeds: Tensor::cat(&[&row, &row, &r3], 0).unwrap(),
            bidirectional: true,
        }]
    };
    let a = logits(&tokens, rows(1.0), &[1, 2]);
    let b = logits(&tokens, rows(-1.0), &[1, 2]);
    assert_eq!(a[0], b[0], "text before the image cannot see it");
    assert!(
        rel_diff(&a[1], &b[1]) > 1e-3,
        "an image row sees the rows after it"
    );
}

/// The 270M GGUF with a random small tower added as Ollama's `gemma3` carries one.
fn vision_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let src = common::test_model(GEMMA3_GGUF);
        let mut file = std::fs::File::open(&src).unwrap();
        let ct = gguf_file::Content::read(&mut file).unwrap();
        let mut md: GgufMetadata = ct.metadata.clone().into_iter().collect();
        let mut tensors: GgufTensors = ct
            .tensor_infos
            .keys()
            .map(|n| (n.clone(), ct.tensor(&mut file, n, &Device::Cpu).unwrap()))
            .collect();
        let (vt, vmd) = Tower::random(Shape::small(640), 5).gguf_parts();
        tensors.extend(vt);
        md.extend(vmd);
        let out = scratch("gguf").join("gemma3-vision.gguf");
        write_gguf(&out, &md, &tensors);
        out
    })
    .clone()
}

fn chat(images: &[&[u8]], text: &str) -> Value {
    json!({
        "model": "gemma3-vision",
        "stream": false,
        "messages": [{"role": "user", "content": text, "images": images.iter().map(|i| b64(i)).collect::<Vec<_>>()}],
        "options": {"temperature": 0, "num_predict": 8},
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn images_over_http() {
    let models = api_common::store_dir("vision-http");
    api_common::import(&models, "gemma3-vision", &vision_gguf());
    api_common::import(&models, "gemma3-text", &common::test_model(GEMMA3_GGUF));
    let (addr, _state) = api_common::spawn_server(api_common::config(models, &[]));
    let base = format!("http://{addr}");
    let (a, b) = (test_png(64, 48, 1), test_png(64, 48, 2));

    let (_, show) = post(&base, "/api/show", json!({"model": "gemma3-vision"})).await;
    let caps = show["capabilities"].as_array().unwrap();
    assert!(caps.contains(&json!("vision")), "{caps:?}");
    let (_, show) = post(&base, "/api/show", json!({"model": "gemma3-text"})).await;
    assert!(!show["capabilities"]
        .as_array()
        .unwrap()
        .contains(&json!("vision")));

    // An image costs its embeddings plus the tokens around them.
    let (s, text_only) = post(&base, "/api/chat", chat(&[], "Describe.")).await;
    assert_eq!(s, 200, "{text_only}");
    let (s, first) = post(&base, "/api/chat", chat(&[&a], "Describe.")).await;
    assert_eq!(s, 200, "{first}");
    let extra = first["prompt_eval_count"].as_u64().unwrap()
        - text_only["prompt_eval_count"].as_u64().unwrap();
    assert_eq!(
        extra,
        16 + 2 + 2,
        "16 embeddings, \\n\\n<start_of_image>, <end_of_image>\\n\\n"
    );

    // The same image again: the same answer, from the cached prefix.
    let (_, again) = post(&base, "/api/chat", chat(&[&a], "Describe.")).await;
    assert_eq!(again["message"], first["message"]);
    // OpenAI's image_url (a data URL) is the same input.
    let (s, oai) = post(
        &base,
        "/v1/chat/completions",
        json!({
            "model": "gemma3-vision", "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(&a))}},
                {"type": "text", "text": "Describe."},
            ]}],
        }),
    )
    .await;
    assert_eq!(s, 200, "{oai}");
    assert_eq!(
        oai["choices"][0]["message"]["content"],
        first["message"]["content"]
    );

    // So are Anthropic's image block and the Responses API's input_image.
    let (s, claude) = post(
        &base,
        "/v1/messages",
        json!({
            "model": "gemma3-vision", "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(&a)}},
                {"type": "text", "text": "Describe."},
            ]}],
        }),
    )
    .await;
    assert_eq!(s, 200, "{claude}");
    assert_eq!(claude["content"][0]["text"], first["message"]["content"]);
    let (s, resp) = post(
        &base,
        "/v1/responses",
        json!({
            "model": "gemma3-vision", "temperature": 0, "max_output_tokens": 8,
            "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": format!("data:image/png;base64,{}", b64(&a))},
                {"type": "input_text", "text": "Describe."},
            ]}],
        }),
    )
    .await;
    assert_eq!(s, 200, "{resp}");
    assert_eq!(
        resp["output"][0]["content"][0]["text"],
        first["message"]["content"]
    );

    // Another image in the same place is not mistaken for the cached one: its answer is
    // what a fresh model gives it.
    let (_, other) = post(&base, "/api/chat", chat(&[&b], "Describe.")).await;
    let (s, _) = post(
        &base,
        "/api/generate",
        json!({"model": "gemma3-vision", "keep_alive": 0}),
    )
    .await;
    assert_eq!(s, 200);
    let (_, fresh) = post(&base, "/api/chat", chat(&[&b], "Describe.")).await;
    assert_eq!(other["message"], fresh["message"]);

    // /api/generate takes images too.
    let (s, gen) = post(
        &base,
        "/api/generate",
        json!({"model": "gemma3-vision", "prompt": "Describe.", "images": [b64(&a)], "stream": false,
               "options": {"temperature": 0, "num_predict": 4}}),
    )
    .await;
    assert_eq!(s, 200, "{gen}");
    assert_eq!(gen["prompt_eval_count"], first["prompt_eval_count"]);

    // Refusals: a model without vision, bytes that are no image, base64 that is not, and a
    // URL the server was not allowed to fetch.
    let mut req = chat(&[&a], "Describe.");
    req["model"] = json!("gemma3-text");
    let (s, e) = post(&base, "/api/chat", req).await;
    assert_eq!(
        (s, e["error"].as_str().unwrap()),
        (400, "\"gemma3-text\" does not support image input")
    );
    let (s, e) = post(&base, "/api/chat", chat(&[b"not an image"], "Describe.")).await;
    assert_eq!(s, 400);
    assert!(
        e["error"].as_str().unwrap().contains("invalid image"),
        "{e}"
    );
    let mut req = chat(&[], "Describe.");
    req["messages"][0]["images"] = json!(["%%%"]);
    let (s, _) = post(&base, "/api/chat", req).await;
    assert_eq!(s, 400);
    let (s, e) = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "gemma3-vision", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}),
    )
    .await;
    assert_eq!(s, 400);
    assert!(e.to_string().contains("WICK_FETCH_IMAGES"), "{e}");
}

/// The official clients send images: python `ollama` (a file path, bytes, and
/// `generate`), `openai` (`image_url` with a data URL), and npm `ollama` (base64 and
/// `Uint8Array`, streamed), against the `wick` binary.
#[test]
fn official_clients_send_images() {
    let models = api_common::store_dir("vision-clients");
    api_common::import(&models, "gemma3-vision", &vision_gguf());
    api_common::import(&models, "gemma3-text", &common::test_model(GEMMA3_GGUF));
    let image = scratch("clients").join("picture.png");
    std::fs::write(&image, test_png(80, 60, 3)).unwrap();
    let server = api_common::WickProcess::start(&models, &[]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let js = root.join("tests/clients/js");
    assert!(
        js.join("node_modules/ollama/package.json").exists(),
        "ollama-js is not installed; run scripts/test-deps.sh"
    );
    let runs = [
        (
            "python3",
            vec!["-m", "pytest", "-q", "tests/clients_vision"],
            root.to_path_buf(),
        ),
        ("node", vec!["--test", "vision.test.mjs"], js),
    ];
    for (prog, args, dir) in runs {
        let out = std::process::Command::new(prog)
            .args(&args)
            .current_dir(dir)
            .env("OLLAMA_HOST", &server.host)
            .env("WICK_TEST_IMAGE", &image)
            .output()
            .unwrap_or_else(|e| panic!("running {prog} (scripts/test-deps.sh installs it): {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{stdout}");
        assert!(
            out.status.success(),
            "{prog} {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
