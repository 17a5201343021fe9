//! Shared support for the integration tests.
//!
//! It finds the real test models fetched by `scripts/fetch-test-models.sh`, writes tiny
//! random-weight Hugging Face model directories, turns GGUF files into Hugging Face
//! (safetensors, f32) directories, and computes reference logits with the
//! candle-transformers models. It deliberately knows nothing about the crate's own model
//! code, so tests can use it as an independent reference.

// Each subject uses only part of it.
#![allow(dead_code)]

pub mod gemma;
pub mod hub;
pub mod registry;

use std::collections::HashMap;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, qwen2, qwen3};
use serde_json::{json, Value as Json};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

// ---------------------------------------------------------------------------------------
// Real test models
// ---------------------------------------------------------------------------------------

pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN_GGUF: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
pub const QWEN_TOKENIZER: &str = "qwen3-tokenizer.json";
pub const QWEN_TOKENIZER_CONFIG: &str = "qwen3-tokenizer_config.json";

/// Where `scripts/fetch-test-models.sh` puts the real models.
pub fn test_models_dir() -> PathBuf {
    match std::env::var_os("WICK_TEST_MODELS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache/candlewick/test-models")
        }
    }
}

/// Path of one real test model file; panics (tests never skip silently) when it is missing.
pub fn test_model(name: &str) -> PathBuf {
    let path = test_models_dir().join(name);
    if !path.is_file() {
        panic!(
            "test model {} is missing; run scripts/fetch-test-models.sh \
             (or point WICK_TEST_MODELS at a directory holding it)",
            path.display()
        );
    }
    path
}

/// A directory holding the real Qwen tokenizer under the Hugging Face file names
/// (`tokenizer.json`, `tokenizer_config.json`), for [`gguf_to_hf_dir`]'s `tokenizer_from`.
pub fn qwen_tokenizer_dir() -> PathBuf {
    let dir = test_models_dir().join("hf").join("qwen-tokenizer");
    copy_qwen_tokenizer(&dir).unwrap_or_else(|e| panic!("copying the Qwen tokenizer: {e}"));
    dir
}

/// The Hugging Face conversion of a real GGUF test model, cached under
/// `<test-models>/hf/<stem>/`.
pub fn test_gguf_hf_dir(name: &str, tokenizer_from: Option<&Path>) -> PathBuf {
    let gguf = test_model(name);
    let stem = gguf.file_stem().expect("GGUF file name").to_owned();
    let out = test_models_dir().join("hf").join(stem);
    gguf_to_hf_dir(&gguf, &out, tokenizer_from)
}

