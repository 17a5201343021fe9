//! Gemma 3 text models in the one decoder: the real 270M GGUF (its tokenizer against
//! SentencePiece, greedy continuations against candle-transformers' `gemma3` on the same
//! weights and against what llama.cpp answers, the safetensors path on those weights),
//! random-weight checkpoints of the real shapes and of a small one with many KV blocks per
//! window (logits against candle's `gemma3`), the multimodal wrapper's text model, and chat
//! over HTTP with Gemma's template.
//!
//! candle-transformers' `quantized_gemma3` is not the reference here: it gates the MLP with
//! SiLU where Gemma uses GELU (candle issue #3745) and has no sliding window at decode, so
//! its greedy output differs from llama.cpp's. The reference is candle's `gemma3` (GELU,
//! exact window when decoding) run on the GGUF's weights dequantized.

use crate::api_common;
use crate::common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::common::gemma::{
    gemma3_gguf_shape, write_random_gemma3, GemmaLayout, GemmaReference, GemmaShape, GEMMA3_GGUF,
    GEMMA3_TOKENIZER, GEMMA3_TOKENIZER_CONFIG,
};
use candle_core::Device;
use candlewick::engine::generate::{generate, GenerateOptions};
use candlewick::engine::sampler::SamplingParams;
use candlewick::model::config::Family;
use candlewick::model::weights::GgufFile;
use candlewick::model::{Batch, ChatTemplate, CpuKvCache, KvCache, KvType, Model, Tokenizer};
use serde_json::{json, Value};

/// Held by the tests that hold a 270M-parameter f32 checkpoint (over 1 GB, twice with the
/// reference), so that parallel tests do not stack them up in memory.
fn one_big_model_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn gguf_path() -> PathBuf {
    common::test_model(GEMMA3_GGUF)
}

fn gguf_model() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| Arc::new(Model::load(&gguf_path(), &Device::Cpu).expect("load gemma3")))
        .clone()
}

/// A directory holding the GGUF's tokenizer as tokenizer.json (for safetensors checkpoints).
fn tokenizer_dir() -> &'static Path {
    static DIR: OnceLock<common::ScratchDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = common::ScratchDir::new("gemma-tok");
        gguf_model()
            .tokenizer
            .save(&dir.path().join("tokenizer.json"))
            .expect("save tokenizer");
        dir
    })
    .path()
}

/// A private paged cache: `seqs` sequences of up to `ctx` tokens in blocks of `block`,
/// each sequence's blocks in reverse order so block tables are not the identity.
struct Run {
    cache: CpuKvCache,
    block: usize,
    per_seq: usize,
}

impl Run {
    fn new(model: &Model, seqs: usize, ctx: usize, block: usize) -> Run {
        let per_seq = ctx.div_ceil(block);
        Run {
            // f32 like the reference, whose logits these runs are held to.
            cache: CpuKvCache::with_type(model.config(), seqs * per_seq, block, KvType::F32),
            block,
            per_seq,
        }
    }

    fn table(&self, seq: usize, tokens: usize) -> Vec<u32> {
        let base = seq * self.per_seq;
        (0..tokens.div_ceil(self.block))
            .map(|i| (base + self.per_seq - 1 - i) as u32)
            .collect()
    }

    /// Appends `tokens` to sequence 0 (holding `done` tokens); logits of every one of them
    /// when `all`, else of the last.
    fn step(&mut self, model: &Model, tokens: &[u32], done: usize, all: bool) -> Vec<Vec<f32>> {
        let mut b = Batch::default();
        b.push_seq(tokens, done, self.table(0, done + tokens.len()), !all);
        if all {
            b.logits_indices = (0..tokens.len()).collect();
        }
        let l = model
            .decoder
            .forward(&b, &mut self.cache as &mut dyn KvCache)
            .expect("forward");
        l.to_vec2().expect("logits")
    }
}

/// Deterministic token ids below `vocab`, avoiding the control tokens at the bottom.
fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (1000 + (s >> 33) as usize % (vocab - 1000)) as u32
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The real GGUF
// ---------------------------------------------------------------------------------------

