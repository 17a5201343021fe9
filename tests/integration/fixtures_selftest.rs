//! Checks the shared test fixtures in `tests/integration/common` against
//! candle-transformers, so other tests can trust them as a reference: tiny models load and
//! run, GGUF conversion is exact on a round trip, and converted real GGUFs agree with
//! candle's own quantized models.
//!
//! Measured on the fetched test models (64 positions, one token at a time): SmolLM2 Q4_1
//! agrees on 61/64 greedy tokens (the other three are near-ties, within 0.11 logit), its
//! f32-dequantized GGUF on 64/64 with logits equal to 1e-4; Qwen2.5-Coder Q4_K_M agrees on
//! 62/64. Skipping the llama Q/K un-permutation drops SmolLM2 to 21/64.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use crate::common::*;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};

/// English prose long enough for 64 tokens in either vocabulary.
const TEXT: &str = "The quick brown fox jumps over the lazy dog. Every morning, the old baker \
opens his small shop on the corner of the street and sells fresh bread to the people of the \
town. Children stop by on their way to school to buy sweet rolls, while their parents talk \
about the weather, the harvest and the news of the day.";
const POSITIONS: usize = 64;
const MIN_AGREEMENT: f64 = 0.95;

fn qwen_ids(text: &str) -> Vec<u32> {
    let tokenizer = tokenizers::Tokenizer::from_file(test_model(QWEN_TOKENIZER))
        .unwrap_or_else(|e| panic!("loading the Qwen tokenizer: {e}"));
    let encoding = tokenizer
        .encode(text, false)
        .unwrap_or_else(|e| panic!("encoding with the Qwen tokenizer: {e}"));
    encoding.get_ids().to_vec()
}

fn assert_finite_rows(rows: &[Vec<f32>], vocab: usize, what: &str) {
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), vocab, "{what}: row {i} length");
        assert!(
            row.iter().all(|v| v.is_finite()),
            "{what}: row {i} not finite"
        );
        let (min, max) = row
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(max > min, "{what}: row {i} is constant");
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn tiny_models_load_and_run_in_candle_transformers() {
    let prompt = qwen_ids("Hello, tiny model!");
    let decode = [785u32, 3974, 13];
    for arch in TinyArch::ALL {
        let scratch = ScratchDir::new("tiny");
        let dir = write_tiny_model(arch, scratch.path(), 7);
        for file in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(dir.join(file).is_file(), "{arch:?}: {file} missing");
        }
        assert_eq!(TinyArch::of_model_dir(&dir), arch);

        let rows = reference_logits(arch, &dir, &prompt, &decode);
        assert_eq!(rows.len(), 1 + decode.len(), "{arch:?}");
        assert_finite_rows(&rows, TINY_VOCAB_SIZE, &format!("{arch:?}"));

        // The KV-cache path must match one full forward over the same tokens, otherwise the
        // reference itself would be unreliable for decode comparisons.
        let all: Vec<u32> = prompt.iter().chain(&decode).copied().collect();
        let full = reference_logits(arch, &dir, &all, &[]);
        let diff = max_abs_diff(&full[0], rows.last().unwrap());
        assert!(diff < 1e-4, "{arch:?}: prefill vs decode differ by {diff}");
    }
}

#[test]
fn tiny_models_are_deterministic_per_seed() {
    let scratch = ScratchDir::new("tiny-seed");
    let read = |seed: u64, name: &str| {
        let dir = write_tiny_model(TinyArch::Qwen2, &scratch.path().join(name), seed);
        fs::read(dir.join("model.safetensors")).unwrap()
    };
    let a = read(1, "a");
    assert_eq!(a, read(1, "b"), "same seed, different weights");
    assert_ne!(a, read(2, "c"), "different seeds, same weights");
}

