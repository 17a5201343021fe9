//! Vision towers: what turns an image into the embeddings a decoder reads in place of
//! tokens. Two families: Gemma 3's (SigLIP over a fixed square, pooled to 256 embeddings,
//! read whole; `gemma`) and Qwen3-VL's (a ViT over the image at its own aspect, 2x2 patches
//! merged into each embedding, DeepStack features for the first decoder layers, read
//! causally with multimodal rope positions; `qwen`). Both run on our CPU pool (`vit`).
//!
//! [`Vision`] is what a loaded generator carries: its tower, the tokens around each image in
//! a prompt, and the embeddings of recently seen images (a chat resends its images every
//! turn).

mod gemma;
mod qwen;
mod vit;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::weights::GgufFile;
use super::{Error, Result, Tokenizer};

pub use gemma::{siglip_name, GemmaTower};
pub use qwen::{qwen_name, QwenTower};

/// A loaded vision tower of one of the supported families.
pub enum VisionTower {
    Gemma3(GemmaTower),
    Qwen3(QwenTower),
}

/// An image as the decoder reads it.
#[derive(Clone, Debug)]
pub struct ImageEmbeds {
    /// The image file's sha256: what names it for prefix reuse and the recent-image cache.
    pub hash: [u8; 32],
    /// `[rows, hidden]`, or `[rows, hidden * (1 + d)]` with DeepStack features (f32).
    pub embeds: Tensor,
    /// Its rows attend to each other both ways (Gemma 3) or causally (Qwen-VL).
    pub bidirectional: bool,
    /// The `[height, width]` grid of its rows, for a multimodal rope (Qwen-VL).
    pub grid: Option<[u32; 2]>,
}

/// A GGUF's tower tensors (f32) under the names `rename` gives them; the tensors it names
/// `None` are left out.
fn renamed_tensors(
    g: &GgufFile,
    rename: fn(&str) -> Option<String>,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for name in g.content.tensor_infos.keys() {
        if let Some(to) = rename(name) {
            tensors.insert(to, g.dense(name, device)?);
        }
    }
    Ok(tensors)
}

impl VisionTower {
    /// The tower in a GGUF (Ollama keeps it beside the text weights), or `None` when the
    /// file has none, or none we can run (the model then serves text).
    pub fn from_gguf(g: &GgufFile, device: &Device) -> Result<Option<Self>> {
        Ok(match g.architecture() {
            "gemma3" => GemmaTower::from_gguf(g, device)?.map(Self::Gemma3),
            "qwen3vl" => QwenTower::from_gguf(g, device)?.map(Self::Qwen3),
            _ => None,
        })
    }

    /// The tower of a Hugging Face checkpoint, or `None` when its config has no
    /// `vision_config` (or its weights no projector).
    pub fn from_safetensors(
        dir: &Path,
        config_json: &str,
        device: &Device,
    ) -> Result<Option<Self>> {
        let v: serde_json::Value =
            serde_json::from_str(config_json).map_err(|e| Error::Config(e.to_string()))?;
        if v.get("vision_config").is_none() {
            return Ok(None);
        }
        let model_type = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
        Ok(match model_type {
            "qwen3_vl" => QwenTower::from_safetensors(dir, &v, device)?.map(Self::Qwen3),
            "gemma3" => GemmaTower::from_safetensors(dir, &v, device)?.map(Self::Gemma3),
            other => {
                tracing::warn!("no vision tower for model_type {other}: text only");
                None
            }
        })
    }

    /// Decodes, preprocesses and encodes an image file's bytes (blocking: seconds for a
    /// full-size tower on a CPU).
    fn encode_bytes(&self, bytes: &[u8], hash: [u8; 32]) -> Result<ImageEmbeds> {
        let img = super::image::decode(bytes)?;
        Ok(match self {
            Self::Gemma3(t) => ImageEmbeds {
                hash,
                embeds: t.encode(&t.preprocess.pixels(&img)?)?,
                bidirectional: true,
                grid: None,
            },
            Self::Qwen3(t) => {
                let (embeds, grid) = t.encode(&t.preprocess.pixels(&img)?)?;
                ImageEmbeds {
                    hash,
                    embeds,
                    bidirectional: false,
                    grid: Some(grid),
                }
            }
        })
    }

    /// The tokens before an image's rows and after them in a prompt: Gemma 3's
    /// "\n\n<start_of_image>" and "<end_of_image>\n\n", Qwen's `<|vision_start|>` and
    /// `<|vision_end|>`.
    fn brackets(&self, tokenizer: &Tokenizer) -> Result<(Vec<u32>, Vec<u32>)> {
        let id = |t: &str| {
            tokenizer
                .token_id(t)
                .ok_or_else(|| Error::Config(format!("a vision model's vocabulary lacks {t}")))
        };
        Ok(match self {
            Self::Gemma3(_) => {
                let (start, end) = (id("<start_of_image>")?, id("<end_of_image>")?);
                let gap = tokenizer.encode("\n\n", false)?;
                let open = gap.iter().copied().chain([start]).collect();
                let close = [end].into_iter().chain(gap.iter().copied()).collect();
                (open, close)
            }
            Self::Qwen3(_) => (vec![id("<|vision_start|>")?], vec![id("<|vision_end|>")?]),
        })
    }
}

/// A generator's vision: its tower, the tokens around each image's embeddings in a prompt,
/// and the embeddings of recently seen images (a chat resends its images every turn).
pub struct Vision {
    pub tower: VisionTower,
    pub open: Vec<u32>,
    pub close: Vec<u32>,
    recent: Mutex<VecDeque<ImageEmbeds>>,
}

/// Images whose embeddings are kept (a few chats' worth; 2.5 MiB each for Gemma 3 4B).
const RECENT_IMAGES: usize = 16;

impl Vision {
    /// `tower`'s vision over `tokenizer`, which must know its image tokens.
    pub fn new(tower: VisionTower, tokenizer: &Tokenizer) -> Result<Self> {
        let (open, close) = tower.brackets(tokenizer)?;
        Ok(Self {
            tower,
            open,
            close,
            recent: Mutex::new(VecDeque::new()),
        })
    }

    /// The embeddings of an image file's bytes: from the recent images when it was seen
    /// lately, else decoded, preprocessed and encoded (blocking).
    pub fn embed(&self, bytes: &[u8]) -> Result<ImageEmbeds> {
        let hash: [u8; 32] = Sha256::digest(bytes).into();
        let lock = || self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = lock().iter().find(|e| e.hash == hash) {
            return Ok(e.clone());
        }
        let embeds = self.tower.encode_bytes(bytes, hash)?;
        let mut recent = lock();
        if recent.len() == RECENT_IMAGES {
            recent.pop_front();
        }
        recent.push_back(embeds.clone());
        Ok(embeds)
    }
}
