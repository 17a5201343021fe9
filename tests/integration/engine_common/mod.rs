//! Helpers shared by the engine integration tests.

// Each subject uses only part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use candlewick::engine::{Engine, EngineConfig, EngineStats, Event, RequestStream, Summary};
use candlewick::model::Model;

use crate::common;

pub fn load(name: &str) -> Arc<Model> {
    Arc::new(Model::load(&common::test_model(name), &Device::Cpu).expect("load model"))
}

pub fn engine(model: &Arc<Model>, num_blocks: usize) -> Engine {
    Engine::start(
        model.clone(),
        EngineConfig {
            num_blocks: Some(num_blocks),
            ..EngineConfig::default()
        },
    )
    .expect("engine")
}

/// Token ids of a chat rendered with the model's own template.
pub fn chat(model: &Model, messages: &[(&str, &str)]) -> Vec<u32> {
    let template = model.chat_template.as_ref().expect("chat template");
    let msgs: Vec<serde_json::Value> = messages
        .iter()
        .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
        .collect();
    let rendered = template
        .render(&msgs, None, true, &serde_json::Map::new())
        .expect("render");
    model.tokenizer.encode(&rendered, false).expect("encode")
}

/// What a finished stream produced.
#[derive(Debug)]
pub struct Output {
    pub ids: Vec<u32>,
    pub text: String,
    pub summary: Summary,
    /// An embedding request's vector.
    pub embedding: Option<Vec<f32>>,
}

/// Drains a stream to its `Done`.
pub fn collect(stream: RequestStream) -> Output {
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut embedding = None;
    for ev in stream {
        match ev {
            Event::Token { id, text: t, .. } => {
                ids.push(id);
                text.push_str(&t);
            }
            Event::Text(t) => text.push_str(&t),
            Event::Embedding(v) => embedding = Some(v),
            Event::Done(summary) => {
                return Output {
                    ids,
                    text,
                    summary,
                    embedding,
                }
            }
        }
    }
    panic!("stream ended without Done");
}

/// Waits until the engine has no sequences and every block is free; the last stats seen.
pub fn wait_all_free(engine: &Engine, timeout: Duration) -> EngineStats {
    let start = Instant::now();
    loop {
        let s = engine.stats();
        if s.free_blocks == s.total_blocks && s.running == 0 && s.waiting == 0 {
            return s;
        }
        if start.elapsed() > timeout {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
