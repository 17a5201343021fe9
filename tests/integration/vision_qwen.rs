//! Qwen3-VL: the whole model (vision tower, mergers, DeepStack, decoder) with random weights
//! against candle-transformers' `qwen3_vl` (whose vision model is reachable only through the
//! whole model), loaded from Ollama's GGUF and from a Hugging Face checkpoint, the tower at
//! Qwen3-VL-2B's widths; and serving over HTTP with a random model in one GGUF carrying the
//! real Qwen tokenizer: `/api/show`'s `vision`, Ollama's and OpenAI's images, rope
//! positions, prefix reuse keyed on the image.
//!
//! candle's reference differs from transformers in two ways the comparison works around:
//! its text model has a 1-D rope and no causal mask within one call. So the image comes
//! first, alone in its call (its rows then see each other both ways, which ours do when
//! told `bidirectional`), the text after it one token per call, and our rows take 1-D
//! positions (no grid). The multimodal rope positions and the causal image rows that
//! serving uses are checked against transformers' rules in the unit tests (`MRope::axis`,
//! `rope_position`) and below (text rows unchanged by M-RoPE; image rows turned by it).

use crate::api_common;
use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::api_common::{b64, post_json as post, test_png};
use crate::common::{rel_diff, SplitMix64};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::qwen3_vl;
use candlewick::model::image::Pixels;
use candlewick::model::vision::{QwenTower, VisionTower};
use candlewick::model::{Batch, CpuKvCache, Decoder, ImageRows, KvType, WeightSource, IMAGE_ID};
use serde_json::{json, Value};

type Named = Vec<(String, Vec<usize>, Vec<f32>)>;
type GgufParts = (Vec<(String, QTensor)>, Vec<(String, gguf_file::Value)>);

/// A Qwen3-VL vision tower's sizes.
#[derive(Clone)]
struct VShape {
    hidden: usize,
    intermediate: usize,
    depth: usize,
    heads: usize,
    /// Side of the learned position grid.
    side: usize,
    deepstack: Vec<usize>,
    out: usize,
}

const PATCH: usize = 16;
const MERGE: usize = 2;

impl VShape {
    /// Qwen3-VL-2B's tower widths (1024 wide, 16 heads, 4096 MLP, 48x48 positions), two of
    /// its 24 blocks, a DeepStack merger after each.
    fn real(out: usize) -> VShape {
        VShape {
            hidden: 1024,
            intermediate: 4096,
            depth: 2,
            heads: 16,
            side: 48,
            deepstack: vec![0, 1],
            out,
        }
    }

    /// A small tower for serving tests.
    fn small(out: usize) -> VShape {
        VShape {
            hidden: 64,
            intermediate: 128,
            depth: 2,
            heads: 4,
            side: 8,
            deepstack: vec![0, 1],
            out,
        }
    }

    fn config(&self) -> Value {
        json!({
            "depth": self.depth,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_heads": self.heads,
            "out_hidden_size": self.out,
            "hidden_act": "gelu_pytorch_tanh",
            "in_channels": 3,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "num_position_embeddings": self.side * self.side,
            "deepstack_visual_indexes": self.deepstack,
        })
    }
}

/// A Qwen3 text model's sizes (head_dim 128 and Qwen3-VL's rope sections).
#[derive(Clone, Copy)]
struct TShape {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
}

const HEAD_DIM: usize = 128;

impl TShape {
    fn config(&self) -> Value {
        json!({
            "model_type": "qwen3_vl_text",
            "head_dim": HEAD_DIM,
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true,
            "rope_theta": 5_000_000.0,
            "sliding_window": null,
            "attention_bias": false,
            "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                             "mrope_interleaved": true},
        })
    }
}

/// Random weights under transformers' names relative to `model.visual.` (`tower`) and the
/// text model's names (`text`, full).
struct Weights {
    v: VShape,
    t: TShape,
    tower: Named,
    text: Named,
}

