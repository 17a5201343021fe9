//! BERT-family sentence embedding models (all-MiniLM, bge, e5 ... in the sentence-transformers
//! layout, and GGUF `bert` as Ollama's registry serves `all-minilm`; NomicBERT as it serves
//! `nomic-embed-text`): the encoder, the pooling and the normalisation the model's own
//! metadata asks for.
//!
//! The transformer itself is candle-transformers' `bert` module (Hugging Face's BertModel,
//! kept by candle's authors and checked against transformers there) or its `nomic_bert`
//! (rotary positions, fused QKV, SwiGLU), run on padded batches with an attention mask. What
//! the checkpoint says around it is read here: `modules.json` names the sentence-transformers
//! modules (Transformer, Pooling, Normalize), `<pooling dir>/config.json` the pooling modes. A
//! directory without `modules.json` is a plain BERT checkpoint: mean pooling, no
//! normalisation (what sentence-transformers itself falls back to).
//!
//! The tokenizer adds the model's special tokens (`[CLS] … [SEP]`); its own truncation and
//! padding settings are switched off, since the engine fits inputs to the context
//! ([`Embedder::fit`]) and [`Embedder::embed`] pads a batch itself.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use candle_transformers::models::nomic_bert::{Config as NomicConfig, NomicBertModel};
use serde_json::Value;

use super::{Error, Result};

/// How token states become one sentence vector (sentence-transformers' pooling modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The first token's state (`[CLS]`).
    Cls,
    /// The element-wise maximum over the tokens.
    Max,
    /// The mean over the tokens.
    Mean,
    /// The sum over the tokens divided by the square root of their count.
    MeanSqrtLen,
    /// The last token's state.
    LastToken,
}

impl Pooling {
    /// The name Ollama's GGUF metadata uses (`bert.pooling_type` is a number there; this is
    /// for logs and `/api/show`).
    pub fn name(self) -> &'static str {
        match self {
            Pooling::Cls => "cls",
            Pooling::Max => "max",
            Pooling::Mean => "mean",
            Pooling::MeanSqrtLen => "mean_sqrt_len",
            Pooling::LastToken => "last",
        }
    }
}

/// Model types this encoder runs (config.json `model_type`).
pub const ENCODER_TYPES: &[&str] = &["bert", "nomic_bert"];

/// GGUF architectures of encoder models (as llama.cpp and Ollama name them).
pub const GGUF_ENCODER_ARCHS: &[&str] = &["bert", "nomic-bert", "jina-bert-v2", "xlm-roberta"];

/// Whether `dir` holds an encoder checkpoint this module loads (config.json's `model_type`).
pub fn is_encoder_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("model_type")?.as_str().map(str::to_owned))
        .is_some_and(|t| ENCODER_TYPES.contains(&t.as_str()))
}

/// The transformer of an embedding model.
enum Encoder {
    Bert(BertModel),
    Nomic(NomicBertModel),
}

impl Encoder {
    /// Final token states `(n, len, hidden)` of a padded batch; `mask` is 1 on real tokens.
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let types = ids.zeros_like()?;
        Ok(match self {
            Encoder::Bert(m) => m.forward(ids, &types, Some(mask))?,
            // Its mask selects with `where_cond`, which takes an integer condition.
            Encoder::Nomic(m) => m.forward(ids, Some(&types), Some(&mask.to_dtype(DType::U8)?))?,
        })
    }
}

/// The sizes [`Embedder`] needs of either encoder's config.
struct Dims {
    hidden: usize,
    max_positions: usize,
    vocab_size: usize,
}

