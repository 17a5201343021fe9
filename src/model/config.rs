//! One architecture description for every supported decoder family. The differences between
//! Llama 3.x / SmolLM2 / Mistral, Qwen2/2.5, Qwen3 and Gemma 3 are fields here (QKV bias, q/k
//! norm, tied embeddings, rope scaling, sliding window per layer, Gemma's extra norms, GELU
//! gate, embedding scale and logit soft-capping), never separate model code.

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
    /// Gemma 3 (text): q/k norm, norms after attention and feed-forward as well as before,
    /// GELU gate, scaled embeddings, sliding-window layers with their own rope base and a
    /// global layer every sixth.
    Gemma3,
}

impl Family {
    pub fn parse(arch: &str) -> Result<Self> {
        match arch {
            "llama" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            // Qwen-VL's text models are these with a multimodal rope (`ArchConfig::mrope`).
            "qwen2_vl" | "qwen2_5_vl" | "qwen2_5_vl_text" | "qwen2_vl_text" | "qwen25vl" => {
                Ok(Self::Qwen2)
            }
            "qwen3" | "qwen3vl" | "qwen3_vl" | "qwen3_vl_text" => Ok(Self::Qwen3),
            // `gemma3_text` is the text model's Hugging Face type; `gemma3` names the
            // multimodal wrapper there and the text weights in GGUF.
            "gemma3" | "gemma3_text" => Ok(Self::Gemma3),
            other => Err(Error::UnsupportedArch(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
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

/// How rope frequencies are stretched for contexts beyond the trained one.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1: long wavelengths slowed by a factor, short ones kept, smooth between.
    Llama3(Llama3RopeScaling),
    /// Every frequency divided by `factor` (position interpolation; Gemma 3 4B and larger,
    /// on their global layers).
    Linear { factor: f64 },
}

/// Multimodal rope (Qwen-VL): each rotary frequency turns by one of a token's three
/// positions (time, height, width). A text token's three are equal, so text alone is plain
/// rope; an image's rows count along its grid.
#[derive(Clone, Debug, PartialEq)]
pub struct MRope {
    /// Frequencies per axis (t, h, w), together `head_dim / 2`.
    pub sections: [usize; 3],
    /// Qwen3-VL's layout (t, h, w, t, h, w, ... while h and w last, then t); otherwise
    /// Qwen2-VL's (a run of t, then of h, then of w).
    pub interleaved: bool,
}

impl MRope {
    /// The axis (0 t, 1 h, 2 w) whose position turns frequency `j`.
    pub fn axis(&self, j: usize) -> usize {
        let [t, h, w] = self.sections;
        if self.interleaved {
            match j % 3 {
                1 if j < 3 * h => 1,
                2 if j < 3 * w => 2,
                _ => 0,
            }
        } else if j < t {
            0
        } else if j < t + h {
            1
        } else if j < t + h + w {
            2
        } else {
            0
        }
    }
}

/// The activation of the feed-forward gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Mistral, Qwen.
    Silu,
    /// GELU in its tanh approximation (GeGLU): Gemma.
    GeluTanh,
}

impl Activation {
    /// From a Hugging Face `hidden_act` / `hidden_activation` name.
    fn parse(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Self::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu_tanh" => Ok(Self::GeluTanh),
            other => Err(Error::Config(format!(
                "unsupported activation '{other}' (supported: silu, gelu_pytorch_tanh)"
            ))),
        }
    }
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
    pub rope_scaling: Option<RopeScaling>,
    /// Qwen-VL's multimodal rope.
    pub mrope: Option<MRope>,
    pub rms_norm_eps: f64,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    /// The window of sliding-window layers: a token sees itself and the `window - 1`
    /// positions before it.
    pub sliding_window: Option<usize>,
    /// Layers that see the whole context although `sliding_window` is set (Gemma 3's global
    /// layers); empty when the window applies to every layer.
    pub full_attention_layers: Vec<usize>,
    /// Rope base of the sliding-window layers when it is their own (Gemma 3's local layers);
    /// those layers then take no rope scaling, which is for the global ones.
    pub sliding_rope_theta: Option<f64>,
    pub activation: Activation,
    /// A norm on the attention output and on the feed-forward output before each joins the
    /// residual stream (Gemma 2/3: four norms per layer).
    pub post_norms: bool,
    /// Token embeddings are multiplied by sqrt(hidden_size) (Gemma).
    pub scale_embeddings: bool,
    /// RMS norm weights are stored as offsets from 1, and the norm multiplies by
    /// `1 + weight` (Hugging Face Gemma checkpoints; GGUF converters store the sum).
    pub norm_weights_offset: bool,
    /// Attention scores are scaled by 1/sqrt(this) instead of 1/sqrt(head_dim) (Gemma's
    /// `query_pre_attn_scalar`).
    pub query_pre_attn_scalar: Option<f64>,
    /// Final logits are soft-capped: `cap * tanh(logit / cap)`.
    pub final_logit_softcap: Option<f64>,
    /// The trained context length.
    pub max_position_embeddings: usize,
}

/// Gemma 3 makes every sixth layer global when its files do not say otherwise
/// (transformers' `sliding_window_pattern` default; llama.cpp and Ollama assume it too).
const GEMMA3_PATTERN: usize = 6;

/// Layers `0..layers` that are global when every `pattern`-th one is (1-based).
fn every_nth_global(layers: usize, pattern: usize) -> Vec<usize> {
    if pattern == 0 {
        return Vec::new();
    }
    (0..layers).filter(|i| (i + 1) % pattern == 0).collect()
}

impl ArchConfig {
    /// KV cache bytes per token with elements of type `ty`.
    pub fn kv_bytes_per_token(&self, ty: super::KvType) -> usize {
        2 * self.num_layers * ty.bytes(self.num_kv_heads * self.head_dim)
    }

    /// The sliding window of `layer`, or None when it sees the whole context.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| !self.full_attention_layers.contains(&layer))
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
        if let Some(m) = &self.mrope {
            if m.sections.iter().sum::<usize>() != self.head_dim / 2 {
                return bad(format!(
                    "mrope sections {:?} do not add up to head_dim / 2 = {}",
                    m.sections,
                    self.head_dim / 2
                ));
            }
        }
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return bad("layers, hidden size and vocabulary must be positive".into());
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive".into());
        }
        if let Some(&l) = self
            .full_attention_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            return bad(format!(
                "global layer {l} is beyond the {} layers",
                self.num_layers
            ));
        }
        let positive = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && v > 0.0);
        if !positive(self.query_pre_attn_scalar) || !positive(self.final_logit_softcap) {
            return bad("query_pre_attn_scalar and soft-capping must be positive".into());
        }
        if !positive(self.sliding_rope_theta) || !positive(Some(self.rope_theta)) {
            return bad("rope bases must be positive".into());
        }
        Ok(self)
    }

    /// From a Hugging Face `config.json`. A multimodal wrapper (Gemma 3's `gemma3`) is read
    /// through its `text_config`, the text model the decoder runs.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let config_err = |e: serde_json::Error| Error::Config(format!("config.json: {e}"));
        let mut v: serde_json::Value = serde_json::from_str(json).map_err(config_err)?;
        if let Some(serde_json::Value::Object(text)) = v.get("text_config") {
            let mut text = text.clone();
            if !text.contains_key("model_type") {
                let outer = v.get("model_type").cloned().unwrap_or_default();
                text.insert("model_type".into(), outer);
            }
            v = serde_json::Value::Object(text);
        }
        let model_type = v
            .get("model_type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| Error::Config("config.json: no model_type".into()))?
            .to_string();
        let family = Family::parse(&model_type)?;
        if family == Family::Gemma3 {
            gemma3_defaults(&mut v);
        }
        let c: HfConfig = serde_json::from_value(v).map_err(config_err)?;
        let num_heads = c.num_attention_heads;
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / num_heads.max(1));
        let mrope = c.rope_scaling.as_ref().and_then(hf_mrope).transpose()?;
        let rope_scaling = match c.rope_scaling {
            Some(v) if v.is_null() => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or(v.get("type"))
                    .and_then(|t| t.as_str());
                match kind {
                    Some("llama3") => Some(RopeScaling::Llama3(
                        serde_json::from_value(v)
                            .map_err(|e| Error::Config(format!("rope_scaling: {e}")))?,
                    )),
                    Some("linear") => match v.get("factor").and_then(|f| f.as_f64()) {
                        Some(factor) if factor > 0.0 => Some(RopeScaling::Linear { factor }),
                        _ => return Err(Error::Config(format!("rope_scaling {v}: bad factor"))),
                    },
                    // Qwen2-VL's "mrope" is the default rope with sections (read above).
                    Some("default" | "mrope") => None,
                    // Other scaling types (yarn, dynamic) change results; refuse rather
                    // than guess.
                    _ => return Err(Error::Config(format!("unsupported rope_scaling {v}"))),
                }
            }
            None => None,
        };
        if c.attn_logit_softcapping.is_some_and(|c| c > 0.0) {
            return Err(Error::Config(
                "attention logit soft-capping (Gemma 2) is not supported".into(),
            ));
        }
        let gemma = family == Family::Gemma3;
        let activation = match c.hidden_activation.as_ref().or(c.hidden_act.as_ref()) {
            Some(name) => Activation::parse(name)?,
            None if gemma => Activation::GeluTanh,
            None => Activation::Silu,
        };
        let num_layers = c.num_hidden_layers;
        let full_attention_layers = if !gemma {
            Vec::new()
        } else if let Some(types) = &c.layer_types {
            if types.len() != num_layers {
                return Err(Error::Config(format!(
                    "layer_types lists {} layers for {num_layers}",
                    types.len()
                )));
            }
            (0..num_layers)
                .filter(|&i| types[i] != "sliding_attention")
                .collect()
        } else {
            let pattern = c
                .sliding_window_pattern
                .or(c.private_sliding_window_pattern)
                .unwrap_or(GEMMA3_PATTERN);
            every_nth_global(num_layers, pattern)
        };
        ArchConfig {
            family,
            arch_name: model_type,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads: c.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            mrope,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            tie_embeddings: c.tie_word_embeddings.unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || c.attention_bias.unwrap_or(false),
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            sliding_window: if c
                .use_sliding_window
                .unwrap_or(matches!(family, Family::Llama | Family::Gemma3))
            {
                c.sliding_window
            } else {
                None
            },
            full_attention_layers,
            sliding_rope_theta: if gemma { c.rope_local_base_freq } else { None },
            activation,
            post_norms: gemma,
            scale_embeddings: gemma,
            norm_weights_offset: gemma,
            query_pre_attn_scalar: if gemma { c.query_pre_attn_scalar } else { None },
            final_logit_softcap: c.final_logit_softcapping.filter(|&c| c > 0.0),
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
        let gemma = family == Family::Gemma3;
        let key = |k: &str| format!("{arch}.{k}");
        // The first of several spellings writers use for one value.
        let f64_of = |keys: &[&str]| keys.iter().find_map(|k| md_f64(md, &key(k)).ok());
        let num_heads = md_usize(md, &key("attention.head_count"))?;
        let hidden_size = md_usize(md, &key("embedding_length"))?;
        let num_layers = md_usize(md, &key("block_count"))?;
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
            Some(t) if t == "llama3" => Some(RopeScaling::Llama3(Llama3RopeScaling {
                factor: md_f64(md, &key("rope.scaling.factor"))?,
                low_freq_factor: md_f64(md, &key("rope.scaling.low_freq_factor")).unwrap_or(1.0),
                high_freq_factor: md_f64(md, &key("rope.scaling.high_freq_factor")).unwrap_or(4.0),
                original_max_position_embeddings: md_usize(
                    md,
                    &key("rope.scaling.original_context_length"),
                )?,
            })),
            Some(t) if t == "linear" => match md_f64(md, &key("rope.scaling.factor")) {
                Ok(1.0) => None,
                Ok(factor) if factor > 0.0 => Some(RopeScaling::Linear { factor }),
                _ => return Err(missing(&key("rope.scaling.factor"))),
            },
            Some(t) if t == "none" => None,
            Some(t) => {
                return Err(Error::Config(format!(
                    "unsupported rope scaling type '{t}'"
                )))
            }
            // Llama 3.1 GGUFs carry the scaling as a `rope_freqs` tensor instead (see weights).
            None => None,
        };
        if f64_of(&["attn_logit_softcapping"]).is_some_and(|c| c > 0.0) {
            return Err(Error::Config(
                "attention logit soft-capping (Gemma 2) is not supported".into(),
            ));
        }
        let sliding_window = md_usize(md, &key("attention.sliding_window")).ok();
        let full_attention_layers = if gemma {
            gguf_global_layers(md, &key("attention.sliding_window_pattern"), num_layers)?
        } else {
            Vec::new()
        };
        ArchConfig {
            family,
            arch_name: arch.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: md_usize(md, &key("feed_forward_length"))?,
            num_layers,
            num_heads,
            num_kv_heads: md_usize(md, &key("attention.head_count_kv")).unwrap_or(num_heads),
            head_dim,
            // Ollama's first Gemma 3 conversions say `rope.global.freq_base`.
            rope_theta: f64_of(&["rope.freq_base", "rope.global.freq_base"]).unwrap_or(if gemma {
                1_000_000.0
            } else {
                10_000.0
            }),
            rope_scaling,
            mrope: gguf_mrope(md, &arch)?,
            rms_norm_eps: md_f64(md, &key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(if gemma { 1e-6 } else { 1e-5 }),
            tie_embeddings: !has_tensor("output.weight"),
            qkv_bias: has_tensor("blk.0.attn_q.bias"),
            qk_norm: has_tensor("blk.0.attn_q_norm.weight"),
            sliding_window,
            full_attention_layers,
            // Ollama writes `rope.local.freq_base`, llama.cpp `rope.freq_base_swa` (or
            // nothing: then both assume 10000, as transformers does).
            sliding_rope_theta: if gemma {
                Some(
                    f64_of(&[
                        "rope.local.freq_base",
                        "rope.freq_base_swa",
                        "rope.local_freq_base",
                    ])
                    .unwrap_or(10_000.0),
                )
            } else {
                None
            },
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            post_norms: gemma,
            scale_embeddings: gemma,
            norm_weights_offset: false,
            // GGUF has no key for it: Gemma 3 27B (62 layers) scales by hidden/heads, the
            // others by head_dim, as llama.cpp and Ollama decide it.
            query_pre_attn_scalar: (gemma && num_layers == 62)
                .then(|| (hidden_size / num_heads.max(1)) as f64),
            final_logit_softcap: f64_of(&["final_logit_softcapping"]).filter(|&c| c > 0.0),
            max_position_embeddings: md_usize(md, &key("context_length")).unwrap_or(4096),
        }
        .validate()
    }
}