#[test]
fn gguf_config_describes_gemma3() {
    let model = gguf_model();
    let c = model.config();
    assert_eq!(c.family, Family::Gemma3);
    assert_eq!((c.num_layers, c.hidden_size, c.head_dim), (18, 640, 256));
    assert_eq!((c.num_heads, c.num_kv_heads), (4, 1));
    assert_eq!(c.sliding_window, Some(512));
    assert_eq!(c.full_attention_layers, vec![5, 11, 17]);
    assert_eq!(c.layer_window(4), Some(512));
    assert_eq!(c.layer_window(5), None);
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert_eq!(c.sliding_rope_theta, Some(10_000.0));
    assert!(c.qk_norm && c.post_norms && c.scale_embeddings && c.tie_embeddings);
    assert!(!c.norm_weights_offset, "GGUF norms already hold 1 + w");
    assert!(model.chat_template.is_some(), "Gemma's built-in template");
    let t = &model.tokenizer;
    assert_eq!(t.bos_id(), Some(2));
    assert!(t.add_bos());
    assert_eq!(t.eos_ids()[0], 1);
    assert!(t.eos_ids().contains(&106), "<end_of_turn> ends generation");
}

/// Our ids for the GGUF vocabulary equal the SentencePiece library's on the same model
/// (tests/fixtures/tokens/gemma3.json, from scripts/gemma3-token-fixtures.py), whether the
/// tokenizer is rebuilt from the GGUF or read back from the tokenizer.json it saves.
#[test]
fn tokenizer_matches_sentencepiece() {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokens/gemma3.json"),
        )
        .expect("fixture"),
    )
    .expect("fixture JSON");
    let gguf = GgufFile::open(&gguf_path()).expect("open");
    let from_gguf = Tokenizer::from_gguf(gguf.metadata()).expect("tokenizer");
    let from_json = Tokenizer::from_file(&tokenizer_dir().join("tokenizer.json")).expect("json");
    let cases = fixture["texts"].as_array().expect("texts");
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).expect("ids");
        for (which, tok) in [("gguf", &from_gguf), ("tokenizer.json", &from_json)] {
            let got = tok.encode(text, false).expect("encode");
            if got != want {
                failures.push(format!("{which} {text:?}: {got:?}, want {want:?}"));
            }
            let back = tok.decode(&want, false).expect("decode");
            if back != text {
                failures.push(format!("{which} decode {want:?}: {back:?}, want {text:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(from_gguf.encode("Hi", true).expect("encode")[0], 2, "bos");
}

/// `n` texts of up to 120 characters drawn from what stresses a SentencePiece vocabulary:
/// runs of spaces, tabs and newlines, words, digits, markup, accents, CJK, emoji (with
/// modifiers), rare and control characters.
fn varied_texts(n: usize, seed: u64) -> Vec<String> {
    const PARTS: &[&str] = &[
        " ",
        "  ",
        "    ",
        "\t",
        "\n",
        "\n\n",
        "\r\n",
        "the",
        "The",
        " quick",
        "brown",
        "fox",
        "tokenizer",
        "antidisestablishment",
        "ing",
        "2025",
        "7",
        "3.14",
        "-",
        ",",
        ".",
        "!",
        "?",
        "(",
        ")",
        "{",
        "}",
        "<p>",
        "</div>",
        "&amp;",
        "def ",
        "return ",
        "==",
        "->",
        "é",
        "naïve",
        "Straße",
        "Ωμέγα",
        "Привет",
        "北京",
        "欢迎你",
        "日本語",
        "한국어",
        "😀",
        "👍🏽",
        "🇩🇪",
        "\u{1}",
        "\u{7f}",
        "\u{20000}",
        "\u{2028}",
        "\u{fffd}",
        "ℕ",
        "ﬁ",
        "<start_of_turn>",
        "<end_of_turn>",
        "<bos>",
        "<unused7>",
        "[multimodal]",
    ];
    let mut s = seed;
    let mut next = move |m: usize| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as usize % m
    };
    (0..n)
        .map(|_| {
            let mut t = String::new();
            while t.chars().count() < 120 {
                t.push_str(PARTS[next(PARTS.len())]);
                if next(8) == 0 {
                    break;
                }
            }
            t
        })
        .collect()
}

/// Our tokenizer rebuilt from the GGUF gives the ids of Gemma 3's own tokenizer.json (the
/// Hugging Face pipeline: its normalizer, merges and added tokens, which write the
/// whitespace-run pieces with U+2581 where the GGUF has spaces), and decodes them alike.
#[test]
fn tokenizer_matches_gemma_tokenizer_json() {
    let gguf = GgufFile::open(&gguf_path()).expect("open");
    let ours = Tokenizer::from_gguf(gguf.metadata()).expect("tokenizer");
    let theirs = Tokenizer::from_file(&common::test_model(GEMMA3_TOKENIZER)).expect("theirs");
    assert_eq!(theirs.bos_id(), ours.bos_id());
    let mut failures = Vec::new();
    for text in varied_texts(400, 17) {
        let (a, b) = (
            ours.encode(&text, false).expect("encode"),
            theirs.encode(&text, false).expect("encode"),
        );
        if a != b {
            failures.push(format!("{text:?}:\n ours   {a:?}\n theirs {b:?}"));
        } else if ours.decode(&a, false).ok() != theirs.decode(&b, false).ok() {
            failures.push(format!("{text:?}: decodes differ"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// For the conversations Google's template accepts (roles alternating, a system message
/// first at most), the built-in template writes the same prompt.
#[test]
fn builtin_template_renders_as_googles() {
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(common::test_model(GEMMA3_TOKENIZER_CONFIG)).expect("read"),
    )
    .expect("config");
    let source = config["chat_template"].as_str().expect("chat_template");
    let bos = Some("<bos>".to_string());
    let google = ChatTemplate::new(source, bos.clone(), None).expect("google's");
    let ours = gguf_model();
    let ours = ours.chat_template.as_ref().expect("built-in");
    let user = |c: &str| json!({"role": "user", "content": c});
    let model = |c: &str| json!({"role": "assistant", "content": c});
    let system = json!({"role": "system", "content": "Be brief. "});
    let parts = json!({"role": "user", "content": [
        {"type": "text", "text": " Look: "}, {"type": "image"}, {"type": "text", "text": "ok?"}
    ]});
    let conversations = [
        vec![user("Hi")],
        vec![system.clone(), user(" What is 2+2?\n")],
        vec![system, user("Hi"), model("Hello!"), user("Tell me more.")],
        vec![user("Hi"), model("Hello!")],
        vec![parts],
    ];
    for messages in &conversations {
        for generation_prompt in [true, false] {
            let render = |t: &ChatTemplate| {
                t.render(messages, None, generation_prompt, &serde_json::Map::new())
                    .expect("render")
            };
            assert_eq!(render(ours), render(&google), "{messages:?}");
        }
    }
}

fn greedy(model: &Arc<Model>, ids: &[u32], n: usize) -> String {
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        num_predict: Some(n),
        ..GenerateOptions::default()
    };
    generate(model, ids, &opts, |_| {}).expect("generate").text
}

/// llama.cpp continues `def add(a, b):` with `return a + b`; so must we.
#[test]
fn completes_add_like_llama_cpp() {
    let model = gguf_model();
    let ids = model
        .tokenizer
        .encode("def add(a, b):", true)
        .expect("encode");
    let text = greedy(&model, &ids, 12);
    assert!(
        text.trim_start().starts_with("return a + b"),
        "continuation: {text:?}"
    );
}

/// Through the engine: a 700-token prompt (past the 512-token window) prefilled in chunks
/// of 64 answers exactly as one prefilled in a single pass.
#[test]
fn long_prompt_chunked_prefill_through_the_engine() {
    let model = gguf_model();
    let text = "Every morning the baker opened the shop at six, set out the bread, and \
                greeted the first customers by name. ";
    let mut ids = model
        .tokenizer
        .encode(&text.repeat(40), true)
        .expect("encode");
    ids.truncate(700);
    let run = |chunk: usize| {
        let opts = GenerateOptions {
            sampling: SamplingParams::greedy(),
            num_predict: Some(16),
            prefill_chunk: chunk,
            ..GenerateOptions::default()
        };
        generate(&model, &ids, &opts, |_| {})
            .expect("generate")
            .tokens
    };
    assert_eq!(run(64), run(1024));
}

/// candle's quantized matmuls (and ours) quantize activations to 8 bits; a token the
/// reference scores within this of its best is a correct greedy choice too.
const NEAR_TIE: f32 = 1.0;

/// Teacher-forced greedy comparison against candle's gemma3 on the GGUF's dequantized
/// weights: `steps` tokens after `prompt`, each our choice from the reference's history.
/// Returns how many choices were exactly the reference's.
fn compare_greedy(
    model: &Model,
    reference: &mut GemmaReference,
    prompt: &[u32],
    steps: usize,
) -> usize {
    let mut run = Run::new(model, 1, prompt.len() + steps + 1, 16);
    // The prompt in uneven chunks, as the scheduler may cut it.
    let mut done = 0;
    let mut ours = Vec::new();
    for c in prompt.chunks(97) {
        ours = run.step(model, c, done, false);
        done += c.len();
    }
    let mut want = reference.forward(prompt, 0);
    let mut exact = 0;
    for i in 0..steps {
        let top = common::argmax(&want);
        let mine = common::argmax(&ours[0]);
        if mine == top {
            exact += 1;
        } else {
            let behind = want[top as usize] - want[mine as usize];
            assert!(
                behind < NEAR_TIE,
                "step {i} at position {done}: we chose {mine}, {behind} logits below the \
                 reference's {top}"
            );
        }
        ours = run.step(model, &[top], done, false);
        want = reference.forward(&[top], done);
        done += 1;
    }
    exact
}

/// The GGUF as a Hugging Face checkpoint (f32, norms as offsets), cached beside it.
fn gguf_as_hf() -> (PathBuf, GemmaShape) {
    let dir = common::test_gguf_hf_dir(GEMMA3_GGUF, Some(tokenizer_dir()));
    (dir, gemma3_gguf_shape(&gguf_path()))
}

/// [`compare_greedy`] on the real model against candle's gemma3 on its weights; at least
/// `min_exact` of `steps` choices must be exactly the reference's.
fn check_real_greedy(what: &str, ids: &[u32], steps: usize, min_exact: usize) {
    let _big = one_big_model_at_a_time();
    let model = gguf_model();
    let (dir, shape) = gguf_as_hf();
    let mut reference = GemmaReference::load(&dir, &shape, GemmaLayout::Text);
    let exact = compare_greedy(&model, &mut reference, ids, steps);
    eprintln!("{what}: {exact}/{steps} greedy choices equal");
    assert!(
        exact >= min_exact,
        "{what}: only {exact}/{steps} greedy choices equal"
    );
}

#[test]
fn gguf_greedy_matches_candle_gemma3() {
    let prompts = [
        "def add(a, b):",
        "The capital of France is",
        "Once upon a time, in a small village by the sea,",
        "1, 2, 3, 4, 5,",
    ];
    for p in prompts {
        let ids = gguf_model().tokenizer.encode(p, true).expect("encode");
        check_real_greedy(p, &ids, 24, 21);
    }
}

/// A prompt just inside the 512-token window, then decoding past it: from position 512 on,
/// the sliding layers drop the oldest tokens (candle's decode path is exact there).
#[test]
fn gguf_greedy_across_the_window() {
    let para = "The river rises in the hills north of the town and runs south through \
                farmland, woods and three villages before it reaches the sea. In spring the \
                meltwater floods the meadows; in summer children swim below the old mill. ";
    let mut ids = gguf_model()
        .tokenizer
        .encode(&para.repeat(20), true)
        .expect("encode");
    ids.truncate(490);
    check_real_greedy("across the window", &ids, 40, 35);
}

/// Our safetensors path on the GGUF's weights (f32, norms stored as offsets from 1) agrees
/// with our GGUF path on the top token at (nearly) every position.
#[test]
fn safetensors_agrees_with_gguf() {
    let _big = one_big_model_at_a_time();
    let gguf = gguf_model();
    let (dir, _) = gguf_as_hf();
    let hf = Model::load(&dir, &Device::Cpu).expect("load safetensors");
    assert!(hf.config().norm_weights_offset);
    assert_eq!(hf.config().full_attention_layers, vec![5, 11, 17]);
    let text = "Photosynthesis is the process by which green plants use sunlight to make \
                food from carbon dioxide and water. It takes place in the chloroplasts, and \
                oxygen is released as a by-product of the reaction, which is why forests \
                matter so much for the air we breathe.";
    let ids = gguf.tokenizer.encode(text, true).expect("encode");
    let ids = &ids[..48];
    let top = |m: &Model| -> Vec<u32> {
        let mut run = Run::new(m, 1, ids.len(), 16);
        run.step(m, ids, 0, true)
            .iter()
            .map(|r| common::argmax(r))
            .collect()
    };
    let (a, b) = (top(&gguf), top(&hf));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!(same * 100 >= 95 * ids.len(), "top-1 agrees at {same}/48");
}

// ---------------------------------------------------------------------------------------
// Random weights against candle's gemma3
// ---------------------------------------------------------------------------------------

/// A random-weight checkpoint of `shape` in a scratch directory, with the GGUF's tokenizer.
fn random_checkpoint(
    tag: &str,
    shape: &GemmaShape,
    seed: u64,
    layout: GemmaLayout,
) -> common::ScratchDir {
    let dir = common::ScratchDir::new(tag);
    let tokenizer = tokenizer_dir().join("tokenizer.json");
    write_random_gemma3(dir.path(), shape, seed, layout, &tokenizer);
    dir
}

/// Sets `key` of the checkpoint's config.json.
fn set_config(dir: &Path, key: &str, value: Value) {
    let path = dir.join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("config");
    config[key] = value;
    std::fs::write(&path, config.to_string()).expect("write");
}

/// The reference's logits after each of `ids`, fed one at a time (its exact path).
fn one_by_one(reference: &mut GemmaReference, ids: &[u32]) -> Vec<Vec<f32>> {
    ids.iter()
        .enumerate()
        .map(|(p, &t)| reference.forward(&[t], p))
        .collect()
}

/// Ours against the reference on `prompt` then `steps` one at a time, with the prompt in
/// chunks of each size in `chunks`; logits within `tol`.
fn check_logits(model: &Model, reference: &[Vec<f32>], prompt: &[u32], steps: &[u32], tol: f32) {
    for chunk in [prompt.len(), 7] {
        let mut run = Run::new(model, 1, prompt.len() + steps.len() + 1, 16);
        let mut done = 0;
        let mut ours = Vec::new();
        for c in prompt.chunks(chunk) {
            ours = run.step(model, c, done, false);
            done += c.len();
        }
        let mut rows = vec![ours.remove(0)];
        for &t in steps {
            rows.push(run.step(model, &[t], done, false).remove(0));
            done += 1;
        }
        for (i, (a, b)) in rows.iter().zip(reference).enumerate() {
            let d = common::max_abs_diff(a, b);
            assert!(d < tol, "chunk {chunk}: step {i} differs by {d}");
        }
    }
}

fn reference_rows(reference: &mut GemmaReference, prompt: &[u32], steps: &[u32]) -> Vec<Vec<f32>> {
    let mut rows = vec![reference.forward(prompt, 0)];
    for (i, &t) in steps.iter().enumerate() {
        rows.push(reference.forward(&[t], prompt.len() + i));
    }
    rows
}

/// A random-weight checkpoint of Gemma 3 270M's real shapes (262144 x 640 embeddings, 18
/// layers, 4 query heads of 256 over one kv head, window 512 with every sixth layer global).
#[test]
fn random_270m_matches_candle_gemma3() {
    let _big = one_big_model_at_a_time();
    let shape = GemmaShape::gemma3_270m();
    let dir = random_checkpoint("gemma-270m", &shape, 11, GemmaLayout::Text);
    let model = Model::load(dir.path(), &Device::Cpu).expect("load");
    assert_eq!(model.config().full_attention_layers, vec![5, 11, 17]);
    let ids = model
        .tokenizer
        .encode(
            "Gemma 3 mixes five sliding-window layers with one global layer, and it norms \
             both the input and the output of every attention and feed-forward block.",
            true,
        )
        .expect("encode");
    let (prompt, steps) = ids.split_at(ids.len() - 6);
    let mut reference = GemmaReference::load(dir.path(), &shape, GemmaLayout::Text);
    let want = reference_rows(&mut reference, prompt, steps);
    drop(reference);
    check_logits(&model, &want, prompt, steps, 1e-4);
}

/// A small model with a window of 8 tokens over 4-token KV blocks: 100 prompt tokens (25
/// blocks, each sliding layer seeing two or three of them) prefilled whole and in chunks
/// that start anywhere in a window, then 20 decode steps, against candle's gemma3 fed one
/// token at a time (exact sliding semantics at every position).
#[test]
fn sliding_windows_across_blocks_and_chunks() {
    let shape = GemmaShape::tiny(262_144);
    let dir = random_checkpoint("gemma-tiny", &shape, 5, GemmaLayout::Text);
    let model = Model::load(dir.path(), &Device::Cpu).expect("load");
    assert_eq!(model.config().full_attention_layers, vec![1, 3]);
    let ids = random_ids(120, shape.vocab, 3);
    let mut reference = GemmaReference::load(dir.path(), &shape, GemmaLayout::Text);
    let want = one_by_one(&mut reference, &ids);
    let (prompt, steps) = ids.split_at(100);
    for (chunk, block) in [(100, 4), (13, 4), (5, 16), (1, 4)] {
        let mut run = Run::new(&model, 1, ids.len(), block);
        let mut done = 0;
        let mut rows = Vec::new();
        for c in prompt.chunks(chunk) {
            rows.extend(run.step(&model, c, done, true));
            done += c.len();
        }
        for &t in steps {
            rows.extend(run.step(&model, &[t], done, false));
            done += 1;
        }
        for (p, (a, b)) in rows.iter().zip(&want).enumerate() {
            let d = common::max_abs_diff(a, b);
            assert!(
                d < 1e-4,
                "chunk {chunk}, block {block}: position {p} differs by {d}"
            );
        }
    }
}

/// The released multimodal layout: config `gemma3` whose `text_config` lists only what
/// differs from transformers' defaults, tensors under `language_model.model.`, a vision
/// tensor beside them; and final-logit soft-capping on.
#[test]
fn multimodal_wrapper_runs_its_text_model() {
    let mut shape = GemmaShape::tiny(262_144);
    // The wrapper's text_config leaves these to Gemma3TextConfig's defaults.
    shape.rms_norm_eps = 1e-6;
    shape.rope_theta = 1_000_000.0;
    shape.rope_local_theta = 10_000.0;
    shape.final_logit_softcapping = Some(0.05);
    let dir = random_checkpoint("gemma-wrapped", &shape, 9, GemmaLayout::Wrapped);
    let model = Model::load(dir.path(), &Device::Cpu).expect("load");
    assert_eq!(model.config().final_logit_softcap, Some(0.05));
    let ids = random_ids(30, shape.vocab, 4);
    let (prompt, steps) = ids.split_at(24);
    // One token at a time: the prompt is longer than the window (see `forward`).
    let mut reference = GemmaReference::load(dir.path(), &shape, GemmaLayout::Wrapped);
    let want = one_by_one(&mut reference, &ids).split_off(prompt.len() - 1);
    let capped = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    // The cap is small enough to bite: the largest logits sit right at it.
    assert!(
        capped <= 0.05 && capped > 0.045,
        "soft-capped logits reach {capped}"
    );
    check_logits(&model, &want, prompt, steps, 1e-5);
}

/// `query_pre_attn_scalar` other than head_dim (Gemma 3 27B): scores scale by its inverse
/// square root. candle's gemma3 always uses head_dim, so its checkpoint absorbs the factor
/// into the q norm weights instead (q is linear in them up to the rotation, which is linear
/// too); both must give the same logits.
#[test]
fn query_pre_attn_scalar_scales_the_scores() {
    let shape = GemmaShape::tiny(262_144);
    let ours_dir = random_checkpoint("gemma-qpas", &shape, 21, GemmaLayout::Text);
    let scalar = 3.0 * shape.head_dim as f64;
    set_config(ours_dir.path(), "query_pre_attn_scalar", json!(scalar));

    let ref_dir = random_checkpoint("gemma-qpas-ref", &shape, 21, GemmaLayout::Text);
    let weights = ref_dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).expect("load");
    let factor = (shape.head_dim as f64 / scalar).sqrt();
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("q_norm.weight") {
            *t = (((&*t + 1.0).expect("add") * factor).expect("mul") - 1.0).expect("sub");
        }
    }
    candle_core::safetensors::save(&tensors, &weights).expect("save");

    let model = Model::load(ours_dir.path(), &Device::Cpu).expect("load");
    assert_eq!(model.config().query_pre_attn_scalar, Some(scalar));
    let ids = random_ids(20, shape.vocab, 8);
    let mut reference = GemmaReference::load(ref_dir.path(), &shape, GemmaLayout::Text);
    let want = one_by_one(&mut reference, &ids);
    let mut run = Run::new(&model, 1, ids.len(), 4);
    let rows = run.step(&model, &ids, 0, true);
    for (p, (a, b)) in rows.iter().zip(&want).enumerate() {
        let d = common::max_abs_diff(a, b);
        assert!(d < 1e-4, "position {p} differs by {d}");
    }
}

/// Gemma 2's attention soft-capping is not implemented: such a config is refused by name.
#[test]
fn attention_soft_capping_is_refused() {
    let shape = GemmaShape::tiny(262_144);
    let dir = random_checkpoint("gemma-softcap", &shape, 1, GemmaLayout::Text);
    set_config(dir.path(), "attn_logit_softcapping", json!(50.0));
    let err = Model::load(dir.path(), &Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("soft-capping"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Over HTTP
// ---------------------------------------------------------------------------------------

/// Chat through /api/chat and /v1/chat/completions with Gemma's template (the GGUF has none
/// of its own), and a raw completion through /api/generate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_over_http_uses_gemma_turns() {
    let dir = api_common::store_dir("gemma3");
    api_common::import(&dir, "gemma3:270m", &gguf_path());
    let cfg = api_common::config(dir, &[("WICK_KV_CACHE_BYTES", "268435456")]);
    let (addr, _state) = api_common::spawn_server(cfg);
    let base = format!("http://{addr}");

    let messages = json!([
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
    ]);
    let resp = api_common::post(
        &base,
        "/api/chat",
        json!({"model": "gemma3:270m", "messages": messages, "stream": false,
               "options": {"temperature": 0, "num_predict": 16}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["message"]["role"], "assistant");
    assert!(v["done"].as_bool().unwrap_or(false), "{v}");
    // The prompt is the template's: <bos>, then the system text opening the user turn.
    let model = gguf_model();
    let prompt = "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of \
                  France?<end_of_turn>\n<start_of_turn>model\n";
    let n = model.tokenizer.encode(prompt, false).expect("encode").len();
    assert_eq!(v["prompt_eval_count"], n, "{v}");
    let answer = v["message"]["content"].as_str().expect("content");
    assert!(!answer.contains("<end_of_turn>"), "{answer:?}");

    let lines = api_common::ok_lines(
        api_common::post(
            &base,
            "/api/chat",
            json!({"model": "gemma3:270m", "messages": messages,
                   "options": {"temperature": 0, "num_predict": 16}}),
        )
        .await,
    )
    .await;
    let streamed: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    assert_eq!(streamed, answer, "streamed and whole answers agree");

    let resp = api_common::post(
        &base,
        "/v1/chat/completions",
        json!({"model": "gemma3:270m", "messages": messages, "temperature": 0,
               "max_tokens": 16}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], answer);

    let resp = api_common::post(
        &base,
        "/api/generate",
        json!({"model": "gemma3:270m", "prompt": "def add(a, b):", "raw": true,
               "stream": false, "options": {"temperature": 0, "num_predict": 12}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    let text = v["response"].as_str().expect("response");
    assert!(
        text.trim_start().starts_with("return a + b"),
        "raw completion: {text:?}"
    );
}
