//! Speculative decoding by prompt lookup on the real models: the output is token for token
//! the output without it (greedy, and sampled with a seed), alone and in a batch, while the
//! engine accepts drafts (so fewer forward steps run). The same with a draft model, and
//! sampled tokens keep their distribution.

use crate::api_common;
use crate::common;
use std::sync::Arc;

use crate::engine_common::{chat, collect, engine, load, Output};
use candle_core::{DType, Device};
use candlewick::engine::speculative::DraftModel;
use candlewick::engine::{Engine, EngineConfig, EngineError, FinishReason, Request};
use candlewick::model::{Decoder, KvType, Model};
use serde_json::{json, Value};

const FILE: &str = include_str!("../fixtures/speculative/inventory.py");

/// The edit task of the speed target: the model returns a file with one change, so most of
/// its answer repeats the prompt.
fn edit_prompt(model: &Model) -> Vec<u32> {
    let ask = format!(
        "Rename the method `sell` to `sell_items` in this file. Reply with the whole file \
         and nothing else.\n\n```python\n{FILE}```"
    );
    chat(model, &[("user", &ask)])
}

fn run(model: &std::sync::Arc<Model>, req: Request) -> (Output, candlewick::engine::EngineStats) {
    let e = engine(model, 256);
    let out = collect(e.submit(req).expect("submit"));
    (out, e.stats())
}

fn with_draft(req: &Request, n: usize) -> Request {
    Request {
        num_draft: Some(n),
        ..req.clone()
    }
}

/// Greedy and seeded sampling both give the same tokens with and without drafts, and at
/// least `min_share` of the output comes from accepted drafts.
fn same_output(name: &str, new_tokens: usize, min_share: f64) {
    let model = load(name);
    let prompt = edit_prompt(&model);
    let greedy = Request {
        num_predict: Some(new_tokens),
        ..Request::new(prompt.clone())
    };
    let mut sampled = greedy.clone();
    sampled.sampling = candlewick::engine::sampler::SamplingParams {
        temperature: 0.7,
        top_k: 40,
        top_p: 0.95,
        repeat_penalty: 1.1,
        seed: Some(7),
        ..Default::default()
    };
    for (what, req) in [("greedy", greedy), ("sampled", sampled)] {
        let (plain, plain_stats) = run(&model, with_draft(&req, 0));
        let (spec, spec_stats) = run(&model, with_draft(&req, 8));
        assert_eq!(
            plain_stats.drafted, 0,
            "{name} {what}: num_draft 0 drafts nothing"
        );
        assert_eq!(
            plain.ids, spec.ids,
            "{name} {what}: speculation changed the output:\n{}\n---\n{}",
            plain.text, spec.text
        );
        assert_eq!(plain.text, spec.text);
        assert_eq!(plain.summary.finish, spec.summary.finish);
        assert_eq!(spec.summary.eval_count, spec.ids.len());
        assert!(
            matches!(
                spec.summary.finish,
                FinishReason::Stop | FinishReason::Length
            ),
            "{:?}",
            spec.summary
        );
        // The answer copies (some of) the file, so drafts are found and kept.
        assert!(
            spec_stats.accepted > 0
                && spec_stats.accepted as f64 >= min_share * spec.ids.len() as f64,
            "{name} {what}: {} of {} drafted tokens accepted for {} tokens",
            spec_stats.accepted,
            spec_stats.drafted,
            spec.ids.len()
        );
        assert!(spec_stats.accepted <= spec_stats.drafted);
        assert!(
            spec_stats.steps < plain_stats.steps,
            "{name} {what}: {} steps with drafts, {} without",
            spec_stats.steps,
            plain_stats.steps
        );
        assert_eq!(spec_stats.free_blocks, spec_stats.total_blocks);
        eprintln!(
            "{name} {what}: {} tokens, steps {} -> {}, drafted {}, accepted {}",
            spec.ids.len(),
            plain_stats.steps,
            spec_stats.steps,
            spec_stats.drafted,
            spec_stats.accepted
        );
    }
}

#[test]
fn qwen_coder_edit_is_unchanged_by_speculation() {
    // The coder model returns the file: most of its answer comes from drafts.
    same_output(common::QWEN_GGUF, 160, 0.5);
}

