//! Weight files: GGUF (quantized tensors stay quantized, read from a memory map) and Hugging
//! Face safetensors directories (single or sharded, memory-mapped). Both are addressed with
//! GGUF tensor names (`blk.3.attn_q.weight`), so the decoder has one loading path.
//!
//! A GGUF file's tensor data is read ahead of the loader by a few threads, in large
//! sequential `pread`s, into the page cache ([`ReadAhead`]): on a network file system one
//! page-fault stream on the map waits a round trip per readahead window, while several large
//! reads in flight keep the link busy; the loader's faults then find the pages there.
//! `scripts/cold-start.sh` measures both ways on a throttled device.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use super::config::{ArchConfig, Family};
use super::cpu_quant::FastQuant;
use super::{Error, Result};

/// An open weight file or directory.
pub enum WeightSource {
    Gguf(GgufFile),
    Safetensors(SafetensorsDir),
}

pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    mmap: Arc<Mmap>,
    /// Reads the tensor data ahead of the loader; stopped when the file is dropped.
    _read_ahead: Option<ReadAhead>,
}

/// Chunks read ahead by each thread; large enough that a network file system sends full
/// read requests back to back.
const READ_AHEAD_CHUNK: u64 = 8 << 20;

/// Threads reading one range of a file in large chunks (thread `i` takes chunks `i`,
/// `i + n`, ...), so that together they move through it in order ahead of the reader that
/// follows; each chunk is read into a scratch buffer and dropped: what stays is the page
/// cache. Dropping it stops the threads after their current chunk.
pub struct ReadAhead {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ReadAhead {
    /// Starts `threads` readers over `range` of `file` (none for 0 threads or an empty range).
    pub fn start(file: &File, range: std::ops::Range<u64>, threads: usize) -> Option<ReadAhead> {
        if threads == 0 || range.is_empty() {
            return None;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let chunks = (range.end - range.start).div_ceil(READ_AHEAD_CHUNK);
        let threads = threads.min(chunks as usize);
        let mut handles = Vec::with_capacity(threads);
        for t in 0..threads {
            let Ok(file) = file.try_clone() else { break };
            let stop = stop.clone();
            let range = range.clone();
            let spawned = std::thread::Builder::new()
                .name("wick-read-ahead".into())
                .spawn(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; READ_AHEAD_CHUNK as usize];
                    let mut chunk = t as u64;
                    while chunk < chunks && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let at = range.start + chunk * READ_AHEAD_CHUNK;
                        let len = READ_AHEAD_CHUNK.min(range.end - at) as usize;
                        // A failed read only loses the head start; the loader reads for itself.
                        if file.read_exact_at(&mut buf[..len], at).is_err() {
                            return;
                        }
                        chunk += threads as u64;
                    }
                });
            if let Ok(h) = spawned {
                handles.push(h);
            }
        }
        Some(ReadAhead {
            stop,
            threads: handles,
        })
    }

    /// Waits for the readers to finish (benchmarks; the loader never waits).
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub struct SafetensorsDir {
    pub dir: PathBuf,
    pub config_json: String,
    st: candle_core::safetensors::MmapedSafetensors,
    names: std::collections::HashSet<String>,
    layout: HfLayout,
}

/// Where a Hugging Face checkpoint keeps the text model's tensors, told from their names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HfLayout {
    /// Before `embed_tokens`, `layers`, `norm`: `model.`, or in a multimodal wrapper
    /// `language_model.model.` (Gemma 3 as released) or `model.language_model.` (as newer
    /// transformers save it).
    prefix: &'static str,
    /// Gemma's four norms per layer: the norm before the MLP is
    /// `pre_feedforward_layernorm`, and `post_attention_layernorm` is the norm of the
    /// attention output (in Llama-style checkpoints it is the norm before the MLP).
    gemma_norms: bool,
}

impl HfLayout {
    /// A plain decoder checkpoint (`model.layers...`).
    pub const PLAIN: HfLayout = HfLayout {
        prefix: "model.",
        gemma_norms: false,
    };

