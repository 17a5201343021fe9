//! Writing blobs into `blobs/` safely when several processes, possibly on several hosts
//! sharing one NAS directory, write the same store.
//!
//! - A download goes to `sha256-<hex>-partial` (pre-sized, written at offsets by ranged
//!   requests: about 64 parts handed out in order to a few connections) with its progress
//!   in `sha256-<hex>-partial.json`; an interrupted download (cancelled, crashed, killed)
//!   continues from there with `Range` requests.
//! - A thread hashes the file while it arrives (the parts complete roughly in order, so
//!   the written prefix grows steadily). Only bytes that hash to the digest reach the final
//!   name `sha256-<hex>`, synced and then renamed; a mismatch deletes the partial file, so
//!   nothing unverified is ever kept.
//! - [`WriterGuard`]: pulls and creates share `.wick-writers.lock` at the store root until
//!   their manifest is written; pruning needs it exclusively, so it never removes a blob
//!   that a manifest about to be written refers to.
//! - `sha256-<hex>-partial.lock` is held (an exclusive `flock`, which Linux's NFS client
//!   maps to a byte-range lock the server arbitrates) for as long as one process writes
//!   the blob. Anyone else who wants the same blob, in this process or another, waits for
//!   the lock, reports the holder's progress meanwhile, and then finds the blob done.
//! - Uploads (`POST /api/blobs`) go to a unique temp file and are renamed only when their
//!   hash matches.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{io_err, nanos, Store, StoreError};

/// A blob is split into about this many parts...
const TARGET_PARTS: u64 = 64;
/// ...each between these sizes. Parts are handed out in order to a few concurrent
/// connections, so what is on disk grows as a prefix and is hashed while it arrives.
const MIN_PART: u64 = 4 << 20;
const MAX_PART: u64 = 128 << 20;
/// Concurrent connections per blob.
const WORKERS: usize = 4;
/// Consecutive attempts without a single new byte before a part gives up.
const RETRIES: u32 = 3;
/// A connection that delivers nothing for this long is dropped and retried.
const STALL: Duration = Duration::from_secs(30);
/// How often progress is reported, and how often the resume state is saved.
const TICK: Duration = Duration::from_millis(60);
const SAVE_EVERY: Duration = Duration::from_millis(500);
/// How often a process waiting for another's download looks again.
const LOCK_POLL: Duration = Duration::from_millis(100);
/// The largest blob a pull accepts: above any model file there is (a 1T-parameter model in
/// fp16 is 2 TB, and registries split such models into files). A manifest claiming more is
/// refused before anything is allocated for it.
pub const MAX_BLOB_BYTES: u64 = 4 << 40;
/// Temp files and abandoned downloads older than this, that no live process holds, are
/// removed when a server starts.
pub const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The files that belong to one blob.
struct BlobPaths {
    done: PathBuf,
    partial: PathBuf,
    state: PathBuf,
    lock: PathBuf,
}

/// One byte range of a download and how much of it is on disk.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Part {
    offset: u64,
    size: u64,
    completed: u64,
}

/// The resume state in `-partial.json`. `completed` never runs ahead of the bytes written.
#[derive(Debug, Serialize, Deserialize)]
struct PartState {
    size: u64,
    parts: Vec<Part>,
}

impl PartState {
    fn fresh(size: u64) -> PartState {
        let part = (size / TARGET_PARTS).clamp(MIN_PART, MAX_PART);
        let count = size.div_ceil(part).max(1);
        let parts = (0..count)
            .map(|i| i * part)
            .take_while(|&offset| offset < size || (size == 0 && offset == 0))
            .map(|offset| Part {
                offset,
                size: part.min(size - offset),
                completed: 0,
            })
            .collect();
        PartState { size, parts }
    }

    fn completed(&self) -> u64 {
        self.parts.iter().map(|p| p.completed.min(p.size)).sum()
    }

    fn read(path: &Path) -> Option<PartState> {
        serde_json::from_slice(&fs::read(path).ok()?).ok()
    }
}

/// Where a blob is downloaded from: any URL the client may be redirected from (the
/// registry's blob URL, which usually answers with a redirect to object storage).
pub struct Source<'a> {
    pub client: &'a reqwest::Client,
    pub url: &'a str,
}

/// What [`Store::fetch_blob`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// The blob was already there (or another process finished it while we waited).
    Present,
    /// This call downloaded (or finished downloading) it.
    Downloaded,
}