/// A loaded sentence embedding model.
pub struct Embedder {
    encoder: Encoder,
    tokenizer: tokenizers::Tokenizer,
    /// Applied in this order and concatenated (as sentence-transformers does).
    pooling: Vec<Pooling>,
    normalize: bool,
    hidden: usize,
    max_positions: usize,
    vocab_size: usize,
    /// Special tokens the tokenizer puts after the text (`[SEP]`), kept when an input is cut.
    tail: usize,
    device: Device,
    pub path: PathBuf,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// The pooling modes and whether to normalise, from `modules.json` and the pooling
/// module's config.
fn read_modules(dir: &Path) -> Result<(Vec<Pooling>, bool)> {
    let modules_path = dir.join("modules.json");
    if !modules_path.is_file() {
        return Ok((vec![Pooling::Mean], false));
    }
    let modules = read_json(&modules_path)?;
    let list = modules.as_array().ok_or_else(|| Error::Format {
        path: modules_path.clone(),
        msg: "expected a list of modules".into(),
    })?;
    let mut pooling = None;
    let mut normalize = false;
    for m in list {
        let ty = m.get("type").and_then(Value::as_str).unwrap_or_default();
        let kind = ty.rsplit('.').next().unwrap_or_default();
        match kind {
            "Transformer" => {}
            "Normalize" => normalize = true,
            "Pooling" => {
                let sub = m.get("path").and_then(Value::as_str).unwrap_or_default();
                // The module's folder is a plain name inside the model directory.
                if sub.contains("..") || sub.starts_with('/') {
                    return Err(Error::Format {
                        path: modules_path.clone(),
                        msg: format!("pooling module path {sub:?} leaves the model directory"),
                    });
                }
                pooling = Some(read_pooling(&dir.join(sub).join("config.json"))?);
            }
            other => {
                return Err(Error::Config(format!(
                    "sentence-transformers module {other:?} ({ty}) is not supported \
                     (supported: Transformer, Pooling, Normalize)"
                )))
            }
        }
    }
    Ok((pooling.unwrap_or_else(|| vec![Pooling::Mean]), normalize))
}

/// sentence-transformers' `1_Pooling/config.json`.
fn read_pooling(path: &Path) -> Result<Vec<Pooling>> {
    let cfg = read_json(path)?;
    let on = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
    if on("pooling_mode_weightedmean_tokens") {
        return Err(Error::Config(
            "weighted-mean pooling is not supported".into(),
        ));
    }
    // sentence-transformers concatenates the enabled modes in this order.
    let modes: Vec<Pooling> = [
        ("pooling_mode_cls_token", Pooling::Cls),
        ("pooling_mode_max_tokens", Pooling::Max),
        ("pooling_mode_mean_tokens", Pooling::Mean),
        ("pooling_mode_mean_sqrt_len_tokens", Pooling::MeanSqrtLen),
        ("pooling_mode_lasttoken", Pooling::LastToken),
    ]
    .into_iter()
    .filter(|(k, _)| on(k))
    .map(|(_, p)| p)
    .collect();
    if modes.is_empty() {
        return Err(Error::Format {
            path: path.to_path_buf(),
            msg: "no pooling mode is enabled".into(),
        });
    }
    Ok(modes)
}

impl Embedder {
    /// Loads a sentence-transformers (or plain BERT) directory: config.json,
    /// model.safetensors (or its shards), tokenizer.json, and modules.json with the pooling
    /// config when present. Runs in f32 on every device: these models are small and their
    /// vectors are compared to 1e-4.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        super::init_threads();
        let config_path = dir.join("config.json");
        let config_json = read_json(&config_path)?;
        let model_type = config_json
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if !ENCODER_TYPES.contains(&model_type.as_str()) {
            return Err(Error::UnsupportedArch(model_type));
        }
        let config_err = |e: serde_json::Error| Error::Format {
            path: config_path.clone(),
            msg: format!("not a {model_type} config: {e}"),
        };
        let (pooling, normalize) = read_modules(dir)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        // The file's own limits (all-MiniLM's pads and cuts to 128) would override the
        // engine's context handling.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        let files = super::weights::safetensors_files(dir)?;
        // SAFETY: read-only maps of model files, which are never modified in place (the
        // store writes blobs once under their digest).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device) }
            .map_err(|e| Error::Format {
                path: dir.to_path_buf(),
                msg: format!("unreadable safetensors: {e}"),
            })?;
        let (encoder, dims) = if model_type == "nomic_bert" {
            nomic(
                vb,
                &serde_json::from_value(config_json).map_err(config_err)?,
            )?
        } else {
            bert(
                vb,
                &serde_json::from_value(config_json).map_err(config_err)?,
            )?
        };
        Self::assemble(encoder, dims, tokenizer, pooling, normalize, dir, device)
    }

