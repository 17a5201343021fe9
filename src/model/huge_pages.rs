//! Owned weight bytes in memory the kernel may back with 2 MiB transparent huge pages.
//!
//! A decode step streams every weight byte once. With 4 KiB pages that stream pays a TLB
//! miss (and a page walk) every 4 KiB; on our 2-core test host a 1 GiB read runs at about
//! 20 GB/s on 4 KiB pages and 27 GB/s on huge pages. Linux gives anonymous memory huge pages
//! only where asked (`madvise`, the usual `transparent_hugepage` setting) or everywhere
//! (`always`), and only for whole aligned 2 MiB spans. So weights are placed one after another
//! in 2 MiB-aligned, advised chunks: a 3 MiB tensor on its own would leave a third of itself
//! on small pages. Where the OS says no (`never`, or not Linux), the same memory works with
//! small pages.
//!
//! The process's other large buffers, the activations of each step, are the allocator's:
//! `keep_step_buffers` keeps them in glibc's heap from step to step.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Weak};

use memmap2::MmapMut;

/// The huge page size on x86-64 and (by default) aarch64 Linux.
const HUGE: usize = 2 << 20;
/// Size of the shared chunks smaller buffers are carved from. A chunk is unmapped when the
/// last buffer in it is dropped; at most its last, partly used span is resident beyond what
/// its buffers hold.
const CHUNK: usize = 32 << 20;
/// Buffers below this stay on the heap (norms, biases, tests' tiny tensors).
const SMALL: usize = 64 << 10;
/// Buffers start on cache lines.
const ALIGN: usize = 64;

/// Keeps freed step buffers in the heap for the next step. glibc maps allocations past its
/// mmap threshold on their own and gives freed memory at the heap's top back past its trim
/// threshold (both adapt, to 32 and 64 MiB at most); a prefill step's activations of a few
/// MiB each were mapped, faulted in zero page by page and unmapped again, step after step:
/// 40% of a 16-prompt SmolLM2 prefill went to page faults. Fixed at those caps, the heap
/// serves and keeps them. Buffers past 32 MiB (a large model's KV planes) still get their own
/// maps, whose untouched pages cost nothing.
pub(super) fn keep_step_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's parameters (it takes the allocator's lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// A 2 MiB-aligned anonymous map advised for huge pages.
struct Chunk {
    /// Keeps the memory mapped; read and written only through `base`.
    _map: MmapMut,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a chunk is plain memory. Each byte range of it belongs to exactly one `HugeBytes`,
// whose `&`/`&mut` borrows govern every access, as they would for a `Vec<u8>`.
unsafe impl Send for Chunk {}
// SAFETY: as for `Send`: shared references to a chunk never access its bytes themselves.
unsafe impl Sync for Chunk {}

impl Chunk {
    /// `len` (a multiple of [`HUGE`]) zero bytes, untouched: the first write to each span is
    /// what gets a huge page.
    fn new(len: usize) -> Option<Self> {
        let mut map = MmapMut::map_anon(len + HUGE).ok()?;
        let at = map.as_ptr().align_offset(HUGE);
        // Advice refused (THP `never`) leaves small pages, which work the same.
        #[cfg(target_os = "linux")]
        let _ = map.advise_range(memmap2::Advice::HugePage, at, len);
        let base = NonNull::new(map[at..].as_mut_ptr())?;
        Some(Self {
            _map: map,
            base,
            len,
        })
    }
}

/// The chunk buffers are being carved from, and how much of it is used. Weak, so that a
/// chunk whose buffers were all dropped (a model unloaded) is unmapped at once.
static CURRENT: Mutex<Option<(Weak<Chunk>, usize)>> = Mutex::new(None);

/// Owned weight bytes: made by [`HugeBytes::zeroed`] (on the heap when small, else in a
/// huge-page chunk), or a heap vector wrapped as it is.
pub struct HugeBytes(Inner);

enum Inner {
    Heap(Vec<u8>),
    Chunk {
        chunk: Arc<Chunk>,
        at: usize,
        len: usize,
    },
}

impl HugeBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        Self::carve(len).unwrap_or_else(|| Self(Inner::Heap(vec![0; len])))
    }

    /// `len` bytes of a chunk: a chunk of their own when large, else the next bytes of the
    /// current shared chunk (a new one when it is full). `None` when small or when the OS
    /// maps nothing (a process out of address space; the heap will say so).
    fn carve(len: usize) -> Option<Self> {
        if len < SMALL {
            return None;
        }
        if len > CHUNK / 2 {
            let chunk = Arc::new(Chunk::new(len.next_multiple_of(HUGE))?);
            return Some(Self(Inner::Chunk { chunk, at: 0, len }));
        }
        // A poisoned lock only means another load panicked; the bump state is still valid.
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let live = current
            .take()
            .and_then(|(c, used)| Some((c.upgrade()?, used)));
        let (chunk, at) = match live {
            Some((chunk, used)) if chunk.len - used >= len => (chunk, used),
            _ => (Arc::new(Chunk::new(CHUNK)?), 0),
        };
        *current = Some((Arc::downgrade(&chunk), (at + len).next_multiple_of(ALIGN)));
        Some(Self(Inner::Chunk { chunk, at, len }))
    }
}