/// `sha256:<lowercase hex>` for a digest in either spelling, or [`StoreError::BadDigest`].
pub fn normalize_digest(digest: &str) -> Result<String, StoreError> {
    let hex = digest
        .strip_prefix("sha256:")
        .or_else(|| digest.strip_prefix("sha256-"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| StoreError::BadDigest(digest.to_string()))?;
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

/// The sha256 of a file, as `sha256:<hex>`.
pub fn sha256_file(path: &Path) -> Result<String, StoreError> {
    let file = File::open(path).map_err(io_err(path))?;
    hash_file(&file, path)
}

fn hash_file(file: &File, path: &Path) -> Result<String, StoreError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0u64;
    loop {
        let n = file.read_at(&mut buf, pos).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// The download lock of one blob. Its file is removed while the lock is still held, so
/// no lock files pile up; [`try_lock`] therefore only counts a lock on the file that is
/// still at the path.
struct HeldLock {
    file: File,
    path: PathBuf,
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// Takes the lock without waiting: `None` when someone else holds it.
fn try_lock(path: &Path) -> Result<Option<HeldLock>, StoreError> {
    use std::os::unix::fs::MetadataExt;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(e)) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source: e,
            })
        }
    }
    // The previous holder may have removed the file between our open and our lock; a
    // lock on a removed file protects nothing, so look again.
    let held = file.metadata().map_err(io_err(path))?;
    match fs::metadata(path) {
        Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => Ok(Some(HeldLock {
            file,
            path: path.to_path_buf(),
        })),
        _ => Ok(None),
    }
}

/// The shared progress of a running download; saves the resume state on demand and, when
/// dropped (the download was cancelled or failed), once more.
struct Progress {
    state_path: PathBuf,
    size: u64,
    parts: Vec<Part>,
    done: Vec<AtomicU64>,
    /// Cleared once the state file is no longer wanted (finished or rejected).
    armed: AtomicBool,
}

impl Progress {
    fn completed(&self) -> u64 {
        self.done.iter().map(|d| d.load(Ordering::Acquire)).sum()
    }

