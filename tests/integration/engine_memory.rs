//! The engine under memory pressure and churn, on SmolLM2: preemption by recompute, cancelled
//! streams returning their blocks, prefix reuse across requests and chat turns, no leaked
//! blocks after many mixed requests, and clear errors for prompts that cannot fit.

use crate::common;
use crate::engine_common;

use std::time::Duration;

use crate::engine_common::{chat, collect, engine, load, wait_all_free, Output};
use candlewick::engine::{EngineError, Event, FinishReason, Request};

fn request(prompt: Vec<u32>, n: usize) -> Request {
    Request {
        num_predict: Some(n),
        ..Request::new(prompt)
    }
}

fn prompts(model: &candlewick::model::Model, n: usize) -> Vec<Vec<u32>> {
    let topics = [
        "the sea", "a cat", "winter", "trains", "coffee", "the moon", "a garden", "music",
    ];
    (0..n)
        .map(|i| {
            let q = format!(
                "Write one sentence about {} number {i}.",
                topics[i % topics.len()]
            );
            chat(model, &[("user", &q)])
        })
        .collect()
}

#[test]
fn preempted_requests_finish_with_the_tokens_they_get_alone() {
    let model = load(common::SMOLLM2_GGUF);
    let prompts = prompts(&model, 16);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let new_tokens = 16;
    let alone: Vec<Output> = prompts
        .iter()
        .map(|p| {
            collect(
                engine(&model, 64)
                    .submit(request(p.clone(), new_tokens))
                    .expect("submit"),
            )
        })
        .collect();

    // Room for about two and a half sequences at full length.
    let blocks = (longest + new_tokens).div_ceil(16) * 5 / 2;
    let engine = engine(&model, blocks);
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .submit(request(p.clone(), new_tokens))
                .expect("submit")
        })
        .collect();
    let outs: Vec<Output> = streams.into_iter().map(collect).collect();
    let stats = wait_all_free(&engine, Duration::from_secs(5));
    assert!(
        stats.preemptions > 0,
        "the budget of {blocks} blocks never forced a preemption"
    );
    for (i, (a, b)) in alone.iter().zip(&outs).enumerate() {
        assert_eq!(b.summary.finish, a.summary.finish, "request {i}");
        assert_eq!(
            a.ids, b.ids,
            "request {i} (preempted {} times)",
            b.summary.preemptions
        );
        assert_eq!(a.text, b.text, "request {i}");
    }
    assert_eq!(stats.free_blocks, stats.total_blocks);
    eprintln!(
        "{blocks} blocks: {} preemptions, {} steps",
        stats.preemptions, stats.steps
    );
}

#[test]
fn dropped_streams_return_their_blocks() {
    let model = load(common::SMOLLM2_GGUF);
    let engine = engine(&model, 128);
    let streams: Vec<_> = prompts(&model, 4)
        .into_iter()
        .map(|p| engine.submit(request(p, 500)).expect("submit"))
        .collect();
    for s in &streams {
        for _ in 0..3 {
            match s.recv() {
                Some(Event::Token { .. }) => {}
                other => panic!("expected a token, got {other:?}"),
            }
        }
    }
    assert!(engine.stats().free_blocks < engine.stats().total_blocks);
    drop(streams);
    let stats = wait_all_free(&engine, Duration::from_secs(5));
    assert_eq!(stats.free_blocks, stats.total_blocks, "{stats:?}");
    assert_eq!(stats.running + stats.waiting, 0);
}

#[test]
fn shared_prefix_is_computed_once() {
    let model = load(common::SMOLLM2_GGUF);
    let system = "You are a careful assistant for a small bookshop. ".to_string()
        + &"The shop sells novels, poetry, travel guides and children's books; it opens at nine, \
            closes at six, and offers free wrapping for gifts. Always answer politely. "
            .repeat(6);
    let p1 = chat(
        &model,
        &[("system", &system), ("user", "When do you open?")],
    );
    let p2 = chat(
        &model,
        &[("system", &system), ("user", "Do you sell poetry?")],
    );
    let common_len = p1.iter().zip(&p2).take_while(|(a, b)| a == b).count();
    assert!(
        common_len >= 200,
        "shared prefix is only {common_len} tokens"
    );

    let engine = engine(&model, 256);
    collect(engine.submit(request(p1, 8)).expect("submit"));
    let before = engine.stats().prompt_tokens_computed;
    let second = collect(engine.submit(request(p2.clone(), 8)).expect("submit"));
    let computed = engine.stats().prompt_tokens_computed - before;
    let expected_cached = common_len.min(p2.len() - 1) / 16 * 16;
    assert_eq!(second.summary.prompt_cached, expected_cached);
    assert_eq!(computed as usize, p2.len() - expected_cached);

    // The same output as without any cache.
    let fresh = collect(
        engine_common::engine(&model, 256)
            .submit(request(p2, 8))
            .expect("submit"),
    );
    assert_eq!(fresh.summary.prompt_cached, 0);
    assert_eq!(second.ids, fresh.ids);
    assert_eq!(second.text, fresh.text);
}

