//! Which source a pulled name comes from.
//!
//! 1. A catalog entry for the name with `use = "always"` (what a user's own entry means
//!    unless it says otherwise): the entry's Hugging Face repository; no registry is asked.
//! 2. Otherwise the registry the name points at, exactly as Ollama pulls it:
//!    `registry.ollama.ai` for plain names, `hf.co`'s registry shim for
//!    `hf.co/<user>/<repo>[:<quant>]` (at `HF_ENDPOINT` when that is set), or the named
//!    host.
//! 3. When the registry does not have the name (404) or cannot be reached (no connection,
//!    a timeout, a 5xx), a catalog entry with `use = "fallback"` (every built-in entry)
//!    takes over: `qwen2.5:0.5b` then comes from `Qwen/Qwen2.5-0.5B-Instruct`. Other
//!    registry errors (auth, a newer Ollama required) are reported as they are.
//! 4. An `hf.co/<user>/<repo>[:<revision>]` name the shim refuses is pulled as
//!    safetensors when the repository's listing shows a safetensors model and no GGUF
//!    files; otherwise the shim's error stands.
//!
//! So a name behaves as in Ollama unless the user's catalog says otherwise or the Ollama
//! way cannot work.

use std::path::PathBuf;

use super::catalog::{Catalog, Use};
use super::hf::{self, HfHub};
use super::pull::{check_scheme, repository_url, PullProgress, Registry};
use super::{ModelName, Store, StoreError};

/// Everything a pull may need: the registry client, the Hub client and where the user's
/// catalog is.
#[derive(Clone)]
pub struct Puller {
    pub registry: Registry,
    pub hub: HfHub,
    /// `WICK_CATALOG`: a directory of `*.toml` catalog files, or one file.
    pub catalog: Option<PathBuf>,
}

impl Puller {
    /// Pulls `name` into `store` from wherever it comes from (see the module doc), with
    /// Ollama's progress reports. Dropping the future cancels the pull; downloaded parts
    /// stay for the next pull to continue.
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
        // Read at every pull, so edited catalog files apply without a restart.
        let catalog = Catalog::load(self.catalog.as_deref())?;
        let entry = catalog.find(name);
        if let Some(e) = entry.filter(|e| e.use_ == Use::Always) {
            return self
                .hub
                .pull(store, name, &e.source, e.parameters.as_ref(), emit)
                .await;
        }
        let hf_name = hf::is_hf_name(name);
        let base = if hf_name {
            self.hub.registry_base(name, insecure)
        } else {
            repository_url(name, insecure)
        };
        let err = match self.registry.fetch_manifest(&base, &name.tag).await {
            Ok(remote) => return self.registry.pull_manifest(store, name, remote, emit).await,
            Err(e) => e,
        };
        if let Some(e) = entry {
            if matches!(
                err,
                StoreError::ManifestNotFound | StoreError::RegistryUnreachable(_)
            ) {
                tracing::warn!(model = %name, error = %err, repo = %e.source.repo, catalog = %e.file,
                    "the registry cannot give this model; pulling it from the catalog's source");
                return self
                    .hub
                    .pull(store, name, &e.source, e.parameters.as_ref(), emit)
                    .await;
            }
            return Err(err);
        }
        if hf_name {
            let src = hf::source_of(name);
            match self.hub.listing(&src).await {
                Ok(listing) if listing.is_safetensors_model() => {
                    tracing::info!(model = %name, "not a GGUF repository; pulling its safetensors");
                    return self
                        .hub
                        .pull_listed(store, name, &src, &listing, None, emit)
                        .await;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(model = %name, error = %e, "no safetensors listing"),
            }
        }
        Err(err)
    }
}
