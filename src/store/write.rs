//! The manifest side of writing: writing a manifest (last, atomically), copying a model
//! (a second manifest over the same blobs), deleting one (and the blobs no other manifest
//! uses) and creating one from an existing model or uploaded blobs plus text layers
//! (`/api/create`, `wick create`).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::blobs::normalize_digest;
use super::catalog::valid_model_file;
use super::gguf;
use super::safetensors::{self, media_type, INDEX, REQUIRED, SINGLE};
use super::{
    io_err, subdirs, write_atomic, ConfigBlob, Layer, LocalModel, Manifest, ModelName, Store,
    StoreError, MEDIA_CONFIG, MEDIA_LICENSE, MEDIA_MANIFEST, MEDIA_MODEL, MEDIA_PARAMS,
    MEDIA_SAFETENSORS, MEDIA_SYSTEM, MEDIA_TEMPLATE,
};

pub const MEDIA_MESSAGES: &str = "application/vnd.ollama.image.messages";

/// What a new model is made of (the parsed `/api/create` request).
#[derive(Debug, Default)]
pub struct CreateSpec {
    /// Start from this model's layers and config.
    pub base: Option<LocalModel>,
    /// A GGUF blob (`sha256:…`, already in the store) to use as the weights.
    pub gguf: Option<String>,
    /// Or a safetensors model's files, checked by [`Store::safetensors_model`].
    pub safetensors: Option<SafetensorsModel>,
    pub template: Option<String>,
    pub system: Option<String>,
    pub license: Vec<String>,
    /// Merged over the base model's parameters.
    pub parameters: Option<Map<String, Value>>,
    pub messages: Option<Vec<Value>>,
}

/// A safetensors model made of uploaded blobs: one named layer per file (as a Hugging Face
/// pull stores it) and its config blob.
#[derive(Debug)]
pub struct SafetensorsModel {
    pub layers: Vec<Layer>,
    pub config: ConfigBlob,
}

impl Store {
    /// Checks that `files` (file name -> `sha256:…` of an uploaded blob) make a model the
    /// loader can open: plain file names, every blob present, config.json, tokenizer.json,
    /// and weights (`model.safetensors`, or the index and every shard it names) whose
    /// headers parse; the family, parameter size and dtype come from the same reading a
    /// Hugging Face pull does ([`safetensors::config_blob`]). The layers come out in the
    /// order a Hugging Face pull writes them: the required files, the other small files,
    /// the index, the weights.
    pub fn safetensors_model(
        &self,
        files: &BTreeMap<String, String>,
    ) -> Result<SafetensorsModel, StoreError> {
        let bad = |msg: String| StoreError::BadModelFiles(msg);
        let mut paths: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut digests: BTreeMap<&str, (String, u64)> = BTreeMap::new();
        for (name, digest) in files {
            if !valid_model_file(name) {
                return Err(bad(format!(
                    "invalid file name {name:?}: a model's files must be plain names, at \
                     most one folder deep"
                )));
            }
            let digest = normalize_digest(digest)?;
            let path = self.blob_file(&digest)?;
            let size = match fs::metadata(&path) {
                Ok(m) if m.is_file() => m.len(),
                _ => return Err(StoreError::BlobNotFound(digest)),
            };
            paths.insert(name.clone(), path);
            digests.insert(name, (digest, size));
        }
        let not_a_model =
            |what: &str| bad(format!("the files are not a safetensors model: {what}"));
        for f in REQUIRED {
            if !paths.contains_key(f) {
                return Err(not_a_model(&format!("no {f}")));
            }
        }
        if !paths.contains_key(INDEX) && !paths.contains_key(SINGLE) {
            return Err(not_a_model(&format!("no weights ({SINGLE} or {INDEX})")));
        }
        // The headers are read here, so broken weights are refused before the model exists;
        // errors name the file, not its blob.
        let name_of = |p: &Path| {
            paths
                .iter()
                .find(|(_, q)| q.as_path() == p)
                .map_or_else(|| p.display().to_string(), |(n, _)| n.clone())
        };
        let weights = safetensors::weight_files(&paths).map_err(|e| match e {
            StoreError::BadSafetensors { path, msg } => {
                not_a_model(&format!("{}: {msg}", name_of(&path)))
            }
            e => e,
        })?;
        let weight_names: Vec<String> = weights.iter().map(|p| name_of(p)).collect();
        let mut order: Vec<&str> = REQUIRED.to_vec();
        order.extend(
            digests
                .keys()
                .copied()
                .filter(|n| !REQUIRED.contains(n) && *n != INDEX && !n.ends_with(".safetensors")),
        );
        if paths.contains_key(INDEX) {
            order.push(INDEX);
        }
        // Other *.safetensors files (a repository's `consolidated.safetensors` beside its
        // shards) are not the model's and stay out of it.
        order.extend(weight_names.iter().map(String::as_str));
        let layers: Vec<Layer> = order
            .into_iter()
            .filter_map(|n| {
                let (digest, size) = digests.get(n)?;
                Some(Layer {
                    media_type: media_type(n).into(),
                    digest: digest.clone(),
                    size: *size,
                    from: None,
                    name: Some(n.to_string()),
                })
            })
            .collect();
        let all: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
        let config = safetensors::config_blob(&paths, &all).map_err(|e| match e {
            StoreError::BadSafetensors { path, msg } => {
                not_a_model(&format!("{}: {msg}", name_of(&path)))
            }
            e => e,
        })?;
        Ok(SafetensorsModel { layers, config })
    }

