//! Gemma 3's vision tower: the SigLIP encoder over 14-pixel patches of an 896-pixel square,
//! its patch grid average-pooled to 16 x 16, an RMS norm and a projection into the text
//! model's width: 256 embeddings per image, which the text model reads whole (both ways).
//!
//! Read from Ollama's GGUF (the tower and projector beside the text weights, `v.*` and
//! `mm.*` tensors, `gemma3.vision.*` metadata) and from Hugging Face safetensors
//! (`vision_tower.vision_model.*`, `multi_modal_projector.*`, `vision_config`);
//! candle-transformers' `siglip` is the tests' reference.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::siglip;

use super::super::image::{Pixels, Preprocess, Size};
use super::super::weights::{safetensors_files, GgufFile, Linear};
use super::super::{Error, Result};
use super::vit::{linear, Block, Norm, Shape};

/// Gemma 3's tower with its projector.
pub struct GemmaTower {
    encoder: Siglip,
    /// The projector's norm weight as it scales (`1 + w`).
    soft_norm: Tensor,
    /// `[vision width, text width]`: embeddings are `x @ projection`.
    projection: Tensor,
    eps: f64,
    /// Patches per side of the encoder's grid, and the pooling kernel over it.
    patches: usize,
    pool: usize,
    pub preprocess: Preprocess,
    device: Device,
}

/// Gemma 3's processor: a bilinear resize to the tower's square, values normalised to -1..1.
fn gemma_preprocess(size: usize) -> Preprocess {
    Preprocess {
        size: Size::Square(size as u32),
        mean: [0.5; 3],
        std: [0.5; 3],
    }
}

impl GemmaTower {
    /// Embeddings per image.
    pub fn tokens_per_image(&self) -> usize {
        (self.patches / self.pool).pow(2)
    }

    /// The embeddings `[tokens_per_image, text width]` (f32) of an image's pixels as
    /// [`Preprocess::pixels`] makes them.
    pub fn encode(&self, pixels: &Pixels) -> Result<Tensor> {
        let s = self.side();
        if (pixels.width, pixels.height) != (s, s) || pixels.data.len() != 3 * s * s {
            return Err(Error::Image(format!(
                "{}x{} pixels for a {s}x{s} tower",
                pixels.width, pixels.height
            )));
        }
        let x = self.encoder.forward(&pixels.data, s, &self.device)?;
        self.project(&x.unsqueeze(0)?)
    }

    /// The side of the square the tower reads.
    pub fn side(&self) -> usize {
        self.patches * self.encoder.patch
    }

    /// The projector: the encoder's `[1, patches^2, width]` grid pooled, normed and
    /// projected.
    fn project(&self, x: &Tensor) -> Result<Tensor> {
        let (_, n, width) = x.dims3()?;
        if n != self.patches * self.patches {
            return Err(Error::Config(format!(
                "the vision encoder gave {n} patches, expected {}",
                self.patches * self.patches
            )));
        }
        let grid = x
            .transpose(1, 2)?
            .reshape((1, width, self.patches, self.patches))?;
        let pooled = grid
            .avg_pool2d(self.pool)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .squeeze(0)?
            .contiguous()?;
        let normed = candle_nn::ops::rms_norm(&pooled, &self.soft_norm, self.eps as f32)?;
        Ok(normed.matmul(&self.projection)?)
    }

