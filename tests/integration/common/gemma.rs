//! Gemma 3 for the tests: random-weight Hugging Face checkpoints of any shape (as
//! `gemma3_text`, or inside the multimodal `gemma3` wrapper), the real GGUF test model as a
//! Hugging Face checkpoint, and candle-transformers' `gemma3` model as the reference. Like
//! the rest of `common`, it knows nothing of the crate's own model code.

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::gemma3;
use serde_json::{json, Value as Json};

use super::{write_json, write_safetensors, F32Tensor, Res, SplitMix64};

pub const GEMMA3_GGUF: &str = "gemma-3-270m-q4_k_m.gguf";
/// Gemma 3's Hugging Face tokenizer.json and tokenizer_config.json (chat template).
pub const GEMMA3_TOKENIZER: &str = "gemma3-tokenizer.json";
pub const GEMMA3_TOKENIZER_CONFIG: &str = "gemma3-tokenizer_config.json";

/// The sizes and attention layout of a Gemma 3 text model.
#[derive(Clone, Debug)]
pub struct GemmaShape {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: usize,
    /// Every `pattern`-th layer (1-based) is global, the others slide.
    pub pattern: usize,
    pub max_positions: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_local_theta: f64,
    pub final_logit_softcapping: Option<f64>,
}

impl GemmaShape {
    /// google/gemma-3-270m, as its config.json gives it.
    pub fn gemma3_270m() -> GemmaShape {
        GemmaShape {
            vocab: 262_144,
            hidden: 640,
            intermediate: 2048,
            layers: 18,
            heads: 4,
            kv_heads: 1,
            head_dim: 256,
            sliding_window: 512,
            pattern: 6,
            max_positions: 32_768,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_local_theta: 10_000.0,
            final_logit_softcapping: None,
        }
    }

    /// A small model over a `vocab`-token vocabulary: four layers of which the second and
    /// fourth are global, a window of 8, and heads wider than hidden/heads (as Gemma's are).
    pub fn tiny(vocab: usize) -> GemmaShape {
        GemmaShape {
            vocab,
            hidden: 64,
            intermediate: 96,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            sliding_window: 8,
            pattern: 2,
            max_positions: 4096,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_local_theta: 10_000.0,
            final_logit_softcapping: None,
        }
    }

    fn is_sliding(&self, layer: usize) -> bool {
        !(layer + 1).is_multiple_of(self.pattern)
    }

    /// The configuration candle's reference model takes.
    fn candle_config(&self) -> gemma3::Config {
        gemma3::Config {
            attention_bias: false,
            head_dim: self.head_dim,
            hidden_activation: candle_nn::Activation::GeluPytorchTanh,
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_attention_heads: self.heads,
            num_hidden_layers: self.layers,
            num_key_value_heads: self.kv_heads,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_local_base_freq: self.rope_local_theta,
            vocab_size: self.vocab,
            final_logit_softcapping: self.final_logit_softcapping,
            attn_logit_softcapping: None,
            // candle scales scores by 1/sqrt(head_dim): the same as Gemma's
            // query_pre_attn_scalar when that equals head_dim, as the configs here say.
            query_pre_attn_scalar: self.head_dim,
            sliding_window: self.sliding_window,
            sliding_window_pattern: self.pattern,
            max_position_embeddings: self.max_positions,
        }
    }

