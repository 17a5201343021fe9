//! Real weights answer real questions, greedy, through their own chat templates and the
//! offline generation path (`wick generate` uses the same function).

use crate::common;

use candle_core::Device;
use std::sync::Arc;

use candlewick::engine::generate::{generate, GenerateOptions};
use candlewick::engine::sampler::SamplingParams;
use candlewick::engine::FinishReason;
use candlewick::model::Model;

fn ask(model: &Arc<Model>, system: Option<&str>, user: &str, n: usize) -> (String, FinishReason) {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    messages.push(serde_json::json!({"role": "user", "content": user}));
    let prompt = model
        .chat_template
        .as_ref()
        .expect("chat template")
        .render(&messages, None, true, &serde_json::Map::new())
        .expect("render");
    let ids = model.tokenizer.encode(&prompt, false).expect("encode");
    let opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        num_predict: Some(n),
        ..GenerateOptions::default()
    };
    let mut streamed = String::new();
    let out = generate(model, &ids, &opts, |p| streamed.push_str(p)).expect("generate");
    assert_eq!(
        streamed, out.text,
        "streamed pieces must add up to the text"
    );
    (out.text, out.finish)
}

#[test]
fn smollm2_knows_capitals() {
    let model = Arc::new(
        Model::load(&common::test_model(common::SMOLLM2_GGUF), &Device::Cpu).expect("load"),
    );
    let (text, finish) = ask(&model, None, "What is the capital of Germany?", 48);
    assert!(text.contains("Berlin"), "answer: {text:?}");
    assert_eq!(
        finish,
        FinishReason::Stop,
        "answer should end by itself: {text:?}"
    );
    let (text, _) = ask(
        &model,
        Some("You are a helpful assistant."),
        "What is the capital of France?",
        48,
    );
    assert!(text.contains("Paris"), "answer: {text:?}");
}

#[test]
fn qwen_coder_writes_python_and_chinese() {
    let model =
        Arc::new(Model::load(&common::test_model(common::QWEN_GGUF), &Device::Cpu).expect("load"));
    let (text, _) = ask(
        &model,
        None,
        "Write a Python function that adds two numbers.",
        64,
    );
    assert!(text.contains("def "), "answer: {text:?}");
    let (text, _) = ask(&model, None, "用一句话介绍北京。", 48);
    assert!(text.contains("北京"), "answer: {text:?}");
    let han = text
        .chars()
        .filter(|c| ('\u{4e00}'..='\u{9fff}').contains(c))
        .count();
    assert!(
        han * 2 > text.chars().filter(|c| !c.is_whitespace()).count(),
        "mostly Chinese: {text:?}"
    );
    assert!(!text.contains('\u{FFFD}'), "no broken characters: {text:?}");
}

#[test]
fn stop_strings_and_num_predict() {
    let model = Arc::new(
        Model::load(&common::test_model(common::SMOLLM2_GGUF), &Device::Cpu).expect("load"),
    );
    let prompt = model
        .chat_template
        .as_ref()
        .expect("template")
        .render(
            &[serde_json::json!({"role": "user", "content": "What is the capital of Germany?"})],
            None,
            true,
            &serde_json::Map::new(),
        )
        .expect("render");
    let ids = model.tokenizer.encode(&prompt, false).expect("encode");
    let mut opts = GenerateOptions {
        sampling: SamplingParams::greedy(),
        num_predict: Some(3),
        ..GenerateOptions::default()
    };
    let out = generate(&model, &ids, &opts, |_| {}).expect("generate");
    assert_eq!(out.tokens.len(), 3);
    assert_eq!(out.finish, FinishReason::Length);

    opts.num_predict = Some(48);
    opts.stop = vec!["Berlin".into()];
    let out = generate(&model, &ids, &opts, |_| {}).expect("generate");
    assert_eq!(out.finish, FinishReason::Stop);
    assert!(
        !out.text.contains("Berlin") && !out.text.is_empty(),
        "text before the stop: {:?}",
        out.text
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let model = Arc::new(
        Model::load(&common::test_model(common::SMOLLM2_GGUF), &Device::Cpu).expect("load"),
    );
    let ids = model
        .tokenizer
        .encode("Once upon a time", false)
        .expect("encode");
    let run = |seed| {
        let opts = GenerateOptions {
            sampling: SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..SamplingParams::default()
            },
            num_predict: Some(24),
            ..GenerateOptions::default()
        };
        generate(&model, &ids, &opts, |_| {})
            .expect("generate")
            .tokens
    };
    assert_eq!(run(7), run(7));
    assert_ne!(
        run(7),
        run(8),
        "different seeds should differ over 24 sampled tokens"
    );
}

/// A prompt prefilled in small chunks (most of them asking for no logits) answers exactly as
/// one prefilled at once.
#[test]
fn chunked_prefill_gives_the_same_answer() {
    let model = Arc::new(
        Model::load(&common::test_model(common::SMOLLM2_GGUF), &Device::Cpu).expect("load"),
    );
    let ids = model
        .tokenizer
        .encode("The three primary colors are red, yellow and", false)
        .expect("encode");
    let run = |chunk: usize| {
        let opts = GenerateOptions {
            sampling: SamplingParams::greedy(),
            num_predict: Some(12),
            prefill_chunk: chunk,
            ..GenerateOptions::default()
        };
        generate(&model, &ids, &opts, |_| {})
            .expect("generate")
            .tokens
    };
    assert_eq!(run(3), run(512));
}
