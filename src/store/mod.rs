//! The model directory, in Ollama's layout so existing `~/.ollama/models` stores work
//! unchanged: `manifests/<host>/<namespace>/<model>/<tag>` (Docker v2 manifests) and
//! content-addressed `blobs/sha256-<hex>`. Knows files and digests, never tensors.
//!
//! The read side (list, resolve a name, hand a model's files to the loader) lives here; the
//! write side is split by concern: [`blobs`] (crash- and NAS-safe blob writing, resumable
//! downloads, cross-process locks), [`pull`] (the Ollama registry protocol), [`hf`]
//! (Hugging Face safetensors repositories), [`catalog`] (names mapped to repositories),
//! [`sources`] (which of those a pull goes to) and [`write`](mod@write) (manifests: create, copy,
//! delete with blob pruning). [`gguf`] and [`safetensors`] read what `/api/show` and the
//! config blob say about the two weight formats, from headers only.
//!
//! `OLLAMA_MODELS` is the one store written to; `WICK_MODELS_READONLY` adds stores (a model
//! baked into a container image, a read-only NAS share) that are searched after it and never
//! written: names resolve in the writable store first, `list` shows every store's models once,
//! and a blob is read from whichever store has it, so a pull whose layers a read-only store
//! already holds downloads nothing. Writes (pull, create, copy, delete, upload) touch only
//! `OLLAMA_MODELS`, and fail with [`StoreError::ReadOnly`] when that is a read-only mount.
//!
//! A model is either a GGUF model (an `application/vnd.ollama.image.model` layer) or a
//! safetensors model: one layer per file of its Hugging Face directory, each with the
//! file's name in the layer's `name` ([`MEDIA_JSON`], [`MEDIA_SAFETENSORS`],
//! [`MEDIA_FILE`]). Its config blob says `model_format: safetensors`, the family from
//! `model_type`, the parameter count from the safetensors headers and the dtype (`BF16`,
//! `F16`, `F32`) as the quantization level. [`Store::model_files`] gives the loader a path
//! for either: the GGUF blob, or a directory of links to the safetensors model's blobs under
//! the system temp directory, removed once the weights are mapped.
//!
//! Temp files of writes that a crash cut short (hidden `.<tag>.tmp-*` manifests,
//! `.upload-*` blobs, `-partial` downloads) are never listed, and [`Store::remove_stale`]
//! clears them at start-up once they are a day old and no live process holds them.

pub mod blobs;
pub mod catalog;
pub mod gguf;
pub mod hf;
pub mod name;
pub mod pull;
pub mod safetensors;
pub mod sources;
pub mod write;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use gguf::{human_params, GgufSummary};
pub use name::ModelName;

pub const MEDIA_MODEL: &str = "application/vnd.ollama.image.model";
pub const MEDIA_TEMPLATE: &str = "application/vnd.ollama.image.template";
pub const MEDIA_SYSTEM: &str = "application/vnd.ollama.image.system";
pub const MEDIA_PARAMS: &str = "application/vnd.ollama.image.params";
pub const MEDIA_LICENSE: &str = "application/vnd.ollama.image.license";
pub const MEDIA_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// A whole JSON file of a Hugging Face model directory (config.json, tokenizer.json, the
/// shard index, ...), its file name in the layer's `name`: Ollama's own convention for
/// safetensors models.
pub const MEDIA_JSON: &str = "application/vnd.ollama.image.json";
/// A whole `.safetensors` weight file, its file name in `name`. Ours: Ollama's `tensor`
/// layers hold one tensor each, not whole files.
pub const MEDIA_SAFETENSORS: &str = "application/vnd.candlewick.image.safetensors";
/// Any other whole file of a model directory (`chat_template.jinja`, ...), named in `name`.
pub const MEDIA_FILE: &str = "application/vnd.candlewick.image.file";

