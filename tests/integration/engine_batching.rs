//! Continuous batching on real GGUF models: sequences submitted together, packed into shared
//! forward steps, produce the greedy tokens each produces alone.

use crate::common;
use crate::engine_common::{chat, collect, engine, load, Output};
use candlewick::engine::{FinishReason, Request};
use candlewick::model::{Batch, CpuKvCache, KvCache, Model};

const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Name a famous painting.",
    "What is 12 times 7?",
    "Give me a short tip for learning to code.",
];

const NEW_TOKENS: usize = 16;

/// candle's quantized matmuls give slightly different results for different numbers of rows
/// (one decode row alone versus eight packed: up to ~0.4 logits on Qwen), so a batched greedy
/// run may pick the other token where the two best are this close. The same tolerance as
/// tests/integration/model_reference.rs.
const NEAR_TIE: f32 = 1.0;

fn request(prompt: Vec<u32>) -> Request {
    Request {
        num_predict: Some(NEW_TOKENS),
        ..Request::new(prompt)
    }
}

/// How far apart the logits of tokens `x` and `y` are after `prompt` and `prefix`, run
/// directly through the decoder in one pass.
fn logit_gap(model: &Model, prompt: &[u32], prefix: &[u32], x: u32, y: u32) -> f32 {
    let ids: Vec<u32> = prompt.iter().chain(prefix).copied().collect();
    let blocks = ids.len().div_ceil(16);
    let mut cache = CpuKvCache::new(model.config(), blocks, 16);
    let mut b = Batch::default();
    b.push_seq(&ids, 0, (0..blocks as u32).collect(), true);
    let l = model
        .decoder
        .forward(&b, &mut cache as &mut dyn KvCache)
        .expect("forward");
    let row: Vec<Vec<f32>> = l.to_vec2().expect("logits");
    (row[0][x as usize] - row[0][y as usize]).abs()
}

/// Each batched output equals the alone output, except that after a near-tie (checked
/// against the model directly) the two may go separate ways; most must be exactly equal.
fn check_against_alone(
    name: &str,
    model: &Model,
    prompts: &[Vec<u32>],
    alone: &[Output],
    batched: &[Output],
    min_exact: usize,
) {
    let mut exact = 0;
    for (i, (a, b)) in alone.iter().zip(batched).enumerate() {
        assert!(matches!(
            a.summary.finish,
            FinishReason::Stop | FinishReason::Length
        ));
        assert!(matches!(
            b.summary.finish,
            FinishReason::Stop | FinishReason::Length
        ));
        assert!(!a.ids.is_empty());
        assert_eq!(b.summary.prompt_eval_count, prompts[i].len());
        assert_eq!(b.summary.eval_count, b.ids.len());
        match a.ids.iter().zip(&b.ids).position(|(x, y)| x != y) {
            None => {
                assert_eq!(a.ids, b.ids, "{name} prompt {i}: one run stopped early");
                assert_eq!(a.text, b.text, "{name} prompt {i}: text differs");
                exact += 1;
            }
            Some(at) => {
                let gap = logit_gap(model, &prompts[i], &a.ids[..at], a.ids[at], b.ids[at]);
                eprintln!("{name} prompt {i}: diverges at token {at}, logit gap {gap}");
                assert!(
                    gap < NEAR_TIE,
                    "{name} prompt {i}: batched chose {} where alone chose {} at token {at}, \
                     but they are {gap} logits apart",
                    b.ids[at],
                    a.ids[at]
                );
            }
        }
    }
    eprintln!(
        "{name}: {exact}/{} batched outputs exactly equal alone",
        prompts.len()
    );
    assert!(
        exact >= min_exact,
        "{name}: only {exact}/{} equal alone",
        prompts.len()
    );
}

fn batched_equals_alone(name: &str) {
    let model = load(name);
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| chat(&model, &[("user", p)]))
        .collect();

    // Each alone run on a fresh engine, so neither it nor the batched run finds cached
    // prefixes: every prompt is computed in full both ways.
    let alone: Vec<Output> = prompts
        .iter()
        .map(|p| {
            collect(
                engine(&model, 64)
                    .submit(request(p.clone()))
                    .expect("submit"),
            )
        })
        .collect();
    let engine = engine(&model, 256);
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(request(p.clone())).expect("submit"))
        .collect();
    let batched: Vec<Output> = streams.into_iter().map(collect).collect();

    check_against_alone(name, &model, &prompts, &alone, &batched, 6);
    let stats = engine.stats();
    assert_eq!(stats.free_blocks, stats.total_blocks);
}

#[test]
fn smollm2_batched_equals_alone() {
    batched_equals_alone(common::SMOLLM2_GGUF);
}

#[test]
fn qwen_batched_equals_alone() {
    batched_equals_alone(common::QWEN_GGUF);
}
