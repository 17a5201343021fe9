//! Pulling Hugging Face safetensors models: a repository's `config.json`, tokenizer files,
//! generation config and `model.safetensors` (or the shards its index names) become one
//! manifest in Ollama's layout, one blob per file, each layer carrying its file name, plus a
//! config blob (`model_format: "safetensors"`) and, from the catalog, a `params` layer.
//!
//! The `hf-hub` crate names the Hub: its endpoint (`HF_ENDPOINT`, default
//! `https://huggingface.co`), the token (`HF_TOKEN`, else the token file under `HF_HOME`),
//! the repository listing `GET /api/models/<repo>/revision/<rev>?blobs=true` (file names,
//! sizes, and the sha256 of every LFS file) and the file URLs
//! `/<repo>/resolve/<rev>/<file>`. The bytes do not go through hf-hub's own download: that
//! writes into its cache (`~/.cache/huggingface/hub`, blobs plus snapshot links), which
//! would hold every model a second time beside our store, and it does not check the
//! content against the sha256. Instead, with an HTTP client of our own (the same token;
//! HTTP/1.1, so parallel ranged parts get connections of their own; a connect timeout):
//!
//! - Every file comes from the commit the listing names, so a repository that changes
//!   during a pull cannot mix two versions.
//! - LFS files (weights, large tokenizers) go through [`Store::fetch_blob`] under the
//!   sha256 the Hub lists for them: ranged, resumable, hashed before they get their name,
//!   one download per blob across processes.
//! - Small files stored in git (config.json, tokenizer_config.json, ...) have no sha256 on
//!   the Hub (only a git blob id), so they are fetched whole (they are at most a few MB),
//!   checked against the listed size, hashed, and stored under that hash.
//!
//! The listing comes first and decides whether a repository is a usable model at all: it
//! must hold `config.json`, `tokenizer.json` and `model.safetensors` or
//! `model.safetensors.index.json`. A repository that does not exist (or is private without
//! a token) is `pull model manifest: file does not exist`, as in Ollama.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use hf_hub::api::tokio::{Api, ApiBuilder};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::blobs::{error_chain, normalize_digest, Source};
use super::catalog::{valid_file_name, valid_repo, valid_revision, HfSource};
use super::pull::{fetch_reporting, finish_pull, repository_url, PullProgress};
use super::safetensors::{self, media_type, INDEX, REQUIRED, SINGLE};
use super::{
    Layer, Manifest, ModelName, Store, StoreError, MEDIA_CONFIG, MEDIA_FILE, MEDIA_MANIFEST,
    MEDIA_PARAMS,
};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Files taken when the repository has them; the last three make a sentence-transformers
/// repository an embedding model with its pooling and normalisation.
const OPTIONAL: [&str; 7] = [
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];
/// Files the Hub keeps in git are under 10 MB; a file this large without a sha256 is not
/// taken on trust.
const MAX_UNHASHED: u64 = 64 << 20;
/// A request that sends nothing for this long is given up.
const STALL: Duration = Duration::from_secs(30);

/// What goes wrong talking to the Hub.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// No such repository or revision (the Hub answers private repositories the same way).
    #[error("pull model manifest: file does not exist")]
    NotFound,
    #[error("pull model manifest: {repo}: {status}: {msg}")]
    Listing {
        repo: String,
        status: u16,
        msg: String,
    },
    #[error("pull model manifest: {0}")]
    Unreachable(String),
    #[error("{repo}: the Hub refused {file}: {msg} (a gated or private repository needs HF_TOKEN set to a token with access)")]
    Refused {
        repo: String,
        file: String,
        msg: String,
    },
    #[error("{repo} is not a safetensors model: it has no {what}")]
    Missing { repo: String, what: String },
    #[error("downloading {file}: {msg}")]
    Download { file: String, msg: String },
    #[error("{file}: the Hub gives no sha256 for it and it is {size} bytes, too large to take unchecked")]
    Unverifiable { file: String, size: u64 },
    #[error("{file}: the Hub lists {want} bytes, got {got}")]
    SizeMismatch { file: String, want: u64, got: u64 },
    #[error("{repo}: {msg}")]
    BadListing { repo: String, msg: String },
    #[error("starting the Hugging Face client: {0}")]
    Client(String),
}