    fn detect(names: &std::collections::HashSet<String>) -> Self {
        let prefix = ["model.", "language_model.model.", "model.language_model."]
            .into_iter()
            .find(|p| names.contains(&format!("{p}embed_tokens.weight")))
            .unwrap_or("model.");
        let gemma_norms = names.contains(&format!(
            "{prefix}layers.0.pre_feedforward_layernorm.weight"
        ));
        Self {
            prefix,
            gemma_norms,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: the file is opened read-only; model files are not modified in place (the
        // store writes new blobs under temporary names and renames them).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let content =
            gguf_file::Content::read(&mut std::io::Cursor::new(&mmap[..])).map_err(|e| {
                Error::Format {
                    path: path.to_path_buf(),
                    msg: format!("not a readable GGUF file: {e}"),
                }
            })?;
        let read_ahead = ReadAhead::start(
            &file,
            content.tensor_data_offset.min(mmap.len() as u64)..mmap.len() as u64,
            crate::config::read_threads_from_env(),
        );
        Ok(Self {
            path: path.to_path_buf(),
            content,
            mmap: Arc::new(mmap),
            _read_ahead: read_ahead,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, gguf_file::Value> {
        &self.content.metadata
    }

    /// `general.architecture`, or "" when the file does not say.
    pub fn architecture(&self) -> &str {
        self.metadata()
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .map_or("", |a| a.as_str())
    }

    /// The raw bytes of a tensor, bounds-checked against the file.
    fn tensor_range(&self, name: &str) -> Result<(&gguf_file::TensorInfo, std::ops::Range<usize>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        let bad = |msg: String| Error::BadTensor {
            path: self.path.clone(),
            name: name.to_string(),
            msg,
        };
        if !elems.is_multiple_of(block) {
            return Err(bad(format!(
                "{elems} elements is not a multiple of the block size {block}"
            )));
        }
        let size = elems / block * info.ggml_dtype.type_size();
        let start = usize::try_from(self.content.tensor_data_offset + info.offset)
            .map_err(|_| bad("offset out of range".into()))?;
        let end = start
            .checked_add(size)
            .filter(|&e| e <= self.mmap.len())
            .ok_or_else(|| {
                bad(format!(
                    "needs bytes {start}..{} but the file has {} (truncated?)",
                    start.saturating_add(size),
                    self.mmap.len()
                ))
            })?;
        Ok((info, start..end))
    }

    /// A tensor dequantized to f32 on `device` (what candle-transformers modules read).
    pub(crate) fn dense(&self, name: &str, device: &Device) -> Result<Tensor> {
        Ok(self
            .qtensor(name, device, None, false)?
            .dequantize(device)?)
    }

    /// A tensor as candle's quantized tensor on `device`. `permute_heads` undoes the
    /// row permutation llama.cpp applies to llama-architecture Q/K projections; `for_matmul`
    /// says whether it will be multiplied (not only gathered from or dequantized).
    fn qtensor(
        &self,
        name: &str,
        device: &Device,
        permute_heads: Option<usize>,
        for_matmul: bool,
    ) -> Result<QTensor> {
        let (info, range) = self.tensor_range(name)?;
        let (dtype, dims) = (info.ggml_dtype, info.shape.dims().to_vec());
        // Inside a QTensor only the 32-value kinds may be ours: candle's CPU matmul picks
        // its repacked k-quant kernels by dtype and would read our packed bytes as GGUF
        // blocks. Projections take our k-quant kernels directly (`linear`).
        let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K);
        if !k_quant {
            if let Some(f) = self.fast_quant(name, device, permute_heads, for_matmul)? {
                return Ok(QTensor::new(QStorage::Cpu(Box::new(f)), dims)?);
            }
        }
        let bytes = &self.mmap[range.clone()];
        let storage = match permute_heads {
            Some(n_head) => {
                let owned = self.unpermuted(name, bytes, &dims, n_head)?;
                QStorage::from_data(Cow::Owned(owned), device, dtype)?
            }
            None => {
                let s = QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?;
                self.release(range);
                s
            }
        };
        Ok(QTensor::new(storage, dims)?)
    }

    /// A tensor our CPU kernels take (see `cpu_quant`), or None for candle's.
    fn fast_quant(
        &self,
        name: &str,
        device: &Device,
        permute_heads: Option<usize>,
        for_matmul: bool,
    ) -> Result<Option<FastQuant>> {
        if !device.is_cpu() {
            return Ok(None);
        }
        let (info, range) = self.tensor_range(name)?;
        let (dtype, dims) = (info.ggml_dtype, info.shape.dims());
        let row_len = dims.last().copied().unwrap_or(0);
        if !FastQuant::handles(dtype, row_len) {
            return Ok(None);
        }
        Ok(match permute_heads {
            Some(n_head) => {
                let owned = self.unpermuted(name, &self.mmap[range.clone()], dims, n_head)?;
                FastQuant::owned(dtype, row_len, owned).ok()
            }
            // A repacked tensor drops its file pages itself as it packs them.
            None => FastQuant::mapped(dtype, row_len, &self.mmap, range, for_matmul),
        })
    }

    /// A llama Q/K projection's rows in Hugging Face order (see `unpermute_rows`).
    fn unpermuted(
        &self,
        name: &str,
        bytes: &[u8],
        dims: &[usize],
        n_head: usize,
    ) -> Result<Vec<u8>> {
        unpermute_rows(bytes, dims, n_head).ok_or_else(|| Error::BadTensor {
            path: self.path.clone(),
            name: name.to_string(),
            msg: format!("cannot split {dims:?} into {n_head} rope heads"),
        })
    }

    /// Drops the file pages of a tensor that has been copied out, so loading does not hold
    /// the file and its copy in memory at once.
    fn release(&self, range: std::ops::Range<usize>) {
        drop_pages(&self.mmap, range);
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
}

/// Drops this process's resident pages of `range` of a file map (the pages it starts and
/// ends in included), once what they held has been copied out or repacked.
pub(super) fn drop_pages(map: &Mmap, range: std::ops::Range<usize>) {
    #[cfg(unix)]
    // SAFETY: the map is read-only and file-backed; DONTNEED only drops resident pages,
    // which are read from the unchanged file again if anything touches them later.
    unsafe {
        let _ = map.unchecked_advise_range(
            memmap2::UncheckedAdvice::DontNeed,
            range.start,
            range.len(),
        );
    }
    #[cfg(not(unix))]
    let _ = (map, range);
}

/// GGUF row order for a head is [x0, y0, x1, y1, ...] (pairs interleaved); Hugging Face order
/// is [x0, x1, ..., y0, y1, ...]. Rows are whole quantized blocks, so the permutation moves
/// byte ranges and works for any quantization type.
fn unpermute_rows(bytes: &[u8], dims: &[usize], n_head: usize) -> Option<Vec<u8>> {
    let rows = *dims.first()?;
    if n_head == 0 || !rows.is_multiple_of(n_head) || !bytes.len().is_multiple_of(rows) {
        return None;
    }
    let head_dim = rows / n_head;
    if !head_dim.is_multiple_of(2) {
        return None;
    }
    let row_bytes = bytes.len() / rows;
    let half = head_dim / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..n_head {
        for j in 0..half {
            for part in 0..2 {
                let src = h * head_dim + 2 * j + part;
                let dst = h * head_dim + part * half + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Some(out)
}

/// The weight files of a Hugging Face directory: the shards its
/// `model.safetensors.index.json` names, or `model.safetensors`; each must exist.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: index.clone(),
            msg: e.to_string(),
        })?;
        let mut shards: Vec<String> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Format {
                path: index.clone(),
                msg: "no weight_map".into(),
            })?
            .values()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        shards.iter().map(|s| dir.join(s)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    for f in &files {
        if !f.is_file() {
            return Err(Error::Io {
                path: f.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "weight file missing"),
            });
        }
    }
    Ok(files)
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_json = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
        let files = safetensors_files(dir)?;
        // SAFETY: read-only maps of files that are never modified in place.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
                Error::Format {
                    path: dir.to_path_buf(),
                    msg: format!("unreadable safetensors: {e}"),
                }
            })?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        let layout = HfLayout::detect(&names);
        Ok(Self {
            dir: dir.to_path_buf(),
            config_json,
            st,
            names,
            layout,
        })
    }

    fn hf_name(&self, gguf: &str) -> String {
        hf_name(gguf, self.layout)
    }

    fn load(&self, hf_name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        if !self.names.contains(hf_name) {
            return Err(Error::MissingTensor {
                path: self.dir.clone(),
                name: hf_name.to_string(),
            });
        }
        let t = self
            .st
            .load(hf_name, device)
            .map_err(|e| Error::BadTensor {
                path: self.dir.clone(),
                name: hf_name.to_string(),
                msg: e.to_string(),
            })?;
        Ok(t.to_dtype(dtype)?)
    }
}

/// Maps a GGUF tensor name to its Hugging Face name in a checkpoint of `layout`.
pub fn hf_name(gguf: &str, layout: HfLayout) -> String {
    let (stem, suffix) = gguf.rsplit_once('.').unwrap_or((gguf, "weight"));
    let p = layout.prefix;
    let mapped = match stem {
        "token_embd" => format!("{p}embed_tokens"),
        "output_norm" => format!("{p}norm"),
        "output" if p == "language_model.model." => "language_model.lm_head".to_string(),
        "output" => "lm_head".to_string(),
        _ => match stem.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((layer, part)) => {
                let part = match part {
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
                    "ffn_norm" if layout.gemma_norms => "pre_feedforward_layernorm",
                    "ffn_norm" => "post_attention_layernorm",
                    "post_attention_norm" => "post_attention_layernorm",
                    "post_ffw_norm" => "post_feedforward_layernorm",
                    other => other,
                };
                format!("{p}layers.{layer}.{part}")
            }
            None => stem.to_string(),
        },
    };
    format!("{mapped}.{suffix}")
}