    /// The text model's config.json fields, as transformers writes them for Gemma 3.
    fn text_config(&self) -> Json {
        let layer_types: Vec<&str> = (0..self.layers)
            .map(|l| {
                if self.is_sliding(l) {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        json!({
            "model_type": "gemma3_text",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": self.max_positions,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_local_base_freq": self.rope_local_theta,
            "rope_scaling": null,
            "query_pre_attn_scalar": self.head_dim,
            "sliding_window": self.sliding_window,
            "layer_types": layer_types,
            "_sliding_window_pattern": self.pattern,
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": null,
            "attention_bias": false,
            "tie_word_embeddings": true,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "torch_dtype": "float32",
        })
    }
}

/// How a checkpoint holds the text model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmaLayout {
    /// `Gemma3ForCausalLM`: config `gemma3_text`, tensors `model.*`.
    Text,
    /// `Gemma3ForConditionalGeneration` as released: config `gemma3` with the text model's
    /// fields (only a few, the rest defaulted) in `text_config`, tensors
    /// `language_model.model.*` beside the vision tower's.
    Wrapped,
}

impl GemmaLayout {
    fn prefix(self) -> &'static str {
        match self {
            GemmaLayout::Text => "",
            GemmaLayout::Wrapped => "language_model.",
        }
    }
}

fn config_json(shape: &GemmaShape, layout: GemmaLayout) -> Json {
    match layout {
        GemmaLayout::Text => {
            let mut c = shape.text_config();
            c["architectures"] = json!(["Gemma3ForCausalLM"]);
            c
        }
        GemmaLayout::Wrapped => {
            // Released multimodal configs omit what equals Gemma3TextConfig's defaults
            // (rms_norm_eps, rope bases, tie_word_embeddings ...) and give the pattern as
            // sliding_window_pattern. query_pre_attn_scalar stays: its default (256) is
            // the released models' head_dim, not a small model's.
            let full = shape.text_config();
            let mut text = serde_json::Map::new();
            for key in [
                "model_type",
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
                "sliding_window",
                "final_logit_softcapping",
                "query_pre_attn_scalar",
            ] {
                text.insert(key.into(), full[key].clone());
            }
            text.insert("sliding_window_pattern".into(), json!(shape.pattern));
            json!({
                "architectures": ["Gemma3ForConditionalGeneration"],
                "model_type": "gemma3",
                "text_config": text,
                "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32},
                "mm_tokens_per_image": 256,
                "torch_dtype": "float32",
            })
        }
    }
}

/// Writes a random-weight Gemma 3 checkpoint of `shape` into `dir`: config.json,
/// model.safetensors (f32) and `tokenizer_json` as tokenizer.json. Norm weights are Hugging
/// Face's offsets from 1 (the model multiplies by 1 + w). A wrapped checkpoint also holds a
/// stray vision tensor, which a text decoder must leave alone. Returns `dir`.
pub fn write_random_gemma3(
    dir: &Path,
    shape: &GemmaShape,
    seed: u64,
    layout: GemmaLayout,
    tokenizer_json: &Path,
) -> PathBuf {
    write_random_inner(dir, shape, seed, layout, tokenizer_json)
        .unwrap_or_else(|e| panic!("writing a random Gemma 3 to {}: {e}", dir.display()));
    dir.to_path_buf()
}

fn write_random_inner(
    dir: &Path,
    shape: &GemmaShape,
    seed: u64,
    layout: GemmaLayout,
    tokenizer_json: &Path,
) -> Res<()> {
    fs::create_dir_all(dir)?;
    write_json(&dir.join("config.json"), &config_json(shape, layout))?;
    fs::copy(tokenizer_json, dir.join("tokenizer.json"))?;
    let mut rng = SplitMix64::new(seed);
    let p = format!("{}model", layout.prefix());
    let (h, d) = (shape.hidden, shape.head_dim);
    let (q_out, kv_out) = (shape.heads * d, shape.kv_heads * d);
    let mut out = Vec::new();
    let mut tensor = |name: String, dims: Vec<usize>, mean: f32, std: f32| {
        let values = rng.normals(dims.iter().product(), mean, std);
        out.push(F32Tensor::new(name, dims, &values));
    };
    tensor(
        format!("{p}.embed_tokens.weight"),
        vec![shape.vocab, h],
        0.0,
        0.02,
    );
    for l in 0..shape.layers {
        let lp = format!("{p}.layers.{l}");
        let matrices = [
            ("self_attn.q_proj", q_out, h),
            ("self_attn.k_proj", kv_out, h),
            ("self_attn.v_proj", kv_out, h),
            ("self_attn.o_proj", h, q_out),
            ("mlp.gate_proj", shape.intermediate, h),
            ("mlp.up_proj", shape.intermediate, h),
            ("mlp.down_proj", h, shape.intermediate),
        ];
        for (name, rows, cols) in matrices {
            tensor(format!("{lp}.{name}.weight"), vec![rows, cols], 0.0, 0.02);
        }
        // Offsets from 1, large enough that ignoring a norm (or the +1) shows in the logits.
        for (name, len) in [
            ("input_layernorm", h),
            ("post_attention_layernorm", h),
            ("pre_feedforward_layernorm", h),
            ("post_feedforward_layernorm", h),
            ("self_attn.q_norm", d),
            ("self_attn.k_norm", d),
        ] {
            tensor(format!("{lp}.{name}.weight"), vec![len], 0.0, 0.1);
        }
    }
    tensor(format!("{p}.norm.weight"), vec![h], 0.0, 0.1);
    if layout == GemmaLayout::Wrapped {
        tensor(
            "vision_tower.vision_model.post_layernorm.weight".into(),
            vec![32],
            0.0,
            0.1,
        );
    }
    write_safetensors(&dir.join("model.safetensors"), &out)
}

/// candle-transformers' Gemma 3 on a checkpoint of `shape`, f32 on the CPU.
pub struct GemmaReference {
    model: gemma3::Model,
}

impl GemmaReference {
    pub fn load(dir: &Path, shape: &GemmaShape, layout: GemmaLayout) -> GemmaReference {
        let load = || -> Res<gemma3::Model> {
            // SAFETY: the weights file is not modified while mapped.
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(
                    &[dir.join("model.safetensors")],
                    DType::F32,
                    &Device::Cpu,
                )?
            };
            let vb = match layout {
                GemmaLayout::Text => vb,
                GemmaLayout::Wrapped => vb.pp("language_model"),
            };
            Ok(gemma3::Model::new(false, &shape.candle_config(), vb)?)
        };
        let model = load().unwrap_or_else(|e| panic!("candle gemma3 on {}: {e}", dir.display()));
        GemmaReference { model }
    }