    fn save(&self) -> Result<(), StoreError> {
        let state = PartState {
            size: self.size,
            parts: self
                .parts
                .iter()
                .zip(&self.done)
                .map(|(p, d)| Part {
                    completed: d.load(Ordering::Acquire),
                    ..*p
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&state).map_err(|e| StoreError::BadManifest {
            path: self.state_path.clone(),
            msg: e.to_string(),
        })?;
        // Not synced: the state is a hint (the hash checks everything in the end), and a
        // sync per save would cost more than the download of a small blob.
        let tmp = self.state_path.with_extension("json.tmp");
        fs::write(&tmp, &bytes)
            .and_then(|()| fs::rename(&tmp, &self.state_path))
            .map_err(io_err(&self.state_path))
    }
}

/// Saves the resume state when the download ends without finishing.
struct SaveOnDrop(Arc<Progress>);

impl Drop for SaveOnDrop {
    fn drop(&mut self) {
        if self.0.armed.load(Ordering::Acquire) {
            if let Err(e) = self.0.save() {
                tracing::warn!(error = %e, "saving the download state");
            }
        }
    }
}

/// Why one ranged request ended early.
enum RangeError {
    /// Worth another try (connection reset, stall, 5xx).
    Retry(String),
    /// Not worth one (4xx, local I/O such as a full disk).
    Fatal(StoreError),
}

impl Store {
    fn blob_paths(&self, digest: &str) -> Result<BlobPaths, StoreError> {
        let done = self.blob_path(digest)?;
        let with = |suffix: &str| {
            let mut s = done.clone().into_os_string();
            s.push(suffix);
            PathBuf::from(s)
        };
        Ok(BlobPaths {
            partial: with("-partial"),
            state: with("-partial.json"),
            lock: with("-partial.lock"),
            done,
        })
    }

    /// Whether the blob is in the store.
    pub fn has_blob(&self, digest: &str) -> Result<bool, StoreError> {
        Ok(self.blob_path(digest)?.is_file())
    }

    /// Makes sure the blob `digest` of `size` bytes is in the store, downloading it from
    /// `src` unless it is there, continuing an interrupted download, or waiting for another
    /// process that is downloading it. `progress` hears the bytes completed so far.
    pub async fn fetch_blob(
        &self,
        src: &Source<'_>,
        digest: &str,
        size: u64,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Fetched, StoreError> {
        let digest = normalize_digest(digest)?;
        if size > MAX_BLOB_BYTES {
            return Err(StoreError::BlobTooLarge {
                size,
                limit: MAX_BLOB_BYTES,
            });
        }
        let paths = self.blob_paths(&digest)?;
        if paths.done.is_file() {
            progress(size);
            return Ok(Fetched::Present);
        }
        let blobs = self.blobs_dir();
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let lock = loop {
            if let Some(lock) = try_lock(&paths.lock)? {
                break lock;
            }
            // Someone else is downloading it: show their progress until they are done.
            progress(PartState::read(&paths.state).map_or(0, |s| s.completed()));
            tokio::time::sleep(LOCK_POLL).await;
            if paths.done.is_file() {
                progress(size);
                return Ok(Fetched::Present);
            }
        };
        if paths.done.is_file() {
            progress(size);
            return Ok(Fetched::Present);
        }
        // What is already downloaded counts; the rest must fit.
        let have = fs::metadata(&paths.partial).map_or(0, |m| m.blocks() * 512);
        let need = size.saturating_sub(have);
        if let Some(free) = free_space(&blobs) {
            if need > free {
                return Err(StoreError::DiskFull { need, free });
            }
        }
        let result = self
            .download_locked(src, &digest, size, &paths, progress)
            .await;
        if let Err(StoreError::Io { source, .. }) = &result {
            if source.kind() == std::io::ErrorKind::StorageFull {
                // The disk filled up (another download, another tenant): give the space
                // back rather than hold a partial file that blocks everyone.
                release_partial(&paths);
            }
        }
        // Also on failure or cancellation (when this is dropped with the future).
        drop(lock);
        result.map(|()| Fetched::Downloaded)
    }

    async fn download_locked(
        &self,
        src: &Source<'_>,
        digest: &str,
        size: u64,
        paths: &BlobPaths,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), StoreError> {
        let partial = &paths.partial;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(partial)
            .map_err(io_err(partial))?;
        let on_disk = file.metadata().map_err(io_err(partial))?.len();
        let state = match PartState::read(&paths.state) {
            Some(s) if s.size == size && on_disk == size && !s.parts.is_empty() => s,
            _ => {
                // No usable state: what is in the file cannot be trusted, start over.
                file.set_len(0).map_err(io_err(partial))?;
                file.set_len(size).map_err(io_err(partial))?;
                PartState::fresh(size)
            }
        };
        let file = Arc::new(file);
        let shared = Arc::new(Progress {
            state_path: paths.state.clone(),
            size,
            done: state
                .parts
                .iter()
                .map(|p| AtomicU64::new(p.completed.min(p.size)))
                .collect(),
            parts: state.parts,
            armed: AtomicBool::new(true),
        });
        shared.save()?;
        let saver = SaveOnDrop(shared.clone());

        // The hash follows the downloaded prefix on its own thread; it stops when this
        // function ends early (error or cancellation).
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let hasher = {
            let (f, p, sh, st) = (
                file.clone(),
                partial.clone(),
                shared.clone(),
                stop.0.clone(),
            );
            tokio::task::spawn_blocking(move || follow_hash(&f, &p, &sh, &st))
        };
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..WORKERS.min(shared.parts.len()) {
            let (client, url) = (src.client.clone(), src.url.to_string());
            let (f, p, sh, next) = (file.clone(), partial.clone(), shared.clone(), next.clone());
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= sh.parts.len() {
                        return Ok(());
                    }
                    fetch_part(&client, &url, &f, &p, &sh, i).await?;
                }
            });
        }
        let mut tick = tokio::time::interval(TICK);
        let mut last_save = Instant::now();
        // Dirty pages are written back while the download runs, one flush after the other,
        // so the sync before the rename has little left to do: the disk, not the network or
        // the hash, is what a durable download waits for, and a backlog of dirty pages at
        // the end would be written only after the last byte arrived.
        let mut flushing: Option<tokio::task::JoinHandle<()>> = None;
        let flush = |flushing: &mut Option<tokio::task::JoinHandle<()>>| {
            if flushing.as_ref().is_none_or(|h| h.is_finished()) {
                let f = file.clone();
                *flushing = Some(tokio::task::spawn_blocking(move || {
                    let _ = f.sync_data();
                }));
            }
        };
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(e))) => return Err(e),
                    Some(Err(e)) => {
                        return Err(StoreError::Registry(format!("download task failed: {e}")))
                    }
                },
                _ = tick.tick() => {
                    progress(shared.completed());
                    flush(&mut flushing);
                    if last_save.elapsed() >= SAVE_EVERY {
                        // The state never runs ahead of the bytes written; if a power
                        // cut loses some of them, the hash at the end catches it.
                        shared.save()?;
                        last_save = Instant::now();
                    }
                }
            }
        }
        progress(size);
        // The last bytes go to disk while the hash catches up with them.
        if let Some(h) = flushing.take() {
            let _ = h.await;
        }
        flush(&mut flushing);

        let got = hasher
            .await
            .map_err(|e| StoreError::Registry(format!("hashing task failed: {e}")))??;
        // From here on the state is either useless (mismatch) or finished.
        saver.0.armed.store(false, Ordering::Release);
        if got != digest {
            let _ = fs::remove_file(partial);
            let _ = fs::remove_file(&paths.state);
            let _ = fs::remove_file(paths.state.with_extension("json.tmp"));
            return Err(StoreError::DownloadMismatch {
                want: digest.to_string(),
                got,
            });
        }
        if let Some(h) = flushing {
            let _ = h.await;
        }
        file.sync_all().map_err(io_err(partial))?;
        fs::rename(partial, &paths.done).map_err(io_err(&paths.done))?;
        let _ = fs::remove_file(&paths.state);
        let _ = fs::remove_file(paths.state.with_extension("json.tmp"));
        Ok(())
    }

    /// Starts an upload of the blob `digest`; the bytes are checked against it in
    /// [`BlobUpload::finish`].
    pub fn begin_upload(&self, digest: &str) -> Result<BlobUpload, StoreError> {
        let expected = normalize_digest(digest)?;
        let done = self.blob_path(&expected)?;
        let blobs = self.blobs_dir();
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let tmp = blobs.join(format!(".upload-{}-{}", std::process::id(), nanos()));
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(BlobUpload {
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            expected,
            done,
        })
    }

    /// Copies a local file into `blobs/` under its sha256 (for `wick create FROM file`
    /// on the server's own disk and for imports).
    pub fn add_file_blob(&self, src: &Path) -> Result<(String, u64), StoreError> {
        let digest = sha256_file(src)?;
        if self.has_blob(&digest)? {
            let size = fs::metadata(src).map_err(io_err(src))?.len();
            return Ok((digest, size));
        }
        let mut up = self.begin_upload(&digest)?;
        let mut input = File::open(src).map_err(io_err(src))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf).map_err(io_err(src))?;
            if n == 0 {
                break;
            }
            up.write(&buf[..n])?;
        }
        let size = up.finish()?;
        Ok((digest, size))
    }
}