/// A weight matrix ready for `x @ W^T (+ b)`: quantized (GGUF) or dense. On CPU a matrix
/// that candle multiplies (k-quants, dense weights) is split by output rows into parts
/// that run in parallel on our thread pool, since candle's own threading is off (see
/// `model::parallel`); our own kernels are parallel inside and stay whole.
#[derive(Clone, Debug)]
pub struct Linear {
    parts: Vec<Part>,
    bias: Option<Tensor>,
}

/// Bytes a dense tensor holds.
pub(crate) fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// A projection (or a row part of one): candle's matmul, or our CPU kernels.
#[derive(Clone, Debug)]
enum Part {
    Candle(QMatMul),
    Ours(Arc<FastQuant>),
}

impl Part {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Part::Candle(w) => x.apply(w),
            Part::Ours(w) => w.forward(x)?.to_dtype(x.dtype()),
        }
    }
}

impl Linear {
    fn new(weight: QMatMul, bias: Option<Tensor>) -> Result<Self> {
        let parts = match weight {
            QMatMul::Tensor(w) if w.device().is_cpu() => split_rows(w.dim(0)?)
                .into_iter()
                .map(|r| {
                    Ok(Part::Candle(QMatMul::Tensor(w.narrow(
                        0,
                        r.start,
                        r.len(),
                    )?)))
                })
                .collect::<Result<_>>()?,
            QMatMul::QTensor(q) => split_q(q)?
                .into_iter()
                .map(|q| Part::Candle(QMatMul::QTensor(q)))
                .collect(),
            w => vec![Part::Candle(w)],
        };
        Ok(Self { parts, bias })
    }