/// The GGUF name for a Hugging Face tensor name, as llama.cpp's converter writes it.
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").expect(hf);
    let (layer, rest) = rest.split_once('.').unwrap();
    let parts = [
        ("self_attn.q_proj.", "attn_q."),
        ("self_attn.k_proj.", "attn_k."),
        ("self_attn.v_proj.", "attn_v."),
        ("self_attn.o_proj.", "attn_output."),
        ("self_attn.q_norm.", "attn_q_norm."),
        ("self_attn.k_norm.", "attn_k_norm."),
        ("mlp.gate_proj.", "ffn_gate."),
        ("mlp.up_proj.", "ffn_up."),
        ("mlp.down_proj.", "ffn_down."),
        ("input_layernorm.", "attn_norm."),
        ("post_attention_layernorm.", "ffn_norm."),
    ];
    let (h, g) = parts.iter().find(|(h, _)| rest.starts_with(h)).expect(hf);
    format!("blk.{layer}.{g}{}", &rest[h.len()..])
}

/// llama.cpp's forward permutation (`LlamaModel.permute`): each head's rows viewed as
/// `[2, head_dim/2]` are transposed to `[head_dim/2, 2]`.
fn permute_rows(t: &Tensor, n_head: usize) -> Tensor {
    let dims = t.dims().to_vec();
    let head_dim = dims[0] / n_head;
    let cols: usize = dims[1..].iter().product();
    t.reshape((n_head, 2, head_dim / 2, cols))
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape(dims))
        .unwrap()
}

