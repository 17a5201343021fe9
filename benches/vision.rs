//! Vision on the CPU: one image through a Gemma 3 vision tower of the real size (SigLIP-so400m:
//! 27 layers, 1152 wide; random weights, since the registries carry no vision weights), and
//! over HTTP the time to first token of a chat's first turn with an image against its second
//! turn, which resends the image with the history (the image's embeddings and the prompt's
//! KV blocks are reused, so only the new text is computed).
//!
//! `cargo bench --bench vision` (the image side from WICK_BENCH_IMAGE, default 448: Gemma 3's
//! tower reads 896, so 448 is a quarter of its patches; threads from WICK_NUM_THREADS). The
//! text model is the Gemma 3 270M test GGUF, with the tower written beside it into one file
//! as Ollama's registry ships `gemma3`.

use std::time::{Duration, Instant};

use base64::Engine as _;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Module, Tensor};
use candle_transformers::models::siglip;
use candlewick::model::vision::{siglip_name, VisionTower};
use candlewick::model::weights::GgufFile;
use futures_util::StreamExt;
use serde_json::{json, Value};

use common::{env_usize, median, models_dir};

mod common;

/// A GGUF file's tensors and metadata, as `gguf_file::write` takes them (owned).
type GgufTensors = Vec<(String, QTensor)>;
type GgufMetadata = Vec<(String, gguf_file::Value)>;

const NAME: &str = "gemma3-vision:bench";

/// A random tower of SigLIP-so400m's shape reading `image`-pixel squares, pooled to 256
/// embeddings of `text_hidden`, as Ollama's GGUF tensors (f16, as Ollama stores it) and
/// metadata.
fn tower(image: usize, text_hidden: usize) -> (GgufTensors, GgufMetadata) {
    let (h, i, layers, patch) = (1152usize, 4304usize, 27usize, 14usize);
    let mut tensors = Vec::new();
    let mut add = |name: String, dims: &[usize], mean: f64| {
        let t =
            (Tensor::randn(0f32, 0.02, dims, &Device::Cpu).expect("randn") + mean).expect("add");
        let ty = if dims.len() > 1 {
            GgmlDType::F16
        } else {
            GgmlDType::F32
        };
        tensors.push((name, QTensor::quantize(&t, ty).expect("quantize")));
    };
    add(
        "v.patch_embedding.weight".into(),
        &[h, 3, patch, patch],
        0.0,
    );
    add("v.patch_embedding.bias".into(), &[h], 0.0);
    add(
        "v.position_embedding.weight".into(),
        &[(image / patch).pow(2), h],
        0.0,
    );
    for l in 0..layers {
        for p in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            add(format!("v.blk.{l}.{p}.weight"), &[h, h], 0.0);
            add(format!("v.blk.{l}.{p}.bias"), &[h], 0.0);
        }
        for n in ["layer_norm1", "layer_norm2"] {
            add(format!("v.blk.{l}.{n}.weight"), &[h], 1.0);
            add(format!("v.blk.{l}.{n}.bias"), &[h], 0.0);
        }
        add(format!("v.blk.{l}.mlp.fc1.weight"), &[i, h], 0.0);
        add(format!("v.blk.{l}.mlp.fc1.bias"), &[i], 0.0);
        add(format!("v.blk.{l}.mlp.fc2.weight"), &[h, i], 0.0);
        add(format!("v.blk.{l}.mlp.fc2.bias"), &[h], 0.0);
    }
    add("v.post_layernorm.weight".into(), &[h], 1.0);
    add("v.post_layernorm.bias".into(), &[h], 0.0);
    add("mm.mm_soft_emb_norm.weight".into(), &[h], 1.0);
    add(
        "mm.mm_input_projection.weight".into(),
        &[h, text_hidden],
        0.0,
    );
    use gguf_file::Value as V;
    let md = [
        ("block_count", V::U32(layers as u32)),
        ("embedding_length", V::U32(h as u32)),
        ("feed_forward_length", V::U32(i as u32)),
        ("attention.head_count", V::U32(16)),
        ("image_size", V::U32(image as u32)),
        ("patch_size", V::U32(patch as u32)),
        ("num_channels", V::U32(3)),
        ("attention.layer_norm_epsilon", V::F32(1e-6)),
    ]
    .into_iter()
    .map(|(k, v)| (format!("gemma3.vision.{k}"), v))
    .chain([("gemma3.mm.tokens_per_image".to_string(), V::U32(256))])
    .collect();
    (tensors, md)
}

fn png(side: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 256) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

/// Streams one chat and returns the time to its first content and the prompt's size.
async fn ttft(base: &str, messages: &Value) -> (Duration, u64) {
    let t = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("{base}/api/chat"))
        .json(&json!({"model": NAME, "messages": messages,
                      "options": {"temperature": 0, "num_predict": 4}}))
        .send()
        .await
        .expect("chat");
    assert!(
        resp.status().is_success(),
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let mut stream = resp.bytes_stream();
    let (mut first, mut buf, mut prompt) = (None, Vec::new(), 0);
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.expect("chunk"));
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Value = serde_json::from_slice(&buf[..nl]).expect("json line");
            buf.drain(..=nl);
            if first.is_none() {
                first = Some(t.elapsed());
            }
            if line["done"] == true {
                prompt = line["prompt_eval_count"].as_u64().unwrap_or(0);
            }
        }
    }
    (first.expect("a first chunk"), prompt)
}

