//! The model manager: each model loads on first use into its own [`Engine`], at most
//! `OLLAMA_MAX_LOADED_MODELS` at once (the least recently used idle one makes room, and on
//! the CPU also when memory is short), and unloads when idle past its keep-alive.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use candle_core::Device;
use tokio::sync::Notify;

use crate::config::{Config, KeepAlive};
use crate::model::{AnyModel, Model};
use crate::store::{LocalModel, ModelName, Store, StoreError};

use super::speculative::DraftModel;
use super::{available_memory, Engine, EngineConfig, EngineError};

/// Why a model could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the model: {0}")]
    Model(#[from] crate::model::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the model loader panicked: {0}")]
    Panicked(String),
}

/// One loaded model.
pub struct Loaded {
    pub engine: Arc<Engine>,
    pub model: AnyModel,
    pub info: LocalModel,
    pub load_duration: Duration,
    /// Requests using the model now.
    active: AtomicUsize,
    /// When it may unload (`None`: never) once idle; and when it was last used (for LRU).
    timing: Mutex<Timing>,
}

#[derive(Clone, Copy)]
struct Timing {
    expires: Option<Instant>,
    expires_wall: Option<SystemTime>,
    last_used: Instant,
    keep_alive: KeepAlive,
}

impl Loaded {
    fn timing(&self) -> Timing {
        match self.timing.lock() {
            Ok(t) => *t,
            Err(p) => *p.into_inner(),
        }
    }

    fn set_timing(&self, f: impl FnOnce(&mut Timing)) {
        match self.timing.lock() {
            Ok(mut t) => f(&mut t),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// When an idle model unloads, for `/api/ps` (forever reads as a far-future date, as in
    /// Ollama).
    pub fn expires_at(&self) -> SystemTime {
        let t = self.timing();
        if self.active.load(Ordering::Relaxed) > 0 {
            return match t.keep_alive {
                KeepAlive::Forever => far_future(),
                KeepAlive::For(d) => SystemTime::now() + d,
            };
        }
        t.expires_wall.unwrap_or_else(far_future)
    }

    pub fn context_length(&self) -> usize {
        self.model.context_length()
    }
}

fn far_future() -> SystemTime {
    SystemTime::now() + Duration::from_secs(293 * 365 * 24 * 3600)
}

/// Marks a model in use; dropping it starts the keep-alive clock.
pub struct InUse {
    loaded: Arc<Loaded>,
    manager: Arc<Inner>,
}

impl InUse {
    pub fn loaded(&self) -> &Arc<Loaded> {
        &self.loaded
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let now = Instant::now();
        self.loaded.set_timing(|t| {
            t.last_used = now;
            (t.expires, t.expires_wall) = match t.keep_alive {
                KeepAlive::Forever => (None, None),
                KeepAlive::For(d) => (Some(now + d), Some(SystemTime::now() + d)),
            };
        });
        if self.loaded.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The reaper decides; waking it makes keep_alive 0 unload promptly.
            self.manager.wake.notify_one();
        }
    }
}

struct Inner {
    /// The loaded models, keyed by manifest path (which names a model uniquely). Held only
    /// for map operations, never across a load or an await.
    models: Mutex<HashMap<PathBuf, Arc<Loaded>>>,
    /// One gate per model name: its loader holds it, so a model loads once however many
    /// requests ask, while requests for other models and `/api/ps` go on.
    loading: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    wake: Notify,
    max_loaded: usize,
    engine_cfg: EngineConfig,
    default_keep_alive: KeepAlive,
    /// Where models run (`WICK_DEVICE`), opened once.
    device: Device,
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical
/// section here is a single map operation).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The set of loaded models.
#[derive(Clone)]
pub struct ModelManager {
    inner: Arc<Inner>,
}

impl ModelManager {
    /// Starts the manager and its reaper task (needs a tokio runtime).
    pub fn new(cfg: &Config) -> Result<ModelManager, LoadError> {
        let engine_cfg = EngineConfig::from_config(cfg);
        let device = crate::model::open_device(cfg.device)?;
        let inner = Arc::new(Inner {
            models: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            max_loaded: cfg.max_loaded_models.max(1),
            engine_cfg,
            default_keep_alive: cfg.keep_alive,
            device,
        });
        tokio::spawn(reaper(Arc::downgrade(&inner)));
        Ok(ModelManager { inner })
    }