/// Held (shared) by every pull and create from before its first blob until its manifest
/// is written, so that pruning, which needs it exclusively, never removes a blob that a
/// manifest about to be written will refer to.
pub struct WriterGuard(#[allow(dead_code)] File);

impl Store {
    fn writers_lock(&self) -> Result<File, StoreError> {
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let path = self.root.join(".wick-writers.lock");
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))
    }

    /// Waits (briefly: pruning holds the lock for milliseconds) and takes a writer's share.
    pub fn writer_guard(&self) -> Result<WriterGuard, StoreError> {
        let file = self.writers_lock()?;
        file.lock_shared().map_err(io_err(&self.root))?;
        Ok(WriterGuard(file))
    }

    /// The lock pruning needs, or `None` while a pull or create is under way.
    pub(crate) fn try_prune_lock(&self) -> Result<Option<File>, StoreError> {
        let file = self.writers_lock()?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(StoreError::Io {
                path: self.root.clone(),
                source: e,
            }),
        }
    }
}

/// A blob being uploaded; dropped unfinished, its temp file goes away.
pub struct BlobUpload {
    tmp: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    expected: String,
    done: PathBuf,
}

impl BlobUpload {
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(bytes);
        match self.file.as_mut() {
            Some(f) => f.write_all(bytes).map_err(io_err(&self.tmp)),
            None => Ok(()),
        }
    }

    /// Checks the hash and moves the blob into place; returns its size.
    pub fn finish(mut self) -> Result<u64, StoreError> {
        let got = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if got != self.expected {
            return Err(StoreError::UploadMismatch {
                expected: self.expected.clone(),
                got,
            });
        }
        let file = self.file.take();
        let size = match file {
            Some(f) => {
                f.sync_all().map_err(io_err(&self.tmp))?;
                f.metadata().map_err(io_err(&self.tmp))?.len()
            }
            None => 0,
        };
        fs::rename(&self.tmp, &self.done).map_err(io_err(&self.done))?;
        Ok(size)
    }
}