    /// Bytes a forward pass reads from this projection's weights and bias: all of them,
    /// whatever the number of rows (the bandwidth a decode step needs).
    pub fn weight_bytes(&self) -> usize {
        use candle_core::quantized::QuantizedType;
        let parts: usize = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
                Part::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => tensor_bytes(t),
                Part::Ours(w) => w.storage_size_in_bytes(),
            })
            .sum();
        parts + self.bias.as_ref().map_or(0, tensor_bytes)
    }

    /// A dense `[out, in]` projection (random-weight models).
    pub(crate) fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::new(QMatMul::Tensor(weight), bias)
    }

    /// The projections `ls` of one input `x` (q, k and v; gate and up): on the CPU with our
    /// kernels in one parallel job (`FastQuant::forward_many`), else one by one. Equal,
    /// bit for bit, to calling [`Self::forward`] on each.
    pub fn forward_many<const N: usize>(x: &Tensor, ls: [&Linear; N]) -> Result<[Tensor; N]> {
        let ours: Option<Vec<&FastQuant>> = ls
            .iter()
            .map(|l| match l.parts.as_slice() {
                [Part::Ours(w)] => Some(w.as_ref()),
                _ => None,
            })
            .collect();
        let fused = match ours {
            Some(ws) if x.device().is_cpu() => FastQuant::forward_many(&ws, x)?,
            _ => None,
        };
        let ys = match fused {
            Some(ys) => ys
                .into_iter()
                .zip(ls)
                .map(|(y, l)| l.with_bias(y.to_dtype(x.dtype())?))
                .collect::<Result<Vec<_>>>()?,
            None => ls
                .iter()
                .map(|l| l.forward(x))
                .collect::<Result<Vec<_>>>()?,
        };
        ys.try_into()
            .map_err(|_| Error::Config("a fused projection lost an output".into()))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.parts.as_slice() {
            // candle's CUDA quantized matmul takes f32 activations only; the GPU runs f16.
            [Part::Candle(w @ QMatMul::QTensor(_))]
                if x.device().is_cuda() && x.dtype() != DType::F32 =>
            {
                x.to_dtype(DType::F32)?.apply(w)?.to_dtype(x.dtype())?
            }
            [w] => w.forward(x)?,
            parts => {
                let outs = super::parallel::par_map(parts.len(), |i| parts[i].forward(x))
                    .into_iter()
                    .map(|y| match y {
                        Some(y) => Ok(y?),
                        None => Err(candle_core::Error::Msg(
                            "a parallel matmul part did not finish".into(),
                        )
                        .into()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&outs, x.rank() - 1)?
            }
        };
        self.with_bias(y)
    }

    /// `y` plus the bias, if the projection has one.
    fn with_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Output-row ranges for splitting an `n`-row matrix across the CPU pool: two per thread
/// (so a fast thread can take a slow one's share), in multiples of 64 rows (candle's
/// repacked kernels work on row tiles). One range when there is one thread.
fn split_rows(n: usize) -> Vec<std::ops::Range<usize>> {
    let step = n
        .div_ceil(2 * super::parallel::num_threads())
        .next_multiple_of(64)
        .max(64);
    (0..n).step_by(step).map(|s| s..n.min(s + step)).collect()
}

/// A quantized CPU matrix in row parts (see [`split_rows`]), unless our kernels take it.
fn split_q(q: Arc<QTensor>) -> Result<Vec<Arc<QTensor>>> {
    let (n, k) = q.shape().dims2()?;
    let rows = split_rows(n);
    if !q.device().is_cpu() || FastQuant::handles(q.dtype(), k) || rows.len() < 2 {
        return Ok(vec![q]);
    }
    let bytes = q.data()?;
    let row_bytes = bytes.len() / n;
    rows.into_iter()
        .map(|r| {
            let part = &bytes[r.start * row_bytes..r.end * row_bytes];
            let storage = QStorage::from_data(Cow::Borrowed(part), &Device::Cpu, q.dtype())?;
            Ok(Arc::new(QTensor::new(storage, (r.len(), k))?))
        })
        .collect()
}

/// The token embedding table: quantized tables are gathered row by row so a 150k-row
/// vocabulary is never dequantized as a whole. A quantized table may be in row parts,
/// shared with a tied output projection (see [`Linear`]).
#[derive(Clone, Debug)]
pub enum Embedding {
    Quantized(Vec<Arc<QTensor>>),
    Dense(Tensor),
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Quantized(parts) if parts.len() == 1 => parts[0].embedding(ids)?,
            Self::Quantized(parts) => {
                let step = parts[0].shape().dims2()?.0 as u32;
                let rows = ids
                    .to_vec1::<u32>()?
                    .into_iter()
                    .map(|id| {
                        let part = parts.get((id / step) as usize).ok_or_else(|| {
                            candle_core::Error::Msg(format!(
                                "token id {id} is out of the vocabulary"
                            ))
                        })?;
                        let local = Tensor::new(&[id % step], ids.device())?;
                        Ok(part.embedding(&local)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
            Self::Dense(w) => w.index_select(ids, 0)?,
        })
    }
}

impl WeightSource {
    /// Opens a `.gguf` file or a Hugging Face directory (with `config.json`).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Self::Safetensors(SafetensorsDir::open(path)?))
        } else {
            Ok(Self::Gguf(GgufFile::open(path)?))
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(g) => &g.path,
            Self::Safetensors(s) => &s.dir,
        }
    }

    pub fn config(&self) -> Result<ArchConfig> {
        match self {
            Self::Gguf(g) => ArchConfig::from_gguf(g.metadata(), |n| g.has(n)),
            Self::Safetensors(s) => ArchConfig::from_hf_json(&s.config_json),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            Self::Gguf(g) => g.has(name),
            Self::Safetensors(s) => s.names.contains(&s.hf_name(name)),
        }
    }

    /// A dense tensor (norm weights, biases) in `dtype`.
    pub fn tensor(&self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Gguf(g) => Ok(g.dense(name, device)?.to_dtype(dtype)?),
            Self::Safetensors(s) => s.load(&s.hf_name(name), device, dtype),
        }
    }

    /// A projection matrix; `rope_heads` marks llama Q/K projections (see `unpermute_rows`).
    pub fn linear(
        &self,
        name: &str,
        device: &Device,
        dtype: DType,
        cfg: &ArchConfig,
        rope_heads: Option<usize>,
    ) -> Result<Linear> {
        let bias_name = format!("{name}.bias");
        let bias = if self.has(&bias_name) {
            Some(self.tensor(&bias_name, device, dtype)?)
        } else {
            None
        };
        let weight = match self {
            Self::Gguf(g) => {
                let (name, permute) = (
                    format!("{name}.weight"),
                    rope_heads.filter(|_| gguf_rope_permuted(cfg)),
                );
                if let Some(f) = g.fast_quant(&name, device, permute, true)? {
                    return Ok(Linear {
                        parts: vec![Part::Ours(Arc::new(f))],
                        bias,
                    });
                }
                let q = g.qtensor(&name, device, permute, true)?;
                match q.dtype() {
                    // Unquantized GGUF tensors are ordinary dense matmuls in the compute dtype.
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                        QMatMul::Tensor(q.dequantize(device)?.to_dtype(dtype)?)
                    }
                    _ => QMatMul::from_arc(Arc::new(q))?,
                }
            }
            Self::Safetensors(s) => {
                QMatMul::Tensor(s.load(&s.hf_name(&format!("{name}.weight")), device, dtype)?)
            }
        };
        Linear::new(weight, bias)
    }

    /// The token embedding table; `tied` when it is the output projection as well.
    pub fn embedding(&self, device: &Device, dtype: DType, tied: bool) -> Result<Embedding> {
        match self {
            Self::Gguf(g) => {
                let q = g.qtensor("token_embd.weight", device, None, tied)?;
                Ok(match q.dtype() {
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                        Embedding::Dense(q.dequantize(device)?.to_dtype(dtype)?)
                    }
                    // Split for the pool only when it is also the output projection.
                    _ if tied => Embedding::Quantized(split_q(Arc::new(q))?),
                    _ => Embedding::Quantized(vec![Arc::new(q)]),
                })
            }
            Self::Safetensors(s) => Ok(Embedding::Dense(s.load(
                &s.hf_name("token_embd.weight"),
                device,
                dtype,
            )?)),
        }
    }

    /// The output projection; tied models reuse the embedding table.
    pub fn lm_head(
        &self,
        cfg: &ArchConfig,
        embedding: &Embedding,
        device: &Device,
        dtype: DType,
    ) -> Result<Linear> {
        if !cfg.tie_embeddings {
            return self.linear("output", device, dtype, cfg, None);
        }
        match embedding {
            // Already in row parts: share them rather than split a second copy.
            Embedding::Quantized(parts) => Ok(Linear {
                parts: parts
                    .iter()
                    .map(|q| Part::Candle(QMatMul::QTensor(q.clone())))
                    .collect(),
                bias: None,
            }),
            Embedding::Dense(w) => Linear::new(QMatMul::Tensor(w.clone()), None),
        }
    }

    /// Llama 3.1 GGUFs store their rope scaling as per-frequency divisors.
    pub fn rope_freq_factors(&self, device: &Device) -> Result<Option<Vec<f32>>> {
        match self {
            Self::Gguf(g) if g.has("rope_freqs.weight") => Ok(Some(
                g.qtensor("rope_freqs.weight", device, None, false)?
                    .dequantize(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            )),
            _ => Ok(None),
        }
    }
}