fn main() {
    // Threads as the server sets them: our pool, candle's own ops on one thread.
    candlewick::model::init_threads();
    let side = env_usize("WICK_BENCH_IMAGE", 448);
    let text = models_dir().join("gemma-3-270m-q4_k_m.gguf");
    assert!(text.is_file(), "{} is missing", text.display());
    let dir = std::env::temp_dir().join(format!("wick-vision-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let gguf = dir.join("gemma3-vision.gguf");
    {
        let mut file = std::fs::File::open(&text).expect("open");
        let ct = gguf_file::Content::read(&mut file).expect("gguf");
        let mut md: GgufMetadata = ct.metadata.clone().into_iter().collect();
        let mut tensors: GgufTensors = ct
            .tensor_infos
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    ct.tensor(&mut file, n, &Device::Cpu).expect("tensor"),
                )
            })
            .collect();
        let (vt, vmd) = tower(side, 640);
        tensors.extend(vt);
        md.extend(vmd);
        let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut out = std::fs::File::create(&gguf).expect("create");
        gguf_file::write(&mut out, &md, &tensors).expect("write gguf");
    }
    let image = png(side as u32);

    // The tower alone.
    let g = GgufFile::open(&gguf).expect("open");
    let Some(VisionTower::Gemma3(tower)) = VisionTower::from_gguf(&g, &Device::Cpu).expect("load")
    else {
        panic!("no Gemma 3 tower");
    };
    let img = candlewick::model::image::decode(&image).expect("decode");
    let times: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            let pixels = tower.preprocess.pixels(&img).expect("pixels");
            tower.encode(&pixels).expect("encode");
            t.elapsed().as_secs_f64()
        })
        .collect();
    // The peer in the same run: candle-transformers' SigLIP on the same weights, without the
    // projector (its ops on one thread, as candle runs inside wick: what served images before
    // our encoder).
    let mut hf = std::collections::HashMap::new();
    for name in g.content.tensor_infos.keys() {
        let Some(hf_name) = siglip_name(name) else {
            continue;
        };
        let mut file = std::fs::File::open(&gguf).expect("open");
        let t = g
            .content
            .tensor(&mut file, name, &Device::Cpu)
            .expect("tensor");
        hf.insert(hf_name, t.dequantize(&Device::Cpu).expect("dequantize"));
    }
    let cfg = siglip::VisionConfig {
        hidden_size: 1152,
        intermediate_size: 4304,
        num_hidden_layers: 27,
        num_attention_heads: 16,
        num_channels: 3,
        image_size: side,
        patch_size: 14,
        hidden_act: candle_nn::Activation::GeluPytorchTanh,
        layer_norm_eps: 1e-6,
    };
    let vb = candle_nn::VarBuilder::from_tensors(hf, candle_core::DType::F32, &Device::Cpu);
    let peer = siglip::VisionModel::new(&cfg, false, vb).expect("candle siglip");
    let pixels = tower.preprocess.pixels(&img).expect("pixels");
    let x = Tensor::from_slice(&pixels.data, (1, 3, side, side), &Device::Cpu).expect("pixels");
    let peer_times: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            peer.forward(&x).expect("candle forward");
            t.elapsed().as_secs_f64()
        })
        .collect();
    drop((tower, g, peer));
    println!(
        "\nGemma 3 vision tower (SigLIP-so400m shape, 27 layers), one {side}x{side} image \
         ({} patches -> 256 embeddings), median of 3: wick {:.2} s (preprocessing and \
         projector included), candle-transformers' siglip {:.2} s (encoder only)",
        (side / 14).pow(2),
        median(times),
        median(peer_times)
    );

    // Over HTTP: a chat's first turn with the image, then its second turn.
    let (rt, base) = common::serve_gguf(&dir.join("store"), NAME, &gguf);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    let (first, second) = rt.block_on(async {
        // Load the model (text only) before timing.
        ttft(&base, &json!([{"role": "user", "content": "Hi"}])).await;
        let turn1 =
            json!([{"role": "user", "content": "What is in this picture?", "images": [b64]}]);
        let first = ttft(&base, &turn1).await;
        let turn2 = json!([
            {"role": "user", "content": "What is in this picture?", "images": [b64]},
            {"role": "assistant", "content": "A pattern of colours."},
            {"role": "user", "content": "Which colour is strongest?"},
        ]);
        (first, ttft(&base, &turn2).await)
    });
    println!("| turn | prompt tokens | TTFT ms |");
    println!("|---|---:|---:|");
    println!(
        "| first (image encoded, whole prompt computed) | {} | {:.0} |",
        first.1,
        first.0.as_secs_f64() * 1e3
    );
    println!(
        "| second (image resent with the history) | {} | {:.0} |",
        second.1,
        second.0.as_secs_f64() * 1e3
    );
    println!(
        "second / first TTFT: {:.3}",
        second.0.as_secs_f64() / first.0.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
