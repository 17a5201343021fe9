//! A model ready to serve: decoder, tokenizer and chat template loaded from one path.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::{ArchConfig, ChatTemplate, Decoder, Error, Result, Tokenizer, WeightSource};

/// A loaded model: the decoder plus what turns text into its tokens and back.
pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    /// The model's own chat template, when its files carry one.
    pub chat_template: Option<ChatTemplate>,
    pub path: PathBuf,
}

impl Model {
    /// Loads a `.gguf` file or a Hugging Face safetensors directory. On CPU the compute
    /// dtype is f32; on GPUs f16 (T4 has no bf16).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        super::init_threads();
        let src = WeightSource::open(path)?;
        let cfg = src.config()?;
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        };
        let (tokenizer, template_src) = match &src {
            WeightSource::Gguf(g) => {
                let md = g.metadata();
                let tpl = md
                    .get("tokenizer.chat_template")
                    .and_then(|v| v.to_string().ok())
                    .cloned();
                (Tokenizer::from_gguf(md)?, tpl)
            }
            WeightSource::Safetensors(s) => {
                let tok = Tokenizer::from_file(&s.dir.join("tokenizer.json"))?;
                (tok, hf_chat_template(&s.dir)?)
            }
        };
        if tokenizer.vocab_size() > cfg.vocab_size {
            return Err(Error::Config(format!(
                "tokenizer has {} tokens but the model only {}",
                tokenizer.vocab_size(),
                cfg.vocab_size
            )));
        }
        // Gemma GGUFs often come without a template (Ollama keeps it beside the weights);
        // their turn format is fixed, so the built-in one stands in.
        let template_src =
            template_src.or_else(|| super::chat_template::builtin(cfg.family).map(str::to_owned));
        let chat_template = match template_src {
            Some(t) => {
                let tok_str = |id: Option<u32>| id.and_then(|i| tokenizer.token_str(i));
                let eos = tokenizer.eos_ids().first().copied();
                Some(ChatTemplate::new(
                    &t,
                    tok_str(tokenizer.bos_id()),
                    tok_str(eos),
                )?)
            }
            None => None,
        };
        let decoder = Decoder::load(&src, cfg, device, dtype)?;
        Ok(Self {
            decoder,
            tokenizer,
            chat_template,
            path: path.to_path_buf(),
        })
    }

    pub fn config(&self) -> &ArchConfig {
        self.decoder.config()
    }
}

/// The chat template of a Hugging Face directory: `chat_template.jinja`, or the
/// `chat_template` of tokenizer_config.json (a string, or a list of named templates).
fn hf_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|source| Error::Io {
                path: jinja,
                source,
            });
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&cfg_path) else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: cfg_path.clone(),
        msg: e.to_string(),
    })?;
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}
