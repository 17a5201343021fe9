//! Pulling a model over the Ollama registry protocol (a Docker distribution v2 subset):
//! `GET /v2/<namespace>/<model>/manifests/<tag>`, then every layer and the config from
//! `/v2/<namespace>/<model>/blobs/<digest>` (redirects followed, also to other hosts),
//! each through [`Store::fetch_blob`], and the manifest written last, verbatim. The same
//! protocol serves `registry.ollama.ai`, `hf.co/<user>/<repo>[:<quant>]` (Hugging Face's
//! registry shim) and any private registry; plain `http://` only when the caller allows
//! it (`insecure`).
//!
//! Progress is reported as the objects Ollama streams from `/api/pull`; `fetch_reporting`
//! and `finish_pull` (one blob with its progress lines; verifying, writing the manifest
//! last, pruning what the old manifest alone used) serve the Hugging Face pulls as well.
//! [`Registry::fetch_manifest`] tells a registry without the name (404) and one that cannot
//! be reached apart, which is what the catalog's fallback (`sources`) decides on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use super::blobs::{error_chain, normalize_digest, Source, WriterGuard};
use super::{Manifest, ModelName, Store, StoreError, MEDIA_MANIFEST};

/// One progress report of a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullProgress {
    /// A phase: `pulling manifest`, `verifying sha256 digest`, `writing manifest`,
    /// `removing unused layers`, `success`.
    Status(&'static str),
    /// Bytes of one layer.
    Layer {
        digest: String,
        total: u64,
        completed: u64,
    },
}

impl PullProgress {
    /// The NDJSON object Ollama sends for it (`total`/`completed` left out while zero).
    pub fn to_json(&self) -> Value {
        match self {
            PullProgress::Status(s) => json!({"status": s}),
            PullProgress::Layer {
                digest,
                total,
                completed,
            } => {
                let short = digest.strip_prefix("sha256:").unwrap_or(digest);
                let mut v = json!({
                    "status": format!("pulling {}", &short[..short.len().min(12)]),
                    "digest": digest,
                });
                if *total > 0 {
                    v["total"] = (*total).into();
                }
                if *completed > 0 {
                    v["completed"] = (*completed).into();
                }
                v
            }
        }
    }
}

/// `<scheme>://<host>/v2/<namespace>/<model>`, under which `manifests/<tag>` and
/// `blobs/<digest>` live. `hf.co/<user>/<repo>` needs nothing special: Hugging Face serves
/// the same protocol there.
pub fn repository_url(name: &ModelName, insecure: bool) -> String {
    let scheme = if insecure { "http" } else { "https" };
    format!(
        "{scheme}://{}/v2/{}/{}",
        name.host, name.namespace, name.model
    )
}

/// An HTTP client for registries.
#[derive(Clone)]
pub struct Registry {
    client: reqwest::Client,
}

impl Registry {
    /// `user_agent` should look like Ollama's (`ollama/<version> (...)`): ollama.com
    /// decides by it whether the caller is new enough for a model.
    pub fn new(user_agent: &str) -> Result<Registry, StoreError> {
        let client = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(Duration::from_secs(30))
            // Each parallel ranged part on a connection of its own, as before hf-hub's
            // reqwest features switched HTTP/2 on for every client in the build.
            .http1_only()
            .build()
            .map_err(|e| StoreError::Registry(format!("starting the HTTP client: {e}")))?;
        Ok(Registry { client })
    }

    /// Pulls `name` into `store`. `insecure` allows plain HTTP to the registry (and is
    /// needed for it). Dropping the future cancels the pull; what was downloaded stays in
    /// the `-partial` files for the next pull to continue.
    pub async fn pull(
        &self,
        store: &Store,
        name: &ModelName,
        scheme_http: bool,
        insecure: bool,
        emit: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), StoreError> {
        check_scheme(scheme_http, insecure)?;
        emit(PullProgress::Status("pulling manifest"));
        let remote = self
            .fetch_manifest(&repository_url(name, insecure), &name.tag)
            .await?;
        self.pull_manifest(store, name, remote, emit).await
    }

    /// Downloads every layer and the config of a manifest fetched from `remote.base`, then
    /// writes the manifest (verbatim) as `name`.
    pub async fn pull_manifest(
        &self,
        store: &Store,
        name: &ModelName,
        remote: RemoteManifest,
        emit: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), StoreError> {
        let RemoteManifest {
            base,
            bytes,
            manifest,
        } = remote;
        let mut layers = manifest.layers.clone();
        layers.push(manifest.config.clone());
        let guard = store.writer_guard()?;
        let mut fetched = HashSet::new();
        for layer in &layers {
            let digest = normalize_digest(&layer.digest)?;
            if !fetched.insert(digest.clone()) {
                continue;
            }
            let url = format!("{base}/blobs/{digest}");
            let src = Source {
                client: &self.client,
                url: &url,
            };
            fetch_reporting(store, &src, &digest, layer.size, emit).await?;
        }
        finish_pull(store, name, &bytes, &fetched, guard, emit)
    }