/// Qwen-VL's multimodal rope from GGUF: `rope.mrope_section` (Ollama) or
/// `rope.dimension_sections` (llama.cpp), three sections and an unused fourth;
/// interleaved for Qwen3-VL.
fn gguf_mrope(md: &HashMap<String, Value>, arch: &str) -> Result<Option<MRope>> {
    let Some((key, v)) = ["rope.mrope_section", "rope.dimension_sections"]
        .iter()
        .map(|k| format!("{arch}.{k}"))
        .find_map(|k| md.get(&k).map(|v| (k, v)))
    else {
        return Ok(None);
    };
    let n: Vec<usize> = v
        .to_vec()
        .ok()
        .map(|a| {
            a.iter()
                .filter_map(|x| {
                    x.to_u32()
                        .ok()
                        .or_else(|| x.to_i32().ok().map(|i| i as u32))
                })
                .map(|x| x as usize)
                .collect()
        })
        .unwrap_or_default();
    match n.as_slice() {
        [t, h, w, rest @ ..] if rest.iter().all(|&r| r == 0) => Ok(Some(MRope {
            sections: [*t, *h, *w],
            interleaved: arch == "qwen3vl",
        })),
        _ => Err(Error::Config(format!("bad {key}: {n:?}"))),
    }
}

/// Gemma 3's global layers from GGUF: `sliding_window_pattern` as one flag per layer (true:
/// sliding) or as a period; absent, every sixth layer.
fn gguf_global_layers(md: &HashMap<String, Value>, key: &str, layers: usize) -> Result<Vec<usize>> {
    match md.get(key) {
        None => Ok(every_nth_global(layers, GEMMA3_PATTERN)),
        Some(Value::Array(flags)) => {
            if flags.len() != layers {
                return Err(Error::Config(format!(
                    "{key} has {} entries for {layers} layers",
                    flags.len()
                )));
            }
            flags
                .iter()
                .enumerate()
                .filter_map(|(i, f)| match f.to_bool() {
                    Ok(true) => None,
                    Ok(false) => Some(Ok(i)),
                    Err(_) => Some(Err(missing(key))),
                })
                .collect()
        }
        Some(_) => Ok(every_nth_global(layers, md_usize(md, key)?)),
    }
}