/// Everything that goes wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid model name")]
    InvalidName(String),
    #[error("model \"{0}\" not found")]
    NotFound(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid manifest: {msg}")]
    BadManifest { path: PathBuf, msg: String },
    #[error("{path}: not a usable GGUF file: {msg}")]
    BadGguf { path: PathBuf, msg: String },
    #[error("invalid digest format")]
    BadDigest(String),
    #[error("{0}: the manifest has no model layer")]
    NoModelLayer(String),
    /// A downloaded blob whose bytes do not hash to its digest; nothing of it is kept.
    #[error("digest mismatch, file must be downloaded again: want {want}, got {got}")]
    DownloadMismatch { want: String, got: String },
    /// An uploaded blob whose bytes do not hash to the digest it was posted under.
    #[error("digest mismatch, expected \"{expected}\", got \"{got}\"")]
    UploadMismatch { expected: String, got: String },
    /// The registry refused or could not be reached; the message is the whole text.
    #[error("{0}")]
    Registry(String),
    /// A blob that a request names is not in `blobs/`.
    #[error("blob \"{0}\" not found")]
    BlobNotFound(String),
    /// The registry does not have the name (404), in Ollama's words.
    #[error("pull model manifest: file does not exist")]
    ManifestNotFound,
    /// The registry could not be reached or failed (no connection, timeout, 5xx); the
    /// message is the whole text.
    #[error("{0}")]
    RegistryUnreachable(String),
    #[error("{path}: not a usable safetensors model: {msg}")]
    BadSafetensors { path: PathBuf, msg: String },
    /// A layer `name` that is not a plain file name, which a model directory cannot hold.
    #[error("{0}: the manifest names a file {1:?} that cannot be part of a model directory")]
    BadFileName(String, String),
    /// `/api/create` files that do not make a loadable safetensors model.
    #[error("{0}")]
    BadModelFiles(String),
    /// A blob larger than any model file could be (a registry's manifest said so).
    #[error(
        "the registry declares a blob of {size} bytes, more than the {limit} a model file may have"
    )]
    BlobTooLarge { size: u64, limit: u64 },
    /// Not enough free space for a download; nothing of it was written.
    #[error("not enough disk space for the model: a blob needs {need} more bytes, {free} are free in the model directory")]
    DiskFull { need: u64, free: u64 },
    #[error(transparent)]
    Hf(#[from] hf::HfError),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    /// `OLLAMA_MODELS` cannot be written (a read-only mount, or no permission).
    #[error(
        "the model directory {path} (OLLAMA_MODELS) is read-only ({reason}): serving works, \
         but pulls, creates, copies and deletes need a writable OLLAMA_MODELS"
    )]
    ReadOnly { path: PathBuf, reason: String },
    /// The model lives in a `WICK_MODELS_READONLY` store, which is never written.
    #[error(
        "model \"{name}\" is in the read-only store {root} (WICK_MODELS_READONLY) and cannot be \
         deleted"
    )]
    BakedModel { name: String, root: PathBuf },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One layer (or the config) of a manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layer {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The file this layer is, in a model stored as files (safetensors models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A Docker distribution v2 manifest as Ollama writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub config: Layer,
    pub layers: Vec<Layer>,
}

/// The config blob: what `details` in `/api/tags` and `/api/show` comes from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigBlob {
    #[serde(default)]
    pub model_format: String,
    #[serde(default)]
    pub model_family: String,
    #[serde(default)]
    pub model_families: Option<Vec<String>>,
    #[serde(default)]
    pub model_type: String,
    #[serde(default)]
    pub file_type: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<serde_json::Value>,
}

impl ConfigBlob {
    /// The config of a GGUF model layer with `digest`, as Ollama writes it.
    pub fn for_gguf(summary: &GgufSummary, digest: &str) -> ConfigBlob {
        ConfigBlob {
            model_format: "gguf".into(),
            model_family: summary.architecture.clone(),
            model_families: Some(vec![summary.architecture.clone()]),
            model_type: human_params(summary.parameter_count),
            file_type: summary.file_type.clone(),
            architecture: "amd64".into(),
            os: "linux".into(),
            rootfs: Some(serde_json::json!({"type": "layers", "diff_ids": [digest]})),
        }
    }
}

/// A model found in the store.
#[derive(Debug, Clone)]
pub struct LocalModel {
    /// The name with the stored casing.
    pub name: ModelName,
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    /// Lowercase hex sha256 of the manifest bytes.
    pub digest: String,
    pub modified: SystemTime,
    /// Sum of the layer sizes and the config size.
    pub size: u64,
    pub config: ConfigBlob,
    /// Found in a `WICK_MODELS_READONLY` store (this one), not in `OLLAMA_MODELS`.
    pub readonly_root: Option<PathBuf>,
}

/// Model families that are encoders serving embeddings only (GGUF architecture names as
/// llama.cpp and Ollama write them, and config.json `model_type`s).
pub const EMBEDDING_FAMILIES: &[&str] = &[
    "bert",
    "nomic-bert",
    "nomic_bert",
    "jina-bert-v2",
    "xlm-roberta",
    "roberta",
];

