//! Single-sequence generation for offline use (`wick generate`, tests): one request through
//! a private engine sized for one context, collected into text, tokens and timings.

use std::sync::Arc;
use std::time::Duration;

use crate::model::Model;

use super::sampler::SamplingParams;
use super::{Engine, EngineConfig, EngineError, Event, FinishReason, Request};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub sampling: SamplingParams,
    /// Maximum new tokens; `None` runs until a stop or the context is full.
    pub num_predict: Option<usize>,
    pub stop: Vec<String>,
    /// Context length (prompt + output) to size the cache for.
    pub num_ctx: usize,
    /// Prompt tokens per forward pass while prefilling.
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            num_predict: None,
            stop: Vec::new(),
            num_ctx: 4096,
            prefill_chunk: 512,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("generation failed: {0}")]
    Failed(String),
}

const BLOCK_SIZE: usize = 16;

/// Generates from `prompt` (token ids), calling `on_text` with each piece of text as soon as
/// it is final. Greedy decoding is deterministic; sampling is reproducible with a seed. A
/// prompt that does not fit the context is an error, not truncated.
pub fn generate(
    model: &Arc<Model>,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    let ctx = opts.num_ctx.min(model.config().max_position_embeddings);
    let cfg = EngineConfig {
        block_size: BLOCK_SIZE,
        num_blocks: Some(ctx.div_ceil(BLOCK_SIZE)),
        max_tokens_per_step: opts.prefill_chunk.max(1),
        max_running: Some(1),
        default_num_ctx: ctx,
        ..EngineConfig::default()
    };
    let engine = Engine::start(model.clone(), cfg)?;
    let stream = engine.submit(Request {
        prompt: prompt.to_vec(),
        sampling: opts.sampling.clone(),
        num_predict: opts.num_predict,
        stop: opts.stop.clone(),
        num_ctx: Some(ctx),
        truncate: false,
        ..Request::new(Vec::new())
    })?;
    let (mut tokens, mut text) = (Vec::new(), String::new());
    for event in stream {
        let piece = match event {
            Event::Token { id, text, .. } => {
                tokens.push(id);
                text
            }
            Event::Text(tail) => tail,
            Event::Embedding(_) => String::new(),
            Event::Done(summary) => {
                if summary.finish == FinishReason::Error {
                    return Err(GenerateError::Failed(summary.error.unwrap_or_default()));
                }
                return Ok(GenerateOutput {
                    tokens,
                    text,
                    finish: summary.finish,
                    prompt_tokens: summary.prompt_eval_count,
                    prefill_time: summary.prompt_eval_duration,
                    decode_time: summary.eval_duration,
                });
            }
        };
        if !piece.is_empty() {
            on_text(&piece);
            text.push_str(&piece);
        }
    }
    Err(GenerateError::Failed(
        "the engine stopped before finishing".into(),
    ))
}
