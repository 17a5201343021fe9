//! Data parallelism for our CPU kernels: one persistent pool of worker threads that every
//! parallel CPU matmul (ours, and candle's k-quant kernels split by rows) runs on.
//!
//! Why our own pool rather than candle's barrier pool: candle's caller spin-waits until
//! every worker has checked in, even a worker that never got a core. When another process
//! shares the cores (a build, a co-tenant, a Kubernetes neighbour), the waiting caller and
//! the worker it waits for can sit on one core, and each op then lasts a scheduler time
//! slice: we measured SmolLM2 decode fall from 51 tokens/s (one thread) to 4.6 (two threads)
//! while a compiler ran beside it. Here work is claimed chunk by chunk from a shared
//! cursor, the caller only waits for chunks that were actually claimed, and waits by
//! yielding the core; idle workers spin briefly, then sleep. With a busy machine the pool
//! degrades to single-thread speed instead of collapsing.
//!
//! Threads: `WICK_NUM_THREADS`, else `RAYON_NUM_THREADS`, else the CPUs this process may
//! use (which follows a container's CPU quota). candle's own pool is kept to one thread
//! and rayon's global pool too, so no second set of spinning threads competes.

use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, Once, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next job before it sleeps. Decode runs a few
/// hundred short jobs per token; waking a sleeping thread costs tens of microseconds.
const WORKER_SPIN: Duration = Duration::from_micros(200);

/// Sets up threading (and the allocator: `huge_pages::keep_step_buffers`) before any model
/// work: reads our thread count, then tells candle
/// (its barrier pool, and the gemm parallelism it derives from `RAYON_NUM_THREADS`) and
/// rayon's global pool to use one thread, so candle's code runs inline on whichever of our
/// threads calls it.
pub fn init_threads() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = num_threads();
        super::huge_pages::keep_step_buffers();
        // set_var: called once at model load, before candle or rayon read these (both
        // read them when they first start threads) and before our own threads exist.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build_global();
        let _ = pool();
    });
}

/// Threads that run parallel work, the caller included (read once).
pub fn num_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        crate::config::threads_from_env()
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// One job: a type-erased `&dyn Fn(Range<usize>)` plus its chunking: claims
/// `0..shares` take `share` items each, later claims `chunk` items each.
struct Job {
    run: unsafe fn(*const (), Range<usize>),
    data: *const (),
    len: usize,
    shares: usize,
    share: usize,
    chunk: usize,
}

/// A value alone on its cache lines (two: the adjacent-line prefetcher pairs them), so
/// threads that write one shared counter do not also evict another that is being read.
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

struct Shared {
    /// `generation << 1 | open`. Workers join a job only while it is open.
    state: Line<AtomicU64>,
    /// Workers inside the current job (joined and not yet left).
    active: Line<AtomicUsize>,
    /// Next unclaimed item of the current job.
    cursor: Line<AtomicUsize>,
    /// Written by the caller only while the job is closed and no worker is active.
    job: UnsafeCell<Job>,
    sleeping: Vec<AtomicBool>,
    panicked: AtomicBool,
    threads: OnceLock<Vec<Thread>>,
}

// SAFETY: `job` is written only while closed with no active worker (see `Pool::run`) and
// read by workers only between joining an open job and leaving it.
unsafe impl Sync for Shared {}

struct Pool {
    shared: &'static Shared,
    /// One job at a time; a second concurrent caller runs its work inline.
    call: Mutex<u64>,
}

thread_local! {
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let workers = num_threads().saturating_sub(1);
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: Line(AtomicU64::new(0)),
            active: Line(AtomicUsize::new(0)),
            cursor: Line(AtomicUsize::new(0)),
            job: UnsafeCell::new(Job {
                run: |_, _| {},
                data: std::ptr::null(),
                len: 0,
                shares: 0,
                share: 1,
                chunk: 1,
            }),
            sleeping: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            panicked: AtomicBool::new(false),
            threads: OnceLock::new(),
        }));
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let spawned = std::thread::Builder::new()
                .name(format!("wick-cpu-{i}"))
                .spawn(move || worker(shared, i));
            match spawned {
                Ok(h) => handles.push(h.thread().clone()),
                // Fewer workers only means less parallelism; the caller covers the rest.
                Err(e) => tracing::warn!("cannot start CPU worker thread {i}: {e}"),
            }
        }
        let _ = shared.threads.set(handles);
        Pool {
            shared,
            call: Mutex::new(0),
        }
    })
}

