//! A model ready to serve: decoder, tokenizer and chat template loaded from one path; or,
//! for an encoder checkpoint, the sentence embedding model ([`AnyModel`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use super::selfcheck::{self, GpuPath};
use super::vision::{Vision, VisionTower};
use super::{
    ArchConfig, ChatTemplate, CpuKvCache, Decoder, Embedder, Error, KvCache, KvType, RefKvCache,
    Result, Tokenizer, WeightSource,
};

/// A loaded model: the decoder plus what turns text into its tokens and back.
pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    /// The model's own chat template, when its files carry one.
    pub chat_template: Option<ChatTemplate>,
    pub path: PathBuf,
    /// On a GPU: our kernels or candle's reference ops (the boot self-check's verdict).
    pub gpu_path: Option<GpuPath>,
    /// Image input, for a model with a vision tower (CPU only for now: the GPU attention
    /// paths have no bidirectional image spans).
    pub vision: Option<Arc<Vision>>,
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
        let gpu_path = device.is_cuda().then(selfcheck::serving_path);
        let tower = match (&src, device.is_cpu()) {
            (_, false) => None,
            (WeightSource::Gguf(g), true) => VisionTower::from_gguf(g, device)?,
            (WeightSource::Safetensors(s), true) => {
                VisionTower::from_safetensors(&s.dir, &s.config_json, device)?
            }
        };
        let vision = tower
            .map(|t| Vision::new(t, &tokenizer).map(Arc::new))
            .transpose()?;
        Ok(Self {
            decoder,
            tokenizer,
            chat_template,
            path: path.to_path_buf(),
            gpu_path,
            vision,
        })
    }

    /// A paged KV cache of `num_blocks` blocks of `block_size` tokens for this model on its
    /// device: the CPU cache with elements `ty`, or on a GPU the cache of the path it serves
    /// on.
    pub fn new_kv_cache(
        &self,
        num_blocks: usize,
        block_size: usize,
        ty: KvType,
    ) -> Result<Box<dyn KvCache + Send>> {
        let (cfg, device) = (self.config(), self.decoder.device());
        Ok(match self.gpu_path {
            None => Box::new(CpuKvCache::with_type(cfg, num_blocks, block_size, ty)),
            Some(GpuPath::Kernels) => Box::new(super::cuda::CudaKvCache::new(
                cfg, num_blocks, block_size, device,
            )?),
            Some(GpuPath::Reference) => Box::new(RefKvCache::new(
                cfg,
                num_blocks,
                block_size,
                device,
                self.decoder.dtype(),
            )?),
        })
    }

    /// The element type [`Self::new_kv_cache`] uses when `ty` is asked for: GPU caches are
    /// f16, and so is q8_0 for a head size that is not whole q8_0 blocks.
    pub fn kv_type(&self, ty: KvType) -> KvType {
        if self.gpu_path.is_some() || !ty.fits(self.config().head_dim) {
            KvType::F16
        } else {
            ty
        }
    }

    /// Bytes one KV block takes over every layer (K and V) in [`Self::new_kv_cache`].
    pub fn kv_block_bytes(&self, block_size: usize, ty: KvType) -> usize {
        block_size * self.config().kv_bytes_per_token(self.kv_type(ty))
    }

    pub fn config(&self) -> &ArchConfig {
        self.decoder.config()
    }
}

/// A loaded model of either kind: a generator (the decoder) or an embedding model (an
/// encoder, which only embeds).
#[derive(Clone)]
pub enum AnyModel {
    Generator(Arc<Model>),
    Embedder(Arc<Embedder>),
}

impl AnyModel {
    /// Loads `path` as an embedding model when it is an encoder checkpoint (config.json's
    /// `model_type`, see [`super::bert::ENCODER_TYPES`], or a GGUF `bert` or `nomic-bert`),
    /// else as a generator.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if path.is_dir() && super::bert::is_encoder_dir(path) {
            return Ok(Self::Embedder(Arc::new(Embedder::load(path, device)?)));
        }
        if let Ok(WeightSource::Gguf(g)) = WeightSource::open(path) {
            let arch = g.architecture();
            if arch == "bert" || arch == "nomic-bert" {
                return Ok(Self::Embedder(Arc::new(Embedder::load_gguf(path, device)?)));
            }
            if super::bert::GGUF_ENCODER_ARCHS.contains(&arch) {
                return Err(Error::Config(format!(
                    "'{arch}' GGUF embedding models are not supported yet (GGUF 'bert' and \
                     'nomic-bert' are, and any BERT or NomicBERT in the sentence-transformers \
                     layout)"
                )));
            }
        }
        Ok(Self::Generator(Arc::new(Model::load(path, device)?)))
    }

    /// The longest sequence the model takes.
    pub fn context_length(&self) -> usize {
        match self {
            Self::Generator(m) => m.config().max_position_embeddings,
            Self::Embedder(e) => e.max_positions(),
        }
    }

    pub fn generator(&self) -> Option<&Arc<Model>> {
        match self {
            Self::Generator(m) => Some(m),
            Self::Embedder(_) => None,
        }
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