/// Qwen-VL's multimodal rope from a config.json `rope_scaling` (`mrope_section`, with
/// `mrope_interleaved` for Qwen3-VL), or `None` for a plain rope.
fn hf_mrope(v: &serde_json::Value) -> Option<Result<MRope>> {
    let sections = v.get("mrope_section")?;
    let parsed: Option<[usize; 3]> = sections.as_array().filter(|a| a.len() == 3).and_then(|a| {
        let n: Vec<usize> = a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as usize)
            .collect();
        n.try_into().ok()
    });
    Some(match parsed {
        Some(sections) => Ok(MRope {
            sections,
            interleaved: v
                .get("mrope_interleaved")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
        }),
        None => Err(Error::Config(format!("bad mrope_section {sections}"))),
    })
}

/// Fills what a Gemma 3 text config leaves out with transformers' `Gemma3TextConfig`
/// defaults (multimodal checkpoints list only what differs from them).
fn gemma3_defaults(v: &mut serde_json::Value) {
    let Some(obj) = v.as_object_mut() else {
        return;
    };
    let defaults = serde_json::json!({
        "vocab_size": 262_208,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131_072,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
    });
    if let serde_json::Value::Object(defaults) = defaults {
        for (k, d) in defaults {
            obj.entry(k).or_insert(d);
        }
    }
}