    /// The manifest of `<base>/manifests/<tag>`, its bytes kept verbatim. A registry that
    /// does not have it answers [`StoreError::ManifestNotFound`]; one that cannot be reached
    /// (no connection, a timeout, a 5xx) [`StoreError::RegistryUnreachable`].
    pub async fn fetch_manifest(
        &self,
        base: &str,
        tag: &str,
    ) -> Result<RemoteManifest, StoreError> {
        let unreachable =
            |msg: String| StoreError::RegistryUnreachable(format!("pull model manifest: {msg}"));
        let url = format!("{base}/manifests/{tag}");
        let resp = self
            .client
            .get(&url)
            .header(reqwest::header::ACCEPT, MEDIA_MANIFEST)
            .send()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(StoreError::ManifestNotFound);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            let msg = format!("{}: {}", status.as_u16(), text.trim());
            return Err(if status.is_server_error() {
                unreachable(msg)
            } else {
                StoreError::Registry(format!("pull model manifest: {msg}"))
            });
        }
        let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| {
            StoreError::Registry(format!("pull model manifest: invalid manifest: {e}"))
        })?;
        Ok(RemoteManifest {
            base: base.to_string(),
            bytes: body.to_vec(),
            manifest,
        })
    }
}

/// A manifest as a registry sent it, and the repository URL it came from.
pub struct RemoteManifest {
    pub base: String,
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
}

/// Plain HTTP only when the caller allows it.
pub fn check_scheme(scheme_http: bool, insecure: bool) -> Result<(), StoreError> {
    if scheme_http && !insecure {
        return Err(StoreError::Registry(
            "insecure protocol http: set insecure to pull over plain HTTP".into(),
        ));
    }
    Ok(())
}

/// Makes sure one blob is in the store, reporting it the way Ollama does: a blob already
/// there is one complete line; a download starts with a line without `completed` and then
/// reports each change.
pub(crate) async fn fetch_reporting(
    store: &Store,
    src: &Source<'_>,
    digest: &str,
    total: u64,
    emit: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<(), StoreError> {
    if store.has_blob(digest)? {
        emit(PullProgress::Layer {
            digest: digest.to_string(),
            total,
            completed: total,
        });
        return Ok(());
    }
    emit(PullProgress::Layer {
        digest: digest.to_string(),
        total,
        completed: 0,
    });
    let last = AtomicU64::new(0);
    let report = |completed: u64| {
        // Only changes are worth a line.
        if last.swap(completed, Ordering::Relaxed) != completed {
            emit(PullProgress::Layer {
                digest: digest.to_string(),
                total,
                completed,
            });
        }
    };
    store.fetch_blob(src, digest, total, &report).await?;
    Ok(())
}

/// The end of every pull once its blobs are in the store: `verifying sha256 digest`,
/// `writing manifest` (the manifest last, so it never names a missing blob), the old
/// manifest's layers that nothing uses any more removed, `success`.
pub(crate) fn finish_pull(
    store: &Store,
    name: &ModelName,
    manifest: &[u8],
    fetched: &HashSet<String>,
    guard: WriterGuard,
    emit: &(dyn Fn(PullProgress) + Send + Sync),
) -> Result<(), StoreError> {
    // Every blob was hashed before it got its final name; this is the phase Ollama clients
    // expect to see.
    emit(PullProgress::Status("verifying sha256 digest"));
    for digest in fetched {
        if !store.has_blob(digest)? {
            return Err(StoreError::BlobNotFound(digest.clone()));
        }
    }
    emit(PullProgress::Status("writing manifest"));
    let old = store.write_manifest(name, manifest)?;
    drop(guard);
    if let Some(old) = old {
        let unused: Vec<String> = old
            .layers
            .iter()
            .chain(std::iter::once(&old.config))
            .map(|l| l.digest.clone())
            .filter(|d| normalize_digest(d).is_ok_and(|d| !fetched.contains(&d)))
            .collect();
        if !unused.is_empty() {
            emit(PullProgress::Status("removing unused layers"));
            store.prune_blobs(&unused)?;
        }
    }
    emit(PullProgress::Status("success"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_urls() {
        let url = |s: &str, insecure| repository_url(&ModelName::parse(s).unwrap(), insecure);
        assert_eq!(
            url("smollm2:135m", false),
            "https://registry.ollama.ai/v2/library/smollm2"
        );
        assert_eq!(
            url("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M", false),
            "https://hf.co/v2/bartowski/Llama-3.2-1B-Instruct-GGUF"
        );
        assert_eq!(
            url("127.0.0.1:5000/me/m:1", true),
            "http://127.0.0.1:5000/v2/me/m"
        );
    }

    #[test]
    fn progress_objects_look_like_ollama() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let first = PullProgress::Layer {
            digest: d.clone(),
            total: 10,
            completed: 0,
        };
        assert_eq!(
            first.to_json(),
            json!({"status": "pulling abababababab", "digest": d, "total": 10})
        );
        let later = PullProgress::Layer {
            digest: d.clone(),
            total: 10,
            completed: 4,
        };
        assert_eq!(later.to_json()["completed"], 4);
        assert_eq!(
            PullProgress::Status("success").to_json(),
            json!({"status": "success"})
        );
    }
}
