//! What a request to the engine is and what comes back: the tokenized [`Request`], the
//! [`Event`]s its [`RequestStream`] carries, and the [`Summary`] that ends it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use super::constraint::Constraint;
use super::sampler::SamplingParams;

/// One generation request, already tokenized (the API renders chat templates).
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Maximum new tokens; `None` until a stop or the context is full.
    pub num_predict: Option<usize>,
    pub stop: Vec<String>,
    /// Context length (prompt plus output); `None` takes the engine's default.
    pub num_ctx: Option<usize>,
    /// A prompt longer than the context keeps its newest tokens (`true`, Ollama's behaviour)
    /// or is refused.
    pub truncate: bool,
    /// Structured output: the grammar the output must match, compiled for this model
    /// ([`super::Engine::compile`]).
    pub constraint: Option<Constraint>,
    /// Free reasoning before the constrained answer (a thinking model's `<think>` block).
    pub reasoning: Option<Reasoning>,
    /// An embedding instead of a generation: the prompt is run through the model (in
    /// chunks, batched with everything else, in KV blocks like any prompt) and the mean of
    /// its final hidden states comes back as [`Event::Embedding`]; nothing is generated. A
    /// prompt longer than the context keeps its first tokens (or is refused).
    pub embed: bool,
    /// Report each generated token's log-probability and this many of the most likely
    /// alternatives ([`Event::Token::logprobs`]); `None` reports nothing.
    pub logprobs: Option<usize>,
    /// Speculative decoding: up to this many tokens guessed by prompt lookup are checked
    /// per step (0: off; `None`: the engine's default). The output does not change.
    pub num_draft: Option<usize>,
    /// Images in the prompt, in order: their rows' prompt ids are replaced by placeholders
    /// ([`crate::model::IMAGE_ID`]) named by the image's hash, so prefix reuse finds a
    /// resent image and never mistakes another for it.
    pub images: Vec<ImageSpan>,
}

/// One image's embeddings at their place in a prompt.
#[derive(Clone, Debug)]
pub struct ImageSpan {
    /// The prompt position of its first row.
    pub start: usize,
    /// `[rows, hidden]` (f32), or wider with DeepStack features (see
    /// [`crate::model::ImageRows`]).
    pub embeds: candle_core::Tensor,
    /// The image's content hash.
    pub hash: [u8; 32],
    /// Its rows attend to each other both ways (Gemma 3), or causally (Qwen-VL).
    pub bidirectional: bool,
    /// For a model with multimodal rope (Qwen-VL): the image's grid of rows, `[height,
    /// width]` in embeddings, along which its rows' rope positions count.
    pub grid: Option<[u32; 2]>,
}

/// The multimodal rope positions (time, height, width) of position `p` of a sequence with
/// `images` (in prompt order), as Qwen-VL counts them: an image's rows start at the position
/// after the text before them and count along its grid; the text after an image continues
/// one past the image's largest position, so positions fall behind cache positions by each
/// image's rows less its longer side.
pub fn rope_position(images: &[ImageSpan], p: usize) -> [u32; 3] {
    let mut behind = 0;
    for img in images {
        let Some([rows, cols]) = img.grid else {
            continue;
        };
        let r = img.range();
        if p >= r.end {
            behind += img.len().saturating_sub(rows.max(cols) as usize);
        } else if p >= r.start {
            let (start, i) = ((r.start - behind) as u32, (p - r.start) as u32);
            let cols = cols.max(1);
            return [start, start + i / cols, start + i % cols];
        } else {
            break;
        }
    }
    [(p - behind) as u32; 3]
}

impl ImageSpan {
    pub fn len(&self) -> usize {
        self.embeds.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len()
    }

    /// The placeholder id of row `i`: the image's hash and the row, mixed into 31 bits.
    pub fn placeholder(&self, i: usize) -> u32 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for &b in self.hash.iter().chain(&(i as u64).to_le_bytes()) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        crate::model::IMAGE_ID | (h as u32 & !crate::model::IMAGE_ID)
    }
}

/// The free reasoning block of a thinking model: the constraint applies after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reasoning {
    /// The token that opens the block when the model writes it; `None` when the prompt
    /// already opened it. A first token other than this one skips the reasoning.
    pub open: Option<u32>,
    /// The token that closes it.
    pub close: u32,
}