#[derive(Deserialize)]
struct HfConfig {
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
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    rope_local_base_freq: Option<f64>,
    sliding_window_pattern: Option<usize>,
    #[serde(rename = "_sliding_window_pattern")]
    private_sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// GGUF metadata of a small Gemma 3 under `arch`, plus `extra` keys.
    fn gemma_md(layers: u32, extra: Vec<(&str, Value)>) -> HashMap<String, Value> {
        let mut md: HashMap<String, Value> = [
            ("general.architecture", Value::String("gemma3".into())),
            ("gemma3.attention.head_count", Value::U32(8)),
            ("gemma3.attention.head_count_kv", Value::U32(4)),
            ("gemma3.attention.key_length", Value::U32(256)),
            ("gemma3.embedding_length", Value::U32(5376)),
            ("gemma3.feed_forward_length", Value::U32(1024)),
            ("gemma3.block_count", Value::U32(layers)),
            ("gemma3.vocab_size", Value::U32(1000)),
            ("gemma3.attention.sliding_window", Value::U32(1024)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        md.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
        md
    }

    #[test]
    fn gemma3_gguf_defaults_and_spellings() {
        // llama.cpp's keys: no pattern, no local base.
        let c = ArchConfig::from_gguf(&gemma_md(12, vec![]), |_| false).expect("config");
        assert_eq!(c.family, Family::Gemma3);
        assert_eq!(c.full_attention_layers, vec![5, 11]);
        assert_eq!((c.rope_theta, c.sliding_rope_theta), (1e6, Some(1e4)));
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(c.query_pre_attn_scalar, None);
        assert_eq!(c.final_logit_softcap, None);
        assert!(c.post_norms && c.scale_embeddings && !c.norm_weights_offset);

        // Ollama's: global/local bases, a per-layer pattern, a zero soft-cap (= none).
        let pattern = [true, false, true, true, false, true]
            .into_iter()
            .map(Value::Bool)
            .collect();
        let md = gemma_md(
            6,
            vec![
                ("gemma3.rope.global.freq_base", Value::F32(5e5)),
                ("gemma3.rope.local.freq_base", Value::F32(2e4)),
                (
                    "gemma3.attention.sliding_window_pattern",
                    Value::Array(pattern),
                ),
                ("gemma3.final_logit_softcapping", Value::F32(0.0)),
            ],
        );
        let c = ArchConfig::from_gguf(&md, |_| false).expect("config");
        assert_eq!(c.full_attention_layers, vec![1, 4]);
        assert_eq!((c.rope_theta, c.sliding_rope_theta), (5e5, Some(2e4)));
        assert_eq!(c.final_logit_softcap, None);
        assert_eq!(c.layer_window(0), Some(1024));
        assert_eq!(c.layer_window(1), None);

        // 27B (62 layers) scales queries by hidden / heads; a linear rope scaling factor.
        let md = gemma_md(
            62,
            vec![
                ("gemma3.rope.scaling.type", Value::String("linear".into())),
                ("gemma3.rope.scaling.factor", Value::F32(8.0)),
                ("gemma3.attention.sliding_window_pattern", Value::U32(3)),
            ],
        );
        let c = ArchConfig::from_gguf(&md, |_| false).expect("config");
        assert_eq!(c.query_pre_attn_scalar, Some(672.0));
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(c.full_attention_layers.len(), 20);
        assert_eq!(c.full_attention_layers[0], 2);

        let md = gemma_md(6, vec![("gemma3.attn_logit_softcapping", Value::F32(50.0))]);
        assert!(ArchConfig::from_gguf(&md, |_| false).is_err());
        let short = Value::Array(vec![Value::Bool(true)]);
        let md = gemma_md(6, vec![("gemma3.attention.sliding_window_pattern", short)]);
        assert!(ArchConfig::from_gguf(&md, |_| false).is_err());
    }

    #[test]
    fn gemma3_hf_text_and_wrapper() {
        let text = r#"{"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
            "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                            "sliding_attention"],
            "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
            "query_pre_attn_scalar": 256, "rope_scaling": null,
            "final_logit_softcapping": null, "attn_logit_softcapping": null}"#;
        let c = ArchConfig::from_hf_json(text).expect("config");
        assert_eq!(c.full_attention_layers, vec![1]);
        assert!(c.norm_weights_offset && c.qk_norm && c.post_norms);
        assert!(c.tie_embeddings, "Gemma ties by default");
        assert_eq!(c.activation, Activation::GeluTanh);

        // As google/gemma-3-4b-it: the text model's fields under text_config, the rest
        // Gemma3TextConfig's defaults.
        let wrapper = r#"{"architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                "model_type": "gemma3_text", "num_hidden_layers": 34,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "sliding_window": 1024},
            "vision_config": {"model_type": "siglip_vision_model"}}"#;
        let c = ArchConfig::from_hf_json(wrapper).expect("config");
        assert_eq!(c.family, Family::Gemma3);
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (8, 4, 256));
        assert_eq!(c.vocab_size, 262_208);
        assert_eq!(c.full_attention_layers, vec![5, 11, 17, 23, 29]);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        assert_eq!(c.sliding_rope_theta, Some(10_000.0));
        assert_eq!(c.max_position_embeddings, 131_072);
        assert_eq!(c.query_pre_attn_scalar, Some(256.0));