impl Weights {
    fn random(v: VShape, t: TShape, seed: u64) -> Weights {
        let mut rng = SplitMix64::new(seed);
        let mut tower = Vec::new();
        let (h, i) = (v.hidden, v.intermediate);
        let merged = h * MERGE * MERGE;
        let mut add = |out: &mut Named, name: String, dims: Vec<usize>, mean: f32, std: f32| {
            let n = dims.iter().product();
            out.push((name, dims, rng.normals(n, mean, std)));
        };
        add(
            &mut tower,
            "patch_embed.proj.weight".into(),
            vec![h, 3, 2, PATCH, PATCH],
            0.0,
            0.02,
        );
        add(
            &mut tower,
            "patch_embed.proj.bias".into(),
            vec![h],
            0.0,
            0.02,
        );
        add(
            &mut tower,
            "pos_embed.weight".into(),
            vec![v.side * v.side, h],
            0.0,
            0.5,
        );
        for l in 0..v.depth {
            let b = format!("blocks.{l}");
            for norm in ["norm1", "norm2"] {
                add(&mut tower, format!("{b}.{norm}.weight"), vec![h], 1.0, 0.1);
                add(&mut tower, format!("{b}.{norm}.bias"), vec![h], 0.0, 0.05);
            }
            add(
                &mut tower,
                format!("{b}.attn.qkv.weight"),
                vec![3 * h, h],
                0.0,
                0.03,
            );
            add(
                &mut tower,
                format!("{b}.attn.qkv.bias"),
                vec![3 * h],
                0.0,
                0.02,
            );
            add(
                &mut tower,
                format!("{b}.attn.proj.weight"),
                vec![h, h],
                0.0,
                0.03,
            );
            add(
                &mut tower,
                format!("{b}.attn.proj.bias"),
                vec![h],
                0.0,
                0.02,
            );
            add(
                &mut tower,
                format!("{b}.mlp.linear_fc1.weight"),
                vec![i, h],
                0.0,
                0.03,
            );
            add(
                &mut tower,
                format!("{b}.mlp.linear_fc1.bias"),
                vec![i],
                0.0,
                0.02,
            );
            add(
                &mut tower,
                format!("{b}.mlp.linear_fc2.weight"),
                vec![h, i],
                0.0,
                0.03,
            );
            add(
                &mut tower,
                format!("{b}.mlp.linear_fc2.bias"),
                vec![h],
                0.0,
                0.02,
            );
        }
        let mergers = std::iter::once(("merger".to_string(), h))
            .chain((0..v.deepstack.len()).map(|k| (format!("deepstack_merger_list.{k}"), merged)));
        for (m, norm) in mergers.collect::<Vec<_>>() {
            add(&mut tower, format!("{m}.norm.weight"), vec![norm], 1.0, 0.1);
            add(&mut tower, format!("{m}.norm.bias"), vec![norm], 0.0, 0.05);
            // Small enough that the GELU's input stays where candle's tanh form (the
            // reference's) and transformers' exact one (ours) agree to 1e-5.
            let fc1 = 0.3 / (merged as f32).sqrt();
            add(
                &mut tower,
                format!("{m}.linear_fc1.weight"),
                vec![merged, merged],
                0.0,
                fc1,
            );
            add(
                &mut tower,
                format!("{m}.linear_fc1.bias"),
                vec![merged],
                0.0,
                0.01,
            );
            add(
                &mut tower,
                format!("{m}.linear_fc2.weight"),
                vec![v.out, merged],
                0.0,
                0.05,
            );
            add(
                &mut tower,
                format!("{m}.linear_fc2.bias"),
                vec![v.out],
                0.0,
                0.02,
            );
        }

        let mut text = Vec::new();
        let (th, ti) = (t.hidden, t.intermediate);
        let (q, kv) = (t.heads * HEAD_DIM, t.kv_heads * HEAD_DIM);
        let p = "model.language_model";
        add(
            &mut text,
            format!("{p}.embed_tokens.weight"),
            vec![t.vocab, th],
            0.0,
            0.5,
        );
        for l in 0..t.layers {
            let b = format!("{p}.layers.{l}");
            for (name, dims) in [
                ("self_attn.q_proj", vec![q, th]),
                ("self_attn.k_proj", vec![kv, th]),
                ("self_attn.v_proj", vec![kv, th]),
                ("self_attn.o_proj", vec![th, q]),
                ("mlp.gate_proj", vec![ti, th]),
                ("mlp.up_proj", vec![ti, th]),
                ("mlp.down_proj", vec![th, ti]),
            ] {
                let std = 1.0 / (dims[1] as f32).sqrt();
                add(&mut text, format!("{b}.{name}.weight"), dims, 0.0, std);
            }
            for (name, n) in [
                ("input_layernorm", th),
                ("post_attention_layernorm", th),
                ("self_attn.q_norm", HEAD_DIM),
                ("self_attn.k_norm", HEAD_DIM),
            ] {
                add(&mut text, format!("{b}.{name}.weight"), vec![n], 1.0, 0.1);
            }
        }
        add(&mut text, format!("{p}.norm.weight"), vec![th], 1.0, 0.1);
        Weights { v, t, tower, text }
    }

