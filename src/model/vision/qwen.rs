//! Qwen3-VL's vision tower: a ViT over 16-pixel patches of the image at its own aspect
//! (sides multiples of 32, area bounded), a learned position table interpolated to the
//! image's grid, a 2-D rotary embedding (row and column) in each attention, every 2x2
//! patches merged into one embedding of the text model's width, and the DeepStack mergers:
//! features taken after some blocks that the decoder adds to the image's rows after its
//! first layers.
//!
//! A still image is two identical frames to the temporal patch embedding (a 3-D conv over 2
//! frames), so the conv's two temporal slices are summed into one 2-D patch projection.
//! Patches are ordered by merge window (each 2x2 group's four in a row), as the merger reads
//! them.
//!
//! Read from Ollama's GGUF (`v.*` beside the text weights, `qwen3vl.vision.*` metadata) and
//! from Hugging Face safetensors (`model.visual.*`, `vision_config`); candle-transformers'
//! `qwen3_vl` vision model is the tests' reference.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Activation, VarBuilder};
use candle_transformers::models::qwen3_vl::config::VisionConfig;

use super::super::image::{Pixels, Preprocess, Size};
use super::super::weights::{safetensors_files, GgufFile, Linear};
use super::super::{Error, Result};
use super::vit::{linear, Block, Norm, Shape};

/// Qwen3-VL's tower with its mergers.
pub struct QwenTower {
    /// `[hidden, 3 * patch * patch]`: both temporal slices of the conv summed.
    patch_embed: Linear,
    /// `[side * side, hidden]`: the learned positions of a `side x side` grid.
    pos_embed: Tensor,
    side: usize,
    blocks: Vec<Block>,
    shape: Shape,
    merger: Merger,
    /// After which block each DeepStack merger reads, in the decoder layers' order.
    deepstack: Vec<(usize, Merger)>,
    patch: usize,
    merge: usize,
    /// The rotary inverse frequencies of one axis (`head_dim / 4` of them).
    inv_freq: Vec<f32>,
    pub preprocess: Preprocess,
    device: Device,
}

/// Merges each 2x2 group of patches into one embedding: a layer norm (over each patch, or
/// over the four together for DeepStack's), then an MLP with exact GELU.
struct Merger {
    norm: Norm,
    postshuffle: bool,
    fc1: Linear,
    fc2: Linear,
}

impl Merger {
    fn load(vb: &VarBuilder, cfg: &VisionConfig, postshuffle: bool) -> Result<Self> {
        let merged = cfg.hidden_size * cfg.spatial_merge_size.pow(2);
        let norm_width = if postshuffle { merged } else { cfg.hidden_size };
        Ok(Self {
            norm: Norm::load(vb, "norm", norm_width)?,
            postshuffle,
            fc1: linear(vb, "linear_fc1", merged, merged)?,
            fc2: linear(vb, "linear_fc2", cfg.out_hidden_size, merged)?,
        })
    }

    /// `[patches, hidden]` in merge-window order -> `[patches / group, out]`.
    fn forward(&self, x: &Tensor, group: usize) -> Result<Tensor> {
        let (n, hidden) = x.dims2()?;
        let rows = n / group;
        let x = if self.postshuffle {
            self.norm
                .forward(&x.reshape((rows, group * hidden))?, NORM_EPS)?
        } else {
            self.norm
                .forward(x, NORM_EPS)?
                .reshape((rows, group * hidden))?
        };
        let h = self.fc1.forward(&x)?.gelu_erf()?;
        self.fc2.forward(&h)
    }
}

/// transformers' Qwen3-VL vision norms (not in its config).
const NORM_EPS: f64 = 1e-6;

/// The pixels an image may take (transformers' Qwen3-VL processor: 256x256 at least; at
/// most 1024x1024 here, where transformers allows 4096x4096: 1024 embeddings, a couple of
/// seconds of a CPU tower, where the full bound would be minutes).
const MIN_PIXELS: u32 = 256 * 256;
const MAX_PIXELS: u32 = 1024 * 1024;

/// The tower's rotary base.
const ROPE_THETA: f32 = 10_000.0;