impl Request {
    /// A greedy request with default limits.
    pub fn new(prompt: Vec<u32>) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::greedy(),
            num_predict: None,
            stop: Vec::new(),
            num_ctx: None,
            truncate: true,
            constraint: None,
            reasoning: None,
            embed: false,
            logprobs: None,
            num_draft: None,
            images: Vec::new(),
        }
    }

    /// An embedding request for `prompt` (see [`Request::embed`]).
    pub fn embedding(prompt: Vec<u32>) -> Self {
        Self {
            embed: true,
            ..Self::new(prompt)
        }
    }
}

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `num_predict` or the context length was reached.
    Length,
    /// The client went away or the engine shut down.
    Cancelled,
    /// The forward pass failed; `Summary::error` says why.
    Error,
}

/// The end of a request, with the counts and timings Ollama reports (nanoseconds there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub finish: FinishReason,
    pub error: Option<String>,
    /// The request's stop string that ended the output, if one did.
    pub stop_string: Option<String>,
    /// Prompt tokens after truncation.
    pub prompt_eval_count: usize,
    /// Of those, tokens found in the prefix cache (not computed).
    pub prompt_cached: usize,
    /// Prompt tokens dropped from the front to fit the context (0 when it fit).
    pub truncated: usize,
    pub eval_count: usize,
    pub load_duration: Duration,
    /// From admission to the first generated token.
    pub prompt_eval_duration: Duration,
    /// From the first generated token to the end.
    pub eval_duration: Duration,
    /// From submission to the end.
    pub total_duration: Duration,
    /// Times the sequence was preempted and recomputed.
    pub preemptions: usize,
}

impl Summary {
    pub fn nanos(d: Duration) -> u64 {
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A token and its log-probability under the model: the log-softmax of the model's raw
/// logits (before penalties, grammar masks and temperature), as vLLM and Ollama report it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: u32,
    /// The bytes the token puts into the text (a special token's name; empty for ids no
    /// text maps to); a token may end inside a multi-byte character.
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A generated token's log-probability and the most likely tokens at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub chosen: Candidate,
    /// Most likely first; as many as the request asked for.
    pub top: Vec<Candidate>,
}

/// What a request's stream carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and the text it makes final (often empty: held back for an
    /// incomplete character or a possible stop string); its log-probabilities when the
    /// request asked for them.
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// Text released at the end that belongs to no new token (what was held back).
    Text(String),
    /// An embedding request's result: the mean of the prompt's final hidden states (not
    /// normalised). `Done` follows.
    Embedding(Vec<f32>),
    /// The last event.
    Done(Summary),
}

/// A request's output. Dropping it cancels the request.
#[derive(Debug)]
pub struct RequestStream {
    rx: Receiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl RequestStream {
    /// The next event; `None` after `Done` (or if the engine died).
    pub fn recv(&self) -> Option<Event> {
        self.rx.recv().ok()
    }

    pub fn recv_timeout(&self, t: Duration) -> Result<Event, RecvTimeoutError> {
        self.rx.recv_timeout(t)
    }

    pub fn try_recv(&self) -> Result<Event, TryRecvError> {
        self.rx.try_recv()
    }

    /// Cancels without dropping (the stream then ends with `Done(Cancelled)`).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Iterator for RequestStream {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.recv()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl RequestStream {
    pub(super) fn new(rx: Receiver<Event>, cancel: Arc<AtomicBool>) -> Self {
        Self { rx, cancel }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: usize, rows: usize, grid: Option<[u32; 2]>) -> ImageSpan {
        ImageSpan {
            start,
            embeds: candle_core::Tensor::zeros(
                (rows, 4),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap(),
            hash: [0; 32],
            bidirectional: false,
            grid,
        }
    }

    #[test]
    fn rope_positions_as_qwen_counts_them() {
        // Text 0..4 (the last `<|vision_start|>`), a 2x3 image at 4..10, text after; then a
        // 2x2 image at 12..16. transformers' get_rope_index: the first image's rows are
        // (4, 4 + r, 4 + c); the text after it resumes at 4 + max(2, 3) = 7.
        let images = [span(4, 6, Some([2, 3])), span(12, 4, Some([2, 2]))];
        let at = |p| rope_position(&images, p);
        assert_eq!(at(3), [3, 3, 3]);
        assert_eq!(at(4), [4, 4, 4]);
        assert_eq!(at(6), [4, 4, 6]);
        assert_eq!(at(9), [4, 5, 6]);
        assert_eq!(at(10), [7, 7, 7]);
        assert_eq!(at(11), [8, 8, 8]);
        // The second image starts at 9 = 12 - 3 and its text after at 9 + 2.
        assert_eq!(at(12), [9, 9, 9]);
        assert_eq!(at(15), [9, 10, 10]);
        assert_eq!(at(16), [11, 11, 11]);
        // Without grids (Gemma 3) positions are the cache positions.
        let plain = [span(4, 6, None)];
        assert_eq!(rope_position(&plain, 12), [12, 12, 12]);
    }
}