/// Claims chunks of the current job until none are left.
///
/// # Safety
/// The caller must be inside the job (its own caller, or a worker counted in `active`).
unsafe fn drain(shared: &Shared) {
    // SAFETY: the caller upholds the contract in `# Safety` above.
    unsafe {
        let job = &*shared.job.get();
        loop {
            let claim = shared.cursor.fetch_add(1, SeqCst);
            let start = match claim.checked_sub(job.shares) {
                None => claim * job.share,
                Some(c) => job.shares * job.share + c * job.chunk,
            };
            if start >= job.len {
                break;
            }
            let size = if claim < job.shares {
                job.share
            } else {
                job.chunk
            };
            (job.run)(job.data, start..job.len.min(start + size));
        }
    }
}

fn worker(shared: &'static Shared, i: usize) {
    IN_POOL.with(|f| f.set(true));
    let mut seen = 0u64;
    loop {
        // Wait for a generation we have not joined yet: spin, then sleep.
        let spin_until = Instant::now() + WORKER_SPIN;
        let mut spins = 0u32;
        let state = loop {
            let s = shared.state.load(SeqCst);
            if s >> 1 != seen >> 1 && s & 1 == 1 {
                break s;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || Instant::now() < spin_until {
                std::hint::spin_loop();
                continue;
            }
            shared.sleeping[i].store(true, SeqCst);
            // Re-check after announcing sleep: the caller wakes only announced sleepers.
            let s = shared.state.load(SeqCst);
            if !(s >> 1 != seen >> 1 && s & 1 == 1) {
                std::thread::park();
            }
            shared.sleeping[i].store(false, SeqCst);
        };
        seen = state;
        shared.active.fetch_add(1, SeqCst);
        // Join only if the job is still the open one we saw: the caller closes it before
        // it waits for `active`, so a late joiner sees the close and touches nothing.
        if shared.state.load(SeqCst) == state {
            // SAFETY: joined an open job (counted in `active` before the check above).
            let ok =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { drain(shared) }));
            if ok.is_err() {
                // A bug: keep the pool alive and let the caller raise it.
                shared.panicked.store(true, SeqCst);
            }
        }
        shared.active.fetch_sub(1, SeqCst);
    }
}

/// `f(i)` for each `i` in `0..count` on the pool, in order; `None` for an item whose result
/// never arrived.
pub fn par_map<T: Send>(count: usize, f: impl Fn(usize) -> T + Sync) -> Vec<Option<T>> {
    let slots: Vec<Mutex<Option<T>>> = (0..count).map(|_| Mutex::new(None)).collect();
    par_for(count, |r| {
        for i in r {
            let v = f(i);
            if let Ok(mut slot) = slots[i].lock() {
                *slot = Some(v);
            }
        }
    });
    slots
        .into_iter()
        .map(|m| m.into_inner().ok().flatten())
        .collect()
}

/// # Safety
/// `data` must point to a live `F`.
unsafe fn call_fn<F: Fn(Range<usize>) + Sync>(data: *const (), r: Range<usize>) {
    // SAFETY: the caller upholds the contract in `# Safety` above.
    unsafe { (*(data as *const F))(r) }
}