    fn tensor(dims: &[usize], values: &[f32]) -> Tensor {
        Tensor::from_slice(values, dims, &Device::Cpu).unwrap()
    }

    fn config(&self) -> Value {
        json!({
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            "image_token_id": 151655,
            "video_token_id": 151656,
            "vision_start_token_id": 151652,
            "vision_end_token_id": 151653,
            "text_config": self.t.config(),
            "vision_config": self.v.config(),
        })
    }

    /// Every tensor under its checkpoint name.
    fn hf_map(&self) -> HashMap<String, Tensor> {
        let tower = self
            .tower
            .iter()
            .map(|(n, d, v)| (format!("model.visual.{n}"), Self::tensor(d, v)));
        let text = self
            .text
            .iter()
            .map(|(n, d, v)| (n.clone(), Self::tensor(d, v)));
        tower.chain(text).collect()
    }

    /// A Hugging Face checkpoint: config.json and model.safetensors (no tokenizer).
    fn write_safetensors(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config().to_string()).unwrap();
        candle_core::safetensors::save(&self.hf_map(), dir.join("model.safetensors")).unwrap();
    }

    /// The tensors and metadata of Ollama's Qwen3-VL GGUF (its conversion writes neither the
    /// tower's MLP width nor its position count: the loader reads them off the tensors).
    fn gguf_parts(&self) -> GgufParts {
        let q = |dims: &[usize], v: &[f32]| {
            QTensor::quantize(&Self::tensor(dims, v), GgmlDType::F32).unwrap()
        };
        let mut tensors = Vec::new();
        for (name, dims, values) in &self.tower {
            for (g, dims, values) in gguf_tower_tensor(name, dims, values) {
                tensors.push((g, q(&dims, &values)));
            }
        }
        for (name, dims, values) in &self.text {
            tensors.push((gguf_text_name(name), q(dims, values)));
        }
        use gguf_file::Value as V;
        let (v, t) = (&self.v, &self.t);
        let u = |x: usize| V::U32(x as u32);
        let md = vec![
            ("general.architecture".into(), V::String("qwen3vl".into())),
            ("qwen3vl.block_count".into(), u(t.layers)),
            ("qwen3vl.vocab_size".into(), u(t.vocab)),
            ("qwen3vl.context_length".into(), u(4096)),
            ("qwen3vl.embedding_length".into(), u(t.hidden)),
            ("qwen3vl.feed_forward_length".into(), u(t.intermediate)),
            ("qwen3vl.attention.head_count".into(), u(t.heads)),
            ("qwen3vl.attention.head_count_kv".into(), u(t.kv_heads)),
            ("qwen3vl.attention.key_length".into(), u(HEAD_DIM)),
            ("qwen3vl.attention.value_length".into(), u(HEAD_DIM)),
            (
                "qwen3vl.attention.layer_norm_rms_epsilon".into(),
                V::F32(1e-6),
            ),
            ("qwen3vl.rope.freq_base".into(), V::F32(5_000_000.0)),
            (
                "qwen3vl.rope.mrope_section".into(),
                V::Array(vec![u(24), u(20), u(20)]),
            ),
            ("qwen3vl.vision.block_count".into(), u(v.depth)),
            ("qwen3vl.vision.embedding_length".into(), u(v.hidden)),
            ("qwen3vl.vision.attention.head_count".into(), u(v.heads)),
            ("qwen3vl.vision.patch_size".into(), u(PATCH)),
            ("qwen3vl.vision.spatial_merge_size".into(), u(MERGE)),
            ("qwen3vl.vision.temporal_patch_size".into(), u(2)),
            ("qwen3vl.vision.num_channels".into(), u(3)),
            (
                "qwen3vl.vision.deepstack_visual_indexes".into(),
                V::Array(v.deepstack.iter().map(|&i| u(i)).collect()),
            ),
            (
                "qwen3vl.vision.attention.layer_norm_epsilon".into(),
                V::F32(1e-6),
            ),
        ];
        (tensors, md)
    }

    fn write_gguf(
        &self,
        out: &Path,
        extra: Vec<(String, gguf_file::Value)>,
        vocab_from: Option<&Path>,
    ) {
        let (mut tensors, mut md) = self.gguf_parts();
        md.extend(extra);
        if let Some(src) = vocab_from {
            // The tokenizer (and template) of a real Qwen GGUF.
            let mut f = std::fs::File::open(src).unwrap();
            let ct = gguf_file::Content::read(&mut f).unwrap();
            md.extend(
                ct.metadata
                    .into_iter()
                    .filter(|(k, _)| k.starts_with("tokenizer.")),
            );
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(out).unwrap();
        gguf_file::write(&mut file, &md, &tensors).unwrap();
    }
}

