//! The GPU self-check: before wick serves on a GPU, small random-weight models with real
//! head shapes run the same batches (prefill chunks, mixed prefill and decode, decode)
//! through both GPU paths, and their logits are compared:
//!
//! * the fast path: the decoder on our kernels ([`super::cuda`]) with [`CudaKvCache`];
//! * the reference path: candle's own ops only, with [`RefKvCache`].
//!
//! Out of tolerance, or any error on the fast path, and wick serves on the reference path,
//! says so loudly at start-up and reports the path in `/api/ps` and `/metrics`.
//! `WICK_GPU_SELFCHECK=off` skips the check (the fast path is then served unchecked). The
//! same logic runs in `cargo test` on the CPU execution layer, where tests also break a
//! kernel on purpose and watch the check fall back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::config::{Activation, ArchConfig, Family};
use super::cuda::CudaKvCache;
use super::{Batch, Decoder, KvCache, RefKvCache, Result};

/// Which implementation serves on a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuPath {
    /// Our kernels (fused norm/rope/activation, paged attention).
    Kernels,
    /// candle's ops only.
    Reference,
}

impl GpuPath {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernels => "kernels",
            Self::Reference => "reference",
        }
    }
}

impl std::fmt::Display for GpuPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The largest logit difference between the paths, relative to the logits' scale (at least
/// 1), that still counts as agreeing. fp16 storage with fp32 arithmetic on both paths
/// differs in the last bits of each layer's outputs (measured: below 1e-2 on the CPU
/// layer); a kernel that is wrong by one element or one position moves logits by far more.
pub const TOLERANCE: f32 = 3e-2;

/// What the check found.
#[derive(Clone, Debug)]
pub struct SelfCheck {
    pub path: GpuPath,
    /// The largest relative logit difference over every case and step.
    pub worst: f32,
    pub tolerance: f32,
    pub elapsed: Duration,
    /// Why the kernels are not used, when they are not.
    pub problem: Option<String>,
    /// Each case's largest difference.
    pub cases: Vec<(String, f32)>,
}

/// How much to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// On a GPU at boot: every head shape, and a context long enough for the split-context
    /// attention.
    Boot,
    /// Short contexts: what the CPU execution layer runs in tests.
    Quick,
}

/// One random-weight model: real head shapes, small everything else (also the attention
/// tests' configuration).
pub(crate) fn case_config(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    hidden: usize,
) -> ArchConfig {
    ArchConfig {
        family: Family::Qwen2,
        arch_name: "qwen2".into(),
        vocab_size: 512,
        hidden_size: hidden,
        intermediate_size: 2 * hidden,
        num_layers: 2,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        mrope: None,
        rms_norm_eps: 1e-6,
        tie_embeddings: true,
        qkv_bias: true,
        qk_norm: false,
        sliding_window: None,
        full_attention_layers: Vec::new(),
        sliding_rope_theta: None,
        activation: Activation::Silu,
        post_norms: false,
        scale_embeddings: false,
        norm_weights_offset: false,
        query_pre_attn_scalar: None,
        final_logit_softcap: None,
        max_position_embeddings: 4096,
    }
}

/// Gemma 3 270M's heads (4/1x256) with what the kernel path does differently for Gemma:
/// a sliding-window layer (its own rope base) next to a global one, post-norms, the GELU
/// gate, scaled embeddings, a query scale and soft-capped logits. The window is `window`
/// tokens, short enough that the check's contexts outgrow it.
fn gemma_case_config(hidden: usize, window: usize) -> ArchConfig {
    ArchConfig {
        family: Family::Gemma3,
        arch_name: "gemma3".into(),
        qkv_bias: false,
        rope_theta: 1_000_000.0,
        sliding_window: Some(window),
        full_attention_layers: vec![1],
        sliding_rope_theta: Some(10_000.0),
        activation: Activation::GeluTanh,
        post_norms: true,
        scale_embeddings: true,
        query_pre_attn_scalar: Some(224.0),
        final_logit_softcap: Some(30.0),
        ..case_config(4, 1, 256, hidden)
    }
}

/// (name, heads, kv heads, head dim) of the checked shapes.
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("qwen2.5-0.5b heads 14/2x64", 14, 2, 64),
    ("qwen2.5-7b heads 28/4x128", 28, 4, 128),
    ("llama-3-8b heads 32/8x128", 32, 8, 128),
];

/// The steps: per sequence, tokens this step (0: not in it). Prefill in chunks, sequences
/// joining late, decode rows next to prefill chunks.
fn plan(scope: Scope) -> Vec<Vec<usize>> {
    let mut steps = vec![
        vec![21, 3, 0],
        vec![1, 17, 9],
        vec![1, 1, 1],
        vec![16, 1, 1],
        vec![1, 1, 1],
    ];
    if scope == Scope::Boot {
        // A fourth sequence past the split-context threshold (1024), prefilled in chunks.
        for s in &mut steps {
            s.push(0);
        }
        steps.push(vec![0, 0, 0, 600]);
        steps.push(vec![1, 0, 0, 600]);
        steps.push(vec![1, 1, 1, 1]);
    }
    steps
}

fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a: Vec<f32> = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if a.len() != b.len() {
        return Ok(f32::INFINITY);
    }
    let scale = b
        .iter()
        .filter(|v| v.is_finite())
        .fold(1f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0f32, f32::max);
    Ok(worst / scale)
}