#[test]
fn second_chat_turn_reuses_the_first() {
    let model = load(common::SMOLLM2_GGUF);
    let engine = engine(&model, 256);
    let q1 = "Name three rivers in Europe.";
    let p1 = chat(&model, &[("user", q1)]);
    let first = collect(engine.submit(request(p1.clone(), 24)).expect("submit"));
    let p2 = chat(
        &model,
        &[
            ("user", q1),
            ("assistant", &first.text),
            ("user", "Which is longest?"),
        ],
    );
    let second = collect(engine.submit(request(p2, 8)).expect("submit"));
    assert!(
        second.summary.prompt_cached >= p1.len() / 16 * 16,
        "turn two found {} cached tokens; turn one's prompt alone has {}",
        second.summary.prompt_cached,
        p1.len()
    );
}

#[test]
fn no_blocks_leak_after_many_mixed_requests() {
    let model = load(common::SMOLLM2_GGUF);
    // 25 prompts of exactly one block each, all different, so every first decode token needs
    // a second block: with three blocks, running sequences keep preempting each other.
    let prompts: Vec<Vec<u32>> = (0..25)
        .map(|i| {
            let sys = format!("{i} Session: answer in French, briefly, and never use lists.");
            let mut p = chat(
                &model,
                &[("system", &sys), ("user", "Say hello to the reader.")],
            );
            assert!(p.len() >= 16);
            p.truncate(16);
            p
        })
        .collect();
    let engine = engine(&model, 3);
    let mut done = 0;
    for round in 0..8 {
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| {
                engine
                    .submit(request(p.clone(), 3 + round % 3))
                    .expect("submit")
            })
            .collect();
        for (i, s) in streams.into_iter().enumerate() {
            match i % 5 {
                // Cancelled before or right after its first token.
                0 => drop(s),
                1 => {
                    let _ = s.recv();
                }
                _ => {
                    let out = collect(s);
                    assert!(
                        matches!(
                            out.summary.finish,
                            FinishReason::Stop | FinishReason::Length
                        ),
                        "{:?}",
                        out.summary
                    );
                    done += 1;
                }
            }
        }
    }
    let stats = wait_all_free(&engine, Duration::from_secs(10));
    assert_eq!(stats.free_blocks, stats.total_blocks, "{stats:?}");
    assert!(stats.preemptions > 0, "{stats:?}");
    eprintln!("200 requests, {done} completed: {stats:?}");
}

#[test]
fn prompts_that_do_not_fit() {
    let model = load(common::SMOLLM2_GGUF);
    let engine = engine(&model, 8);
    let long: Vec<u32> = chat(&model, &[("user", &"Tell me about rivers. ".repeat(40))]);
    assert!(long.len() > 8 * 16);
    // Longer than the whole cache is treated like longer than the context: the front is
    // cut (keeping room to answer), or, without truncation, a clear refusal.
    let out = collect(engine.submit(request(long.clone(), 4)).expect("submit"));
    assert_eq!(
        out.summary.prompt_eval_count + out.summary.truncated,
        long.len()
    );
    assert!(out.summary.prompt_eval_count < 128, "{:?}", out.summary);
    let strict = Request {
        truncate: false,
        ..request(long.clone(), 4)
    };
    assert!(matches!(
        engine.submit(strict),
        Err(EngineError::PromptTooLong { ctx: 128, .. })
    ));
    let short = chat(&model, &[("user", &"Tell me about rivers. ".repeat(12))]);
    assert!(short.len() > 64 && short.len() < 128);
    let strict = Request {
        num_ctx: Some(64),
        truncate: false,
        ..request(short.clone(), 4)
    };
    assert!(matches!(
        engine.submit(strict),
        Err(EngineError::PromptTooLong { ctx: 64, .. })
    ));
    let lenient = Request {
        num_ctx: Some(64),
        ..request(short.clone(), 4)
    };
    let out = collect(engine.submit(lenient).expect("submit"));
    assert!(out.summary.truncated > 0);
    assert!(out.summary.prompt_eval_count + out.summary.truncated == short.len());
    assert!(out.summary.prompt_eval_count < 64);
    assert!(matches!(
        engine.submit(request(Vec::new(), 4)),
        Err(EngineError::EmptyPrompt)
    ));
}