    pub fn default_keep_alive(&self) -> KeepAlive {
        self.inner.default_keep_alive
    }

    /// The loaded model for `info`, loading it from `store` (off the async threads) if
    /// needed. Only requests for this same model wait for its load.
    pub async fn acquire(
        &self,
        store: &Store,
        info: &LocalModel,
        keep_alive: Option<KeepAlive>,
    ) -> Result<InUse, LoadError> {
        let keep_alive = keep_alive.unwrap_or(self.inner.default_keep_alive);
        let key = &info.manifest_path;
        if let Some(in_use) = self.try_use(key, keep_alive) {
            return Ok(in_use);
        }
        let gate = lock(&self.inner.loading)
            .entry(key.clone())
            .or_default()
            .clone();
        let _turn = gate.lock().await;
        // Whoever held the gate before us may have loaded it.
        if let Some(in_use) = self.try_use(key, keep_alive) {
            return Ok(in_use);
        }
        let draft = draft_of(store, info)?;
        self.make_room(info.size + draft.as_ref().map_or(0, |(_, d)| d.size))
            .await;
        let engine_cfg = self.inner.engine_cfg.clone();
        let device = self.inner.device.clone();
        let (store, model) = (store.clone(), info.clone());
        let (engine, model, load_duration) = tokio::task::spawn_blocking(move || {
            // A GGUF blob, or a directory of links to a safetensors model's blobs that goes
            // away once the weights are mapped.
            let files = store.model_files(&model)?;
            let draft = match draft {
                Some((name, info)) => {
                    let files = store
                        .model_files(&info)
                        .map_err(|e| draft_error(&name, e))?;
                    Some((name, files))
                }
                None => None,
            };
            let draft = draft.as_ref().map(|(n, f)| (n.as_str(), f.path()));
            load(files.path(), draft, engine_cfg, &device)
        })
        .await
        .map_err(|e| LoadError::Panicked(e.to_string()))??;
        tracing::info!(model = %info.name.display_short(), secs = load_duration.as_secs_f64(), "model loaded");
        let loaded = Arc::new(Loaded {
            engine,
            model,
            info: info.clone(),
            load_duration,
            active: AtomicUsize::new(0),
            timing: Mutex::new(Timing {
                expires: None,
                expires_wall: None,
                last_used: Instant::now(),
                keep_alive,
            }),
        });
        lock(&self.inner.models).insert(key.clone(), loaded.clone());
        Ok(self.use_loaded(loaded, keep_alive))
    }

    /// The model at `key` marked in use, if it is loaded and its engine runs. An engine
    /// whose thread died is dropped here, so the next request loads a fresh one.
    fn try_use(&self, key: &PathBuf, keep_alive: KeepAlive) -> Option<InUse> {
        let mut models = lock(&self.inner.models);
        let loaded = models.get(key)?.clone();
        if !loaded.engine.is_running() {
            tracing::error!(model = %loaded.info.name.display_short(), "the model's engine stopped; loading it again");
            models.remove(key);
            drop(models);
            drop_off_thread(loaded);
            return None;
        }
        // Marked under the map's lock, so the reaper cannot unload it in between.
        let in_use = self.use_loaded(loaded, keep_alive);
        drop(models);
        Some(in_use)
    }

    fn use_loaded(&self, loaded: Arc<Loaded>, keep_alive: KeepAlive) -> InUse {
        loaded.active.fetch_add(1, Ordering::AcqRel);
        loaded.set_timing(|t| {
            t.keep_alive = keep_alive;
            t.last_used = Instant::now();
        });
        InUse {
            loaded,
            manager: self.inner.clone(),
        }
    }

    /// Unloads a model now if nothing uses it (`keep_alive: 0` with no prompt).
    pub async fn unload(&self, info: &LocalModel) {
        let mut models = lock(&self.inner.models);
        let idle = models
            .get(&info.manifest_path)
            .is_some_and(|l| l.active.load(Ordering::Acquire) == 0);
        if idle {
            if let Some(l) = models.remove(&info.manifest_path) {
                drop(models);
                drop_off_thread(l);
            }
        }
    }