/// A tower tensor as Ollama's conversion writes it (name; the layout where it differs).
fn gguf_tower_tensor(
    name: &str,
    dims: &[usize],
    values: &[f32],
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    if name == "patch_embed.proj.weight" {
        // GGUF holds at most 4 dimensions: the conv's two temporal slices as two tensors
        // `[hidden, 3, patch, patch]`.
        let [h, c, t, p, q] = dims.try_into().unwrap();
        let slice = |i: usize| -> Vec<f32> {
            (0..h * c)
                .flat_map(|hc| {
                    let at = (hc * t + i) * p * q;
                    values[at..at + p * q].to_vec()
                })
                .collect()
        };
        return vec![
            ("v.patch_embed.weight".into(), vec![h, c, p, q], slice(0)),
            ("v.patch_embed.weight.1".into(), vec![h, c, p, q], slice(1)),
        ];
    }
    let g = name
        .replace("blocks.", "blk.")
        .replace("deepstack_merger_list.", "deepstack_merger.");
    vec![(format!("v.{g}"), dims.to_vec(), values.to_vec())]
}

/// A text tensor's GGUF name.
fn gguf_text_name(hf: &str) -> String {
    let n = hf.strip_prefix("model.language_model.").unwrap();
    let (stem, kind) = n.rsplit_once('.').unwrap();
    let stem = match stem {
        "embed_tokens" => "token_embd".to_string(),
        "norm" => "output_norm".to_string(),
        _ => {
            let (l, part) = stem
                .strip_prefix("layers.")
                .unwrap()
                .split_once('.')
                .unwrap();
            let part = match part {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                other => panic!("{other}"),
            };
            format!("blk.{l}.{part}")
        }
    };
    format!("{stem}.{kind}")
}

fn scratch(tag: &str) -> PathBuf {
    api_common::store_dir(&format!("vision-qwen-scratch-{tag}"))
}

/// Smooth pixels of a `w x h` image (already at the tower's grid), values in -1..1.
fn pixels(w: usize, h: usize, seed: usize) -> Pixels {
    let mut data = Vec::with_capacity(3 * w * h);
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let v = ((x * (3 + c) + y * (5 + seed) + c * 17) % 64) as f32 / 32.0 - 1.0;
                data.push(v);
            }
        }
    }
    Pixels {
        data,
        width: w,
        height: h,
    }
}

/// candle's `pixel_values`: per patch in merge-window order, channel, frame (the image
/// twice), row, column.
fn candle_pixels(p: &Pixels) -> Tensor {
    let (gh, gw) = (p.height / PATCH, p.width / PATCH);
    let plane = p.width * p.height;
    let mut out = Vec::new();
    for br in 0..gh / MERGE {
        for bc in 0..gw / MERGE {
            for ir in 0..MERGE {
                for ic in 0..MERGE {
                    let (r, c) = (br * MERGE + ir, bc * MERGE + ic);
                    for ch in 0..3 {
                        for _frame in 0..2 {
                            for y in 0..PATCH {
                                let at = ch * plane + (r * PATCH + y) * p.width + c * PATCH;
                                out.extend_from_slice(&p.data[at..at + PATCH]);
                            }
                        }
                    }
                }
            }
        }
    }
    let n = gh * gw;
    Tensor::from_vec(out, (n, 3 * 2 * PATCH * PATCH), &Device::Cpu).unwrap()
}