#[test]
fn smollm2_edit_is_unchanged_by_speculation() {
    // The 135M model paraphrases more than it copies.
    same_output(common::SMOLLM2_GGUF, 160, 0.0);
}

/// Several speculating sequences in one batch (drafts shared among them, some prompts
/// without anything to look up), each equal to its plain run alone.
#[test]
fn batched_speculation_equals_plain_alone() {
    let model = load(common::QWEN_GGUF);
    let prompts = [
        edit_prompt(&model),
        chat(
            &model,
            &[("user", "Count from 1 to 30, separated by commas.")],
        ),
        chat(&model, &[("user", "What is the capital of France?")]),
        chat(
            &model,
            &[(
                "user",
                "Repeat this line three times: the quick brown fox jumps",
            )],
        ),
    ];
    let req = |p: &Vec<u32>, n| Request {
        num_predict: Some(48),
        num_draft: Some(n),
        ..Request::new(p.clone())
    };
    let alone: Vec<Output> = prompts.iter().map(|p| run(&model, req(p, 0)).0).collect();
    let e = engine(&model, 512);
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(req(p, 6)).expect("submit"))
        .collect();
    let batched: Vec<Output> = streams.into_iter().map(collect).collect();
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a.ids, b.ids, "prompt {i}:\n{}\n---\n{}", a.text, b.text);
    }
    let stats = e.stats();
    assert!(stats.accepted > 0, "{stats:?}");
    assert_eq!(stats.free_blocks, stats.total_blocks);
}

/// A draft never takes the output past `num_predict`, and a stop string inside accepted
/// drafts ends the output where it would without them.
#[test]
fn limits_hold_inside_a_step() {
    let model = load(common::SMOLLM2_GGUF);
    let prompt = edit_prompt(&model);
    for n in [1, 5, 17, 40] {
        let req = Request {
            num_predict: Some(n),
            ..Request::new(prompt.clone())
        };
        let (plain, _) = run(&model, with_draft(&req, 0));
        let (spec, _) = run(&model, with_draft(&req, 12));
        assert_eq!(spec.ids.len(), plain.ids.len(), "num_predict {n}");
        assert_eq!(spec.ids, plain.ids);
    }
    let req = Request {
        num_predict: Some(200),
        stop: vec!["def restock".into()],
        ..Request::new(prompt)
    };
    let (plain, _) = run(&model, with_draft(&req, 0));
    let (spec, _) = run(&model, with_draft(&req, 12));
    assert_eq!(spec.text, plain.text);
    assert_eq!(spec.summary.stop_string, plain.summary.stop_string);
    assert_eq!(spec.summary.eval_count, plain.summary.eval_count);
}

#[test]
fn too_many_drafts_are_refused() {
    let model = load(common::SMOLLM2_GGUF);
    let e = engine(&model, 16);
    let err = e
        .submit(Request {
            num_draft: Some(candlewick::engine::MAX_DRAFT + 1),
            ..Request::new(vec![1, 2, 3])
        })
        .expect_err("refused");
    assert!(matches!(err, EngineError::TooManyDrafts { .. }), "{err}");
}