impl Drop for BlobUpload {
    fn drop(&mut self) {
        // After a successful finish the temp name no longer exists; this is a no-op then.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Sets its flag when dropped: tells the hash thread to stop.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Store {
    /// Removes what crashed writers left behind, when it is older than `max_age` and no live
    /// process holds it (the store is shared: a file another process is writing is never
    /// touched): temp manifests (`.<tag>.tmp-*`), unfinished uploads (`blobs/.upload-*`)
    /// and abandoned downloads (`-partial` with its resume state, when its lock is free).
    /// Returns how many files went.
    pub fn remove_stale(&self, max_age: Duration) -> usize {
        let old = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_age)
        };
        let mut removed = 0;
        let mut remove = |p: &Path| {
            if fs::remove_file(p).is_ok() {
                tracing::info!(file = %p.display(), "removed a stale temp file");
                removed += 1;
            }
        };
        for tag in self.manifest_files() {
            let name = tag.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.starts_with('.') && n.contains(".tmp-")) && old(&tag) {
                remove(&tag);
            }
        }
        let Ok(entries) = fs::read_dir(self.blobs_dir()) else {
            return removed;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".upload-") && old(&path) {
                remove(&path);
            } else if let Some(digest) = name.strip_suffix("-partial") {
                let Ok(paths) = self.blob_paths(&digest.replacen('-', ":", 1)) else {
                    continue;
                };
                if !old(&path) {
                    continue;
                }
                // Held by a live download (here or on another host): leave it.
                if let Ok(Some(_held)) = try_lock(&paths.lock) {
                    for p in [&paths.partial, &paths.state] {
                        remove(p);
                    }
                    let _ = fs::remove_file(paths.state.with_extension("json.tmp"));
                }
            }
        }
        removed
    }
}

/// Bytes free for an unprivileged writer on the file system holding `dir`, or `None` when
/// that cannot be read.
pub(crate) fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call and `st` points to
    // writable memory of the right type, which statvfs fills on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // The field types vary by platform (u64 on Linux x86-64).
    #[allow(clippy::useless_conversion)]
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// Removes a download's partial file and resume state (its lock file stays: another
/// process may be waiting on it).
fn release_partial(paths: &BlobPaths) {
    let _ = fs::remove_file(&paths.partial);
    let _ = fs::remove_file(&paths.state);
    let _ = fs::remove_file(paths.state.with_extension("json.tmp"));
}