impl From<Vec<u8>> for HugeBytes {
    fn from(v: Vec<u8>) -> Self {
        Self(Inner::Heap(v))
    }
}

impl Deref for HugeBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Inner::Heap(v) => v,
            // SAFETY: `at..at + len` lies inside the chunk (carve checked it), is owned by
            // this buffer alone and is initialised (zero-mapped, or written through it); the
            // `Arc` keeps the map alive for as long as the borrow of `self`.
            Inner::Chunk { chunk, at, len } => unsafe {
                std::slice::from_raw_parts(chunk.base.as_ptr().add(*at), *len)
            },
        }
    }
}

impl DerefMut for HugeBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Inner::Heap(v) => v,
            // SAFETY: as in `deref`; and `&mut self` makes this the only borrow of the range,
            // which no other buffer overlaps.
            Inner::Chunk { chunk, at, len } => unsafe {
                std::slice::from_raw_parts_mut(chunk.base.as_ptr().add(*at), *len)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Huge-page kilobytes of the mapping that starts at `addr`, from /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn huge_kb_at(addr: usize) -> Option<usize> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let (_, region) = smaps.split_once(&format!("{addr:x}-"))?;
        let v = region
            .lines()
            .find_map(|l| l.strip_prefix("AnonHugePages:"))?;
        v.trim().trim_end_matches("kB").trim().parse().ok()
    }

    /// Buffers are zeroed, writable in full and disjoint; chunked ones start on cache lines,
    /// large ones on a huge page; and with THP on, a written chunk is all huge pages.
    #[test]
    fn buffers_are_zeroed_disjoint_and_on_huge_pages() {
        let mut bufs: Vec<HugeBytes> = [100, SMALL, 3 * HUGE / 2, 3 * HUGE / 2 + 1, CHUNK]
            .iter()
            .map(|&n| HugeBytes::zeroed(n))
            .collect();
        assert!(matches!(bufs[0].0, Inner::Heap(_)));
        assert!(bufs[1..].iter().all(|b| matches!(b.0, Inner::Chunk { .. })));
        for (i, b) in bufs.iter_mut().enumerate() {
            assert!(b.iter().all(|&x| x == 0), "buffer {i} starts zeroed");
            if matches!(b.0, Inner::Chunk { .. }) {
                assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            }
            b.fill(i as u8 + 1);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(
                b.iter().all(|&x| x == i as u8 + 1),
                "buffer {i} kept its bytes"
            );
        }
        let large = &bufs[4];
        assert_eq!(large.as_ptr() as usize % HUGE, 0);
        #[cfg(target_os = "linux")]
        if std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"))
        {
            let kb = huge_kb_at(large.as_ptr() as usize);
            assert_eq!(kb, Some(CHUNK / 1024), "the written chunk is on huge pages");
        }
    }
}
