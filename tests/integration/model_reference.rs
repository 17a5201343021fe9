//! Our one decoder against candle-transformers' reference models: tiny random-weight
//! safetensors models of each family (logits within 1e-4), real GGUF models (greedy tokens
//! equal), the safetensors path on real weights converted from GGUF (top-1 agreement), and
//! the engine's logprobs against the log-softmax of the decoder's own logits.

use crate::common;
use crate::engine_common;

use crate::common::TinyArch;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candlewick::model::{Batch, CpuKvCache, KvCache, KvType, Model};

const BLOCK: usize = 16;

/// A private cache and block table for one or more sequences of up to `ctx` tokens each.
/// The reference models keep K/V in f32: logit comparisons use an f32 cache, the greedy
/// comparisons on real weights the server's default (f16).
struct Run {
    cache: CpuKvCache,
    blocks_per_seq: usize,
}

impl Run {
    fn new(model: &Model, seqs: usize, ctx: usize, ty: KvType) -> Self {
        let blocks_per_seq = ctx.div_ceil(BLOCK);
        Self {
            cache: CpuKvCache::with_type(model.config(), seqs * blocks_per_seq, BLOCK, ty),
            blocks_per_seq,
        }
    }

    /// Sequence `s` owns blocks in reverse order, so block tables are not the identity.
    fn table(&self, s: usize, tokens: usize) -> Vec<u32> {
        let base = s * self.blocks_per_seq;
        (0..tokens.div_ceil(BLOCK))
            .map(|i| (base + self.blocks_per_seq - 1 - i) as u32)
            .collect()
    }
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().expect("logits to host")
}

/// Prompt in one pass (or in chunks), then decode steps one token at a time.
fn our_logits(model: &Model, prompt: &[u32], steps: &[u32], chunk: usize) -> Vec<Vec<f32>> {
    logits_with(model, prompt, steps, chunk, KvType::F32)
}

fn logits_with(
    model: &Model,
    prompt: &[u32],
    steps: &[u32],
    chunk: usize,
    ty: KvType,
) -> Vec<Vec<f32>> {
    let mut run = Run::new(model, 1, prompt.len() + steps.len() + 1, ty);
    let mut out = Vec::new();
    let mut done = 0;
    for c in prompt.chunks(chunk) {
        let mut b = Batch::default();
        let last = done + c.len() == prompt.len();
        b.push_seq(c, done, run.table(0, done + c.len()), last);
        let l = model
            .decoder
            .forward(&b, &mut run.cache as &mut dyn KvCache)
            .expect("forward");
        done += c.len();
        if last {
            out.extend(rows(&l));
        }
    }
    for &t in steps {
        let mut b = Batch::default();
        b.push_seq(&[t], done, run.table(0, done + 1), true);
        let l = model
            .decoder
            .forward(&b, &mut run.cache as &mut dyn KvCache)
            .expect("forward");
        done += 1;
        out.extend(rows(&l));
    }
    out
}

fn tiny_prompt(model: &Model) -> (Vec<u32>, Vec<u32>) {
    let ids = model
        .tokenizer
        .encode(
            "The quick brown fox jumps over the lazy dog. 北京欢迎你！ fn main() { println!(\"hi\"); } 1234567 and then some more words to pad the prompt out, because a test wants at least forty-eight tokens of mixed text here.",
            false,
        )
        .expect("encode");
    assert!(ids.len() >= 48, "prompt has {} tokens", ids.len());
    (ids[..32].to_vec(), ids[32..48].to_vec())
}

fn check_tiny(arch: TinyArch, seed: u64) {
    let dir = common::ScratchDir::new("tiny-ref");
    let path = common::write_tiny_model(arch, dir.path(), seed);
    let model = Model::load(&path, &Device::Cpu).expect("load tiny model");
    let (prompt, steps) = tiny_prompt(&model);
    let reference = common::reference_logits(arch, &path, &prompt, &steps);
    for chunk in [32, 7] {
        let ours = our_logits(&model, &prompt, &steps, chunk);
        assert_eq!(ours.len(), reference.len());
        for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
            let d = common::max_abs_diff(a, b);
            assert!(d < 1e-4, "{arch:?} chunk {chunk}: step {i} differs by {d}");
        }
    }
}

#[test]
fn tiny_qwen2_matches_reference() {
    check_tiny(TinyArch::Qwen2, 1);
}

#[test]
fn tiny_qwen3_matches_reference() {
    check_tiny(TinyArch::Qwen3, 2);
}