    /// Loads a GGUF BERT as Ollama's registry serves `all-minilm` and `mxbai-embed-large`,
    /// or a NomicBERT as it serves `nomic-embed-text` (llama.cpp's conversions): the
    /// hyperparameters from `bert.*` (`nomic-bert.*`) metadata, the tensors renamed to Hugging
    /// Face's and dequantized to f32, the WordPiece vocabulary restored
    /// ([`super::tokenizer::wordpiece_from_gguf`]), pooling from `*.pooling_type`, and
    /// unit-length vectors (what Ollama returns).
    pub fn load_gguf(path: &Path, device: &Device) -> Result<Self> {
        super::init_threads();
        let format_err = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| format_err(e.to_string()))?;
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let names = match arch.as_str() {
            "bert" => &BERT_NAMES,
            "nomic-bert" => &NOMIC_NAMES,
            _ => {
                return Err(Error::UnsupportedArch(format!(
                    "{arch} (GGUF embedding models load as 'bert' or 'nomic-bert'; others \
                     from safetensors)"
                )))
            }
        };
        let num = |key: &str| -> Result<usize> {
            md.get(&format!("{arch}.{key}"))
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
                .ok_or_else(|| Error::Config(format!("GGUF metadata {arch}.{key} is missing")))
        };
        let float = |key: &str| {
            md.get(&format!("{arch}.{key}"))
                .and_then(|v| v.to_f32().ok())
        };
        let eps = float("attention.layer_norm_epsilon").unwrap_or(1e-12);
        // llama.cpp's pooling types: 1 mean, 2 cls, 3 last.
        let pooling = match md
            .get(&format!("{arch}.pooling_type"))
            .and_then(|v| v.to_u32().ok())
        {
            Some(2) => Pooling::Cls,
            Some(3) => Pooling::LastToken,
            _ => Pooling::Mean,
        };
        let mut tensors = std::collections::HashMap::new();
        for name in content.tensor_infos.keys() {
            let hf = names
                .hf(name)
                .ok_or_else(|| format_err(format!("unexpected tensor {name} in a {arch} GGUF")))?;
            let t = content
                .tensor(&mut file, name, device)
                .and_then(|q| q.dequantize(device))
                .map_err(|e| format_err(format!("{name}: {e}")))?;
            tensors.insert(hf, t);
        }
        let rows = |name: &str| -> Result<usize> {
            tensors
                .get(name)
                .map(|t| t.dims()[0])
                .ok_or_else(|| format_err(format!("no {name} tensor")))
        };
        let tokenizer = super::tokenizer::wordpiece_from_gguf(md)?;
        if arch == "nomic-bert" {
            let config: NomicConfig = serde_json::from_value(serde_json::json!({
                "vocab_size": rows("embeddings.word_embeddings.weight")?,
                "n_embd": num("embedding_length")?,
                "n_head": num("attention.head_count")?,
                "n_layer": num("block_count")?,
                "n_inner": num("feed_forward_length")?,
                "n_positions": num("context_length")?,
                "type_vocab_size": rows("embeddings.token_type_embeddings.weight").unwrap_or(0),
                "layer_norm_epsilon": eps,
                "rotary_emb_base": float("rope.freq_base").unwrap_or(1000.0),
            }))
            .map_err(|e| format_err(format!("NomicBERT config: {e}")))?;
            let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
            let (encoder, dims) = nomic(vb, &config)?;
            return Self::assemble(encoder, dims, tokenizer, vec![pooling], true, path, device);
        }
        let config: BertConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": rows("embeddings.word_embeddings.weight")?,
            "hidden_size": num("embedding_length")?,
            "num_hidden_layers": num("block_count")?,
            "num_attention_heads": num("attention.head_count")?,
            "intermediate_size": num("feed_forward_length")?,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "max_position_embeddings": num("context_length")?,
            "type_vocab_size": rows("embeddings.token_type_embeddings.weight")?,
            "initializer_range": 0.02,
            "layer_norm_eps": eps,
            "pad_token_id": 0,
            "classifier_dropout": null,
            "model_type": "bert",
        }))
        .map_err(|e| format_err(format!("BERT config: {e}")))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let (encoder, dims) = bert(vb, &config)?;
        Self::assemble(encoder, dims, tokenizer, vec![pooling], true, path, device)
    }

    /// The encoder with the tokenizer and pooling around it.
    fn assemble(
        encoder: Encoder,
        dims: Dims,
        tokenizer: tokenizers::Tokenizer,
        pooling: Vec<Pooling>,
        normalize: bool,
        path: &Path,
        device: &Device,
    ) -> Result<Self> {
        if tokenizer.get_vocab_size(true) > dims.vocab_size {
            return Err(Error::Config(format!(
                "tokenizer has {} tokens but the model only {}",
                tokenizer.get_vocab_size(true),
                dims.vocab_size
            )));
        }
        let tail = special_tail(&tokenizer)?;
        tracing::info!(
            path = %path.display(),
            pooling = ?pooling.iter().map(|p| p.name()).collect::<Vec<_>>(),
            normalize,
            "embedding model loaded"
        );
        Ok(Self {
            encoder,
            tokenizer,
            pooling,
            normalize,
            hidden: dims.hidden,
            max_positions: dims.max_positions,
            vocab_size: dims.vocab_size,
            tail,
            device: device.clone(),
            path: path.to_path_buf(),
        })
    }

    /// `text` as the model's token ids, with its special tokens (`[CLS] … [SEP]`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Cuts `ids` to `len` tokens keeping the first ones and the closing special tokens,
    /// as Ollama truncates embedding inputs; returns how many were dropped.
    pub fn fit(&self, ids: &mut Vec<u32>, len: usize) -> usize {
        if ids.len() <= len {
            return 0;
        }
        let dropped = ids.len() - len;
        let tail = self.tail.min(len);
        let end: Vec<u32> = ids[ids.len() - tail..].to_vec();
        ids.truncate(len - tail);
        ids.extend(end);
        dropped
    }

    /// The longest input, in tokens.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The length of the vectors [`Embedder::embed`] returns.
    pub fn dim(&self) -> usize {
        self.hidden * self.pooling.len()
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn pooling(&self) -> &[Pooling] {
        &self.pooling
    }

    /// Whether the vectors come out at unit length (a `Normalize` module).
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One vector per input, computed as one padded batch. Every input must be non-empty
    /// and at most [`Embedder::max_positions`] long (the engine checks both).
    pub fn embed(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let n = inputs.len();
        let len = inputs.iter().map(|i| i.len()).max().unwrap_or(0);
        if n == 0 || len == 0 {
            return Ok(vec![Vec::new(); n]);
        }
        if len > self.max_positions {
            return Err(Error::Config(format!(
                "an input of {len} tokens is longer than the model's {} positions",
                self.max_positions
            )));
        }
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0f32; n * len];
        for (row, input) in inputs.iter().enumerate() {
            ids[row * len..row * len + input.len()].copy_from_slice(input);
            mask[row * len..row * len + input.len()].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let states = self.encoder.forward(&ids, &mask)?;
        let mut parts = Vec::with_capacity(self.pooling.len());
        for p in &self.pooling {
            parts.push(self.pool(*p, &states, &mask, inputs)?);
        }
        let mut pooled = Tensor::cat(&parts, D::Minus1)?;
        if self.normalize {
            let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
            // sentence-transformers' F.normalize: eps 1e-12 keeps a zero vector zero.
            pooled = pooled.broadcast_div(&norm.clamp(1e-12f32, f32::MAX)?)?;
        }
        Ok(pooled.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    /// One pooling mode over a batch's final states `(n, len, hidden)`.
    fn pool(
        &self,
        p: Pooling,
        states: &Tensor,
        mask: &Tensor,
        inputs: &[&[u32]],
    ) -> Result<Tensor> {
        let m = mask.unsqueeze(D::Minus1)?; // (n, len, 1)
        let count = mask.sum_keepdim(D::Minus1)?; // (n, 1)
        Ok(match p {
            Pooling::Cls => states.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => states.broadcast_mul(&m)?.sum(1)?.broadcast_div(&count)?,
            Pooling::MeanSqrtLen => states
                .broadcast_mul(&m)?
                .sum(1)?
                .broadcast_div(&count.sqrt()?)?,
            Pooling::Max => {
                // Padding rows must never win: push them far below any real state.
                let low = ((m.ones_like()? - &m)? * -1e9)?;
                states.broadcast_add(&low)?.max(1)?
            }
            Pooling::LastToken => {
                let rows = inputs
                    .iter()
                    .enumerate()
                    .map(|(i, input)| states.get(i)?.get(input.len() - 1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::stack(&rows, 0)?
            }
        })
    }
}

/// candle-transformers' BERT from `vb`.
fn bert(vb: VarBuilder, config: &BertConfig) -> Result<(Encoder, Dims)> {
    let dims = Dims {
        hidden: config.hidden_size,
        max_positions: config.max_position_embeddings,
        vocab_size: config.vocab_size,
    };
    Ok((Encoder::Bert(BertModel::load(vb, config)?), dims))
}

/// candle-transformers' NomicBERT from `vb`.
fn nomic(vb: VarBuilder, config: &NomicConfig) -> Result<(Encoder, Dims)> {
    let dims = Dims {
        hidden: config.n_embd,
        max_positions: config.n_positions,
        vocab_size: config.vocab_size,
    };
    Ok((Encoder::Nomic(NomicBertModel::load(vb, config)?), dims))
}

/// How a family's llama.cpp tensor names map to Hugging Face's: whole names outside the
/// layers, and each layer's parts under `layers.N`.
struct TensorNames {
    top: &'static [(&'static str, &'static str)],
    layers: &'static str,
    parts: &'static [(&'static str, &'static str)],
}

/// GGUF `bert` (`blk.3.attn_q.weight` -> `encoder.layer.3.attention.self.query.weight`).
const BERT_NAMES: TensorNames = TensorNames {
    top: &[
        ("token_embd", "embeddings.word_embeddings"),
        ("position_embd", "embeddings.position_embeddings"),
        ("token_types", "embeddings.token_type_embeddings"),
        ("token_embd_norm", "embeddings.LayerNorm"),
    ],
    layers: "encoder.layer",
    parts: &[
        ("attn_q", "attention.self.query"),
        ("attn_k", "attention.self.key"),
        ("attn_v", "attention.self.value"),
        ("attn_output", "attention.output.dense"),
        ("attn_output_norm", "attention.output.LayerNorm"),
        ("ffn_up", "intermediate.dense"),
        ("ffn_down", "output.dense"),
        ("layer_output_norm", "output.LayerNorm"),
    ],
};

/// GGUF `nomic-bert` (`blk.3.attn_qkv.weight` -> `encoder.layers.3.attn.Wqkv.weight`):
/// llama.cpp's `ffn_up` is the SwiGLU's value projection `fc11`, `ffn_gate` its gate `fc12`.
const NOMIC_NAMES: TensorNames = TensorNames {
    top: &[
        ("token_embd", "embeddings.word_embeddings"),
        ("token_types", "embeddings.token_type_embeddings"),
        ("token_embd_norm", "emb_ln"),
    ],
    layers: "encoder.layers",
    parts: &[
        ("attn_qkv", "attn.Wqkv"),
        ("attn_output", "attn.out_proj"),
        ("attn_output_norm", "norm1"),
        ("ffn_up", "mlp.fc11"),
        ("ffn_gate", "mlp.fc12"),
        ("ffn_down", "mlp.fc2"),
        ("layer_output_norm", "norm2"),
    ],
};

impl TensorNames {
    /// The Hugging Face name of GGUF tensor `gguf`, or None for a tensor the family lacks.
    fn hf(&self, gguf: &str) -> Option<String> {
        let (stem, kind) = gguf.rsplit_once('.')?;
        if kind != "weight" && kind != "bias" {
            return None;
        }
        let find = |table: &[(&str, &'static str)], key: &str| {
            table.iter().find(|(g, _)| *g == key).map(|(_, hf)| *hf)
        };
        if let Some(top) = find(self.top, stem) {
            return Some(format!("{top}.{kind}"));
        }
        let (layer, part) = stem.strip_prefix("blk.")?.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let hf = find(self.parts, part)?;
        Some(format!("{}.{layer}.{hf}.{kind}", self.layers))
    }
}

/// How many special tokens the tokenizer's post-processor appends after the text: the
/// difference between a probe word's encodings with and without special tokens, minus what
/// comes before it.
fn special_tail(tok: &tokenizers::Tokenizer) -> Result<usize> {
    let err = |e: tokenizers::Error| Error::Tokenizer(format!("encode: {e}"));
    let plain = tok.encode_fast("a", false).map_err(err)?;
    let full = tok.encode_fast("a", true).map_err(err)?;
    let (plain, full) = (plain.get_ids(), full.get_ids());
    let head = (0..=full.len().saturating_sub(plain.len()))
        .find(|&s| full[s..].starts_with(plain))
        .unwrap_or(0);
    Ok(full.len().saturating_sub(head + plain.len()))
}