impl LocalModel {
    /// Whether the model only computes embeddings (an encoder family): `/api/show` says
    /// `embedding`, and chat and generate are refused before loading, as Ollama does.
    pub fn is_embedding(&self) -> bool {
        EMBEDDING_FAMILIES.contains(&self.config.model_family.as_str())
    }

    fn layer(&self, media_type: &str) -> Option<&Layer> {
        self.manifest
            .layers
            .iter()
            .find(|l| l.media_type == media_type)
    }
}

/// The store rooted at `$OLLAMA_MODELS`, with the read-only stores searched after it.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    readonly: Vec<PathBuf>,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store {
            root: root.into(),
            readonly: Vec::new(),
        }
    }

    /// Adds read-only stores (`WICK_MODELS_READONLY`), searched in this order after the
    /// writable one; one that is the writable store itself is left out.
    pub fn with_readonly(mut self, dirs: impl IntoIterator<Item = PathBuf>) -> Store {
        for d in dirs {
            if d != self.root && !self.readonly.contains(&d) {
                self.readonly.push(d);
            }
        }
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The read-only stores, in search order.
    pub fn readonly_roots(&self) -> &[PathBuf] {
        &self.readonly
    }

    /// Fails with [`StoreError::ReadOnly`] unless `OLLAMA_MODELS` (or, while it does not
    /// exist yet, the directory it would be created in) can be written: a clear answer
    /// before a pull or create starts, rather than an I/O error halfway through it.
    pub fn check_writable(&self) -> Result<(), StoreError> {
        let mut dir = self.root.as_path();
        while !dir.exists() {
            match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => dir = p,
                _ => return Ok(()),
            }
        }
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
            return Ok(());
        };
        // SAFETY: `c` is a NUL-terminated path that outlives the call; access() only reads it.
        let rc = unsafe { libc::access(c.as_ptr(), libc::W_OK) };
        if rc == 0 {
            return Ok(());
        }
        Err(StoreError::ReadOnly {
            path: self.root.clone(),
            reason: std::io::Error::last_os_error().to_string(),
        })
    }

    fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    /// Every file under `manifests/<host>/<namespace>/<model>/`, temp files included.
    pub(crate) fn manifest_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for host in subdirs(&self.manifests_dir()).unwrap_or_default() {
            for ns in subdirs(&host).unwrap_or_default() {
                for model in subdirs(&ns).unwrap_or_default() {
                    if let Ok(tags) = fs::read_dir(&model) {
                        out.extend(tags.flatten().map(|t| t.path()).filter(|p| p.is_file()));
                    }
                }
            }
        }
        out
    }

    /// `blobs/`, where every layer lives under its digest.
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// Where the manifest of `name` lives (whether or not it exists).
    pub fn manifest_path(&self, name: &ModelName) -> PathBuf {
        self.manifests_dir().join(name.manifest_rel_path())
    }

    /// The file of a blob; `digest` is `sha256:<64 hex>` (or `sha256-`).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = digest
            .strip_prefix("sha256:")
            .or_else(|| digest.strip_prefix("sha256-"))
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| StoreError::BadDigest(digest.to_string()))?;
        Ok(self.root.join("blobs").join(format!("sha256-{hex}")))
    }

    /// Where a blob is read from: the first store that has it (`OLLAMA_MODELS`, then the
    /// read-only ones), or its place in `OLLAMA_MODELS` when none does.
    pub fn blob_file(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let own = self.blob_path(digest)?;
        if own.is_file() {
            return Ok(own);
        }
        let name = own.file_name().map(PathBuf::from).unwrap_or_default();
        Ok(self
            .readonly
            .iter()
            .map(|r| r.join("blobs").join(&name))
            .find(|p| p.is_file())
            .unwrap_or(own))
    }

    /// Every model whose manifest parses, most recently modified first; a name in several
    /// stores is listed once, as the store it resolves to (the writable one first).
    /// Unreadable entries are skipped with a warning so one bad file does not hide the rest.
    pub fn list(&self) -> Result<Vec<LocalModel>, StoreError> {
        let mut out = self.list_root(&self.root, None)?;
        let key = |n: &ModelName| {
            format!("{}/{}/{}:{}", n.host, n.namespace, n.model, n.tag).to_ascii_lowercase()
        };
        let mut seen: std::collections::HashSet<String> =
            out.iter().map(|m| key(&m.name)).collect();
        for ro in &self.readonly {
            match self.list_root(ro, Some(ro)) {
                Ok(models) => {
                    for m in models {
                        if seen.insert(key(&m.name)) {
                            out.push(m);
                        }
                    }
                }
                // A read-only store that cannot be read hides only its own models.
                Err(e) => {
                    tracing::warn!(store = %ro.display(), error = %e, "skipping read-only store")
                }
            }
        }
        out.sort_by_key(|m| std::cmp::Reverse(m.modified));
        Ok(out)
    }

    fn list_root(
        &self,
        root: &Path,
        readonly: Option<&Path>,
    ) -> Result<Vec<LocalModel>, StoreError> {
        let mut out = Vec::new();
        let top = root.join("manifests");
        // Exactly four levels: host/namespace/model/tag.
        for host in subdirs(&top)? {
            for ns in subdirs(&host)? {
                for model in subdirs(&ns)? {
                    let Ok(tags) = fs::read_dir(&model) else {
                        continue;
                    };
                    for tag in tags.flatten() {
                        let path = tag.path();
                        // Hidden files are temp manifests of a write in progress or cut
                        // short (tags never start with a dot).
                        if !path.is_file() || file_name(&path).starts_with('.') {
                            continue;
                        }
                        let name = ModelName {
                            host: file_name(&host),
                            namespace: file_name(&ns),
                            model: file_name(&model),
                            tag: file_name(&path),
                        };
                        match self.load(name, path, readonly) {
                            Ok(m) => out.push(m),
                            Err(e) => tracing::warn!(error = %e, "skipping model"),
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Finds a model by name, in `OLLAMA_MODELS` and then in each read-only store, matching
    /// each path component case-insensitively (an exact match wins) and keeping the stored
    /// casing.
    pub fn resolve(&self, name: &ModelName) -> Result<LocalModel, StoreError> {
        if let Some(m) = self.resolve_in(&self.root, None, name)? {
            return Ok(m);
        }
        for ro in &self.readonly {
            if let Some(m) = self.resolve_in(ro, Some(ro), name)? {
                return Ok(m);
            }
        }
        Err(StoreError::NotFound(name.display_short()))
    }

    fn resolve_in(
        &self,
        root: &Path,
        readonly: Option<&Path>,
        name: &ModelName,
    ) -> Result<Option<LocalModel>, StoreError> {
        let mut dir = root.join("manifests");
        let mut parts = Vec::with_capacity(4);
        for want in [&name.host, &name.namespace, &name.model, &name.tag] {
            let Some(found) = find_ci(&dir, want) else {
                return Ok(None);
            };
            parts.push(found.clone());
            dir = dir.join(found);
        }
        if !dir.is_file() {
            return Ok(None);
        }
        let stored = ModelName {
            host: parts[0].clone(),
            namespace: parts[1].clone(),
            model: parts[2].clone(),
            tag: parts[3].clone(),
        };
        self.load(stored, dir, readonly).map(Some)
    }

    fn load(
        &self,
        name: ModelName,
        path: PathBuf,
        readonly: Option<&Path>,
    ) -> Result<LocalModel, StoreError> {
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::BadManifest {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        let modified = fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(io_err(&path))?;
        let size = manifest.config.size + manifest.layers.iter().map(|l| l.size).sum::<u64>();
        // A missing or odd config only loses `details`; the model itself still works.
        let config = self
            .blob_file(&manifest.config.digest)
            .ok()
            .and_then(|p| fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(LocalModel {
            name,
            digest: hex::encode(Sha256::digest(&bytes)),
            manifest,
            manifest_path: path,
            modified,
            size,
            config,
            readonly_root: readonly.map(Path::to_path_buf),
        })
    }

    /// The GGUF weights of a model.
    pub fn model_blob(&self, m: &LocalModel) -> Result<PathBuf, StoreError> {
        let layer = m
            .layer(MEDIA_MODEL)
            .ok_or_else(|| StoreError::NoModelLayer(m.name.display_short()))?;
        self.blob_file(&layer.digest)
    }

    /// The files of a safetensors model by their names (`config.json` -> its blob), or
    /// `None` for a model without named files (GGUF).
    pub fn named_files(
        &self,
        m: &LocalModel,
    ) -> Result<Option<BTreeMap<String, PathBuf>>, StoreError> {
        let mut files = BTreeMap::new();
        for l in &m.manifest.layers {
            let Some(name) = &l.name else { continue };
            if !matches!(
                l.media_type.as_str(),
                MEDIA_JSON | MEDIA_SAFETENSORS | MEDIA_FILE
            ) {
                continue;
            }
            if !catalog::valid_model_file(name) {
                return Err(StoreError::BadFileName(
                    m.name.display_short(),
                    name.clone(),
                ));
            }
            files.insert(name.clone(), self.blob_file(&l.digest)?);
        }
        if files.is_empty()
            || !m
                .manifest
                .layers
                .iter()
                .any(|l| l.media_type == MEDIA_SAFETENSORS)
        {
            return Ok(None);
        }
        Ok(Some(files))
    }

    /// What the loader needs: the GGUF blob, or for a safetensors model a directory of
    /// links named as its files, pointing at their blobs (`Model::load` takes a Hugging
    /// Face directory; mmap follows the links). The directory is private to this process
    /// and goes away with the returned value, so nothing but blobs and manifests is ever
    /// written into the shared store.
    pub fn model_files(&self, m: &LocalModel) -> Result<ModelFiles, StoreError> {
        if m.layer(MEDIA_MODEL).is_some() {
            return self.model_blob(m).map(ModelFiles::Gguf);
        }
        let Some(files) = self.named_files(m)? else {
            return Err(StoreError::NoModelLayer(m.name.display_short()));
        };
        LinkedDir::create(&m.digest, &files).map(ModelFiles::Linked)
    }

    /// What `/api/show` says about the weights: from the GGUF header, or from a
    /// safetensors model's config.json, tokenizer_config.json and weight headers (in the
    /// same GGUF key names).
    pub fn summary(&self, m: &LocalModel, verbose: bool) -> Result<GgufSummary, StoreError> {
        if m.layer(MEDIA_MODEL).is_some() {
            return gguf::read_summary(&self.model_blob(m)?, verbose);
        }
        match self.named_files(m)? {
            Some(files) => safetensors::summary(&files, verbose),
            None => Err(StoreError::NoModelLayer(m.name.display_short())),
        }
    }

    /// The text of a layer (template, system, license) if the model has one.
    pub fn layer_text(&self, m: &LocalModel, media_type: &str) -> Option<String> {
        let layer = m.layer(media_type)?;
        fs::read_to_string(self.blob_file(&layer.digest).ok()?).ok()
    }

    /// The `params` layer (default options), if any.
    pub fn params(&self, m: &LocalModel) -> Option<serde_json::Map<String, serde_json::Value>> {
        serde_json::from_str(&self.layer_text(m, MEDIA_PARAMS)?).ok()
    }

    /// Registers a GGUF file under `name` the way Ollama would: the file is copied to its
    /// blob (temp file + rename), a config blob is written, and the manifest last, so a
    /// crash never leaves a manifest pointing at a missing blob.
    pub fn import_gguf(&self, name: &ModelName, gguf: &Path) -> Result<LocalModel, StoreError> {
        self.check_writable()?;
        let summary = gguf::read_summary(gguf, false)?;
        let blobs = self.root.join("blobs");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let (digest, size) = self.copy_blob(gguf)?;
        let config = ConfigBlob::for_gguf(&summary, &digest);
        let config_bytes = serde_json::to_vec(&config).map_err(|e| StoreError::BadManifest {
            path: gguf.to_path_buf(),
            msg: e.to_string(),
        })?;
        let config_digest = self.write_blob_bytes(&config_bytes)?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: MEDIA_MANIFEST.into(),
            config: Layer {
                media_type: MEDIA_CONFIG.into(),
                digest: config_digest,
                size: config_bytes.len() as u64,
                from: None,
                name: None,
            },
            layers: vec![Layer {
                media_type: MEDIA_MODEL.into(),
                digest,
                size,
                from: None,
                name: None,
            }],
        };
        let path = self.manifests_dir().join(name.manifest_rel_path());
        let bytes = serde_json::to_vec(&manifest).map_err(|e| StoreError::BadManifest {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        write_atomic(&path, &bytes)?;
        self.resolve(name)
    }

    /// Copies a file into `blobs/` under its sha256, hashing while copying.
    fn copy_blob(&self, src: &Path) -> Result<(String, u64), StoreError> {
        let blobs = self.root.join("blobs");
        let tmp = blobs.join(format!(".import-{}-{}", std::process::id(), nanos()));
        let result = (|| {
            let mut input = fs::File::open(src).map_err(io_err(src))?;
            let mut out = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut size = 0u64;
            loop {
                let n = input.read(&mut buf).map_err(io_err(src))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
                size += n as u64;
            }
            out.sync_all().map_err(io_err(&tmp))?;
            let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
            let dst = self.blob_path(&digest)?;
            fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
            Ok((digest, size))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Writes a small blob (config, template, params) under its digest unless it is there.
    pub fn write_blob_bytes(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        if !self.blob_file(&digest)?.is_file() {
            let path = self.blob_path(&digest)?;
            let blobs = self.root.join("blobs");
            fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
            write_atomic(&path, bytes)?;
        }
        Ok(digest)
    }
}

/// The weights of a model as the loader takes them.
#[derive(Debug)]
pub enum ModelFiles {
    /// A GGUF blob.
    Gguf(PathBuf),
    /// A Hugging Face directory made of links to blobs.
    Linked(LinkedDir),
}

impl ModelFiles {
    pub fn path(&self) -> &Path {
        match self {
            ModelFiles::Gguf(p) => p,
            ModelFiles::Linked(d) => &d.path,
        }
    }
}

/// A directory of symbolic links `<file name> -> blobs/sha256-…` under the system temp
/// directory, one per load, removed when dropped. Once the model is loaded it is no longer
/// needed: the maps and open files hold the blobs, not the links.
#[derive(Debug)]
pub struct LinkedDir {
    path: PathBuf,
}

impl LinkedDir {
    fn create(digest: &str, files: &BTreeMap<String, PathBuf>) -> Result<LinkedDir, StoreError> {
        let parent = std::env::temp_dir().join(format!("wick-{}", std::process::id()));
        let path = parent.join(format!("{}-{}", &digest[..digest.len().min(12)], nanos()));
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        let dir = LinkedDir { path };
        for (name, blob) in files {
            // Absolute targets: the store root may be given as a relative path.
            let target = fs::canonicalize(blob).map_err(io_err(blob))?;
            let link = dir.path.join(name);
            // `1_Pooling/config.json`: names were checked to be at most one folder deep.
            if let Some(parent) = link.parent().filter(|p| *p != dir.path) {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            std::os::unix::fs::symlink(&target, &link).map_err(io_err(&link))?;
        }
        Ok(dir)
    }
}

impl Drop for LinkedDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
        // The per-process parent goes once no other load uses it (this fails otherwise).
        if let Some(parent) = self.path.parent() {
            let _ = fs::remove_dir(parent);
        }
    }
}

pub(crate) fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{}", std::process::id(), nanos()));
    // Synced before the rename, so readers (other processes, other NAS clients) see either
    // the old file or the whole new one.
    let result = fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(io_err(path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Subdirectories of `dir`; a missing `dir` is an empty store, not an error.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    match fs::read_dir(dir) {
        Ok(rd) => Ok(rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// The entry of `dir` named `want`, exactly or else ignoring ASCII case.
fn find_ci(dir: &Path, want: &str) -> Option<String> {
    if dir.join(want).exists() {
        return Some(want.to_string());
    }
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.eq_ignore_ascii_case(want))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("wick-store-{tag}-{}", nanos()));
        fs::create_dir_all(&p).ok();
        p
    }

    #[test]
    fn resolves_case_insensitively_and_lists() {
        let root = scratch("ci");
        let store = Store::new(&root);
        let blob = b"fake gguf";
        let digest = store.write_blob_bytes(blob).unwrap();
        let cfg = store
            .write_blob_bytes(b"{\"model_format\":\"gguf\",\"model_family\":\"llama\"}")
            .unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": cfg, "size": 45},
            "layers": [{"mediaType": MEDIA_MODEL, "digest": digest, "size": 9}],
        });
        let dir = root.join("manifests/registry.ollama.ai/library/MyModel");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("Latest"), manifest.to_string()).unwrap();

        let name = ModelName::parse("mymodel").unwrap();
        let m = store.resolve(&name).unwrap();
        assert_eq!(m.name.display_short(), "MyModel:Latest");
        assert_eq!(m.size, 54);
        assert_eq!(m.config.model_family, "llama");
        assert!(store.model_blob(&m).unwrap().is_file());
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert!(matches!(
            store.resolve(&ModelName::parse("other").unwrap()),
            Err(StoreError::NotFound(_))
        ));
        let _ = fs::remove_dir_all(root);
    }

    #[test]
    fn empty_store_lists_nothing() {
        let store = Store::new(scratch("empty").join("nope"));
        assert!(store.list().unwrap().is_empty());
        assert!(store.blob_path("sha256:zz").is_err());
    }
}