/// The repository listing (`?blobs=true`).
#[derive(Debug, Clone, Deserialize)]
pub struct Listing {
    /// The commit the listing describes.
    pub sha: String,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Sibling {
    pub rfilename: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Lfs {
    pub sha256: String,
    pub size: u64,
}

impl Listing {
    fn sibling(&self, file: &str) -> Option<&Sibling> {
        self.siblings.iter().find(|s| s.rfilename == file)
    }

    fn has(&self, file: &str) -> bool {
        self.sibling(file).is_some()
    }

    /// A model we can pull and run: config, tokenizer and safetensors weights, and no GGUF
    /// files (a repository with GGUF files is for the registry shim).
    pub fn is_safetensors_model(&self) -> bool {
        REQUIRED.iter().all(|f| self.has(f))
            && (self.has(SINGLE) || self.has(INDEX))
            && !self.siblings.iter().any(|s| s.rfilename.ends_with(".gguf"))
    }
}

/// A Hugging Face Hub client.
#[derive(Clone, Debug)]
pub struct HfHub {
    api: Api,
    /// For the files: HTTP/1.1, so the parallel ranged parts of a weight file get a TCP
    /// connection each (one HTTP/2 connection to the CDN would carry them all), with a
    /// connect timeout and the token.
    files: reqwest::Client,
    endpoint: String,
}

impl HfHub {
    /// `endpoint`: `HF_ENDPOINT` (default `https://huggingface.co`); `token`: `HF_TOKEN`
    /// (default: the token file hf-hub finds under `HF_HOME`).
    pub fn new(endpoint: Option<&str>, token: Option<&str>) -> Result<HfHub, HfError> {
        let endpoint = endpoint
            .map(|e| e.trim_end_matches('/'))
            .filter(|e| !e.is_empty())
            .unwrap_or(DEFAULT_ENDPOINT)
            .to_string();
        let cache = Cache::from_env();
        let token = token
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .or_else(|| cache.token());
        let api = ApiBuilder::from_cache(cache)
            .with_endpoint(endpoint.clone())
            .with_token(token.clone())
            .with_progress(false)
            .with_user_agent("candlewick", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| HfError::Client(e.to_string()))?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| HfError::Client("HF_TOKEN is not a valid header value".into()))?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        // reqwest drops the Authorization header when a redirect leaves the Hub's host, so
        // the LFS storage never sees the token.
        let files = reqwest::Client::builder()
            .user_agent(format!("candlewick/{}", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(30))
            .http1_only()
            .build()
            .map_err(|e| HfError::Client(error_chain(&e)))?;
        Ok(HfHub {
            api,
            files,
            endpoint,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Where the registry shim for `hf.co/<user>/<repo>` lives: `https://hf.co/v2/...` on
    /// the real Hub, `<HF_ENDPOINT>/v2/...` when the Hub is elsewhere (a mirror), so that
    /// such names never go to the internet behind the user's back.
    pub fn registry_base(&self, name: &ModelName, insecure: bool) -> String {
        if self.endpoint == DEFAULT_ENDPOINT {
            repository_url(name, insecure)
        } else {
            format!("{}/v2/{}/{}", self.endpoint, name.namespace, name.model)
        }
    }

    /// The listing of `src.repo` at `src.revision`.
    pub async fn listing(&self, src: &HfSource) -> Result<Listing, HfError> {
        if !valid_repo(&src.repo) || !valid_revision(&src.revision) {
            return Err(HfError::NotFound);
        }
        let repo = self.api.repo(Repo::with_revision(
            src.repo.clone(),
            RepoType::Model,
            src.revision.clone(),
        ));
        let send = repo.info_request().query(&[("blobs", "true")]).send();
        let resp = tokio::time::timeout(2 * STALL, send)
            .await
            .map_err(|_| HfError::Unreachable(format!("{}: no answer", self.endpoint)))?
            .map_err(|e| HfError::Unreachable(error_chain(&e)))?;
        let status = resp.status();
        // The Hub answers 401 for repositories that do not exist and for private ones, so
        // as not to tell them apart.
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(HfError::NotFound);
        }
        if !status.is_success() {
            let msg = hub_message(resp).await;
            if status.is_server_error() {
                return Err(HfError::Unreachable(format!(
                    "{}: {}: {msg}",
                    src.repo,
                    status.as_u16()
                )));
            }
            return Err(HfError::Listing {
                repo: src.repo.clone(),
                status: status.as_u16(),
                msg,
            });
        }
        let listing: Listing = resp.json().await.map_err(|e| HfError::BadListing {
            repo: src.repo.clone(),
            msg: format!("unreadable listing: {}", error_chain(&e)),
        })?;
        if !valid_revision(&listing.sha) {
            return Err(HfError::BadListing {
                repo: src.repo.clone(),
                msg: format!("odd commit id {:?}", listing.sha),
            });
        }
        Ok(listing)
    }

    /// Pulls `src` into the store as `name`, with `params` (from the catalog) as its
    /// default options. `pulling manifest` has been reported by the caller.
    pub async fn pull(
        &self,
        store: &Store,
        name: &ModelName,
        src: &HfSource,
        params: Option<&Map<String, Value>>,
        emit: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), StoreError> {
        let listing = self.listing(src).await?;
        self.pull_listed(store, name, src, &listing, params, emit)
            .await
    }

    /// [`HfHub::pull`] once the listing is known.
    pub async fn pull_listed(
        &self,
        store: &Store,
        name: &ModelName,
        src: &HfSource,
        listing: &Listing,
        params: Option<&Map<String, Value>>,
        emit: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), StoreError> {
        let missing = |what: &str| HfError::Missing {
            repo: src.repo.clone(),
            what: what.to_string(),
        };
        let mut wanted: Vec<String> = Vec::new();
        for f in REQUIRED {
            if !listing.has(f) {
                return Err(missing(f).into());
            }
            wanted.push(f.to_string());
        }
        for f in OPTIONAL
            .into_iter()
            .chain(src.files.iter().map(String::as_str))
        {
            if wanted.iter().any(|w| w == f) {
                continue;
            }
            if listing.has(f) {
                wanted.push(f.to_string());
            } else if src.files.iter().any(|x| x == f) {
                return Err(missing(f).into());
            }
        }
        let sharded = listing.has(INDEX);
        if sharded {
            wanted.push(INDEX.to_string());
        } else if !listing.has(SINGLE) {
            return Err(missing("safetensors weights (model.safetensors or its index)").into());
        }

        let fetch = Fetch {
            hub: self,
            store,
            listing,
            repo: &src.repo,
            emit,
        };
        let guard = store.writer_guard()?;
        let mut layers = Vec::new();
        for f in &wanted {
            layers.push(fetch.file(f).await?);
        }
        // The weights: every shard the index names, or the one file.
        let weights = if sharded {
            let index_blob = layers
                .iter()
                .find(|l| l.name.as_deref() == Some(INDEX))
                .map(|l| store.blob_file(&l.digest))
                .transpose()?
                .ok_or_else(|| missing(INDEX))?;
            let index: Value = std::fs::read(&index_blob)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| bad_index(src, "unreadable JSON"))?;
            let shards = safetensors::index_shards(&index)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad_index(src, "no weight_map"))?;
            if let Some(s) = shards
                .iter()
                .find(|s| !valid_file_name(s) || !s.ends_with(".safetensors"))
            {
                return Err(bad_index(src, &format!("odd shard name {s:?}")).into());
            }
            shards
        } else {
            vec![SINGLE.to_string()]
        };
        for w in &weights {
            if !listing.has(w) {
                return Err(missing(w).into());
            }
            layers.push(fetch.file(w).await?);
        }

        if let Some(p) = params.filter(|p| !p.is_empty()) {
            let bytes = to_json(p)?;
            layers.push(local_layer(store, MEDIA_PARAMS, &bytes, emit)?);
        }
        let files: BTreeMap<String, std::path::PathBuf> = layers
            .iter()
            .filter_map(|l| Some((l.name.clone()?, store.blob_file(&l.digest).ok()?)))
            .collect();
        let digests: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
        let config = safetensors::config_blob(&files, &digests)?;
        let config = local_layer(store, MEDIA_CONFIG, &to_json(&config)?, emit)?;
        let mut fetched: HashSet<String> = digests.into_iter().collect();
        fetched.insert(config.digest.clone());
        let manifest = Manifest {
            schema_version: 2,
            media_type: MEDIA_MANIFEST.into(),
            config,
            layers,
        };
        finish_pull(store, name, &to_json(&manifest)?, &fetched, guard, emit)
    }
}

/// One pull's way to a file of the repository.
struct Fetch<'a> {
    hub: &'a HfHub,
    store: &'a Store,
    listing: &'a Listing,
    repo: &'a str,
    emit: &'a (dyn Fn(PullProgress) + Send + Sync),
}

impl Fetch<'_> {
    /// The file's URL at the listing's commit, each part of its name (`1_Pooling/config.json`
    /// has two) percent-encoded as one segment.
    fn url(&self, file: &str) -> Result<String, HfError> {
        let repo = self.hub.api.repo(Repo::with_revision(
            self.repo.to_string(),
            RepoType::Model,
            self.listing.sha.clone(),
        ));
        let mut url = reqwest::Url::parse(&repo.url("")).map_err(|e| HfError::BadListing {
            repo: self.repo.to_string(),
            msg: format!("file URL: {e}"),
        })?;
        url.path_segments_mut()
            .map_err(|()| HfError::Client(format!("{} cannot hold paths", self.hub.endpoint)))?
            .pop_if_empty()
            .extend(file.split('/'));
        Ok(url.to_string())
    }