/// Hashes the blob from the start as its parts complete in order (bytes already on disk
/// from an earlier attempt included); `Err` if stopped before the end.
fn follow_hash(
    file: &File,
    path: &Path,
    shared: &Progress,
    stop: &AtomicBool,
) -> Result<String, StoreError> {
    let mut hasher = Sha256::new();
    // Small enough that what `read` copied is still in the CPU cache when it is hashed.
    let mut buf = vec![0u8; 256 << 10];
    let (mut pos, mut j) = (0u64, 0usize);
    loop {
        while j < shared.parts.len()
            && shared.done[j].load(Ordering::Acquire) >= shared.parts[j].size
        {
            j += 1;
        }
        let available = match shared.parts.get(j) {
            Some(p) => p.offset + shared.done[j].load(Ordering::Acquire),
            None => shared.size,
        };
        if pos < available {
            let n = (available - pos).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], pos)
                .map_err(io_err(path))?;
            hasher.update(&buf[..n]);
            pos += n as u64;
            continue;
        }
        if pos >= shared.size {
            return Ok(format!("sha256:{}", hex::encode(hasher.finalize())));
        }
        if stop.load(Ordering::Acquire) {
            return Err(StoreError::Registry("download stopped".into()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Fetches part `i` until it is complete, retrying failures that make no progress.
async fn fetch_part(
    client: &reqwest::Client,
    url: &str,
    file: &File,
    path: &Path,
    shared: &Progress,
    i: usize,
) -> Result<(), StoreError> {
    let part = shared.parts[i];
    let mut failures = 0u32;
    loop {
        let before = shared.done[i].load(Ordering::Acquire);
        if before >= part.size {
            return Ok(());
        }
        let err = match fetch_range(client, url, file, path, part, &shared.done[i]).await {
            Ok(()) if shared.done[i].load(Ordering::Acquire) >= part.size => return Ok(()),
            Ok(()) => "the connection closed before the range was complete".to_string(),
            Err(RangeError::Fatal(e)) => return Err(e),
            Err(RangeError::Retry(e)) => e,
        };
        if shared.done[i].load(Ordering::Acquire) > before {
            failures = 0;
        } else {
            failures += 1;
        }
        if failures > RETRIES {
            return Err(StoreError::Registry(format!(
                "downloading {url}: {err} (after {RETRIES} retries)"
            )));
        }
        tracing::debug!(%url, part = i, error = %err, "retrying a blob range");
        tokio::time::sleep(Duration::from_millis(200 << failures.min(4))).await;
    }
}

/// One ranged GET for the rest of a part, written at its offsets as it arrives.
async fn fetch_range(
    client: &reqwest::Client,
    url: &str,
    file: &File,
    path: &Path,
    part: Part,
    done: &AtomicU64,
) -> Result<(), RangeError> {
    let have = done.load(Ordering::Acquire);
    let start = part.offset + have;
    let end = part.offset + part.size - 1;
    let resp = client
        .get(url)
        .header(reqwest::header::RANGE, format!("bytes={start}-{end}"))
        .send()
        .await
        .map_err(|e| RangeError::Retry(error_chain(&e)))?;
    let status = resp.status();
    // A server that ignores Range sends the whole blob: skip to where we are.
    let mut skip = match status.as_u16() {
        206 => 0,
        200 => start,
        408 | 429 => return Err(RangeError::Retry(format!("{url}: {status}"))),
        400..=499 => {
            return Err(RangeError::Fatal(StoreError::Registry(format!(
                "downloading {url}: {status}"
            ))))
        }
        _ => return Err(RangeError::Retry(format!("{url}: {status}"))),
    };
    let mut stream = resp.bytes_stream();
    loop {
        let next = match tokio::time::timeout(STALL, stream.next()).await {
            Ok(n) => n,
            Err(_) => return Err(RangeError::Retry("no data for 30s".into())),
        };
        let Some(chunk) = next else {
            return Ok(());
        };
        let mut chunk = chunk.map_err(|e| RangeError::Retry(error_chain(&e)))?;
        if skip > 0 {
            let n = skip.min(chunk.len() as u64);
            skip -= n;
            chunk = chunk.slice(n as usize..);
        }
        let have = done.load(Ordering::Acquire);
        let room = (part.size - have).min(chunk.len() as u64) as usize;
        if room == 0 {
            return Ok(());
        }
        file.write_all_at(&chunk[..room], part.offset + have)
            .map_err(|e| {
                RangeError::Fatal(StoreError::Io {
                    path: path.to_path_buf(),
                    source: e,
                })
            })?;
        done.store(have + room as u64, Ordering::Release);
    }
}

/// An error with its causes, which is where reqwest says what really happened.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_blob() {
        for size in [
            0u64,
            1,
            MIN_PART - 1,
            MIN_PART,
            3 * MIN_PART + 7,
            100 * MIN_PART,
        ] {
            let s = PartState::fresh(size);
            assert!(!s.parts.is_empty());
            assert!(s.parts.len() as u64 <= (size / MIN_PART).max(TARGET_PARTS) + 1);
            let mut next = 0;
            for p in &s.parts {
                assert_eq!(p.offset, next);
                next += p.size;
            }
            assert_eq!(next, size, "size {size}");
        }
    }

    #[test]
    fn digests_normalise() {
        let hex = "AB".repeat(32);
        assert_eq!(
            normalize_digest(&format!("sha256-{hex}")).unwrap(),
            format!("sha256:{}", hex.to_lowercase())
        );
        assert!(normalize_digest("sha256:abc").is_err());
        assert!(normalize_digest(&format!("md5:{hex}")).is_err());
    }
}