    /// Whether models run on the CPU (image input does only there, for now).
    pub fn runs_on_cpu(&self) -> bool {
        self.inner.device.is_cpu()
    }

    /// The loaded models, for `/api/ps`.
    pub async fn list(&self) -> Vec<Arc<Loaded>> {
        lock(&self.inner.models).values().cloned().collect()
    }

    /// Evicts least recently used idle models until one more fits: under
    /// `OLLAMA_MAX_LOADED_MODELS`, and on the CPU within the memory available (the new
    /// model's file plus its KV cache budget, or 256 MiB of cache when that adapts).
    async fn make_room(&self, size: u64) {
        let need = size as usize + self.inner.engine_cfg.kv_cache_bytes.unwrap_or(256 << 20);
        loop {
            let victim = {
                let mut models = lock(&self.inner.models);
                let too_many = models.len() >= self.inner.max_loaded;
                let too_big = self.inner.device.is_cpu() && need > available_memory();
                if !too_many && !too_big {
                    return;
                }
                let victim = models
                    .iter()
                    .filter(|(_, l)| l.active.load(Ordering::Acquire) == 0)
                    .min_by_key(|(_, l)| l.timing().last_used)
                    .map(|(k, _)| k.clone());
                // Everything is busy: load anyway rather than fail; the OS pages weights.
                let Some(l) = victim.and_then(|k| models.remove(&k)) else {
                    return;
                };
                tracing::info!(model = %l.info.name.display_short(), too_many, too_big, "unloading to make room");
                l
            };
            // Wait for it to go, so the memory check sees what it freed.
            let _ = tokio::task::spawn_blocking(move || drop(victim)).await;
        }
    }
}

type LoadResult = (Arc<Engine>, AnyModel, Duration);

/// The model named by `info`'s `draft_model` parameter, if it has one.
fn draft_of(store: &Store, info: &LocalModel) -> Result<Option<(String, LocalModel)>, LoadError> {
    let Some(value) = store
        .params(info)
        .and_then(|p| p.get("draft_model").cloned())
    else {
        return Ok(None);
    };
    let Some(name) = value.as_str().map(str::to_owned) else {
        return Err(draft_error(
            &value.to_string(),
            "draft_model must be a model name",
        ));
    };
    let parsed = ModelName::parse(&name).map_err(|e| draft_error(&name, e))?;
    let draft = store.resolve(&parsed).map_err(|e| draft_error(&name, e))?;
    Ok(Some((name, draft)))
}

fn draft_error(name: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError::Engine(EngineError::Draft(format!("{name}: {e}")))
}

/// Loads a model (and its draft model, named and at its path) and starts its engine.
fn load(
    path: &Path,
    draft: Option<(&str, &Path)>,
    mut cfg: EngineConfig,
    device: &Device,
) -> Result<LoadResult, LoadError> {
    let t0 = Instant::now();
    let model = AnyModel::load(path, device)?;
    if let Some((name, path)) = draft {
        let draft = Model::load(path, device).map_err(|e| draft_error(name, e))?;
        cfg.draft = Some(DraftModel {
            name: name.to_string(),
            model: Arc::new(draft),
        });
    }
    let load_duration = t0.elapsed();
    cfg.load_duration = load_duration;
    let engine = Arc::new(Engine::start_any(model.clone(), cfg)?);
    Ok((engine, model, load_duration))
}

/// Dropping an engine joins its thread, so it happens on a blocking thread.
fn drop_off_thread(l: Arc<Loaded>) {
    tracing::info!(model = %l.info.name.display_short(), "unloading model");
    tokio::task::spawn_blocking(move || drop(l));
}

/// Unloads idle models whose keep-alive ran out; stops when the manager is gone.
async fn reaper(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let next = {
            let mut models = lock(&strong.models);
            let now = Instant::now();
            let expired: Vec<PathBuf> = models
                .iter()
                .filter(|(_, l)| {
                    l.active.load(Ordering::Acquire) == 0
                        && l.timing().expires.is_some_and(|e| e <= now)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                if let Some(l) = models.remove(&k) {
                    drop_off_thread(l);
                }
            }
            models
                .values()
                .filter_map(|l| l.timing().expires)
                .min()
                .map(|e| e.saturating_duration_since(now))
        };
        let wait = next
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_millis(10));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = strong.wake.notified() => {}
        }
    }
}
