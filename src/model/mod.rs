//! The math: one decoder for the llama, qwen2, qwen3 and gemma3 families, a BERT encoder for
//! sentence embeddings ([`bert`]), weight loading from GGUF and Hugging Face safetensors,
//! attention over a paged KV cache, tokenizers and chat templates. Knows tensors, never
//! requests.

pub mod attention;
pub mod bert;
pub mod chat_template;
pub mod config;
mod cpu_activation;
mod cpu_attention;
mod cpu_quant;
mod cpu_rows;
pub mod cuda;
pub mod decoder;
pub mod huge_pages;
pub mod image;
mod loaded;
mod parallel;
pub mod ref_attention;
pub mod reply;
pub mod selfcheck;
pub mod tokenizer;
pub mod vision;
pub mod weights;

use std::path::PathBuf;

pub use attention::{Batch, CpuKvCache, ImageRows, KvCache, KvType, SeqSlice, IMAGE_ID};
pub use bert::Embedder;
pub use chat_template::ChatTemplate;
pub use config::{ArchConfig, Family};
pub use decoder::Decoder;
pub use huge_pages::HugeBytes;
pub use loaded::{AnyModel, Model};
pub use parallel::init_threads;
pub use ref_attention::RefKvCache;
pub use reply::{Piece, ReplyFormat, ReplyParser, ToolCall, ToolSyntax};
pub use tokenizer::Tokenizer;
pub use weights::WeightSource;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid model file: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: missing tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor '{name}': {msg}")]
    BadTensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error(
        "unsupported model architecture '{0}' (supported: llama, mistral, qwen2, qwen3, gemma3; embeddings: bert)"
    )]
    UnsupportedArch(String),
    #[error("model config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// The template refused what it was given (`raise_exception`, e.g. Llama 3.1's "only
    /// single tool-calls at once"), or it was too large to render: the caller's input.
    #[error("{0}")]
    TemplateRaised(String),
    /// An image the client sent that cannot be read.
    #[error("invalid image: {0}")]
    Image(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Cuda(#[from] cuda::KernelError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Opens the device `spec` names (`WICK_DEVICE`, `--device`).
pub fn open_device(spec: crate::config::DeviceSpec) -> Result<candle_core::Device> {
    match spec {
        crate::config::DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "cuda")]
        crate::config::DeviceSpec::Cuda(n) => Ok(candle_core::Device::new_cuda(n)?),
        #[cfg(not(feature = "cuda"))]
        crate::config::DeviceSpec::Cuda(_) => Err(Error::Config(
            "this build has no CUDA support (build with --features cuda)".into(),
        )),
    }
}

/// Test data shared by the kernel tests: deterministic values in [-1, 1).
#[cfg(test)]
pub(crate) fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}
