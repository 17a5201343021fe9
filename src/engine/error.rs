//! The errors of starting an engine and submitting to it.

use super::sampler::SamplerError;

/// Errors returned by `Engine::start` and `Engine::submit`.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("empty prompt")]
    EmptyPrompt,
    /// A generation asked of an embedding model (the API checks this first, from the store).
    #[error("the model only computes embeddings")]
    EmbeddingOnly,
    #[error("the prompt has {prompt} tokens but the context is {ctx} (and truncation is off)")]
    PromptTooLong { prompt: usize, ctx: usize },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    /// Image embeddings that do not fit their prompt (a caller's bug) or a prompt with
    /// images that would have to be cut.
    #[error("{0}")]
    BadImage(String),
    #[error(transparent)]
    Sampling(#[from] SamplerError),
    #[error("top_logprobs must be between 0 and {max}, got {asked}")]
    TooManyLogprobs { asked: usize, max: usize },
    #[error("num_draft must be between 0 and {max}, got {asked}")]
    TooManyDrafts { asked: usize, max: usize },
    #[error("the KV cache budget of {bytes} bytes is less than one block of {block_bytes}")]
    CacheTooSmall { bytes: usize, block_bytes: usize },
    /// `OLLAMA_MAX_QUEUE` requests are already waiting (Ollama's words).
    #[error("server busy, please try again.  maximum pending requests exceeded")]
    Busy,
    #[error("the engine has stopped")]
    Stopped,
    #[error("starting the engine thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A structured-output grammar that does not compile (the client's) or a model that
    /// cannot be constrained.
    #[error(transparent)]
    Grammar(#[from] super::constraint::GrammarError),
    /// A `draft_model` that cannot draft for the model.
    #[error("the draft model cannot draft for this model: {0}")]
    Draft(String),
    #[error("allocating the KV cache: {0}")]
    Cache(#[source] crate::model::Error),
}