/// Calls `f` on disjoint ranges that together cover `0..count`, in parallel.
pub fn par_for<F: Fn(Range<usize>) + Sync>(count: usize, f: F) {
    if count == 0 {
        return;
    }
    let pool = pool();
    let workers = pool.shared.sleeping.len();
    if workers == 0 || count == 1 || IN_POOL.with(|p| p.get()) {
        return f(0..count);
    }
    let Ok(mut gen) = pool.call.try_lock() else {
        return f(0..count);
    };
    let shared = pool.shared;
    *gen += 1;
    // Claims: first one contiguous share per thread (7/8 of the items in all), then small
    // chunks, so fast threads absorb a slow one's work. Whoever comes claims the next
    // share, so a worker that never gets a core leaves none stranded. One long run per
    // thread keeps each weight stream sequential: SmolLM2 decoded 7% faster than with
    // eight equal chunks (each a fresh stream to start, each claim a contended atomic).
    let threads = workers + 1;
    let share = (count * 7 / 8 / threads).max(1);
    let chunk = count.div_ceil(threads * 16);
    // SAFETY: the previous job is closed and `active` was 0 when it returned, so no worker
    // reads `job` now; workers read it only after the open state below is published.
    unsafe {
        *shared.job.get() = Job {
            run: call_fn::<F>,
            data: &f as *const _ as *const (),
            len: count,
            shares: threads,
            share,
            chunk,
        };
    }
    shared.cursor.store(0, SeqCst);
    shared.state.store(*gen << 1 | 1, SeqCst);
    if let Some(threads) = shared.threads.get() {
        for (t, sleeping) in threads.iter().zip(&shared.sleeping) {
            if sleeping.load(SeqCst) {
                t.unpark();
            }
        }
    }
    {
        let _close = Close(shared, *gen);
        // SAFETY: we own the open job.
        unsafe { drain(shared) };
        // `_close` drops here (or while unwinding from `f`), before `f` does.
    }
    if shared.panicked.swap(false, SeqCst) {
        panic!("a CPU kernel panicked on a worker thread");
    }
}

/// Closes the caller's job, then waits only for workers that joined it: every item is
/// claimed by then, so they are finishing a chunk (or leaving). Waits by yielding rather
/// than spinning, so that a worker sharing our core gets to run.
struct Close(&'static Shared, u64);

impl Drop for Close {
    fn drop(&mut self) {
        let Close(shared, gen) = *self;
        shared.state.store(gen << 1, SeqCst);
        let mut spins = 0u32;
        while shared.active.load(SeqCst) != 0 {
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// An output buffer that parallel tasks write disjoint parts of.
pub struct SharedOut(pub *mut f32);
// SAFETY: only handed to tasks that write disjoint elements (each caller's contract).
unsafe impl Sync for SharedOut {}

/// Fills `out`, seen as rows of `row_len` values, calling `f(row_index, row)` for every row
/// in parallel.
pub fn par_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    let base = SharedOut(out.as_mut_ptr());
    let base = &base;
    par_for(rows, move |range: Range<usize>| {
        for r in range {
            // SAFETY: r < rows, so the row lies inside `out`; ranges are disjoint (par_for).
            let row = unsafe { std::slice::from_raw_parts_mut(base.0.add(r * row_len), row_len) };
            f(r, row);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_once() {
        let mut out = vec![0f32; 1000 * 3];
        par_rows(&mut out, 3, |r, row| {
            for v in row.iter_mut() {
                *v += r as f32;
            }
        });
        for (r, row) in out.chunks(3).enumerate() {
            assert!(row.iter().all(|&v| v == r as f32));
        }
    }

    #[test]
    fn many_jobs_from_several_callers_cover_every_item_once() {
        let callers: Vec<_> = (0..3)
            .map(|c| {
                std::thread::spawn(move || {
                    for len in 1..300 {
                        let hits: Vec<AtomicUsize> =
                            (0..len).map(|_| AtomicUsize::new(0)).collect();
                        par_for(len, |r| {
                            for i in r {
                                hits[i].fetch_add(1, SeqCst);
                            }
                        });
                        assert!(
                            hits.iter().all(|h| h.load(SeqCst) == 1),
                            "caller {c} len {len}"
                        );
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().expect("caller");
        }
    }
}