/// Writes `dir`'s tiny model as a GGUF the way llama.cpp would (f32, llama Q/K permuted).
fn write_tiny_gguf(arch: TinyArch, dir: &Path, path: &Path) {
    use gguf_file::Value;
    let hf = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors = Vec::new();
    for (name, t) in &hf {
        let mut t = t.clone();
        if arch == TinyArch::Llama && name.contains(".q_proj.") {
            t = permute_rows(&t, TINY_HEADS);
        } else if arch == TinyArch::Llama && name.contains(".k_proj.") {
            t = permute_rows(&t, TINY_KV_HEADS);
        }
        tensors.push((
            gguf_name(name),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let a = arch.model_type();
    let rope_theta = if arch == TinyArch::Llama {
        500000.0
    } else {
        10000.0
    };
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), Value::U32(TINY_LAYERS as u32)),
        (format!("{a}.context_length"), Value::U32(4096)),
        (
            format!("{a}.embedding_length"),
            Value::U32(TINY_HIDDEN_SIZE as u32),
        ),
        (
            format!("{a}.feed_forward_length"),
            Value::U32(TINY_INTERMEDIATE_SIZE as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            Value::U32(TINY_HEADS as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(TINY_KV_HEADS as u32),
        ),
        (
            format!("{a}.attention.key_length"),
            Value::U32(TINY_HEAD_DIM as u32),
        ),
        (
            format!("{a}.rope.dimension_count"),
            Value::U32(TINY_HEAD_DIM as u32),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(rope_theta)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

#[test]
fn gguf_round_trip_restores_hf_tensors_and_config() {
    for arch in TinyArch::ALL {
        let scratch = ScratchDir::new("roundtrip");
        let src = write_tiny_model(arch, &scratch.path().join("src"), 11);
        let gguf = scratch.path().join("tiny.gguf");
        write_tiny_gguf(arch, &src, &gguf);
        let out = gguf_to_hf_dir(&gguf, &scratch.path().join("hf"), None);

        let load = |dir: &Path| -> HashMap<String, Tensor> {
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
        };
        let (want, got) = (load(&src), load(&out));
        let mut want_names: Vec<_> = want.keys().collect();
        let mut got_names: Vec<_> = got.keys().collect();
        want_names.sort();
        got_names.sort();
        assert_eq!(want_names, got_names, "{arch:?}: tensor names");
        for (name, w) in &want {
            let g = &got[name];
            assert_eq!(w.dims(), g.dims(), "{arch:?}: {name} shape");
            let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(w == g, "{arch:?}: {name} values differ");
        }

        let config = |dir: &Path| -> serde_json::Value {
            serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
        };
        let (want, got) = (config(&src), config(&out));
        for key in [
            "model_type",
            "architectures",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "tie_word_embeddings",
        ] {
            assert_eq!(want[key], got[key], "{arch:?}: config {key}");
        }
        assert_eq!(got["head_dim"], TINY_HEAD_DIM, "{arch:?}: head_dim");
        assert!(
            !out.join("tokenizer.json").exists(),
            "no tokenizer was asked for"
        );

        // A second call finds the marker and keeps the first conversion.
        let before = fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        gguf_to_hf_dir(&gguf, &out, None);
        let after = fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after, "{arch:?}: cached conversion was redone");
    }
}

/// Token ids for SmolLM2 without a tokenizer: greedy longest match of the text against the
/// GGUF's own vocabulary (byte-level BPE pieces, `Ġ` for a leading space). It is not the
/// real BPE segmentation, but every id is a real, common piece of English text, which is
/// all a logits comparison needs.
fn gguf_vocab_ids(gguf: &Path, text: &str) -> Vec<u32> {
    let mut file = fs::File::open(gguf).unwrap();
    let ct = gguf_file::Content::read(&mut file).unwrap();
    let tokens = ct.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
    let vocab: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string().unwrap().as_str(), i as u32))
        .collect();
    let chars: Vec<char> = text
        .chars()
        .map(|c| if c == ' ' { 'Ġ' } else { c })
        .collect();
    let mut ids = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        let found = (1..=(chars.len() - at).min(24)).rev().find_map(|len| {
            let piece: String = chars[at..at + len].iter().collect();
            vocab.get(piece.as_str()).map(|&id| (id, len))
        });
        let (id, len) = found.unwrap_or_else(|| panic!("no vocabulary piece at {:?}", chars[at]));
        ids.push(id);
        at += len;
    }
    ids
}

/// Feeds `ids` one at a time to a quantized model (which only returns last-position
/// logits), so every position gets its own logits row.
fn step_by_step(
    ids: &[u32],
    mut forward: impl FnMut(&Tensor, usize) -> candle_core::Result<Tensor>,
) -> Vec<Vec<f32>> {
    ids.iter()
        .enumerate()
        .map(|(pos, &id)| {
            let x = Tensor::new(&[id], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = forward(&x, pos).unwrap();
            logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

/// How two models' per-position logits compare.
struct Agreement {
    positions: usize,
    /// Positions with the same greedy token.
    same: usize,
    /// `same` plus near-ties: the other model's pick is within `NEAR_TIE` of the best
    /// reference logit. Quantizing activations (which candle's quantized matmul does) flips
    /// such picks without anything being wrong.
    same_or_tie: usize,
    max_logit_diff: f32,
}

const NEAR_TIE: f32 = 0.25;

impl Agreement {
    fn measure(what: &str, reference: &[Vec<f32>], other: &[Vec<f32>]) -> Agreement {
        assert_eq!(reference.len(), other.len());
        let mut a = Agreement {
            positions: reference.len(),
            same: 0,
            same_or_tie: 0,
            max_logit_diff: 0.0,
        };
        for (r, o) in reference.iter().zip(other) {
            let (best, pick) = (argmax(r), argmax(o));
            a.same += usize::from(best == pick);
            a.same_or_tie += usize::from(r[best as usize] - r[pick as usize] <= NEAR_TIE);
            a.max_logit_diff = a.max_logit_diff.max(max_abs_diff(r, o));
        }
        println!(
            "{what}: greedy argmax agrees on {}/{} positions ({:.1}%), {} counting near-ties \
             ({:.1}%); max |logit diff| {:.4}",
            a.same,
            a.positions,
            a.percent(a.same),
            a.same_or_tie,
            a.percent(a.same_or_tie),
            a.max_logit_diff
        );
        a
    }

    fn percent(&self, n: usize) -> f64 {
        100.0 * n as f64 / self.positions as f64
    }
}

/// Checks a quantized model's logits against the converted checkpoint's: greedy tokens agree,
/// up to quantization near-ties, on `MIN_AGREEMENT` of positions.
fn assert_quantized_agreement(what: &str, reference: &[Vec<f32>], quantized: &[Vec<f32>]) {
    let a = Agreement::measure(what, reference, quantized);
    assert!(
        a.percent(a.same_or_tie) >= MIN_AGREEMENT * 100.0,
        "{what}: only {:.1}% of positions agree",
        a.percent(a.same_or_tie)
    );
}

#[test]
fn smollm2_gguf_converts_to_an_equivalent_llama_checkpoint() {
    let gguf = test_model(SMOLLM2_GGUF);
    let dir = test_gguf_hf_dir(SMOLLM2_GGUF, None);
    assert_eq!(TinyArch::of_model_dir(&dir), TinyArch::Llama);

    let ids = gguf_vocab_ids(&gguf, TEXT);
    assert!(ids.len() >= POSITIONS, "only {} ids", ids.len());
    let ids = &ids[..POSITIONS];
    let reference = reference_logits(TinyArch::Llama, &dir, &ids[..1], &ids[1..]);

    let mut file = fs::File::open(&gguf).unwrap();
    let ct = gguf_file::Content::read(&mut file).unwrap();
    let mut model = quantized_llama::ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap();
    let quantized = step_by_step(ids, |x, pos| model.forward(x, pos));
    assert_quantized_agreement("SmolLM2 Q4_1 GGUF vs converted", &reference, &quantized);

    // The same GGUF with every tensor dequantized to f32 (still in llama.cpp's Q/K row
    // order) must give the converted checkpoint's logits to float rounding: this pins the
    // un-permutation, names and config down exactly, with no quantization noise.
    let bytes = dequantized_gguf(&gguf);
    let mut cursor = std::io::Cursor::new(bytes);
    let ct = gguf_file::Content::read(&mut cursor).unwrap();
    let mut model =
        quantized_llama::ModelWeights::from_gguf(ct, &mut cursor, &Device::Cpu).unwrap();
    let exact = step_by_step(ids, |x, pos| model.forward(x, pos));
    let a = Agreement::measure("SmolLM2 f32 GGUF vs converted", &reference, &exact);
    assert_eq!(
        a.same, a.positions,
        "f32 GGUF and converted checkpoint pick differently"
    );
    assert!(
        a.max_logit_diff < 1e-3,
        "logits differ by {}",
        a.max_logit_diff
    );
}

/// `gguf` with every tensor dequantized to f32 and the metadata unchanged, as file bytes.
fn dequantized_gguf(gguf: &Path) -> Vec<u8> {
    let cpu = Device::Cpu;
    let mut file = fs::File::open(gguf).unwrap();
    let ct = gguf_file::Content::read(&mut file).unwrap();
    let tensors: Vec<(String, QTensor)> = ct
        .tensor_infos
        .keys()
        .map(|name| {
            let t = ct
                .tensor(&mut file, name, &cpu)
                .unwrap()
                .dequantize(&cpu)
                .unwrap();
            (name.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap())
        })
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    out.into_inner()
}

#[test]
fn qwen_gguf_converts_to_an_equivalent_qwen2_checkpoint() {
    let gguf = test_model(QWEN_GGUF);
    let tokenizer = qwen_tokenizer_dir();
    let dir = test_gguf_hf_dir(QWEN_GGUF, Some(&tokenizer));
    assert_eq!(TinyArch::of_model_dir(&dir), TinyArch::Qwen2);
    assert!(dir.join("tokenizer.json").is_file());
    assert!(dir.join("tokenizer_config.json").is_file());

    let ids = qwen_ids(TEXT);
    assert!(ids.len() >= POSITIONS, "only {} ids", ids.len());
    let ids = &ids[..POSITIONS];
    let reference = reference_logits(TinyArch::Qwen2, &dir, &ids[..1], &ids[1..]);

    let mut file = fs::File::open(&gguf).unwrap();
    let ct = gguf_file::Content::read(&mut file).unwrap();
    let mut model = quantized_qwen2::ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap();
    let quantized = step_by_step(ids, |x, pos| model.forward(x, pos));
    assert_quantized_agreement(
        "Qwen2.5-Coder Q4_K_M GGUF vs converted",
        &reference,
        &quantized,
    );
}