#[test]
fn tiny_llama_matches_reference() {
    check_tiny(TinyArch::Llama, 3);
}

/// Three sequences at different positions in one packed step give the logits each gets alone.
#[test]
fn packed_batch_equals_sequences_alone() {
    let dir = common::ScratchDir::new("tiny-packed");
    let path = common::write_tiny_model(TinyArch::Qwen2, dir.path(), 4);
    let model = Model::load(&path, &Device::Cpu).expect("load tiny model");
    let (all, _) = tiny_prompt(&model);
    let prompts = [&all[..5], &all[3..20], &all[10..32]];
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            our_logits(&model, &p[..p.len() - 1], &p[p.len() - 1..], 64)
                .pop()
                .expect("row")
        })
        .collect();

    // Prefill all but the last token of each, each in its own blocks; then one step that mixes
    // two decodes with the third sequence's last token.
    let mut run = Run::new(&model, 3, 64, KvType::F16);
    let mut b = Batch::default();
    for (s, p) in prompts.iter().enumerate() {
        b.push_seq(&p[..p.len() - 1], 0, run.table(s, p.len() - 1), false);
    }
    model
        .decoder
        .forward(&b, &mut run.cache as &mut dyn KvCache)
        .expect("prefill");
    let mut b = Batch::default();
    for (s, p) in prompts.iter().enumerate() {
        b.push_seq(&p[p.len() - 1..], p.len() - 1, run.table(s, p.len()), true);
    }
    let packed = rows(
        &model
            .decoder
            .forward(&b, &mut run.cache as &mut dyn KvCache)
            .expect("step"),
    );
    for (s, (a, b)) in packed.iter().zip(&alone).enumerate() {
        let d = common::max_abs_diff(a, b);
        assert!(d < 1e-4, "sequence {s} differs by {d} when batched");
    }
}

fn argmax(row: &[f32]) -> u32 {
    common::argmax(row)
}

/// candle's quantized matmuls quantize activations to 8 bits, so a last-bit difference in an
/// input (a different summation order in attention, or candle's own m=1 versus m=T kernel
/// paths, which differ by up to 0.37 logits on the Qwen prompt below) can move logits by
/// this much. A token the reference scores within this of its best is a correct greedy
/// choice too.
const NEAR_TIE: f32 = 1.0;

/// One greedy step of the reference: its choice and its logits.
struct RefStep {
    top: u32,
    logits: Vec<f32>,
}

/// Greedy continuation by candle-transformers' quantized reference for a GGUF file.
fn reference_greedy(path: &std::path::Path, prompt: &[u32], n: usize) -> Vec<RefStep> {
    let mut file = std::fs::File::open(path).expect("open gguf");
    let content = gguf_file::Content::read(&mut file).expect("read gguf");
    let arch = content.metadata["general.architecture"]
        .to_string()
        .expect("arch")
        .clone();
    enum M {
        L(candle_transformers::models::quantized_llama::ModelWeights),
        Q(candle_transformers::models::quantized_qwen2::ModelWeights),
    }
    let dev = Device::Cpu;
    let mut m = match arch.as_str() {
        "llama" => M::L(
            candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
                content, &mut file, &dev,
            )
            .expect("reference llama"),
        ),
        "qwen2" => M::Q(
            candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
                content, &mut file, &dev,
            )
            .expect("reference qwen2"),
        ),
        other => panic!("no reference for {other}"),
    };
    let mut fwd = |ids: &[u32], pos: usize| -> RefStep {
        let x = Tensor::new(ids, &dev)
            .expect("ids")
            .unsqueeze(0)
            .expect("batch");
        let l = match &mut m {
            M::L(m) => m.forward(&x, pos),
            M::Q(m) => m.forward(&x, pos),
        }
        .expect("reference forward");
        let row: Vec<f32> = l
            .flatten_all()
            .expect("flatten")
            .to_vec1()
            .expect("to host");
        RefStep {
            top: argmax(&row),
            logits: row,
        }
    };
    let mut out = vec![fwd(prompt, 0)];
    while out.len() < n {
        let pos = prompt.len() + out.len() - 1;
        let last = out[out.len() - 1].top;
        out.push(fwd(&[last], pos));
    }
    out
}

