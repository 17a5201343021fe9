//! Single-sequence generation for offline use (`wick generate`, benchmarks, tests): the
//! prompt is prefilled in chunks into a private paged cache, then tokens are decoded one
//! at a time through the sampler, the incremental detokenizer and the stop matcher.

use std::time::{Duration, Instant};

use crate::model::{Batch, CpuKvCache, KvCache, Model};

use super::detok::{IncrementalDecoder, StopMatcher};
use super::sampler::{Sampler, SamplingParams};

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `num_predict` or the context length was reached.
    Length,
}

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
    #[error("the prompt has {prompt} tokens but the context is {ctx}")]
    PromptTooLong { prompt: usize, ctx: usize },
    #[error("empty prompt")]
    EmptyPrompt,
    #[error(transparent)]
    Model(#[from] crate::model::Error),
}

const BLOCK_SIZE: usize = 16;

/// Generates from `prompt` (token ids), calling `on_text` with each piece of text as soon as
/// it is final. Greedy decoding is deterministic; sampling is reproducible with a seed.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<GenerateOutput, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let ctx = opts.num_ctx.min(model.config().max_position_embeddings);
    if prompt.len() >= ctx {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            ctx,
        });
    }
    let num_blocks = ctx.div_ceil(BLOCK_SIZE);
    let mut cache = CpuKvCache::new(model.config(), num_blocks, BLOCK_SIZE);
    let table: Vec<u32> = (0..num_blocks as u32).collect();
    let blocks_for = |n: usize| table[..n.div_ceil(BLOCK_SIZE)].to_vec();

    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut detok = IncrementalDecoder::new(&model.tokenizer);
    let mut stops = StopMatcher::new(opts.stop.clone());
    let eos = model.tokenizer.eos_ids();
    let mut history = prompt.to_vec();
    let mut text = String::new();

    let start = Instant::now();
    let mut logits = None;
    let mut done = 0;
    for chunk in prompt.chunks(opts.prefill_chunk.max(1)) {
        let mut batch = Batch::default();
        let last = done + chunk.len() == prompt.len();
        batch.push_seq(chunk, done, blocks_for(done + chunk.len()), last);
        let out = model
            .decoder
            .forward(&batch, &mut cache as &mut dyn KvCache)?;
        done += chunk.len();
        if last {
            logits = Some(out);
        }
    }
    let prefill_time = start.elapsed();

    let start = Instant::now();
    let limit = opts
        .num_predict
        .unwrap_or(usize::MAX)
        .min(ctx - prompt.len());
    let mut generated = Vec::new();
    let mut finish = FinishReason::Length;
    let mut stopped_by_string = false;
    while let Some(l) = logits.take() {
        if generated.len() >= limit {
            break;
        }
        let row: Vec<f32> = l
            .squeeze(0)
            .and_then(|r| r.to_vec1())
            .map_err(crate::model::Error::from)?;
        let tok = sampler.sample(&row, &history);
        if eos.contains(&tok) {
            finish = FinishReason::Stop;
            break;
        }
        generated.push(tok);
        history.push(tok);
        if let Some(piece) = detok.push(tok)? {
            let out = stops.push(&piece);
            on_text(&out.emit);
            text.push_str(&out.emit);
            if out.stopped {
                finish = FinishReason::Stop;
                stopped_by_string = true;
                break;
            }
        }
        if generated.len() >= limit {
            break;
        }
        let mut batch = Batch::default();
        let cached = history.len() - 1;
        batch.push_seq(&[tok], cached, blocks_for(history.len()), true);
        logits = Some(
            model
                .decoder
                .forward(&batch, &mut cache as &mut dyn KvCache)?,
        );
    }
    if !stopped_by_string {
        // Whatever the detokenizer and stop matcher still hold is final text now.
        let out = stops.push(&detok.flush()?);
        let mut tail = out.emit;
        if out.stopped {
            finish = FinishReason::Stop;
        } else {
            tail.push_str(&stops.finish());
        }
        on_text(&tail);
        text.push_str(&tail);
    }
    Ok(GenerateOutput {
        tokens: generated,
        text,
        finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: start.elapsed(),
    })
}