/// candle's logits after the image (first, alone) and then each of `text` fed one token per
/// call: one row per text token.
fn candle_logits(w: &Weights, px: &Pixels, rows: usize, text: &[u32]) -> Vec<Vec<f32>> {
    let cfg: qwen3_vl::Config = serde_json::from_value(w.config()).unwrap();
    let vb = VarBuilder::from_tensors(w.hf_map(), DType::F32, &Device::Cpu);
    let model = qwen3_vl::Qwen3VLModel::new(&cfg, vb).unwrap();
    let (gh, gw) = (px.height / PATCH, px.width / PATCH);
    let ids = Tensor::new(vec![151655u32 % w.t.vocab as u32; rows], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let grid = Tensor::new(&[[1u32, gh as u32, gw as u32]], &Device::Cpu).unwrap();
    model
        .forward(
            &ids,
            Some(candle_pixels(px)),
            None,
            Some(grid),
            None,
            vec![rows],
            vec![vec![(0, rows)]],
            vec![vec![]],
            &[0],
        )
        .unwrap();
    text.iter()
        .enumerate()
        .map(|(i, &t)| {
            let ids = Tensor::new(&[[t]], &Device::Cpu).unwrap();
            model
                .forward(
                    &ids,
                    None,
                    None,
                    None,
                    None,
                    vec![1],
                    vec![vec![]],
                    vec![vec![]],
                    &[rows + i],
                )
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

/// Our logits for the same: the image's rows (both ways, 1-D positions) then the text, in
/// one step; the rows after the image. Without `deepstack` the image brings only its
/// embeddings.
fn our_logits(
    decoder: &Decoder,
    tower: &QwenTower,
    px: &Pixels,
    text: &[u32],
    deepstack: bool,
) -> Vec<Vec<f32>> {
    let (embeds, grid) = tower.encode(px).unwrap();
    let rows = (grid[0] * grid[1]) as usize;
    let hidden = decoder.config().hidden_size;
    assert_eq!(embeds.dims(), &[rows, hidden * 3]);
    let embeds = if deepstack {
        embeds
    } else {
        embeds.narrow(1, 0, hidden).unwrap()
    };
    let mut tokens: Vec<u32> = (0..rows as u32).map(|i| IMAGE_ID | i).collect();
    tokens.extend_from_slice(text);
    let mut cache = CpuKvCache::with_type(decoder.config(), 16, 16, KvType::F32);
    let mut batch = Batch::default();
    batch.push_seq(&tokens, 0, (0..16).collect(), false);
    batch.logits_indices = (rows..tokens.len()).collect();
    batch.images = vec![ImageRows {
        row: 0,
        embeds,
        bidirectional: true,
    }];
    decoder
        .forward(&batch, &mut cache)
        .unwrap()
        .to_vec2()
        .unwrap()
}

#[test]
fn whole_model_matches_candle_from_gguf_and_safetensors() {
    let t = TShape {
        hidden: 256,
        intermediate: 512,
        layers: 3,
        heads: 2,
        kv_heads: 1,
        vocab: 512,
    };
    let w = Weights::random(VShape::real(t.hidden), t, 21);
    let dir = scratch("parity");
    let gguf = dir.join("qwen3vl.gguf");
    w.write_gguf(&gguf, Vec::new(), None);
    let st = dir.join("hf");
    w.write_safetensors(&st);

    // A 96x64 image: a 6x4 grid of patches, 3x2 embeddings.
    let px = pixels(96, 64, 1);
    let text = [17u32, 300, 5, 411];
    let want = candle_logits(&w, &px, 6, &text);

    let check = |what: &str, path: &Path| {
        let src = WeightSource::open(path).unwrap();
        let cfg = src.config().unwrap();
        assert_eq!(
            cfg.mrope.as_ref().map(|m| (m.sections, m.interleaved)),
            Some(([24, 20, 20], true)),
            "{what}"
        );
        let decoder = Decoder::load(&src, cfg, &Device::Cpu, DType::F32).unwrap();
        let tower = match &src {
            WeightSource::Gguf(g) => VisionTower::from_gguf(g, &Device::Cpu),
            WeightSource::Safetensors(s) => {
                VisionTower::from_safetensors(&s.dir, &s.config_json, &Device::Cpu)
            }
        };
        let Some(VisionTower::Qwen3(tower)) = tower.unwrap() else {
            panic!("{what}: no Qwen3-VL tower");
        };
        let got = our_logits(&decoder, &tower, &px, &text, true);
        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
            let d = rel_diff(g, r);
            assert!(d < 1e-3, "{what}: token {i}: relative difference {d}");
        }
        // The DeepStack features matter: without them the text after the image reads
        // otherwise.
        let flat = our_logits(&decoder, &tower, &px, &text, false);
        let d = rel_diff(&flat[0], &want[0]);
        assert!(d > 1e-2, "{what}: without DeepStack only {d} off");
    };
    check("gguf", &gguf);
    check("safetensors", &st);
}

/// Logits of every row of one prompt in a fresh cache, with `rope` positions (empty: 1-D).
fn rows_logits(
    decoder: &Decoder,
    tokens: &[u32],
    images: Vec<ImageRows>,
    rope: Vec<[u32; 3]>,
) -> Vec<Vec<f32>> {
    let mut cache = CpuKvCache::with_type(decoder.config(), 16, 16, KvType::F32);
    let mut batch = Batch::default();
    batch.push_seq(tokens, 0, (0..16).collect(), false);
    batch.logits_indices = (0..tokens.len()).collect();
    batch.images = images;
    batch.rope = rope;
    decoder
        .forward(&batch, &mut cache)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// The decoder's multimodal rope: text alone turns as plain rope (bit for bit), an image's
/// grid positions change only what comes after it, and a common shift of every position
/// changes nothing (rope sees differences only).
#[test]
fn multimodal_rope_in_the_decoder() {
    let t = TShape {
        hidden: 128,
        intermediate: 256,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        vocab: 512,
    };
    let w = Weights::random(VShape::small(t.hidden), t, 3);
    let gguf = scratch("mrope").join("m.gguf");
    w.write_gguf(&gguf, Vec::new(), None);
    let src = WeightSource::open(&gguf).unwrap();
    let decoder = Decoder::load(&src, src.config().unwrap(), &Device::Cpu, DType::F32).unwrap();

    let text = [5u32, 77, 300, 12, 9, 401];
    let plain = rows_logits(&decoder, &text, Vec::new(), Vec::new());
    let same = (0..text.len() as u32).map(|p| [p; 3]).collect();
    assert_eq!(rows_logits(&decoder, &text, Vec::new(), same), plain);

    // Two text tokens, a 2x3 image, four text tokens: transformers' positions are (0, 1),
    // then (2, 2 + r, 2 + c), then 5, 6, 7, 8.
    let mut tokens = vec![5u32, 77];
    tokens.extend((0..6).map(|i| IMAGE_ID | i));
    tokens.extend([300, 12, 9, 401]);
    let embeds = Tensor::from_vec(
        common::SplitMix64::new(9).normals(6 * t.hidden, 0.0, 1.0),
        (6, t.hidden),
        &Device::Cpu,
    )
    .unwrap();
    let image = || {
        vec![ImageRows {
            row: 2,
            embeds: embeds.clone(),
            bidirectional: false,
        }]
    };
    let mut mrope: Vec<[u32; 3]> = vec![[0; 3], [1; 3]];
    mrope.extend((0..6).map(|i| [2, 2 + i / 3, 2 + i % 3]));
    mrope.extend((5..9).map(|p| [p; 3]));
    let one_d = rows_logits(&decoder, &tokens, image(), Vec::new());
    let multi = rows_logits(&decoder, &tokens, image(), mrope.clone());
    assert_eq!(multi[..2], one_d[..2], "text before the image");
    assert!(
        rel_diff(&multi[11], &one_d[11]) > 1e-3,
        "the grid positions move what follows"
    );
    let shifted = mrope.iter().map(|p| p.map(|x| x + 10)).collect();
    let moved = rows_logits(&decoder, &tokens, image(), shifted);
    for (a, b) in moved.iter().zip(&multi) {
        assert!(rel_diff(a, b) < 1e-4, "a common shift: {}", rel_diff(a, b));
    }
}

/// A random Qwen3-VL (small tower, small text model of the real vocabulary) with the real
/// Qwen tokenizer and chat template, in one GGUF as Ollama ships `qwen3-vl`.
fn serving_gguf() -> PathBuf {
    let t = TShape {
        hidden: 128,
        intermediate: 256,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        vocab: 151_936,
    };
    let w = Weights::random(VShape::small(t.hidden), t, 8);
    let out = scratch("serving").join("qwen3vl.gguf");
    w.write_gguf(
        &out,
        Vec::new(),
        Some(&common::test_model(common::QWEN_GGUF)),
    );
    out
}

fn chat(images: &[&[u8]], text: &str) -> Value {
    json!({
        "model": "qwen3-vl", "stream": false,
        "messages": [{"role": "user", "content": text,
                      "images": images.iter().map(|i| b64(i)).collect::<Vec<_>>()}],
        "options": {"temperature": 0, "num_predict": 8}, "logprobs": true,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn qwen_images_over_http() {
    let models = api_common::store_dir("vision-qwen-http");
    api_common::import(&models, "qwen3-vl", &serving_gguf());
    let (addr, _state) = api_common::spawn_server(api_common::config(models, &[]));
    let base = format!("http://{addr}");
    // 64x48 -> 320x224 pixels (the 256x256 minimum area, sides multiples of 32): a 20x14
    // patch grid, 10x7 embeddings. A 200x100 one: 384x192, 12x6.
    let (a, b) = (test_png(64, 48, 1), test_png(200, 100, 2));

    let (_, show) = post(&base, "/api/show", json!({"model": "qwen3-vl"})).await;
    let caps = show["capabilities"].as_array().unwrap();
    assert!(caps.contains(&json!("vision")), "{caps:?}");

    let (s, text_only) = post(&base, "/api/chat", chat(&[], "Describe.")).await;
    assert_eq!(s, 200, "{text_only}");
    let count = |v: &Value| v["prompt_eval_count"].as_u64().unwrap();
    let (s, first) = post(&base, "/api/chat", chat(&[&a], "Describe.")).await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(
        count(&first) - count(&text_only),
        70 + 2,
        "70 embeddings between <|vision_start|> and <|vision_end|>"
    );
    let (_, wide) = post(&base, "/api/chat", chat(&[&b], "Describe.")).await;
    assert_eq!(count(&wide) - count(&text_only), 72 + 2);
    // Random weights answer alike in text; the first token's probability tells the images apart.
    let first_logprob = |v: &Value| v["logprobs"][0]["logprob"].as_f64().unwrap();
    assert!(
        (first_logprob(&wide) - first_logprob(&first)).abs() > 1e-4,
        "{} vs {}",
        wide["logprobs"][0],
        first["logprobs"][0]
    );

    // OpenAI's image_url is the same input; the Responses API's resend finds the image's
    // rows in the prefix cache.
    let url = format!("data:image/png;base64,{}", b64(&a));
    let (s, oai) = post(
        &base,
        "/v1/chat/completions",
        json!({
            "model": "qwen3-vl", "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Describe."},
            ]}],
        }),
    )
    .await;
    assert_eq!(s, 200, "{oai}");
    assert_eq!(
        oai["choices"][0]["message"]["content"],
        first["message"]["content"]
    );
    let (s, resp) = post(
        &base,
        "/v1/responses",
        json!({
            "model": "qwen3-vl", "temperature": 0, "max_output_tokens": 8,
            "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": url},
                {"type": "input_text", "text": "Describe."},
            ]}],
        }),
    )
    .await;
    assert_eq!(s, 200, "{resp}");
    assert_eq!(
        resp["output"][0]["content"][0]["text"],
        first["message"]["content"]
    );
    let cached = resp["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 70, "the image's rows come from the cache: {resp}");

    // A cached image answers as on a freshly loaded model (its rope positions and
    // DeepStack rows are what the cache holds).
    let (s, _) = post(
        &base,
        "/api/generate",
        json!({"model": "qwen3-vl", "keep_alive": 0}),
    )
    .await;
    assert_eq!(s, 200);
    let (_, fresh) = post(&base, "/api/chat", chat(&[&a], "Describe.")).await;
    assert_eq!(fresh["message"], first["message"]);
    assert!((first_logprob(&fresh) - first_logprob(&first)).abs() < 1e-3);
}