/// Over HTTP: `num_draft` in `options`, in a model's parameters (as a Modelfile's
/// `PARAMETER` sets them) and as the server default `WICK_NUM_DRAFT`; the answer is the
/// plain one and `/api/ps` reports the drafts.
#[tokio::test]
async fn options_modelfile_and_server_default() {
    let models = api_common::store_dir("speculative");
    api_common::import(
        &models,
        "smollm2:135m",
        &common::test_model(common::SMOLLM2_GGUF),
    );
    let (addr, _state) =
        api_common::spawn_server(api_common::config(models, &[("WICK_NUM_DRAFT", "0")]));
    let base = format!("http://{addr}");
    let ask = format!("Repeat this file exactly.\n\n```python\n{FILE}```");
    let chat = |model: &str, options: Value| {
        json!({"model": model, "stream": false, "options": options,
               "messages": [{"role": "user", "content": ask}]})
    };
    let answer = |v: Value| {
        v["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Accepted drafts over every loaded model, and the first one's report.
    let ps = |base: String| async move {
        let models = api_common::ps(&base).await;
        let accepted: u64 = models
            .iter()
            .filter_map(|m| m["speculative"]["accepted"].as_u64())
            .sum();
        (accepted, models.first().map(|m| m["speculative"].clone()))
    };
    let opts = |n: i64| json!({"temperature": 0, "num_predict": 64, "num_draft": n});

    let plain = api_common::post(&base, "/api/chat", chat("smollm2:135m", opts(0))).await;
    assert_eq!(plain.status(), 200);
    let plain = answer(plain.json().await.expect("JSON"));
    let (_, spec) = ps(base.clone()).await;
    let spec = spec.expect("a loaded model");
    assert_eq!(spec["method"], "ngram");
    assert_eq!(spec["num_draft"], 0);
    assert_eq!(spec["drafted"], 0);

    let fast = api_common::post(&base, "/api/chat", chat("smollm2:135m", opts(8))).await;
    assert_eq!(fast.status(), 200);
    assert_eq!(answer(fast.json().await.expect("JSON")), plain);
    let (accepted, spec) = ps(base.clone()).await;
    assert!(accepted > 0, "{spec:?}");

    // Out of range: a 400 naming the option, in each dialect.
    let bad = api_common::post(&base, "/api/chat", chat("smollm2:135m", opts(33))).await;
    assert_eq!(bad.status(), 400);
    let v: Value = bad.json().await.expect("JSON");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("num_draft"),
        "{v}"
    );
    let openai = json!({"model": "smollm2:135m", "max_tokens": 4,
                        "messages": [{"role": "user", "content": "hi"}],
                        "options": {"num_draft": 1000}});
    let bad = api_common::post(&base, "/v1/chat/completions", openai).await;
    assert_eq!(bad.status(), 400);

    // Models made from it with `parameters`, as a Modelfile's `PARAMETER` lines make them.
    let create = |model: &'static str, parameters: Value| {
        let base = base.clone();
        async move {
            let created = api_common::post(
                &base,
                "/api/create",
                json!({"model": model, "from": "smollm2:135m", "stream": false,
                       "parameters": parameters}),
            )
            .await;
            assert_eq!(created.status(), 200, "{:?}", created.text().await);
        }
    };

    // A model whose parameters turn it on.
    create("smol-spec", json!({"num_draft": 8, "temperature": 0})).await;
    let (before, _) = ps(base.clone()).await;
    let made = api_common::post(
        &base,
        "/api/chat",
        chat("smol-spec", json!({"num_predict": 64})),
    )
    .await;
    assert_eq!(made.status(), 200);
    assert_eq!(answer(made.json().await.expect("JSON")), plain);
    let (after, _) = ps(base.clone()).await;
    assert!(after > before, "{before} -> {after}");

    // A model whose parameters name a draft model (here the model itself: the registries
    // carry no smaller model with its tokenizer).
    create(
        "smol-drafted",
        json!({"draft_model": "smollm2:135m", "temperature": 0}),
    )
    .await;
    let made = api_common::post(
        &base,
        "/api/chat",
        chat("smol-drafted", json!({"num_predict": 64})),
    )
    .await;
    assert_eq!(made.status(), 200);
    assert_eq!(answer(made.json().await.expect("JSON")), plain);
    let loaded = api_common::ps(&base).await;
    let spec = loaded
        .iter()
        .find(|m| {
            m["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("smol-drafted"))
        })
        .map(|m| m["speculative"].clone())
        .expect("smol-drafted loaded");
    assert_eq!(spec["method"], "draft_model", "{spec}");
    assert_eq!(spec["draft_model"], "smollm2:135m", "{spec}");
    assert_eq!(spec["num_draft"], 8, "{spec}");
    assert!(spec["accepted"].as_u64() > Some(0), "{spec}");
    // A draft model that is not there: the load fails with a message naming it.
    create("smol-nodraft", json!({"draft_model": "missing:1b"})).await;
    let bad = api_common::post(
        &base,
        "/api/chat",
        chat("smol-nodraft", json!({"num_predict": 4})),
    )
    .await;
    assert_eq!(bad.status(), 500);
    let v: Value = bad.json().await.expect("JSON");
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("draft model") && msg.contains("missing:1b"),
        "{v}"
    );

    // The server default.
    let models = api_common::store_dir("speculative-default");
    api_common::import(
        &models,
        "smollm2:135m",
        &common::test_model(common::SMOLLM2_GGUF),
    );
    let (addr, _state) =
        api_common::spawn_server(api_common::config(models, &[("WICK_NUM_DRAFT", "6")]));
    let base2 = format!("http://{addr}");
    let resp = api_common::post(
        &base2,
        "/api/chat",
        chat("smollm2:135m", json!({"temperature": 0, "num_predict": 64})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(answer(resp.json().await.expect("JSON")), plain);
    let (accepted, spec) = ps(base2).await;
    assert_eq!(spec.expect("a loaded model")["num_draft"], 6);
    assert!(accepted > 0);
}

/// What exact speculation rests on: a token's logits computed as one row of a multi-row
/// step equal, bit for bit, its logits computed by a decode step of its own, with a cache of
/// elements `ty`.
fn chunk_rows_equal_decode_steps(name: &str, ty: KvType) {
    use candlewick::model::{Batch, CpuKvCache, KvCache};
    let model = load(name);
    let prompt = chat(
        &model,
        &[("user", "Write a short story about a lighthouse.")],
    );
    let next: Vec<u32> = model
        .tokenizer
        .encode(
            "Once upon a time, there was a lighthouse keeper named",
            false,
        )
        .expect("encode");
    let blocks = (prompt.len() + next.len()).div_ceil(16);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let prefill = |cache: &mut CpuKvCache| {
        let mut b = Batch::default();
        b.push_seq(&prompt, 0, table.clone(), true);
        model
            .decoder
            .forward(&b, cache as &mut dyn KvCache)
            .expect("prefill");
    };
    let mut cache = CpuKvCache::with_type(model.config(), blocks, 16, ty);
    prefill(&mut cache);
    let mut one_by_one = Vec::new();
    for (i, &t) in next.iter().enumerate() {
        let mut b = Batch::default();
        b.push_seq(&[t], prompt.len() + i, table.clone(), true);
        let l = model
            .decoder
            .forward(&b, &mut cache as &mut dyn KvCache)
            .expect("decode");
        one_by_one.extend(l.to_vec2::<f32>().expect("logits"));
    }
    for rows in [2, 9, 16, next.len()] {
        let mut cache = CpuKvCache::with_type(model.config(), blocks, 16, ty);
        prefill(&mut cache);
        let mut chunked = Vec::new();
        for (c, part) in next.chunks(rows).enumerate() {
            let mut b = Batch::default();
            b.push_seq_rows(part, prompt.len() + c * rows, table.clone(), part.len());
            let l = model
                .decoder
                .forward(&b, &mut cache as &mut dyn KvCache)
                .expect("chunk");
            chunked.extend(l.to_vec2::<f32>().expect("logits"));
        }
        for (i, (a, b)) in one_by_one.iter().zip(&chunked).enumerate() {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst == 0.0,
                "{name} {ty:?}: row {i} of chunks of {rows} differs by up to {worst}"
            );
        }
    }
}

#[test]
fn qwen_chunk_rows_equal_decode_steps() {
    chunk_rows_equal_decode_steps(common::QWEN_GGUF, KvType::F16);
}

#[test]
fn smollm2_chunk_rows_equal_decode_steps() {
    chunk_rows_equal_decode_steps(common::SMOLLM2_GGUF, KvType::F16);
    // The q8_0 cache keeps it too: a row is quantized the same whatever step writes it.
    chunk_rows_equal_decode_steps(common::SMOLLM2_GGUF, KvType::Q8_0);
}

/// An engine whose drafts come from `draft` (running at most `max_running` sequences).
fn draft_engine(
    model: &Arc<Model>,
    draft: &Arc<Model>,
    max_running: Option<usize>,
) -> Result<Engine, EngineError> {
    Engine::start(
        model.clone(),
        EngineConfig {
            num_blocks: Some(512),
            max_running,
            draft: Some(DraftModel {
                name: "draft".into(),
                model: draft.clone(),
            }),
            ..EngineConfig::default()
        },
    )
}

/// A random-weight model of a small shape with `target`'s vocabulary and tokenizer: a
/// draft whose guesses are nearly always wrong.
fn random_draft(target: &Model) -> Arc<Model> {
    let mut cfg = target.config().clone();
    cfg.num_layers = 2;
    cfg.hidden_size = 128;
    cfg.intermediate_size = 256;
    cfg.num_heads = 2;
    cfg.num_kv_heads = 1;
    cfg.head_dim = 64;
    let decoder = Decoder::random(cfg, &Device::Cpu, DType::F32, 11).expect("random decoder");
    Arc::new(Model {
        decoder,
        tokenizer: target.tokenizer.clone(),
        chat_template: None,
        path: "random-draft".into(),
        gpu_path: None,
        vision: None,
    })
}

/// A draft model's guesses change nothing: with the target drafting for itself (every
/// greedy guess right) and with a random-weight draft (nearly every guess wrong), greedy
/// and seeded outputs equal the plain ones, alone and four at once.
#[test]
fn draft_model_output_equals_plain() {
    let model = load(common::QWEN_GGUF);
    let prompts = [
        edit_prompt(&model),
        chat(&model, &[("user", "Write a haiku about rain.")]),
        chat(
            &model,
            &[("user", "Explain what a hash map is in two sentences.")],
        ),
        chat(&model, &[("user", "List five prime numbers.")]),
    ];
    let greedy = |p: &Vec<u32>| Request {
        num_predict: Some(40),
        num_draft: Some(6),
        ..Request::new(p.clone())
    };
    let sampled = |p: &Vec<u32>| {
        let mut r = greedy(p);
        r.sampling = candlewick::engine::sampler::SamplingParams {
            temperature: 0.8,
            top_k: 40,
            seed: Some(3),
            ..Default::default()
        };
        r
    };
    let plain = |r: Request| run(&model, with_draft(&r, 0)).0.ids;
    let expect: Vec<(Vec<u32>, Vec<u32>)> = prompts
        .iter()
        .map(|p| (plain(greedy(p)), plain(sampled(p))))
        .collect();
    for (what, draft) in [("itself", model.clone()), ("random", random_draft(&model))] {
        let e = draft_engine(&model, &draft, None).expect("engine");
        // Alone: the first prompt, greedy and sampled.
        for (i, req) in [greedy(&prompts[0]), sampled(&prompts[0])]
            .into_iter()
            .enumerate()
        {
            let out = collect(e.submit(req).expect("submit"));
            let want = if i == 0 { &expect[0].0 } else { &expect[0].1 };
            assert_eq!(&out.ids, want, "draft {what}, alone, run {i}: {}", out.text);
        }
        let alone = e.stats();
        // Together: every prompt, greedy and sampled at once.
        let streams: Vec<_> = prompts
            .iter()
            .flat_map(|p| [greedy(p), sampled(p)])
            .map(|r| e.submit(r).expect("submit"))
            .collect();
        let outs: Vec<Output> = streams.into_iter().map(collect).collect();
        for (i, out) in outs.iter().enumerate() {
            let (g, s) = &expect[i / 2];
            let want = if i % 2 == 0 { g } else { s };
            assert_eq!(&out.ids, want, "draft {what}, batched, request {i}");
        }
        let stats = e.stats();
        eprintln!("draft {what}: alone {alone:?}\nall {stats:?}");
        assert!(alone.drafted > 0, "draft {what}: {alone:?}");
        if what == "itself" {
            // Greedy guesses of the model itself are its greedy output.
            assert!(
                alone.accepted * 2 >= alone.drafted,
                "draft {what}: {alone:?}"
            );
        }
        assert_eq!(stats.free_blocks, stats.total_blocks);
    }
}

/// A draft model with another tokenizer cannot draft: the engine does not start.
#[test]
fn draft_with_another_vocabulary_is_refused() {
    let qwen = load(common::QWEN_GGUF);
    let smol = load(common::SMOLLM2_GGUF);
    let err = draft_engine(&qwen, &smol, None).err().expect("refused");
    assert!(matches!(err, EngineError::Draft(_)), "{err}");
    assert!(err.to_string().contains("tokenizer"), "{err}");
}

/// Sampling with drafts keeps the model's distribution, not only its seeded outputs: the
/// second and third tokens of a story (the first that a draft row can give) sampled at
/// temperature 1 under 300 seeds with a draft model and under 300 other seeds without,
/// compared by two-sample chi-squared tests. Keeping the draft (its greedy guess) more
/// often than the sampler picks it would fail this by far.
#[test]
fn sampled_tokens_keep_the_distribution() {
    let model = load(common::SMOLLM2_GGUF);
    let prompt = chat(
        &model,
        &[("user", "Write one sentence that starts a fairy tale.")],
    );
    const N: u64 = 300;
    let outputs = |draft: bool, seeds: std::ops::Range<u64>| {
        let e = if draft {
            draft_engine(&model, &model, Some(4)).expect("engine")
        } else {
            engine(&model, 512)
        };
        // With drafts, one stream at a time: a step of one row is bound by reading the
        // weights, so the scheduler drafts (in a batch of 300, every row costs compute and
        // it would not).
        let seeds: Vec<u64> = seeds.collect();
        let mut ids: Vec<Vec<u32>> = Vec::new();
        for wave in seeds.chunks(if draft { 1 } else { seeds.len() }) {
            let streams: Vec<_> = wave
                .iter()
                .map(|&seed| {
                    let mut r = Request {
                        num_predict: Some(3),
                        num_draft: Some(if draft { 4 } else { 0 }),
                        ..Request::new(prompt.clone())
                    };
                    r.sampling = candlewick::engine::sampler::SamplingParams {
                        temperature: 1.0,
                        top_k: 0,
                        top_p: 1.0,
                        seed: Some(seed),
                        ..Default::default()
                    };
                    e.submit(r).expect("submit")
                })
                .collect();
            ids.extend(streams.into_iter().map(|s| collect(s).ids));
        }
        assert!(ids.iter().all(|t| t.len() == 3));
        (ids, e.stats())
    };
    let (plain, _) = outputs(false, 0..N);
    let (spec, stats) = outputs(true, 10_000..10_000 + N);
    // A draft kept at the second token makes the third come from a draft row.
    assert!(
        stats.accepted > N / 10,
        "drafts must have given tokens: {stats:?}"
    );
    for at in [1, 2] {
        let (chi2, critical, cells) =
            chi_squared(plain.iter().map(|t| t[at]), spec.iter().map(|t| t[at]));
        eprintln!("token {at}: {cells} cells, chi2 {chi2:.1}, critical {critical:.1}");
        assert!(
            chi2 < critical,
            "token {at}: distributions differ: chi2 {chi2:.1} (critical {critical:.1})"
        );
    }
}

/// The two-sample chi-squared statistic of two equally large samples, over the tokens seen
/// at least 10 times in both together (the rest pooled), its 0.1% critical value, and the
/// number of cells.
fn chi_squared(a: impl Iterator<Item = u32>, b: impl Iterator<Item = u32>) -> (f64, f64, usize) {
    let mut counts: std::collections::HashMap<u32, (f64, f64)> = Default::default();
    a.for_each(|t| counts.entry(t).or_default().0 += 1.0);
    b.for_each(|t| counts.entry(t).or_default().1 += 1.0);
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let mut rest = (0.0, 0.0);
    for (x, y) in counts.into_values() {
        if x + y >= 10.0 {
            cells.push((x, y));
        } else {
            rest = (rest.0 + x, rest.1 + y);
        }
    }
    if rest.0 + rest.1 > 0.0 {
        cells.push(rest);
    }
    assert!(cells.len() >= 3, "the test needs a spread: {cells:?}");
    let chi2: f64 = cells.iter().map(|&(x, y)| (x - y).powi(2) / (x + y)).sum();
    // The 0.1% critical value by the Wilson-Hilferty approximation.
    let df = (cells.len() - 1) as f64;
    let h = 2.0 / (9.0 * df);
    let critical = df * (1.0 - h + 3.09 * h.sqrt()).powi(3);
    (chi2, critical, cells.len())
}