/// Our greedy choice at each step, fed the reference's tokens (teacher forcing), so one
/// near-tie cannot make the rest of the comparison meaningless.
fn our_choices(model: &Model, prompt: &[u32], forced: &[u32], ty: KvType) -> Vec<u32> {
    let mut run = Run::new(model, 1, prompt.len() + forced.len() + 1, ty);
    let mut b = Batch::default();
    b.push_seq(prompt, 0, run.table(0, prompt.len()), true);
    let mut l = model
        .decoder
        .forward(&b, &mut run.cache as &mut dyn KvCache)
        .expect("prefill");
    let mut out = Vec::new();
    for &t in forced {
        out.push(argmax(&rows(&l)[0]));
        let cached = prompt.len() + out.len() - 1;
        let mut b = Batch::default();
        b.push_seq(&[t], cached, run.table(0, cached + 1), true);
        l = model
            .decoder
            .forward(&b, &mut run.cache as &mut dyn KvCache)
            .expect("decode");
    }
    out
}

fn check_gguf_greedy(name: &str, prompts: &[&str]) {
    let path = common::test_model(name);
    let model = Model::load(&path, &Device::Cpu).expect("load gguf");
    let template = model.chat_template.as_ref().expect("chat template");
    for p in prompts {
        let text = template
            .render(
                &[serde_json::json!({"role": "user", "content": p})],
                None,
                true,
                &serde_json::Map::new(),
            )
            .expect("render");
        let ids = model.tokenizer.encode(&text, false).expect("encode");
        let reference = reference_greedy(&path, &ids, 32);
        let forced: Vec<u32> = reference.iter().map(|s| s.top).collect();
        // The default f16 cache, and llama.cpp's q8_0 blocks (OLLAMA_KV_CACHE_TYPE=q8_0).
        for ty in [KvType::F16, KvType::Q8_0] {
            let ours = our_choices(&model, &ids, &forced, ty);
            let mut exact = 0;
            for (i, (o, r)) in ours.iter().zip(&reference).enumerate() {
                if *o == r.top {
                    exact += 1;
                } else {
                    let behind = r.logits[r.top as usize] - r.logits[*o as usize];
                    assert!(
                        behind < NEAR_TIE,
                        "{name} {ty:?} {p:?} step {i}: we chose {o}, {behind} logits below \
                         the reference's {}",
                        r.top
                    );
                }
            }
            // q8_0 rounds keys and values to 8 bits: more near-ties fall the other way
            // (29-32 of 32 here), each still within NEAR_TIE of the reference's choice.
            let least = if ty == KvType::Q8_0 { 27 } else { 28 };
            assert!(
                exact >= least,
                "{name} {ty:?} {p:?}: only {exact}/32 greedy choices equal"
            );
        }
    }
}

#[test]
fn smollm2_gguf_greedy_matches_reference() {
    check_gguf_greedy(
        common::SMOLLM2_GGUF,
        &[
            "What is the capital of Germany?",
            "Write a haiku about the sea.",
            "List three colors.",
        ],
    );
}

#[test]
fn qwen_gguf_greedy_matches_reference() {
    check_gguf_greedy(
        common::QWEN_GGUF,
        &[
            "Write a Python function that adds two numbers.",
            "用一句话介绍北京。",
            "What does HTTP stand for?",
        ],
    );
}

/// Logits at every position of a text, through one forward with all positions requested.
fn all_position_argmax(model: &Model, ids: &[u32]) -> Vec<u32> {
    let mut run = Run::new(model, 1, ids.len(), KvType::F16);
    let mut b = Batch::default();
    b.push_seq(ids, 0, run.table(0, ids.len()), false);
    b.logits_indices = (0..ids.len()).collect();
    let l = model
        .decoder
        .forward(&b, &mut run.cache as &mut dyn KvCache)
        .expect("forward");
    rows(&l).iter().map(|r| argmax(r)).collect()
}

fn check_safetensors_agrees(name: &str, tokenizer_dir: Option<&std::path::Path>) {
    let gguf_model = Model::load(&common::test_model(name), &Device::Cpu).expect("load gguf");
    let hf_dir = common::test_gguf_hf_dir(name, tokenizer_dir);
    let hf_model = Model::load(&hf_dir, &Device::Cpu).expect("load safetensors dir");
    let text = "The history of the city goes back two thousand years. Its old town, with narrow \
                streets and a cathedral, draws visitors from around the world, and the river that \
                runs through it was once its main trade route. Merchants brought salt, wine and \
                cloth; in the winter the river froze and the markets moved onto the ice, where \
                children skated between the stalls until the spring thaw returned.";
    let ids = gguf_model.tokenizer.encode(text, false).expect("encode");
    let ids = &ids[..64.min(ids.len())];
    assert_eq!(ids.len(), 64, "text too short");
    let a = all_position_argmax(&gguf_model, ids);
    let b = all_position_argmax(&hf_model, ids);
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(
        same * 100 >= 95 * ids.len(),
        "{name}: safetensors and GGUF agree on top-1 at only {same}/{} positions",
        ids.len()
    );
}

