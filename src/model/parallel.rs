//! Data parallelism for our CPU kernels on candle's own worker pool. candle's workers spin
//! for a while after each of its ops; work on a second pool (rayon's) would fight them for
//! the same cores, so everything parallel goes through one pool.

use std::ops::Range;
use std::sync::Once;

/// Keeps rayon's global pool (used by a few candle-nn ops) to one thread, so that all
/// parallel CPU work runs on candle's pool. With two pools of a thread per core each, their
/// spinning workers can starve each other: we measured runs on 2 cores that fell from 50 to
/// 4 tokens/s at random. Called before any model work; a pool built earlier is left alone.
pub fn init_threads() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build_global();
    });
}

struct SharedOut(*mut f32);
// SAFETY: each row range is handed to exactly one worker (execute_chunked partitions
// 0..rows), so no two threads ever write the same element.
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
    candle_core::utils::barrier_pool().execute_chunked(rows, move |range: Range<usize>| {
        for r in range {
            // SAFETY: r < rows, so the row lies inside `out`; rows are disjoint (see above).
            let row = unsafe { std::slice::from_raw_parts_mut(base.0.add(r * row_len), row_len) };
            f(r, row);
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_row_once() {
        let mut out = vec![0f32; 1000 * 3];
        super::par_rows(&mut out, 3, |r, row| {
            for v in row.iter_mut() {
                *v += r as f32;
            }
        });
        for (r, row) in out.chunks(3).enumerate() {
            assert!(row.iter().all(|&v| v == r as f32));
        }
    }
}