fn copy_qwen_tokenizer(dir: &Path) -> Res<()> {
    fs::create_dir_all(dir)?;
    copy_if_changed(&test_model(QWEN_TOKENIZER), &dir.join("tokenizer.json"))?;
    copy_if_changed(
        &test_model(QWEN_TOKENIZER_CONFIG),
        &dir.join("tokenizer_config.json"),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scratch directories and atomic file operations
// ---------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        let path = std::env::temp_dir().join(format!("candlewick-{tag}-{}", unique_suffix()));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating scratch dir {}: {e}", path.display()));
        ScratchDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Unique within the machine: test binaries run in parallel and each runs tests in threads.
fn unique_suffix() -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// A path beside `path` that nobody else uses, for write-then-rename.
fn temp_sibling(path: &Path, what: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let name = name.unwrap_or_default();
    path.with_file_name(format!(".{name}.{what}-{}", unique_suffix()))
}

/// Copies `src` to `dst` atomically, skipping the write when `dst` already has the bytes, so
/// readers in other test processes never see a half-written file.
fn copy_if_changed(src: &Path, dst: &Path) -> Res<()> {
    let bytes = fs::read(src)?;
    if fs::read(dst).ok().as_deref() == Some(&bytes[..]) {
        return Ok(());
    }
    let tmp = temp_sibling(dst, "tmp");
    fs::write(&tmp, &bytes)?;
    fs::rename(&tmp, dst)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Writing f32 safetensors
// ---------------------------------------------------------------------------------------

/// One f32 tensor ready for `model.safetensors` (little-endian bytes).
struct F32Tensor {
    name: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl F32Tensor {
    fn new(name: String, shape: Vec<usize>, values: &[f32]) -> F32Tensor {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        F32Tensor { name, shape, bytes }
    }

    fn from_tensor(name: String, t: &Tensor) -> Res<F32Tensor> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(F32Tensor::new(name, t.dims().to_vec(), &values))
    }
}

fn write_safetensors(path: &Path, tensors: &[F32Tensor]) -> Res<()> {
    use safetensors::tensor::TensorView;
    let views = tensors
        .iter()
        .map(|t| {
            let view = TensorView::new(safetensors::Dtype::F32, t.shape.clone(), &t.bytes)?;
            Ok((t.name.clone(), view))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    // transformers refuses safetensors files whose "format" is not a known framework.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path)?;
    Ok(())
}

fn write_json(path: &Path, value: &Json) -> Res<()> {
    fs::write(path, serde_json::to_string_pretty(value)? + "\n")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Tiny random-weight models
// ---------------------------------------------------------------------------------------

/// The architectures the tiny models (and the reference runner) cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyArch {
    Qwen2,
    Qwen3,
    Llama,
}

impl TinyArch {
    pub const ALL: [TinyArch; 3] = [TinyArch::Qwen2, TinyArch::Qwen3, TinyArch::Llama];

    /// The `model_type` of a Hugging Face `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            TinyArch::Qwen2 => "qwen2",
            TinyArch::Qwen3 => "qwen3",
            TinyArch::Llama => "llama",
        }
    }

    fn architecture(self) -> &'static str {
        match self {
            TinyArch::Qwen2 => "Qwen2ForCausalLM",
            TinyArch::Qwen3 => "Qwen3ForCausalLM",
            TinyArch::Llama => "LlamaForCausalLM",
        }
    }

    /// The architecture of a model directory, from its `config.json` `model_type`.
    pub fn of_model_dir(dir: &Path) -> TinyArch {
        let config = read_config(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        match config["model_type"].as_str() {
            Some("qwen2") => TinyArch::Qwen2,
            Some("qwen3") => TinyArch::Qwen3,
            Some("llama") => TinyArch::Llama,
            other => panic!("{}: unsupported model_type {other:?}", dir.display()),
        }
    }
}

/// The real Qwen tokenizer's vocabulary (embedding rows), used by every tiny model so the
/// real tokenizer works with them.
pub const TINY_VOCAB_SIZE: usize = 151_936;
pub const TINY_HIDDEN_SIZE: usize = 64;
pub const TINY_LAYERS: usize = 2;
pub const TINY_HEADS: usize = 4;
pub const TINY_KV_HEADS: usize = 2;
pub const TINY_HEAD_DIM: usize = TINY_HIDDEN_SIZE / TINY_HEADS;
pub const TINY_INTERMEDIATE_SIZE: usize = 128;
pub const TINY_MAX_POSITIONS: usize = 4096;
/// Qwen's `<|endoftext|>` and `<|im_end|>`.
const QWEN_BOS: u32 = 151_643;
const QWEN_EOS: u32 = 151_645;

/// splitmix64 with Box–Muller normals: a few lines, deterministic for a seed, no dependency.
pub struct SplitMix64 {
    state: u64,
    spare: Option<f64>,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]; never 0, so the logarithm below stays finite.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let theta = std::f64::consts::TAU * self.uniform();
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `count` values `mean + std * N(0, 1)`.
    pub fn normals(&mut self, count: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..count)
            .map(|_| mean + std * self.normal() as f32)
            .collect()
    }
}

/// Writes a tiny random-weight Hugging Face model of `arch` into `dir` (created if needed):
/// `config.json`, `model.safetensors` (f32) and the real Qwen `tokenizer.json` /
/// `tokenizer_config.json`. The same seed always gives the same bytes. Returns `dir`.
pub fn write_tiny_model(arch: TinyArch, dir: &Path, seed: u64) -> PathBuf {
    write_tiny_model_inner(arch, dir, seed)
        .unwrap_or_else(|e| panic!("writing tiny {arch:?} model to {}: {e}", dir.display()));
    dir.to_path_buf()
}

fn write_tiny_model_inner(arch: TinyArch, dir: &Path, seed: u64) -> Res<()> {
    fs::create_dir_all(dir)?;
    write_json(&dir.join("config.json"), &tiny_config(arch))?;
    write_safetensors(&dir.join("model.safetensors"), &tiny_weights(arch, seed))?;
    copy_qwen_tokenizer(dir)
}

fn tiny_config(arch: TinyArch) -> Json {
    let mut config = json!({
        "architectures": [arch.architecture()],
        "model_type": arch.model_type(),
        "hidden_size": TINY_HIDDEN_SIZE,
        "intermediate_size": TINY_INTERMEDIATE_SIZE,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_HEADS,
        "num_key_value_heads": TINY_KV_HEADS,
        "vocab_size": TINY_VOCAB_SIZE,
        "max_position_embeddings": TINY_MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": QWEN_BOS,
        "eos_token_id": QWEN_EOS,
    });
    let extra = match arch {
        TinyArch::Qwen2 => json!({
            "rope_theta": 10000.0,
            "tie_word_embeddings": true,
            // candle's qwen2 masks by sliding_window even when it is off, so it must be
            // at least the context length.
            "sliding_window": TINY_MAX_POSITIONS,
            "max_window_layers": TINY_LAYERS,
            "use_sliding_window": false,
        }),
        TinyArch::Qwen3 => json!({
            "rope_theta": 10000.0,
            "tie_word_embeddings": true,
            "head_dim": TINY_HEAD_DIM,
            "attention_bias": false,
            "sliding_window": null,
            "max_window_layers": TINY_LAYERS,
            "use_sliding_window": false,
        }),
        TinyArch::Llama => json!({
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "tie_word_embeddings": false,
            "attention_bias": false,
            "mlp_bias": false,
        }),
    };
    merge(&mut config, extra);
    config
}

fn merge(into: &mut Json, from: Json) {
    if let (Some(into), Json::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

fn tiny_weights(arch: TinyArch, seed: u64) -> Vec<F32Tensor> {
    let mut rng = SplitMix64::new(seed);
    let (h, i, v, d) = (
        TINY_HIDDEN_SIZE,
        TINY_INTERMEDIATE_SIZE,
        TINY_VOCAB_SIZE,
        TINY_HEAD_DIM,
    );
    let (q_out, kv_out) = (TINY_HEADS * d, TINY_KV_HEADS * d);
    let mut out = Vec::new();
    // Matrices get a small std like trained checkpoints; norm weights sit near 1 but not at 1
    // so an implementation that ignores them is caught.
    let mut matrix = |out: &mut Vec<F32Tensor>, name: String, shape: Vec<usize>| {
        let values = rng.normals(shape.iter().product(), 0.0, 0.02);
        out.push(F32Tensor::new(name, shape, &values));
    };
    matrix(&mut out, "model.embed_tokens.weight".into(), vec![v, h]);
    for layer in 0..TINY_LAYERS {
        let p = format!("model.layers.{layer}");
        matrix(
            &mut out,
            format!("{p}.self_attn.q_proj.weight"),
            vec![q_out, h],
        );
        matrix(
            &mut out,
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv_out, h],
        );
        matrix(
            &mut out,
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv_out, h],
        );
        matrix(
            &mut out,
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q_out],
        );
        matrix(&mut out, format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
        matrix(&mut out, format!("{p}.mlp.up_proj.weight"), vec![i, h]);
        matrix(&mut out, format!("{p}.mlp.down_proj.weight"), vec![h, i]);
    }
    if arch == TinyArch::Llama {
        matrix(&mut out, "lm_head.weight".into(), vec![v, h]);
    }
    // Vectors come after all matrices so adding one never reshuffles the matrices' values.
    let mut vector = |out: &mut Vec<F32Tensor>, name: String, len: usize, mean: f32, std| {
        out.push(F32Tensor::new(
            name,
            vec![len],
            &rng.normals(len, mean, std),
        ));
    };
    for layer in 0..TINY_LAYERS {
        let p = format!("model.layers.{layer}");
        vector(&mut out, format!("{p}.input_layernorm.weight"), h, 1.0, 0.1);
        vector(
            &mut out,
            format!("{p}.post_attention_layernorm.weight"),
            h,
            1.0,
            0.1,
        );
        if arch == TinyArch::Qwen2 {
            // Larger than the matrices so a dropped bias visibly changes the logits.
            vector(
                &mut out,
                format!("{p}.self_attn.q_proj.bias"),
                q_out,
                0.0,
                0.1,
            );
            vector(
                &mut out,
                format!("{p}.self_attn.k_proj.bias"),
                kv_out,
                0.0,
                0.1,
            );
            vector(
                &mut out,
                format!("{p}.self_attn.v_proj.bias"),
                kv_out,
                0.0,
                0.1,
            );
        }
        if arch == TinyArch::Qwen3 {
            vector(
                &mut out,
                format!("{p}.self_attn.q_norm.weight"),
                d,
                1.0,
                0.1,
            );
            vector(
                &mut out,
                format!("{p}.self_attn.k_norm.weight"),
                d,
                1.0,
                0.1,
            );
        }
    }
    vector(&mut out, "model.norm.weight".into(), h, 1.0, 0.1);
    out
}

// ---------------------------------------------------------------------------------------
// Reference logits from candle-transformers
// ---------------------------------------------------------------------------------------

fn read_config(dir: &Path) -> Res<Json> {
    Ok(serde_json::from_str(&fs::read_to_string(
        dir.join("config.json"),
    )?)?)
}

/// Runs the candle-transformers model for `arch` (f32, CPU) from `dir`: one forward over
/// `tokens`, then each of `decode_steps` one at a time through its KV cache. Returns the
/// last-position logits after the prompt and after each decode step (`1 + decode_steps.len()`
/// rows of `vocab_size`).
pub fn reference_logits(
    arch: TinyArch,
    dir: &Path,
    tokens: &[u32],
    decode_steps: &[u32],
) -> Vec<Vec<f32>> {
    assert!(
        !tokens.is_empty(),
        "reference_logits needs a non-empty prompt"
    );
    reference_logits_inner(arch, dir, tokens, decode_steps).unwrap_or_else(|e| {
        panic!(
            "candle-transformers {arch:?} reference on {}: {e}",
            dir.display()
        )
    })
}

fn reference_logits_inner(
    arch: TinyArch,
    dir: &Path,
    tokens: &[u32],
    decode_steps: &[u32],
) -> Res<Vec<Vec<f32>>> {
    let config = fs::read_to_string(dir.join("config.json"))?;
    let device = Device::Cpu;
    // SAFETY: the weights file is not modified while mapped (writers rename new files in).
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &device)?
    };
    match arch {
        TinyArch::Qwen2 => {
            let config: qwen2::Config = serde_json::from_str(&config)?;
            let mut model = qwen2::ModelForCausalLM::new(&config, vb)?;
            run_reference(tokens, decode_steps, |x, pos| model.forward(x, pos))
        }
        TinyArch::Qwen3 => {
            let config: qwen3::Config = serde_json::from_str(&config)?;
            let mut model = qwen3::ModelForCausalLM::new(&config, vb)?;
            run_reference(tokens, decode_steps, |x, pos| model.forward(x, pos))
        }
        TinyArch::Llama => {
            let config: llama::LlamaConfig = serde_json::from_str(&config)?;
            let config = config.into_config(false);
            let mut cache = llama::Cache::new(true, DType::F32, &config, &device)?;
            let model = llama::Llama::load(vb, &config)?;
            run_reference(tokens, decode_steps, |x, pos| {
                model.forward(x, pos, &mut cache)
            })
        }
    }
}