impl QwenTower {
    /// The tower of an Ollama Qwen3-VL GGUF (`qwen3vl.vision.*`, `v.*`), or `None` when the
    /// file has no vision metadata or tensors.
    pub fn from_gguf(g: &GgufFile, device: &Device) -> Result<Option<Self>> {
        let md = g.metadata();
        let key = |k: &str| format!("qwen3vl.vision.{k}");
        if !md.contains_key(&key("block_count"))
            || !g
                .content
                .tensor_infos
                .contains_key("v.merger.linear_fc2.weight")
        {
            return Ok(None);
        }
        let num = |k: &str| -> Result<usize> {
            md.get(&key(k))
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
                .ok_or_else(|| Error::Config(format!("GGUF metadata {} is missing", key(k))))
        };
        let deepstack = match md.get(&key("deepstack_visual_indexes")) {
            Some(v) => v
                .to_vec()
                .map_err(|e| Error::Config(e.to_string()))?
                .iter()
                .map(|i| i.to_u32().map(|i| i as usize))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::Config(e.to_string()))?,
            None => Vec::new(),
        };
        // Ollama's conversion writes neither the MLP width nor the position grid: the
        // tensors' shapes tell them.
        let rows_of = |names: &[&str], k: &str| -> Result<usize> {
            num(k).or_else(|e| {
                names
                    .iter()
                    .find_map(|n| g.content.tensor_infos.get(*n))
                    .and_then(|i| i.shape.dims().first().copied())
                    .ok_or(e)
            })
        };
        let has_deepstack = g
            .content
            .tensor_infos
            .keys()
            .any(|n| n.starts_with("v.deepstack"));
        if deepstack.is_empty() && has_deepstack {
            return Err(Error::Config(format!(
                "the GGUF has DeepStack mergers but no {}",
                key("deepstack_visual_indexes")
            )));
        }
        let cfg = VisionConfig {
            depth: num("block_count")?,
            hidden_size: num("embedding_length")?,
            out_hidden_size: md
                .get("qwen3vl.embedding_length")
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::Config("GGUF metadata qwen3vl.embedding_length is missing".into())
                })?,
            hidden_act: Activation::GeluPytorchTanh,
            intermediate_size: rows_of(
                &["v.blk.0.mlp.linear_fc1.weight", "v.blk.0.ffn_up.weight"],
                "feed_forward_length",
            )?,
            num_heads: num("attention.head_count")?,
            in_chans: 3,
            patch_size: num("patch_size")?,
            spatial_merge_size: num("spatial_merge_size").unwrap_or(2),
            temporal_patch_size: num("temporal_patch_size").unwrap_or(2),
            num_position_embeddings: rows_of(
                &["v.pos_embed.weight", "v.position_embd.weight"],
                "num_positional_embeddings",
            )?,
            deepstack_visual_indexes: deepstack,
        };
        let mut tensors = super::renamed_tensors(g, qwen_name, device)?;
        // GGUF holds at most 4 dimensions: the conv's temporal slices come as two tensors
        // (`.weight` and `.weight.1`), or as one with its dimensions folded.
        let (w, p) = (cfg.hidden_size, cfg.patch_size);
        let slice = |t: &Tensor| t.reshape((w, 3 * p * p));
        let conv = tensors
            .remove("patch_embed.proj.weight")
            .ok_or_else(|| Error::Config("the GGUF has no vision patch embedding".into()))?;
        let patch = match tensors.remove("patch_embed.proj.weight.1") {
            Some(second) => (slice(&conv)? + slice(&second)?)?,
            None => conv
                .reshape((w, 3, cfg.temporal_patch_size, p * p))?
                .sum(2)?
                .reshape((w, 3 * p * p))?,
        };
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::load(&cfg, &vb, patch, device).map(Some)
    }

    /// The tower of a Hugging Face Qwen3-VL checkpoint (`config` its parsed config.json).
    pub fn from_safetensors(
        dir: &Path,
        config: &serde_json::Value,
        device: &Device,
    ) -> Result<Option<Self>> {
        let Some(vision) = config.get("vision_config") else {
            return Ok(None);
        };
        let cfg: VisionConfig = serde_json::from_value(vision.clone())
            .map_err(|e| Error::Config(format!("vision_config: {e}")))?;
        let files = safetensors_files(dir)?;
        // SAFETY: read-only maps of files that are never modified in place.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device) }?;
        let vb = vb.pp("model").pp("visual");
        if !vb.contains_tensor("merger.linear_fc2.weight") {
            tracing::warn!("config.json has a vision_config but the weights no tower: text only");
            return Ok(None);
        }
        let (w, p) = (cfg.hidden_size, cfg.patch_size);
        let conv = vb.get(
            (w, 3, cfg.temporal_patch_size, p, p),
            "patch_embed.proj.weight",
        )?;
        let patch = conv.sum(2)?.reshape((w, 3 * p * p))?;
        Self::load(&cfg, &vb, patch, device).map(Some)
    }

    /// From transformers' names under `visual.` (q, k and v fused as `attn.qkv`, or apart
    /// as `attn.q`, `attn.k`, `attn.v`), and the patch embedding's weight `[hidden, 3 *
    /// patch * patch]` with its temporal slices summed (a still image repeats its frame, so
    /// the slices act as their sum).
    fn load(cfg: &VisionConfig, vb: &VarBuilder, patch: Tensor, device: &Device) -> Result<Self> {
        let (w, p, m) = (cfg.hidden_size, cfg.patch_size, cfg.spatial_merge_size);
        if cfg.in_chans != 3 || cfg.temporal_patch_size == 0 || m == 0 {
            return Err(Error::Config(format!(
                "a vision tower of {} channels, {} frames per patch and merge {m}",
                cfg.in_chans, cfg.temporal_patch_size
            )));
        }
        let patch_embed = Linear::dense(patch, Some(vb.get(w, "patch_embed.proj.bias")?))?;
        let side = (cfg.num_position_embeddings as f64).sqrt().round() as usize;
        if side * side != cfg.num_position_embeddings || side == 0 {
            return Err(Error::Config(format!(
                "{} vision positions are not a square grid",
                cfg.num_position_embeddings
            )));
        }
        let pos_embed = vb.get((side * side, w), "pos_embed.weight")?;
        let i = cfg.intermediate_size;
        let blocks = (0..cfg.depth)
            .map(|l| {
                let b = vb.pp(format!("blocks.{l}"));
                let (q, k, v) = if b.contains_tensor("attn.qkv.weight") {
                    // The fused projection's rows are q's, then k's, then v's.
                    let (qkv, bias) = (
                        b.get((3 * w, w), "attn.qkv.weight")?,
                        b.get(3 * w, "attn.qkv.bias")?,
                    );
                    let part = |i: usize| -> Result<Linear> {
                        Linear::dense(
                            qkv.narrow(0, i * w, w)?.contiguous()?,
                            Some(bias.narrow(0, i * w, w)?.contiguous()?),
                        )
                    };
                    (part(0)?, part(1)?, part(2)?)
                } else {
                    (
                        linear(&b, "attn.q", w, w)?,
                        linear(&b, "attn.k", w, w)?,
                        linear(&b, "attn.v", w, w)?,
                    )
                };
                Ok(Block {
                    norm1: Norm::load(&b, "norm1", w)?,
                    q,
                    k,
                    v,
                    out: linear(&b, "attn.proj", w, w)?,
                    norm2: Norm::load(&b, "norm2", w)?,
                    fc1: linear(&b, "mlp.linear_fc1", i, w)?,
                    fc2: linear(&b, "mlp.linear_fc2", w, i)?,
                })
            })
            .collect::<Result<_>>()?;
        let deepstack = cfg
            .deepstack_visual_indexes
            .iter()
            .enumerate()
            .map(|(k, &after)| {
                if after >= cfg.depth {
                    return Err(Error::Config(format!(
                        "DeepStack reads after block {after} of {}",
                        cfg.depth
                    )));
                }
                Ok((
                    after,
                    Merger::load(&vb.pp(format!("deepstack_merger_list.{k}")), cfg, true)?,
                ))
            })
            .collect::<Result<_>>()?;
        let heads = cfg.num_heads;
        if heads == 0 || !w.is_multiple_of(heads) || !(w / heads).is_multiple_of(4) {
            return Err(Error::Config(format!(
                "a vision width of {w} in {heads} heads has no 2-D rotary embedding"
            )));
        }
        let rope_dim = w / heads / 2;
        let inv_freq = (0..rope_dim)
            .step_by(2)
            .map(|i| 1.0 / ROPE_THETA.powf(i as f32 / rope_dim as f32))
            .collect();
        Ok(Self {
            patch_embed,
            pos_embed,
            side,
            blocks,
            shape: Shape {
                heads,
                eps: NORM_EPS,
                act: cfg.hidden_act,
            },
            merger: Merger::load(&vb.pp("merger"), cfg, false)?,
            deepstack,
            patch: p,
            merge: m,
            inv_freq,
            preprocess: Preprocess {
                size: Size::Fit {
                    factor: (p * m) as u32,
                    min_pixels: MIN_PIXELS,
                    max_pixels: MAX_PIXELS,
                },
                mean: [0.5; 3],
                std: [0.5; 3],
            },
            device: device.clone(),
        })
    }

    /// DeepStack features per image row (each as wide as an embedding).
    pub fn deepstack_features(&self) -> usize {
        self.deepstack.len()
    }

    /// An image's rows `[rows, out * (1 + deepstack)]` (the embeddings, then each DeepStack
    /// feature; f32) and their `[height, width]` grid, for pixels as [`Preprocess::pixels`]
    /// makes them (sides multiples of a merge window's).
    pub fn encode(&self, pixels: &Pixels) -> Result<(Tensor, [u32; 2])> {
        let (p, m) = (self.patch, self.merge);
        let (gh, gw) = (pixels.height / p, pixels.width / p);
        if gh == 0
            || gw == 0
            || pixels.height != gh * p
            || pixels.width != gw * p
            || !gh.is_multiple_of(m)
            || !gw.is_multiple_of(m)
            || pixels.data.len() != 3 * pixels.height * pixels.width
        {
            return Err(Error::Image(format!(
                "{}x{} pixels are no grid of {m}x{m} patches of {p}",
                pixels.width, pixels.height
            )));
        }
        let order = merge_order(gh, gw, m);
        // Each patch's pixels in the conv weight's order: channel, row, column.
        let (w, plane) = (pixels.width, pixels.height * pixels.width);
        let mut patches = Vec::with_capacity(pixels.data.len());
        for &(r, c) in &order {
            for ch in 0..3 {
                for y in 0..p {
                    let at = ch * plane + (r * p + y) * w + c * p;
                    patches.extend_from_slice(&pixels.data[at..at + p]);
                }
            }
        }
        let n = order.len();
        let patches = Tensor::from_vec(patches, (n, 3 * p * p), &self.device)?;
        let mut x = (self.patch_embed.forward(&patches)? + self.positions(gh, gw, &order)?)?;
        let rope = self.rotary(&order)?;
        let group = m * m;
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (l, b) in self.blocks.iter().enumerate() {
            x = b.forward(&x, &self.shape, Some(&rope))?;
            for (_, merger) in self.deepstack.iter().filter(|(after, _)| *after == l) {
                deepstack.push(merger.forward(&x, group)?);
            }
        }
        let mut parts = vec![self.merger.forward(&x, group)?];
        parts.extend(deepstack);
        let rows = Tensor::cat(&parts, 1)?;
        Ok((rows, [(gh / m) as u32, (gw / m) as u32]))
    }

    /// The learned positions bilinearly interpolated from the `side x side` table to a
    /// `gh x gw` grid (corners on corners), in `order`.
    fn positions(&self, gh: usize, gw: usize, order: &[(usize, usize)]) -> Result<Tensor> {
        let last = (self.side - 1) as f32;
        let along = |n: usize| -> Vec<(usize, usize, f32)> {
            (0..n)
                .map(|i| {
                    let v = if n == 1 {
                        0.0
                    } else {
                        i as f32 * last / (n - 1) as f32
                    };
                    let lo = v.floor() as usize;
                    (lo, (lo + 1).min(self.side - 1), v - lo as f32)
                })
                .collect()
        };
        let (hs, ws) = (along(gh), along(gw));
        let n = order.len();
        let (mut idx, mut weight) = (Vec::with_capacity(4 * n), Vec::with_capacity(4 * n));
        for &(r, c) in order {
            let ((h0, h1, dh), (w0, w1, dw)) = (hs[r], ws[c]);
            for (hi, wi, wt) in [
                (h0, w0, (1.0 - dh) * (1.0 - dw)),
                (h0, w1, (1.0 - dh) * dw),
                (h1, w0, dh * (1.0 - dw)),
                (h1, w1, dh * dw),
            ] {
                idx.push((hi * self.side + wi) as u32);
                weight.push(wt);
            }
        }
        let table = self
            .pos_embed
            .index_select(&Tensor::new(idx.as_slice(), &self.device)?, 0)?;
        let hidden = table.dim(1)?;
        let weight = Tensor::from_vec(weight, (n * 4, 1), &self.device)?;
        Ok(table
            .broadcast_mul(&weight)?
            .reshape((n, 4, hidden))?
            .sum(1)?)
    }

    /// Cos and sin `[patches, head_dim / 2]` of each patch's angles: its row's, then its
    /// column's.
    fn rotary(&self, order: &[(usize, usize)]) -> Result<(Tensor, Tensor)> {
        let f = &self.inv_freq;
        let angles: Vec<f32> = order
            .iter()
            .flat_map(|&(r, c)| {
                f.iter()
                    .map(move |x| r as f32 * x)
                    .chain(f.iter().map(move |x| c as f32 * x))
            })
            .collect();
        let angles = Tensor::from_vec(angles, (order.len(), 2 * f.len()), &self.device)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}