/// llama.cpp's converter permutes Q/K rows only for the llama architecture family.
fn gguf_rope_permuted(cfg: &ArchConfig) -> bool {
    cfg.family == Family::Llama
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names() {
        let hf_name = |n| hf_name(n, HfLayout::PLAIN);
        assert_eq!(hf_name("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(
            hf_name("blk.3.attn_q.bias"),
            "model.layers.3.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight"),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            hf_name("blk.11.attn_k_norm.weight"),
            "model.layers.11.self_attn.k_norm.weight"
        );
        assert_eq!(
            hf_name("blk.2.ffn_norm.weight"),
            "model.layers.2.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight"), "lm_head.weight");
    }

    #[test]
    fn read_ahead_reads_the_whole_range_and_stops() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("wick-readahead-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; (READ_AHEAD_CHUNK * 2 + 5) as usize])
            .unwrap();
        drop(f);
        let f = File::open(&path).unwrap();
        assert!(ReadAhead::start(&f, 0..10, 0).is_none());
        assert!(ReadAhead::start(&f, 10..10, 4).is_none());
        let r = ReadAhead::start(&f, 3..READ_AHEAD_CHUNK * 2 + 5, 4).unwrap();
        assert_eq!(r.threads.len(), 3, "no more threads than chunks");
        r.join();
        // Reading past the end fails quietly.
        ReadAhead::start(&f, 0..READ_AHEAD_CHUNK * 4, 2)
            .unwrap()
            .join();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn gemma_layouts() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        let wrapped = HfLayout::detect(&names(&[
            "language_model.model.embed_tokens.weight",
            "language_model.model.layers.0.pre_feedforward_layernorm.weight",
        ]));
        assert_eq!(
            hf_name("blk.4.ffn_norm.weight", wrapped),
            "language_model.model.layers.4.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name("blk.4.post_attention_norm.weight", wrapped),
            "language_model.model.layers.4.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("blk.4.post_ffw_norm.weight", wrapped),
            "language_model.model.layers.4.post_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name("output_norm.weight", wrapped),
            "language_model.model.norm.weight"
        );
        let newer = HfLayout::detect(&names(&[
            "model.language_model.embed_tokens.weight",
            "model.language_model.layers.0.pre_feedforward_layernorm.weight",
        ]));
        assert_eq!(
            hf_name("token_embd.weight", newer),
            "model.language_model.embed_tokens.weight"
        );
        let plain = HfLayout::detect(&names(&["model.embed_tokens.weight"]));
        assert_eq!(plain, HfLayout::PLAIN);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // 2 heads of dim 4, one byte per row: HF rows 0..8; llama.cpp interleaves halves.
        let hf: Vec<u8> = (0..8).collect();
        let gguf: Vec<u8> = vec![0, 2, 1, 3, 4, 6, 5, 7];
        assert_eq!(unpermute_rows(&gguf, &[8, 1], 2), Some(hf));
        assert_eq!(unpermute_rows(&gguf, &[8, 1], 3), None);
    }
}