/// Drives a forward function that returns last-position logits (`[1, 1, V]` or `[1, V]`,
/// depending on the model) over the prompt and then the decode steps.
fn run_reference(
    tokens: &[u32],
    decode_steps: &[u32],
    mut forward: impl FnMut(&Tensor, usize) -> candle_core::Result<Tensor>,
) -> Res<Vec<Vec<f32>>> {
    let mut rows = Vec::with_capacity(1 + decode_steps.len());
    let prompt = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
    rows.push(logits_row(&forward(&prompt, 0)?)?);
    for (step, &token) in decode_steps.iter().enumerate() {
        let input = Tensor::new(&[token], &Device::Cpu)?.unsqueeze(0)?;
        rows.push(logits_row(&forward(&input, tokens.len() + step)?)?);
    }
    Ok(rows)
}

fn logits_row(logits: &Tensor) -> Res<Vec<f32>> {
    Ok(logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The largest elementwise difference of two logit rows.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Index of the largest value (the greedy next token).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

// ---------------------------------------------------------------------------------------
// GGUF -> Hugging Face directory
// ---------------------------------------------------------------------------------------

/// Bumped whenever the conversion's output changes, so stale caches are redone.
const CONVERTER_VERSION: u32 = 1;
const MARKER: &str = ".candlewick-converted";

/// Converts a GGUF file into a Hugging Face model directory at `out`: `model.safetensors`
/// with every tensor dequantized to f32 under its Hugging Face name (llama Q/K rows put back
/// in Hugging Face order), and `config.json` from the GGUF metadata. With `tokenizer_from`,
/// its `tokenizer.json` (and `tokenizer_config.json` when present) are copied in.
///
/// A finished conversion carries a marker and is reused. Conversion writes to a temporary
/// sibling and renames it into place, so concurrent test processes never see a partial
/// directory. Returns `out`.
pub fn gguf_to_hf_dir(gguf: &Path, out: &Path, tokenizer_from: Option<&Path>) -> PathBuf {
    ensure_converted(gguf, out)
        .unwrap_or_else(|e| panic!("converting {} to {}: {e}", gguf.display(), out.display()));
    if let Some(src) = tokenizer_from {
        copy_tokenizer(src, out).unwrap_or_else(|e| {
            panic!(
                "copying the tokenizer from {} to {}: {e}",
                src.display(),
                out.display()
            )
        });
    }
    out.to_path_buf()
}

fn copy_tokenizer(src: &Path, out: &Path) -> Res<()> {
    copy_if_changed(&src.join("tokenizer.json"), &out.join("tokenizer.json"))?;
    let config = src.join("tokenizer_config.json");
    if config.is_file() {
        copy_if_changed(&config, &out.join("tokenizer_config.json"))?;
    }
    Ok(())
}

/// What the marker says: the converter version and the source file, so a replaced GGUF or a
/// changed converter invalidates the cache.
fn marker_text(gguf: &Path) -> Res<String> {
    let len = fs::metadata(gguf)?.len();
    let name = gguf.file_name().unwrap_or_default().to_string_lossy();
    Ok(format!(
        "converter {CONVERTER_VERSION}\nsource {name}\nbytes {len}\n"
    ))
}

fn is_converted(out: &Path, marker: &str) -> bool {
    fs::read_to_string(out.join(MARKER)).is_ok_and(|m| m == marker)
}

fn ensure_converted(gguf: &Path, out: &Path) -> Res<()> {
    let marker = marker_text(gguf)?;
    if is_converted(out, &marker) {
        return Ok(());
    }
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = temp_sibling(out, "tmp");
    fs::create_dir_all(&tmp)?;
    let converted = convert_gguf(gguf, &tmp).and_then(|()| {
        fs::write(tmp.join(MARKER), &marker)?;
        Ok(())
    });
    if let Err(e) = converted {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    publish_dir(&tmp, out, &marker)
}

/// Renames the finished `tmp` to `out`. A complete `out` from a racing process wins; a stale
/// one (older converter, interrupted run) is moved aside first.
fn publish_dir(tmp: &Path, out: &Path, marker: &str) -> Res<()> {
    for _ in 0..3 {
        if fs::rename(tmp, out).is_ok() {
            return Ok(());
        }
        if is_converted(out, marker) {
            fs::remove_dir_all(tmp)?;
            return Ok(());
        }
        let aside = temp_sibling(out, "stale");
        if fs::rename(out, &aside).is_ok() {
            let _ = fs::remove_dir_all(&aside);
        }
    }
    let _ = fs::remove_dir_all(tmp);
    Err(format!("could not move the conversion into {}", out.display()).into())
}

/// Reads one metadata value; the key is named in the error because GGUF writers differ.
fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Res<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| format!("GGUF metadata {key} is missing").into())
}

fn md_usize(ct: &gguf_file::Content, key: &str) -> Res<usize> {
    Ok(md(ct, key)?.to_u64()? as usize)
}

/// A float from the metadata, rounded to the f32's shortest decimal so `1e-5` stored as
/// f32 becomes `1e-5` in `config.json`, not `9.999999747378752e-6`.
fn md_float(ct: &gguf_file::Content, key: &str) -> Res<Option<f64>> {
    let Some(value) = ct.metadata.get(key) else {
        return Ok(None);
    };
    let value = match value {
        gguf_file::Value::F64(v) => *v,
        v => v.to_f32()?.to_string().parse::<f64>()?,
    };
    Ok(Some(value))
}

/// The Hugging Face name of a GGUF tensor, or None for tensors this converter doesn't know.
/// `gemma`: Gemma's four norms per layer, where `ffn_norm` is the norm before the MLP
/// (`pre_feedforward_layernorm`) and `post_attention_layernorm` the attention output's.
fn hf_tensor_name(gguf_name: &str, gemma: bool) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let (layer, rest) = gguf_name.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undoes llama.cpp's `LlamaModel.permute` on the rows of a Q or K projection (weight or
/// bias). The converter views each head's rows as `[2, head_dim/2]` (the two rotate-half
/// halves) and transposes to `[head_dim/2, 2]`, interleaving them for GPT-J style rope:
/// GGUF row `2i + j` of a head is Hugging Face row `j * head_dim/2 + i`. Transposing back
/// restores the Hugging Face order.
fn unpermute_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let head_dim = dims[0] / n_head;
    let cols: usize = dims[1..].iter().product();
    t.reshape((n_head, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

fn convert_gguf(gguf: &Path, out: &Path) -> Res<()> {
    let mut file = fs::File::open(gguf)?;
    let ct = gguf_file::Content::read(&mut file)?;
    let arch = md(&ct, "general.architecture")?.to_string()?.clone();
    if arch == "gemma3" {
        return gemma::convert_gemma3(&ct, &mut file, out);
    }
    if !matches!(arch.as_str(), "llama" | "qwen2" | "qwen3") {
        return Err(
            format!("architecture {arch} is not supported (llama, qwen2, qwen3, gemma3)").into(),
        );
    }
    let key = |k: &str| format!("{arch}.{k}");
    let n_head = md_usize(&ct, &key("attention.head_count"))?;
    let n_kv_head = md_usize(&ct, &key("attention.head_count_kv"))?;
    let hidden = md_usize(&ct, &key("embedding_length"))?;
    let head_dim = match ct.metadata.get(&key("attention.key_length")) {
        Some(v) => v.to_u64()? as usize,
        None => hidden / n_head,
    };
    if let Some(rope_dim) = ct.metadata.get(&key("rope.dimension_count")) {
        let rope_dim = rope_dim.to_u64()? as usize;
        if rope_dim != head_dim {
            return Err(
                format!("partial rotary ({rope_dim} of {head_dim}) is not supported").into(),
            );
        }
    }

    let embd = ct
        .tensor_infos
        .get("token_embd.weight")
        .ok_or("GGUF has no token_embd.weight")?;
    let vocab_size = match ct.metadata.get("tokenizer.ggml.tokens") {
        Some(tokens) => tokens.to_vec()?.len(),
        None => embd.shape.dims()[0],
    };
    if vocab_size != embd.shape.dims()[0] {
        return Err(format!(
            "token list has {vocab_size} entries but token_embd has {} rows",
            embd.shape.dims()[0]
        )
        .into());
    }

    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    let mut has_qkv_bias = false;
    for name in names {
        let Some(hf_name) = hf_tensor_name(name, false) else {
            // e.g. llama 3.1's rope_freqs.weight: silently dropping it would give a
            // checkpoint that loads but computes something else.
            return Err(format!("GGUF tensor {name} has no Hugging Face mapping").into());
        };
        has_qkv_bias |= name.ends_with("attn_q.bias");
        let mut t = ct
            .tensor(&mut file, name, &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        if arch == "llama" {
            if name.contains(".attn_q.") {
                t = unpermute_rows(&t, n_head)?;
            } else if name.contains(".attn_k.") {
                t = unpermute_rows(&t, n_kv_head)?;
            }
        }
        tensors.push(F32Tensor::from_tensor(hf_name, &t)?);
    }
    let tied = !ct.tensor_infos.contains_key("output.weight");
    write_safetensors(&out.join("model.safetensors"), &tensors)?;
    drop(tensors);

    let layers = md_usize(&ct, &key("block_count"))?;
    let context = md_usize(&ct, &key("context_length"))?;
    let mut config = json!({
        "architectures": [match arch.as_str() {
            "llama" => "LlamaForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            _ => "Qwen3ForCausalLM",
        }],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": md_usize(&ct, &key("feed_forward_length"))?,
        "num_hidden_layers": layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": context,
        "rms_norm_eps": md_float(&ct, &key("attention.layer_norm_rms_epsilon"))?
            .ok_or("GGUF metadata attention.layer_norm_rms_epsilon is missing")?,
        "rope_theta": md_float(&ct, &key("rope.freq_base"))?.unwrap_or(10000.0),
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    let extra = match arch.as_str() {
        "llama" => json!({ "attention_bias": has_qkv_bias, "mlp_bias": false }),
        "qwen2" => json!({
            "sliding_window": context,
            "max_window_layers": layers,
            "use_sliding_window": false,
        }),
        _ => json!({
            "attention_bias": has_qkv_bias,
            "sliding_window": null,
            "max_window_layers": layers,
            "use_sliding_window": false,
        }),
    };
    merge(&mut config, extra);
    for (gguf_key, hf_key) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
    ] {
        if let Some(id) = ct.metadata.get(gguf_key) {
            merge(&mut config, json!({ hf_key: id.to_u64()? }));
        }
    }
    write_json(&out.join("config.json"), &config)
}

/// The largest difference relative to the reference's (`b`'s) largest magnitude.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}
