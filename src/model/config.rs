//! One architecture description for every supported decoder family. The differences between
//! Llama 3.x / SmolLM2 / Mistral, Qwen2/2.5 and Qwen3 are fields here (QKV bias, q/k norm,
//! tied embeddings, rope scaling, sliding window), never separate model code.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

use super::{Error, Result};

/// The model families we can run; all share one decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3.x, SmolLM2, Mistral (no biases, no q/k norm).
    Llama,
    /// Qwen2 and Qwen2.5: biases on q/k/v.
    Qwen2,
    /// Qwen3: RMS norm on each q and k head, explicit head_dim.
    Qwen3,
}

impl Family {
    pub fn parse(arch: &str) -> Result<Self> {
        match arch {
            "llama" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            other => Err(Error::UnsupportedArch(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }
}

/// Llama 3.1-style frequency-dependent rope scaling.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ArchConfig {
    pub family: Family,
    /// The architecture string as the weights name it (e.g. "llama", "qwen2", "mistral").
    pub arch_name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rms_norm_eps: f64,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    pub sliding_window: Option<usize>,
    /// The trained context length.
    pub max_position_embeddings: usize,
}

impl ArchConfig {
    /// KV cache bytes per token at the given element size.
    pub fn kv_bytes_per_token(&self, elem_size: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * elem_size
    }

    fn validate(self) -> Result<Self> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return bad("attention head counts and head_dim must be positive".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for rope", self.head_dim));
        }
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("layers, hidden size and vocabulary must be positive".into());
        }
        Ok(self)
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let c: HfConfig =
            serde_json::from_str(json).map_err(|e| Error::Config(format!("config.json: {e}")))?;
        let family = Family::parse(&c.model_type)?;
        let num_heads = c.num_attention_heads;
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / num_heads.max(1));
        let rope_scaling = match c.rope_scaling {
            Some(v)
                if v.get("rope_type")
                    .or(v.get("type"))
                    .and_then(|t| t.as_str())
                    == Some("llama3") =>
            {
                Some(
                    serde_json::from_value(v)
                        .map_err(|e| Error::Config(format!("rope_scaling: {e}")))?,
                )
            }
            Some(v) if v.is_null() => None,
            // Other scaling types (linear, yarn, dynamic) change results; refuse rather than guess.
            Some(v) => return Err(Error::Config(format!("unsupported rope_scaling {v}"))),
            None => None,
        };
        ArchConfig {
            family,
            arch_name: c.model_type.clone(),
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers: c.num_hidden_layers,
            num_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            tie_embeddings: c.tie_word_embeddings.unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || c.attention_bias.unwrap_or(false),
            qk_norm: family == Family::Qwen3,
            sliding_window: if c.use_sliding_window.unwrap_or(family == Family::Llama) {
                c.sliding_window
            } else {
                None
            },
            max_position_embeddings: c.max_position_embeddings.unwrap_or(4096),
        }
        .validate()
    }

    /// From GGUF metadata (`general.architecture` and the `<arch>.*` keys). `tensor_names`
    /// tells whether the output projection is tied and whether biases exist.
    pub fn from_gguf(
        md: &HashMap<String, Value>,
        has_tensor: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let arch = md_str(md, "general.architecture")?;
        let family = Family::parse(&arch)?;
        let key = |k: &str| format!("{arch}.{k}");
        let num_heads = md_usize(md, &key("attention.head_count"))?;
        let hidden_size = md_usize(md, &key("embedding_length"))?;
        let head_dim = md_usize(md, &key("attention.key_length"))
            .or_else(|_| md_usize(md, &key("rope.dimension_count")))
            .unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match md_usize(md, &key("vocab_size")) {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok())
                .map(|v| v.len())
                .ok_or_else(|| Error::Config("no vocabulary size in GGUF metadata".into()))?,
        };
        let rope_scaling = match md
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
        {
            Some(t) if t == "llama3" => Some(Llama3RopeScaling {
                factor: md_f64(md, &key("rope.scaling.factor"))?,
                low_freq_factor: md_f64(md, &key("rope.scaling.low_freq_factor")).unwrap_or(1.0),
                high_freq_factor: md_f64(md, &key("rope.scaling.high_freq_factor")).unwrap_or(4.0),
                original_max_position_embeddings: md_usize(
                    md,
                    &key("rope.scaling.original_context_length"),
                )?,
            }),
            Some(t) if t == "none" => None,
            Some(t) => {
                return Err(Error::Config(format!(
                    "unsupported rope scaling type '{t}'"
                )))
            }
            // Llama 3.1 GGUFs carry the scaling as a `rope_freqs` tensor instead (see weights).
            None => None,
        };
        ArchConfig {
            family,
            arch_name: arch.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: md_usize(md, &key("feed_forward_length"))?,
            num_layers: md_usize(md, &key("block_count"))?,
            num_heads,
            num_kv_heads: md_usize(md, &key("attention.head_count_kv")).unwrap_or(num_heads),
            head_dim,
            rope_theta: md_f64(md, &key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: md_f64(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            tie_embeddings: !has_tensor("output.weight"),
            qkv_bias: has_tensor("blk.0.attn_q.bias"),
            qk_norm: has_tensor("blk.0.attn_q_norm.weight"),
            sliding_window: md_usize(md, &key("attention.sliding_window")).ok(),
            max_position_embeddings: md_usize(md, &key("context_length")).unwrap_or(4096),
        }
        .validate()
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_position_embeddings: Option<usize>,
}

fn missing(key: &str) -> Error {
    Error::Config(format!("GGUF metadata has no usable '{key}'"))
}

pub(crate) fn md_str(md: &HashMap<String, Value>, key: &str) -> Result<String> {
    md.get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| missing(key))
}

pub(crate) fn md_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let v = md.get(key).ok_or_else(|| missing(key))?;
    let n = match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I8(x) => u64::try_from(*x).map_err(|_| missing(key))?,
        Value::I16(x) => u64::try_from(*x).map_err(|_| missing(key))?,
        Value::I32(x) => u64::try_from(*x).map_err(|_| missing(key))?,
        Value::I64(x) => u64::try_from(*x).map_err(|_| missing(key))?,
        _ => return Err(missing(key)),
    };
    usize::try_from(n).map_err(|_| missing(key))
}

pub(crate) fn md_f64(md: &HashMap<String, Value>, key: &str) -> Result<f64> {
    match md.get(key) {
        Some(Value::F32(x)) => Ok(*x as f64),
        Some(Value::F64(x)) => Ok(*x),
        Some(_) => md_usize(md, key).map(|x| x as f64),
        None => Err(missing(key)),
    }
}