#[test]
fn qwen_safetensors_agrees_with_gguf() {
    let tok = common::qwen_tokenizer_dir();
    check_safetensors_agrees(common::QWEN_GGUF, Some(&tok));
}

#[test]
fn smollm2_safetensors_agrees_with_gguf() {
    // SmolLM2 ships no tokenizer.json: save the one rebuilt from the GGUF metadata.
    let gguf = Model::load(&common::test_model(common::SMOLLM2_GGUF), &Device::Cpu).expect("load");
    let tok_dir = common::ScratchDir::new("smol-tok");
    gguf.tokenizer
        .save(&tok_dir.path().join("tokenizer.json"))
        .expect("save tokenizer");
    check_safetensors_agrees(common::SMOLLM2_GGUF, Some(tok_dir.path()));
}

/// The engine's logprobs are the log-softmax of the model's raw logits at each step: a
/// separate forward pass over the same tokens (the engine's f16 cache) gives the same
/// values, the same best alternatives in order, and the tokens' bytes spell the text. Sampled
/// with penalties and a grammar-free top-k, so the reported numbers must not be the
/// sampler's (penalised, truncated, tempered) distribution.
#[test]
fn engine_logprobs_are_the_models_log_softmax() {
    use candlewick::engine::{Event, Request};
    let model = engine_common::load(common::SMOLLM2_GGUF);
    let engine = engine_common::engine(&model, 64);
    let prompt = engine_common::chat(&model, &[("user", "Name three colours of the rainbow.")]);
    for (temperature, seed) in [(0.0, 0), (1.0, 3)] {
        let mut req = Request::new(prompt.clone());
        req.num_predict = Some(16);
        req.logprobs = Some(5);
        req.sampling.temperature = temperature;
        req.sampling.seed = Some(seed);
        req.sampling.repeat_penalty = 1.3;
        req.sampling.top_k = 3;
        let (mut ids, mut entries, mut text) = (Vec::new(), Vec::new(), String::new());
        for ev in engine.submit(req).expect("submit") {
            match ev {
                Event::Token {
                    id,
                    text: t,
                    logprobs,
                } => {
                    ids.push(id);
                    entries.push(logprobs.expect("logprobs were asked for"));
                    text.push_str(&t);
                }
                Event::Text(t) => text.push_str(&t),
                Event::Embedding(_) => panic!("not an embedding"),
                Event::Done(_) => break,
            }
        }
        assert!(ids.len() >= 4, "too short an answer: {text:?}");
        let rows = logits_with(
            &model,
            &prompt,
            &ids[..ids.len() - 1],
            prompt.len(),
            KvType::F16,
        );
        for (i, (lp, row)) in entries.iter().zip(&rows).enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let norm = f64::from(max)
                + row
                    .iter()
                    .map(|&v| f64::from(v - max).exp())
                    .sum::<f64>()
                    .ln();
            let want = |id: u32| f64::from(row[id as usize]) - norm;
            assert_eq!(lp.chosen.id, ids[i]);
            let d = (f64::from(lp.chosen.logprob) - want(ids[i])).abs();
            assert!(
                d < 2e-3,
                "t={temperature} step {i}: chosen logprob off by {d}"
            );
            let mut order: Vec<u32> = (0..row.len() as u32).collect();
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            assert_eq!(lp.top.len(), 5);
            for (j, c) in lp.top.iter().enumerate() {
                let d = (f64::from(c.logprob) - want(order[j])).abs();
                assert!(
                    d < 2e-3,
                    "t={temperature} step {i} alternative {j}: off by {d}"
                );
            }
            if temperature == 0.0 && i == 0 {
                // No penalty applies to the first token: greedy picks the best.
                assert_eq!(lp.chosen.id, lp.top[0].id);
            }
        }
        let bytes: Vec<u8> = entries
            .iter()
            .flat_map(|e| e.chosen.bytes.clone())
            .collect();
        assert_eq!(String::from_utf8_lossy(&bytes), text.as_str());
    }
}