        let capped = text.replace(
            r#""attn_logit_softcapping": null"#,
            r#""attn_logit_softcapping": 50.0"#,
        );
        assert!(ArchConfig::from_hf_json(&capped).is_err());
        let gelu = text.replace(
            "\"head_dim\"",
            "\"hidden_activation\": \"relu\", \"head_dim\"",
        );
        assert!(ArchConfig::from_hf_json(&gelu).is_err());
    }

    #[test]
    fn other_families_keep_one_window_and_silu() {
        let qwen = r#"{"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "hidden_act": "silu", "sliding_window": 4096, "use_sliding_window": false}"#;
        let c = ArchConfig::from_hf_json(qwen).expect("config");
        assert_eq!(c.activation, Activation::Silu);
        assert!(c.full_attention_layers.is_empty() && c.sliding_window.is_none());
        assert!(!c.post_norms && !c.scale_embeddings && !c.norm_weights_offset);
        let mistral = r#"{"model_type": "mistral", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "sliding_window": 4096}"#;
        let c = ArchConfig::from_hf_json(mistral).expect("config");
        assert_eq!(
            (c.layer_window(0), c.layer_window(1)),
            (Some(4096), Some(4096))
        );
    }

    #[test]
    fn mrope_axes_follow_transformers() {
        // Qwen3-VL's apply_interleaved_mrope: start from t, then h at 1::3 below 3 * 20 and
        // w at 2::3 below 3 * 20.
        let m = MRope {
            sections: [24, 20, 20],
            interleaved: true,
        };
        let mut want = [0usize; 64];
        for j in (1..60).step_by(3) {
            want[j] = 1;
        }
        for j in (2..60).step_by(3) {
            want[j] = 2;
        }
        let got: Vec<usize> = (0..64).map(|j| m.axis(j)).collect();
        assert_eq!(got, want);
        assert_eq!(got.iter().filter(|&&a| a == 0).count(), 24);
        // Qwen2-VL's chunks: 16 of t, 24 of h, 24 of w.
        let m = MRope {
            sections: [16, 24, 24],
            interleaved: false,
        };
        let got: Vec<usize> = (0..64).map(|j| m.axis(j)).collect();
        assert_eq!(&got[..16], &[0; 16]);
        assert_eq!(&got[16..40], &[1; 24]);
        assert_eq!(&got[40..], &[2; 24]);
    }

    #[test]
    fn qwen3_vl_config_json() {
        // As Qwen/Qwen3-VL-2B-Instruct's config.json (text part abridged).
        let json = r#"{
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            "image_token_id": 151655,
            "text_config": {
                "model_type": "qwen3_vl_text", "hidden_size": 2048, "head_dim": 128,
                "intermediate_size": 6144, "num_hidden_layers": 28,
                "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 151936,
                "rms_norm_eps": 1e-6, "rope_theta": 5000000, "hidden_act": "silu",
                "max_position_embeddings": 262144, "tie_word_embeddings": true,
                "attention_bias": false,
                "rope_scaling": {"mrope_interleaved": true, "mrope_section": [24, 20, 20],
                                 "rope_type": "default"}
            },
            "vision_config": {"depth": 24, "hidden_size": 1024}
        }"#;
        let c = ArchConfig::from_hf_json(json).unwrap();
        assert_eq!(c.family, Family::Qwen3);
        assert!(c.qk_norm && !c.qkv_bias && c.rope_scaling.is_none());
        assert_eq!(
            c.mrope,
            Some(MRope {
                sections: [24, 20, 20],
                interleaved: true
            })
        );
        let bad = json.replace("[24, 20, 20]", "[24, 20, 21]");
        assert!(ArchConfig::from_hf_json(&bad).is_err());
    }
}