    /// Writes `bytes` as the manifest of `name` (temp file + rename) and returns the
    /// manifest it replaced, if any.
    pub fn write_manifest(
        &self,
        name: &ModelName,
        bytes: &[u8],
    ) -> Result<Option<Manifest>, StoreError> {
        let path = self.manifest_path(name);
        let old = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok());
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        write_atomic(&path, bytes)?;
        Ok(old)
    }

    /// Every digest some manifest in the store refers to. Fails if a manifest cannot be
    /// read, so that pruning never deletes a blob an unreadable manifest might need.
    pub fn referenced_digests(&self) -> Result<HashSet<String>, StoreError> {
        let mut out = HashSet::new();
        for host in subdirs(&self.root.join("manifests"))? {
            for ns in subdirs(&host)? {
                for model in subdirs(&ns)? {
                    let tags = fs::read_dir(&model).map_err(io_err(&model))?;
                    for tag in tags.flatten() {
                        let path = tag.path();
                        if !path.is_file() || tag.file_name().to_string_lossy().starts_with('.') {
                            continue;
                        }
                        let bytes = fs::read(&path).map_err(io_err(&path))?;
                        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
                            StoreError::BadManifest {
                                path: path.clone(),
                                msg: e.to_string(),
                            }
                        })?;
                        for l in m.layers.iter().chain(std::iter::once(&m.config)) {
                            if let Ok(d) = normalize_digest(&l.digest) {
                                out.insert(d);
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Removes those of `candidates` that no manifest refers to; returns how many went.
    /// Nothing is removed while a pull or create is under way (its blobs may not have a
    /// manifest yet); the blobs then stay until a later prune.
    pub fn prune_blobs(&self, candidates: &[String]) -> Result<usize, StoreError> {
        let Some(_lock) = self.try_prune_lock()? else {
            tracing::info!("a pull or create is under way; unused blobs are left for later");
            return Ok(0);
        };
        let used = self.referenced_digests()?;
        let mut removed = 0;
        for c in candidates {
            let Ok(d) = normalize_digest(c) else { continue };
            if used.contains(&d) {
                continue;
            }
            let path = self.blob_path(&d)?;
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::Io { path, source: e }),
            }
        }
        Ok(removed)
    }

    /// Deletes a model: its manifest, the directories that leaves empty, and the blobs no
    /// other manifest uses. A model of a read-only store is refused
    /// ([`StoreError::BakedModel`]).
    pub fn delete(&self, m: &LocalModel) -> Result<(), StoreError> {
        if let Some(root) = &m.readonly_root {
            return Err(StoreError::BakedModel {
                name: m.name.display_short(),
                root: root.clone(),
            });
        }
        self.check_writable()?;
        fs::remove_file(&m.manifest_path).map_err(io_err(&m.manifest_path))?;
        let top = self.root.join("manifests");
        let mut dir = m.manifest_path.parent();
        while let Some(d) = dir {
            if d == top || !d.starts_with(&top) || fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        let digests: Vec<String> = m
            .manifest
            .layers
            .iter()
            .chain(std::iter::once(&m.manifest.config))
            .map(|l| l.digest.clone())
            .collect();
        match self.prune_blobs(&digests) {
            Ok(_) => Ok(()),
            Err(e) => {
                // The model is gone; keeping blobs is the safe way to fail.
                tracing::warn!(error = %e, "not pruning blobs");
                Ok(())
            }
        }
    }

    /// Copies a model: the same manifest bytes under a second name.
    pub fn copy(&self, src: &LocalModel, dst: &ModelName) -> Result<(), StoreError> {
        self.check_writable()?;
        let bytes = fs::read(&src.manifest_path).map_err(io_err(&src.manifest_path))?;
        self.write_manifest(dst, &bytes)?;
        Ok(())
    }

    /// Stores a config blob and returns its manifest entry.
    fn config_layer(&self, bytes: &[u8]) -> Result<Layer, StoreError> {
        Ok(Layer {
            media_type: MEDIA_CONFIG.into(),
            digest: self.write_blob_bytes(bytes)?,
            size: bytes.len() as u64,
            from: None,
            name: None,
        })
    }

    /// Builds a model from `spec` and writes its manifest last; `status` hears Ollama's
    /// progress lines (`parsing GGUF`, `using existing layer …`, `creating new layer …`,
    /// `writing manifest`).
    pub fn create(
        &self,
        name: &ModelName,
        spec: CreateSpec,
        status: &mut dyn FnMut(String),
    ) -> Result<LocalModel, StoreError> {
        let guard = self.writer_guard()?;
        let mut layers: Vec<Layer> = Vec::new();
        let mut config_layer: Option<Layer> = None;
        let mut params = Map::new();
        if let Some(base) = &spec.base {
            layers = base.manifest.layers.clone();
            config_layer = Some(base.manifest.config.clone());
            params = self.params(base).unwrap_or_default();
        }
        if let Some(digest) = &spec.gguf {
            let digest = normalize_digest(digest)?;
            let path = self.blob_file(&digest)?;
            if !path.is_file() {
                return Err(StoreError::BlobNotFound(digest));
            }
            status("parsing GGUF".into());
            let summary = gguf::read_summary(&path, false)?;
            let size = fs::metadata(&path).map_err(io_err(&path))?.len();
            status(format!("using existing layer {digest}"));
            // New weights replace the old ones, GGUF or a safetensors model's files.
            layers.retain(|l| l.media_type != MEDIA_MODEL && l.name.is_none());
            layers.insert(
                0,
                Layer {
                    media_type: MEDIA_MODEL.into(),
                    digest: digest.clone(),
                    size,
                    from: None,
                    name: None,
                },
            );
            let config = ConfigBlob::for_gguf(&summary, &digest);
            config_layer = Some(self.config_layer(&to_json(&config, &path)?)?);
        }
        if let Some(model) = spec.safetensors {
            for l in &model.layers {
                status(format!("using existing layer {}", l.digest));
            }
            // New weights replace the old ones, GGUF or a safetensors model's files.
            layers.retain(|l| l.media_type != MEDIA_MODEL && l.name.is_none());
            layers.splice(0..0, model.layers);
            config_layer = Some(self.config_layer(&to_json(&model.config, &self.root)?)?);
        }
        let Some(config) = config_layer else {
            return Err(StoreError::NoModelLayer(name.display_short()));
        };
        if !layers
            .iter()
            .any(|l| l.media_type == MEDIA_MODEL || l.media_type == MEDIA_SAFETENSORS)
        {
            return Err(StoreError::NoModelLayer(name.display_short()));
        }

        let mut text_layer = |media: &str, bytes: Vec<u8>, layers: &mut Vec<Layer>| {
            let existed = normalize_digest(&format!("sha256:{}", sha_hex(&bytes)))
                .and_then(|d| self.has_blob(&d))
                .unwrap_or(false);
            let digest = self.write_blob_bytes(&bytes)?;
            status(if existed {
                format!("using existing layer {digest}")
            } else {
                format!("creating new layer {digest}")
            });
            layers.push(Layer {
                media_type: media.into(),
                digest,
                size: bytes.len() as u64,
                from: None,
                name: None,
            });
            Ok::<(), StoreError>(())
        };
        if let Some(t) = spec.template {
            layers.retain(|l| l.media_type != MEDIA_TEMPLATE);
            text_layer(MEDIA_TEMPLATE, t.into_bytes(), &mut layers)?;
        }
        if let Some(s) = spec.system {
            layers.retain(|l| l.media_type != MEDIA_SYSTEM);
            text_layer(MEDIA_SYSTEM, s.into_bytes(), &mut layers)?;
        }
        if !spec.license.is_empty() {
            layers.retain(|l| l.media_type != MEDIA_LICENSE);
            for l in spec.license {
                text_layer(MEDIA_LICENSE, l.into_bytes(), &mut layers)?;
            }
        }
        if let Some(new) = spec.parameters {
            params.extend(new);
            layers.retain(|l| l.media_type != MEDIA_PARAMS);
            let bytes = to_json(&params, &self.root)?;
            text_layer(MEDIA_PARAMS, bytes, &mut layers)?;
        }
        if let Some(msgs) = spec.messages {
            layers.retain(|l| l.media_type != MEDIA_MESSAGES);
            let bytes = to_json(&msgs, &self.root)?;
            text_layer(MEDIA_MESSAGES, bytes, &mut layers)?;
        }

        let manifest = Manifest {
            schema_version: 2,
            media_type: MEDIA_MANIFEST.into(),
            config,
            layers,
        };
        let path = self.manifest_path(name);
        let bytes = to_json(&manifest, &path)?;
        status("writing manifest".into());
        self.write_manifest(name, &bytes)?;
        drop(guard);
        self.resolve(name)
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn to_json(v: &impl serde::Serialize, path: &Path) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::BadManifest {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("wick-write-{tag}-{}", super::super::nanos()));
        fs::create_dir_all(&p).ok();
        p
    }

    fn manifest_over(store: &Store, blobs: &[&[u8]]) -> Vec<u8> {
        let layers: Vec<Value> = blobs
            .iter()
            .map(|b| {
                let d = store.write_blob_bytes(b).unwrap();
                serde_json::json!({"mediaType": MEDIA_MODEL, "digest": d, "size": b.len()})
            })
            .collect();
        let cfg = store.write_blob_bytes(b"{}").unwrap();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": cfg, "size": 2},
            "layers": layers,
        }))
        .unwrap()
    }

    #[test]
    fn delete_keeps_shared_blobs_and_prunes_the_rest() {
        let root = scratch("delete");
        let store = Store::new(&root);
        let a = ModelName::parse("a").unwrap();
        let b = ModelName::parse("ns/b:1").unwrap();
        store
            .write_manifest(&a, &manifest_over(&store, &[b"shared", b"only-a"]))
            .unwrap();
        store
            .write_manifest(&b, &manifest_over(&store, &[b"shared"]))
            .unwrap();
        let blob = |b: &[u8]| store.blob_path(&format!("sha256:{}", sha_hex(b))).unwrap();

        store.delete(&store.resolve(&a).unwrap()).unwrap();
        assert!(!blob(b"only-a").exists());
        assert!(blob(b"shared").exists());
        assert!(blob(b"{}").exists(), "config still used by b");
        assert!(!root.join("manifests/registry.ollama.ai/library").exists());

        store.copy(&store.resolve(&b).unwrap(), &a).unwrap();
        store.delete(&store.resolve(&b).unwrap()).unwrap();
        assert!(blob(b"shared").exists(), "the copy still uses it");
        // While a pull or create is under way nothing is pruned...
        let guard = store.writer_guard().unwrap();
        store.delete(&store.resolve(&a).unwrap()).unwrap();
        assert!(blob(b"shared").exists());
        drop(guard);
        // ...and a later prune finds what was left.
        let shared = format!("sha256:{}", sha_hex(b"shared"));
        assert_eq!(store.prune_blobs(&[shared]).unwrap(), 1);
        assert!(!blob(b"shared").exists());
        assert!(store.list().unwrap().is_empty());
        let _ = fs::remove_dir_all(root);
    }
}