    /// The tower in an Ollama-style Gemma 3 GGUF, or `None` when the file has none (or no
    /// projector).
    pub fn from_gguf(g: &GgufFile, device: &Device) -> Result<Option<Self>> {
        let md = g.metadata();
        let arch = g.architecture();
        let key = |k: &str| format!("{arch}.vision.{k}");
        if arch != "gemma3" || !md.contains_key(&key("block_count")) {
            return Ok(None);
        }
        if !g
            .content
            .tensor_infos
            .contains_key("mm.mm_input_projection.weight")
        {
            tracing::warn!("the GGUF has vision metadata but no projector: text only");
            return Ok(None);
        }
        let num = |k: &str| -> Result<usize> {
            md.get(&key(k))
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
                .ok_or_else(|| Error::Config(format!("GGUF metadata {} is missing", key(k))))
        };
        let eps = md
            .get(&key("attention.layer_norm_epsilon"))
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(1e-6) as f64;
        let tokens = md
            .get(&format!("{arch}.mm.tokens_per_image"))
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(256) as usize;
        let cfg = siglip::VisionConfig {
            hidden_size: num("embedding_length")?,
            intermediate_size: num("feed_forward_length")?,
            num_hidden_layers: num("block_count")?,
            num_attention_heads: num("attention.head_count")?,
            num_channels: 3,
            image_size: num("image_size")?,
            patch_size: num("patch_size")?,
            hidden_act: candle_nn::Activation::GeluPytorchTanh,
            layer_norm_eps: eps,
        };
        let tensors = super::renamed_tensors(g, siglip_name, device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        // Ollama's conversion stores Gemma's norm weights as they scale (1 + w).
        let soft_norm = g.dense("mm.mm_soft_emb_norm.weight", device)?;
        let projection = g.dense("mm.mm_input_projection.weight", device)?;
        Self::assemble(&cfg, vb, soft_norm, projection, tokens, device).map(Some)
    }

    /// The tower of a Hugging Face Gemma 3 checkpoint, or `None` when its config has no
    /// `vision_config` or its weights no projector.
    pub fn from_safetensors(
        dir: &Path,
        v: &serde_json::Value,
        device: &Device,
    ) -> Result<Option<Self>> {
        let Some(vision) = v.get("vision_config") else {
            return Ok(None);
        };
        let mut cfg: siglip::VisionConfig = serde_json::from_value(vision.clone())
            .map_err(|e| Error::Config(format!("vision_config: {e}")))?;
        // transformers' SigLIP default (candle's serde default is CLIP's 16).
        if vision.get("patch_size").is_none() {
            cfg.patch_size = 16;
        }
        let tokens = v
            .get("mm_tokens_per_image")
            .and_then(|t| t.as_u64())
            .unwrap_or(256) as usize;
        let files = safetensors_files(dir)?;
        // SAFETY: read-only maps of files that are never modified in place.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device) }?;
        // transformers saves the wrappers at the top, or (newer versions) under `model.`.
        let root = if vb.contains_tensor("model.vision_tower.vision_model.post_layernorm.weight") {
            vb.pp("model")
        } else {
            vb
        };
        if !root.contains_tensor("multi_modal_projector.mm_input_projection_weight") {
            tracing::warn!(
                "config.json has a vision_config but the weights no projector: text only"
            );
            return Ok(None);
        }
        let mm = root.pp("multi_modal_projector");
        let width = cfg.hidden_size;
        let soft_norm = (mm.get(width, "mm_soft_emb_norm.weight")? + 1.0)?;
        let projection = mm.get_unchecked("mm_input_projection_weight")?;
        let vb = root.pp("vision_tower").pp("vision_model");
        Self::assemble(&cfg, vb, soft_norm, projection, tokens, device).map(Some)
    }

    fn assemble(
        cfg: &siglip::VisionConfig,
        vb: VarBuilder,
        soft_norm: Tensor,
        projection: Tensor,
        tokens: usize,
        device: &Device,
    ) -> Result<Self> {
        let patches = cfg.image_size / cfg.patch_size;
        let side = (tokens as f64).sqrt() as usize;
        if side == 0 || side * side != tokens || !patches.is_multiple_of(side) {
            return Err(Error::Config(format!(
                "{tokens} tokens per image do not pool a {patches}x{patches} patch grid"
            )));
        }
        if projection.dims2()?.0 != cfg.hidden_size {
            return Err(Error::Config(format!(
                "the vision projection is {:?}, the tower {} wide",
                projection.dims(),
                cfg.hidden_size
            )));
        }
        Ok(Self {
            encoder: Siglip::load(cfg, &vb)?,
            soft_norm: soft_norm.to_dtype(DType::F32)?,
            projection: projection.to_dtype(DType::F32)?,
            eps: cfg.layer_norm_eps,
            patches,
            pool: patches / side,
            preprocess: gemma_preprocess(cfg.image_size),
            device: device.clone(),
        })
    }
}

/// SigLIP's vision encoder (the tower before the projector), with the projections and the
/// per-head attention on our CPU pool: candle's own SigLIP runs each op on one thread, and
/// an image is a thousand or more rows through 400M parameters.
struct Siglip {
    /// The patch embedding as a projection of flattened `[3][patch][patch]` patches.
    patch_embed: Linear,
    /// `[patches, width]`.
    positions: Tensor,
    blocks: Vec<Block>,
    post_norm: Norm,
    shape: Shape,
    patch: usize,
}

impl Siglip {
    /// From transformers' names under `vision_model.` (`embeddings.*`, `encoder.layers.N.*`,
    /// `post_layernorm.*`).
    fn load(cfg: &siglip::VisionConfig, vb: &VarBuilder) -> Result<Self> {
        let (w, p) = (cfg.hidden_size, cfg.patch_size);
        let patch_embed = Linear::dense(
            vb.get((w, 3, p, p), "embeddings.patch_embedding.weight")?
                .reshape((w, 3 * p * p))?,
            Some(vb.get(w, "embeddings.patch_embedding.bias")?),
        )?;
        let n = (cfg.image_size / p).pow(2);
        let positions = vb.get((n, w), "embeddings.position_embedding.weight")?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|l| {
                let b = format!("encoder.layers.{l}");
                let i = cfg.intermediate_size;
                let proj = |name: &str| linear(vb, &format!("{b}.self_attn.{name}"), w, w);
                Ok(Block {
                    norm1: Norm::load(vb, &format!("{b}.layer_norm1"), w)?,
                    q: proj("q_proj")?,
                    k: proj("k_proj")?,
                    v: proj("v_proj")?,
                    out: proj("out_proj")?,
                    norm2: Norm::load(vb, &format!("{b}.layer_norm2"), w)?,
                    fc1: linear(vb, &format!("{b}.mlp.fc1"), i, w)?,
                    fc2: linear(vb, &format!("{b}.mlp.fc2"), w, i)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_embed,
            positions,
            blocks,
            post_norm: Norm::load(vb, "post_layernorm", w)?,
            shape: Shape {
                heads: cfg.num_attention_heads,
                eps: cfg.layer_norm_eps,
                act: candle_nn::Activation::GeluPytorchTanh,
            },
            patch: p,
        })
    }

    /// The encoder's output `[patches, width]` for pixels `[3][side][side]`, patches in
    /// row-major order.
    fn forward(&self, pixels: &[f32], side: usize, device: &Device) -> Result<Tensor> {
        let p = self.patch;
        let grid = side / p;
        // Each patch's pixels in the conv weight's order: channel, row, column.
        let mut patches = Vec::with_capacity(3 * side * side);
        for (py, px) in (0..grid).flat_map(|y| (0..grid).map(move |x| (y, x))) {
            for c in 0..3 {
                for y in 0..p {
                    let row = (c * side + py * p + y) * side + px * p;
                    patches.extend_from_slice(&pixels[row..row + p]);
                }
            }
        }
        let patches = Tensor::from_vec(patches, (grid * grid, 3 * p * p), device)?;
        let mut x = self.patch_embed.forward(&patches)?.add(&self.positions)?;
        for b in &self.blocks {
            x = b.forward(&x, &self.shape, None)?;
        }
        self.post_norm.forward(&x, self.shape.eps)
    }
}

/// The Hugging Face (SigLIP) name of a tower tensor in Ollama's Gemma 3 GGUF
/// (`v.blk.3.attn_q.weight` -> `encoder.layers.3.self_attn.q_proj.weight`); `None` for the
/// text model's and the projector's tensors.
pub fn siglip_name(gguf: &str) -> Option<String> {
    let rest = gguf.strip_prefix("v.")?;
    let (stem, kind) = rest.rsplit_once('.')?;
    let top = match stem {
        "patch_embedding" => Some("embeddings.patch_embedding"),
        "position_embedding" => Some("embeddings.position_embedding"),
        "post_layernorm" => Some("post_layernorm"),
        _ => None,
    };
    if let Some(top) = top {
        return Some(format!("{top}.{kind}"));
    }
    let (layer, part) = stem.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.out_proj",
        p @ ("layer_norm1" | "layer_norm2" | "mlp.fc1" | "mlp.fc2") => p,
        _ => return None,
    };
    Some(format!("encoder.layers.{layer}.{part}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::siglip_name;

    #[test]
    fn ollama_tower_names_map_to_siglip() {
        for (g, hf) in [
            (
                "v.patch_embedding.weight",
                "embeddings.patch_embedding.weight",
            ),
            (
                "v.position_embedding.weight",
                "embeddings.position_embedding.weight",
            ),
            ("v.post_layernorm.bias", "post_layernorm.bias"),
            (
                "v.blk.26.attn_output.weight",
                "encoder.layers.26.self_attn.out_proj.weight",
            ),
            ("v.blk.0.mlp.fc2.bias", "encoder.layers.0.mlp.fc2.bias"),
            (
                "v.blk.3.layer_norm1.weight",
                "encoder.layers.3.layer_norm1.weight",
            ),
        ] {
            assert_eq!(siglip_name(g).as_deref(), Some(hf), "{g}");
        }
        for other in [
            "blk.0.attn_q.weight",
            "mm.mm_input_projection.weight",
            "v.blk.x.attn_q.weight",
        ] {
            assert_eq!(siglip_name(other), None, "{other}");
        }
    }
}