/// Runs one model through both paths; the largest relative logit difference.
fn compare(device: &Device, cfg: ArchConfig, scope: Scope, seed: u64) -> Result<f32> {
    let steps = plan(scope);
    let seqs = steps[0].len();
    let bs = 16;
    let per_seq = 1300usize.div_ceil(bs);
    let nb = seqs * per_seq;
    let dec = Decoder::random(cfg.clone(), device, DType::F16, seed)?;
    let mut fast = CudaKvCache::new(dec.config(), nb, bs, device)?;
    let mut reference = RefKvCache::new(dec.config(), nb, bs, device, DType::F16)?;
    // Sequence s owns blocks s, s + seqs, s + 2 * seqs, ...: interleaved, not contiguous.
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| (0..per_seq).map(|i| (i * seqs + s) as u32).collect())
        .collect();
    let mut cached = vec![0usize; seqs];
    let mut worst = 0f32;
    let mut tok = seed as u32;
    for step in &steps {
        let mut batch = Batch::default();
        for (s, &n) in step.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let ids: Vec<u32> = (0..n)
                .map(|_| {
                    tok = tok.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (tok >> 8) % cfg.vocab_size as u32
                })
                .collect();
            batch.push_seq(&ids, cached[s], tables[s].clone(), true);
            cached[s] += n;
        }
        let a = dec.forward(&batch, &mut fast as &mut dyn KvCache)?;
        let b = dec.forward(&batch, &mut reference as &mut dyn KvCache)?;
        worst = worst.max(rel_diff(&a, &b)?);
    }
    Ok(worst)
}

/// Runs the check on `device` and decides the path.
pub fn run(device: &Device, scope: Scope) -> SelfCheck {
    let t0 = Instant::now();
    let mut cases = Vec::new();
    let mut worst = 0f32;
    let mut problem = None;
    let shapes = match scope {
        Scope::Boot => SHAPES,
        Scope::Quick => &SHAPES[..2],
    };
    let hidden = if scope == Scope::Boot { 512 } else { 128 };
    let mut configs: Vec<(&str, ArchConfig)> = shapes
        .iter()
        .map(|&(name, heads, kvh, d)| (name, case_config(heads, kvh, d, hidden)))
        .collect();
    let window = if scope == Scope::Boot { 512 } else { 16 };
    configs.push((
        "gemma3-270m heads 4/1x256, sliding and global layers",
        gemma_case_config(hidden, window),
    ));
    for (i, (name, cfg)) in configs.into_iter().enumerate() {
        match compare(device, cfg, scope, 17 + i as u64) {
            Ok(e) => {
                worst = worst.max(e);
                cases.push((name.to_string(), e));
                if e.is_nan() || e > TOLERANCE {
                    problem.get_or_insert_with(|| {
                        format!(
                            "{name}: logits of the kernel path differ from the reference by \
                             {e:.3e} of their scale (tolerance {TOLERANCE:.0e})"
                        )
                    });
                }
            }
            Err(e) => {
                cases.push((name.to_string(), f32::INFINITY));
                worst = f32::INFINITY;
                problem.get_or_insert_with(|| format!("{name}: the kernel path failed: {e}"));
            }
        }
    }
    SelfCheck {
        path: if problem.is_none() {
            GpuPath::Kernels
        } else {
            GpuPath::Reference
        },
        worst,
        tolerance: TOLERANCE,
        elapsed: t0.elapsed(),
        problem,
        cases,
    }
}

static STATUS: Mutex<Option<SelfCheck>> = Mutex::new(None);

/// The last check's result, if one ran in this process.
pub fn status() -> Option<SelfCheck> {
    STATUS.lock().ok().and_then(|s| s.clone())
}

/// The path GPU models load with: the check's verdict, the kernels when none ran.
pub fn serving_path() -> GpuPath {
    status().map_or(GpuPath::Kernels, |s| s.path)
}

/// Whether `WICK_GPU_SELFCHECK` turns the check off.
pub fn disabled() -> bool {
    std::env::var("WICK_GPU_SELFCHECK").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "off" | "0" | "false" | "no"
        )
    })
}

/// Runs the check on a GPU before serving (unless disabled), logs the outcome and records
/// the path every GPU model will load with.
pub fn at_boot(device: &Device) -> Option<SelfCheck> {
    if !device.is_cuda() {
        return None;
    }
    if disabled() {
        tracing::warn!(
            "GPU self-check skipped (WICK_GPU_SELFCHECK=off): serving on our kernels unchecked"
        );
        return None;
    }
    let check = run(device, Scope::Boot);
    match &check.problem {
        None => tracing::info!(
            path = %check.path,
            worst = check.worst,
            tolerance = check.tolerance,
            ms = check.elapsed.as_millis() as u64,
            "GPU self-check passed: serving on our kernels"
        ),
        Some(p) => {
            tracing::error!(
                problem = %p,
                ms = check.elapsed.as_millis() as u64,
                "GPU SELF-CHECK FAILED: our kernels disagree with candle's reference ops on \
                 this GPU; serving on the slower reference path"
            );
            eprintln!(
                "*** GPU self-check FAILED: {p}\n*** serving on the reference path (candle ops \
                 only); /api/ps and /metrics report it"
            );
        }
    }
    record(check.clone());
    Some(check)
}

/// Sets the recorded verdict (tests; `at_boot`).
pub fn record(check: SelfCheck) {
    if let Ok(mut s) = STATUS.lock() {
        *s = Some(check);
    }
}