    /// Brings one file into the store and returns its layer.
    async fn file(&self, file: &str) -> Result<Layer, StoreError> {
        let sibling = self.listing.sibling(file).ok_or_else(|| HfError::Missing {
            repo: self.repo.to_string(),
            what: file.to_string(),
        })?;
        let url = self.url(file)?;
        let (digest, size) = match &sibling.lfs {
            Some(lfs) => {
                let digest = normalize_digest(&format!("sha256:{}", lfs.sha256)).map_err(|_| {
                    HfError::BadListing {
                        repo: self.repo.to_string(),
                        msg: format!("{file}: odd sha256 {:?}", lfs.sha256),
                    }
                })?;
                let src = Source {
                    client: &self.hub.files,
                    url: &url,
                };
                fetch_reporting(self.store, &src, &digest, lfs.size, self.emit).await?;
                (digest, lfs.size)
            }
            None => {
                let bytes = self.small(file, &url, sibling.size).await?;
                let layer = local_layer(self.store, MEDIA_FILE, &bytes, self.emit)?;
                (layer.digest, layer.size)
            }
        };
        Ok(Layer {
            media_type: media_type(file).into(),
            digest,
            size,
            from: None,
            name: Some(file.to_string()),
        })
    }

    /// A file kept in git: fetched whole and checked against the listed size.
    async fn small(&self, file: &str, url: &str, want: Option<u64>) -> Result<Vec<u8>, HfError> {
        let dl = |msg: String| HfError::Download {
            file: file.to_string(),
            msg,
        };
        let send = self.hub.files.get(url).send();
        let resp = tokio::time::timeout(STALL, send)
            .await
            .map_err(|_| dl("no answer for 30s".into()))?
            .map_err(|e| dl(error_chain(&e)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(HfError::Refused {
                repo: self.repo.to_string(),
                file: file.to_string(),
                msg: hub_message(resp).await,
            });
        }
        if !status.is_success() {
            return Err(dl(format!(
                "{}: {}",
                status.as_u16(),
                hub_message(resp).await
            )));
        }
        let too_big = |size: u64| HfError::Unverifiable {
            file: file.to_string(),
            size,
        };
        if let Some(n) = want.or(resp.content_length()).filter(|&n| n > MAX_UNHASHED) {
            return Err(too_big(n));
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        loop {
            let next = tokio::time::timeout(STALL, stream.next())
                .await
                .map_err(|_| dl("no data for 30s".into()))?;
            let Some(chunk) = next else { break };
            body.extend_from_slice(&chunk.map_err(|e| dl(error_chain(&e)))?);
            if body.len() as u64 > MAX_UNHASHED {
                return Err(too_big(body.len() as u64));
            }
        }
        if let Some(want) = want.filter(|&w| w != body.len() as u64) {
            return Err(HfError::SizeMismatch {
                file: file.to_string(),
                want,
                got: body.len() as u64,
            });
        }
        Ok(body)
    }
}

/// Stores bytes made or fetched here (small files, params, the config) as a blob, with the
/// one complete progress line Ollama shows for a layer it did not have to download.
fn local_layer(
    store: &Store,
    media_type: &str,
    bytes: &[u8],
    emit: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<Layer, StoreError> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    store.write_blob_bytes(bytes)?;
    let size = bytes.len() as u64;
    emit(PullProgress::Layer {
        digest: digest.clone(),
        total: size,
        completed: size,
    });
    Ok(Layer {
        media_type: media_type.into(),
        digest,
        size,
        from: None,
        name: None,
    })
}

fn bad_index(src: &HfSource, msg: &str) -> HfError {
    HfError::BadListing {
        repo: src.repo.clone(),
        msg: format!("{INDEX}: {msg}"),
    }
}

fn to_json(v: &impl serde::Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Registry(format!("encoding JSON: {e}")))
}

/// The Hub's reason for an error: its `X-Error-Message` header, else the body's `error`,
/// else the body.
async fn hub_message(resp: reqwest::Response) -> String {
    if let Some(m) = resp
        .headers()
        .get("x-error-message")
        .and_then(|v| v.to_str().ok())
    {
        return m.to_string();
    }
    let text = resp.text().await.unwrap_or_default();
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().chars().take(300).collect())
}