    /// Runs `tokens` at positions `pos..` and returns the last one's logits. Several tokens
    /// at once are exact only within the sliding window (candle's prefill mask lets a token
    /// see one position more than the window; its decode path, one token at a time, is
    /// exact at any length).
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
        let mut run = || -> Res<Vec<f32>> {
            let x = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
            let logits = self.model.forward(&x, pos)?;
            Ok(logits.flatten_all()?.to_vec1::<f32>()?)
        };
        run().unwrap_or_else(|e| panic!("candle gemma3 forward: {e}"))
    }
}

/// The shape of the Gemma 3 GGUF `ct` (a text model; vision tensors are ignored).
fn gguf_shape(ct: &gguf_file::Content) -> Res<GemmaShape> {
    let u = |k: &str| super::md_usize(ct, &format!("gemma3.{k}"));
    let f = |k: &str| super::md_float(ct, &format!("gemma3.{k}"));
    let vocab = ct
        .tensor_infos
        .get("token_embd.weight")
        .ok_or("no token_embd.weight")?
        .shape
        .dims()[0];
    Ok(GemmaShape {
        vocab,
        hidden: u("embedding_length")?,
        intermediate: u("feed_forward_length")?,
        layers: u("block_count")?,
        heads: u("attention.head_count")?,
        kv_heads: u("attention.head_count_kv")?,
        head_dim: u("attention.key_length")?,
        sliding_window: u("attention.sliding_window")?,
        // Neither llama.cpp's converter nor this file says it: Gemma 3's fixed pattern.
        pattern: 6,
        max_positions: u("context_length")?,
        rms_norm_eps: f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
        rope_theta: f("rope.freq_base")?.unwrap_or(1_000_000.0),
        rope_local_theta: 10_000.0,
        final_logit_softcapping: None,
    })
}

/// The shape of a Gemma 3 GGUF file.
pub fn gemma3_gguf_shape(gguf: &Path) -> GemmaShape {
    let read = || -> Res<GemmaShape> {
        let mut file = fs::File::open(gguf)?;
        gguf_shape(&gguf_file::Content::read(&mut file)?)
    };
    read().unwrap_or_else(|e| panic!("{}: {e}", gguf.display()))
}

/// The Gemma 3 half of `convert_gguf`: every tensor dequantized to f32 under its Hugging
/// Face name, norm weights back to offsets from 1 (GGUF converters store 1 + w), and a
/// `gemma3_text` config.json.
pub(super) fn convert_gemma3(ct: &gguf_file::Content, file: &mut fs::File, out: &Path) -> Res<()> {
    let shape = gguf_shape(ct)?;
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let Some(hf) = super::hf_tensor_name(name, true) else {
            return Err(format!("GGUF tensor {name} has no Hugging Face mapping").into());
        };
        let mut t = ct
            .tensor(file, name, &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        if name.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        tensors.push(F32Tensor::from_tensor(hf, &t)?);
    }
    write_safetensors(&out.join("model.safetensors"), &tensors)?;
    drop(tensors);
    write_json(
        &out.join("config.json"),
        &config_json(&shape, GemmaLayout::Text),
    )
}