/// The patches of a `gh x gw` grid as (row, column), each `m x m` merge window's in a row.
fn merge_order(gh: usize, gw: usize, m: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::with_capacity(gh * gw);
    for br in 0..gh / m {
        for bc in 0..gw / m {
            for ir in 0..m {
                for ic in 0..m {
                    out.push((br * m + ir, bc * m + ic));
                }
            }
        }
    }
    out
}

/// The Hugging Face name (under `visual.`) of a tower tensor in a Qwen3-VL GGUF, for the
/// spellings of Ollama's conversion (`v.patch_embed`, `v.pos_embed`, `v.blk.N.norm1`,
/// `attn_q`/`attn_k`/`attn_v` or `attn_qkv`, `attn_out`, `mlp.linear_fc1`, `v.merger.*`,
/// `v.deepstack_merger.N.*`) and of llama.cpp's (`v.patch_embd`, `v.position_embd`, `ln1`,
/// `ffn_up`, `mm.0`, `mm.2`, `v.post_ln`); `None` for the text model's tensors. The patch
/// embedding's second temporal slice keeps its `.1`.
pub fn qwen_name(gguf: &str) -> Option<String> {
    if let Some(r) = gguf.strip_prefix("mm.") {
        let (i, kind) = r.split_once('.')?;
        let fc = match i {
            "0" => "linear_fc1",
            "2" => "linear_fc2",
            _ => return None,
        };
        return Some(format!("merger.{fc}.{kind}"));
    }
    let rest = gguf.strip_prefix("v.")?;
    if let Some(kind) = ["patch_embed.proj.", "patch_embed.", "patch_embd."]
        .iter()
        .find_map(|p| rest.strip_prefix(p))
    {
        return Some(format!("patch_embed.proj.{kind}"));
    }
    if let Some(kind) = ["pos_embed.", "position_embd."]
        .iter()
        .find_map(|p| rest.strip_prefix(p))
    {
        return Some(format!("pos_embed.{kind}"));
    }
    if let Some(kind) = rest.strip_prefix("post_ln.") {
        return Some(format!("merger.norm.{kind}"));
    }
    if rest.starts_with("merger.") {
        return Some(rest.to_string());
    }
    if let Some(r) = rest.strip_prefix("deepstack_merger.") {
        return Some(format!("deepstack_merger_list.{r}"));
    }
    let (layer, part) = rest.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (stem, kind) = part.rsplit_once('.')?;
    let stem = match stem {
        "norm1" | "ln1" => "norm1",
        "norm2" | "ln2" => "norm2",
        "attn_qkv" | "attn.qkv" => "attn.qkv",
        "attn_q" => "attn.q",
        "attn_k" => "attn.k",
        "attn_v" => "attn.v",
        "attn_out" | "attn_output" | "attn.proj" => "attn.proj",
        "mlp.linear_fc1" | "ffn_up" => "mlp.linear_fc1",
        "mlp.linear_fc2" | "ffn_down" => "mlp.linear_fc2",
        _ => return None,
    };
    Some(format!("blocks.{layer}.{stem}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_transformers() {
        for (g, hf) in [
            ("v.patch_embed.weight", "patch_embed.proj.weight"),
            ("v.patch_embed.weight.1", "patch_embed.proj.weight.1"),
            ("v.patch_embd.bias", "patch_embed.proj.bias"),
            ("v.pos_embed.weight", "pos_embed.weight"),
            ("v.position_embd.weight", "pos_embed.weight"),
            ("v.blk.3.norm1.bias", "blocks.3.norm1.bias"),
            ("v.blk.3.ln2.weight", "blocks.3.norm2.weight"),
            ("v.blk.0.attn_q.weight", "blocks.0.attn.q.weight"),
            ("v.blk.0.attn_qkv.bias", "blocks.0.attn.qkv.bias"),
            ("v.blk.7.attn_out.weight", "blocks.7.attn.proj.weight"),
            ("v.blk.7.ffn_down.bias", "blocks.7.mlp.linear_fc2.bias"),
            (
                "v.blk.7.mlp.linear_fc1.weight",
                "blocks.7.mlp.linear_fc1.weight",
            ),
            ("v.merger.linear_fc2.bias", "merger.linear_fc2.bias"),
            ("v.post_ln.weight", "merger.norm.weight"),
            ("mm.0.weight", "merger.linear_fc1.weight"),
            (
                "v.deepstack_merger.2.norm.weight",
                "deepstack_merger_list.2.norm.weight",
            ),
        ] {
            assert_eq!(qwen_name(g).as_deref(), Some(hf), "{g}");
        }
        for other in ["blk.0.attn_q.weight", "token_embd.weight", "mm.1.weight"] {
            assert_eq!(qwen_name(other), None, "{other}");
        }
    }

    #[test]
    fn patches_come_by_merge_window() {
        assert_eq!(
            merge_order(2, 4, 2),
            [
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
    }
}