/// Whether a name is a Hugging Face one (`hf.co/...`, `huggingface.co/...`).
pub fn is_hf_name(name: &ModelName) -> bool {
    name.host.eq_ignore_ascii_case("hf.co") || name.host.eq_ignore_ascii_case("huggingface.co")
}

/// The repository behind `hf.co/<user>/<repo>[:<tag>]` as a safetensors source: the tag
/// is a revision (`latest` means `main`).
pub fn source_of(name: &ModelName) -> HfSource {
    HfSource {
        repo: format!("{}/{}", name.namespace, name.model),
        revision: if name.tag.eq_ignore_ascii_case("latest") {
            "main".into()
        } else {
            name.tag.clone()
        },
        files: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MEDIA_JSON, MEDIA_SAFETENSORS};

    fn listing(files: &[&str]) -> Listing {
        Listing {
            sha: "abc".into(),
            siblings: files
                .iter()
                .map(|f| Sibling {
                    rfilename: f.to_string(),
                    size: None,
                    lfs: None,
                })
                .collect(),
        }
    }

    #[test]
    fn what_counts_as_a_safetensors_model() {
        let base = ["config.json", "tokenizer.json"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            listing(&v).is_safetensors_model()
        };
        assert!(with(&["model.safetensors"]));
        assert!(with(&[
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors"
        ]));
        assert!(!with(&[]));
        assert!(!with(&["model.safetensors", "model-Q4_K_M.gguf"]));
        assert!(!listing(&["config.json", "model.safetensors"]).is_safetensors_model());
    }

    #[test]
    fn hf_names_map_to_repositories() {
        let n = ModelName::parse("hf.co/Qwen/Qwen2.5-0.5B-Instruct").unwrap();
        assert!(is_hf_name(&n));
        assert_eq!(
            source_of(&n),
            HfSource {
                repo: "Qwen/Qwen2.5-0.5B-Instruct".into(),
                revision: "main".into(),
                files: vec![],
            }
        );
        let n = ModelName::parse("huggingface.co/u/r:v1.0").unwrap();
        assert!(is_hf_name(&n));
        assert_eq!(source_of(&n).revision, "v1.0");
        assert!(!is_hf_name(&ModelName::parse("qwen2.5").unwrap()));
    }

    #[test]
    fn endpoints_and_urls() {
        let hub = HfHub::new(None, None).unwrap();
        let n = ModelName::parse("hf.co/u/r:Q4_K_M").unwrap();
        assert_eq!(hub.registry_base(&n, false), "https://hf.co/v2/u/r");
        let hub = HfHub::new(Some("http://127.0.0.1:9/"), None).unwrap();
        assert_eq!(hub.registry_base(&n, false), "http://127.0.0.1:9/v2/u/r");
        let l = listing(&["config.json"]);
        let f = Fetch {
            hub: &hub,
            store: &Store::new("/nonexistent"),
            listing: &Listing {
                sha: "0123abcd".into(),
                ..l
            },
            repo: "u/r",
            emit: &|_| {},
        };
        assert_eq!(
            f.url("model-00001-of-00002.safetensors").unwrap(),
            "http://127.0.0.1:9/u/r/resolve/0123abcd/model-00001-of-00002.safetensors"
        );
        assert_eq!(
            f.url("a b#c.json").unwrap(),
            "http://127.0.0.1:9/u/r/resolve/0123abcd/a%20b%23c.json"
        );
        assert_eq!(media_type("x.safetensors"), MEDIA_SAFETENSORS);
        assert_eq!(media_type("tokenizer.json"), MEDIA_JSON);
        assert_eq!(media_type("chat_template.jinja"), MEDIA_FILE);
    }
}
