//! The paged KV cache's bookkeeping: which fixed-size blocks are free, who holds each block
//! (reference counts), and which full blocks hold which token prefix (prefix reuse).
//!
//! The cache tensors themselves live in the model's `KvCache`; this module only hands out
//! block ids. A full block is keyed by a hash of every token id up to and including it (its
//! parent block's hash and its own tokens), so a new sequence whose tokens start with a cached
//! prefix can take those blocks instead of recomputing them. A block whose reference count
//! drops to zero stays in the hash map with its contents until the space is needed.
//!
//! Free blocks are handed out so that the memory the cache touches stays close to what is in
//! use at once (on the CPU an untouched block costs no memory): first blocks that were used
//! before and hold no cached prefix, most recently freed first (their pages are resident and
//! warm); then cached prefixes, least recently freed first (a sequence's tail before its
//! head); blocks never used come last.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Hash of a full block: the chain of all tokens up to and including it.
pub type BlockHash = u64;

/// What a cached full block holds, kept so that a hash collision can never hand out the
/// wrong contents.
#[derive(Clone, Debug)]
struct CachedKey {
    hash: BlockHash,
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
}

#[derive(Clone, Debug, Default)]
struct BlockMeta {
    refs: u32,
    cached: Option<CachedKey>,
    /// Handed out at least once (its memory is touched).
    used: bool,
    /// Key in the free set while `refs == 0`.
    free_key: Option<FreeKey>,
}

/// Order of the free set (smallest handed out first): class, then order within the class.
type FreeKey = (u8, u64);
const REUSE: u8 = 0;
const EVICT: u8 = 1;
const UNTOUCHED: u8 = 2;

/// The block pool of one loaded model.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<BlockMeta>,
    /// Free blocks in the order they are handed out (see the module docs).
    free: BTreeMap<FreeKey, u32>,
    by_hash: HashMap<BlockHash, u32>,
    tick: u64,
}

/// The hash of a full block whose tokens are `tokens`, following the block `parent`.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let mut m = Self {
            block_size,
            blocks: vec![BlockMeta::default(); num_blocks],
            free: BTreeMap::new(),
            by_hash: HashMap::new(),
            tick: 0,
        };
        for id in 0..num_blocks {
            m.push_free(id as u32);
        }
        m
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks nobody holds (cached prefixes included: they are evicted on demand).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Full blocks currently findable by prefix.
    pub fn num_cached(&self) -> usize {
        self.by_hash.len()
    }

    fn push_free(&mut self, id: u32) {
        self.tick += 1;
        let meta = &mut self.blocks[id as usize];
        let key = match (meta.used, meta.cached.is_some()) {
            (false, _) => (UNTOUCHED, u64::from(id)),
            (true, false) => (REUSE, u64::MAX - self.tick),
            (true, true) => (EVICT, self.tick),
        };
        meta.free_key = Some(key);
        self.free.insert(key, id);
    }

    /// The cached blocks holding the longest block-aligned prefix of `tokens`, with their
    /// hashes. At most `max_tokens` tokens are matched (the caller keeps at least one token
    /// to compute, whose logits it needs). Nothing is reserved: see `take`.
    pub fn match_prefix(&self, tokens: &[u32], max_tokens: usize) -> (Vec<u32>, Vec<BlockHash>) {
        let bs = self.block_size;
        let mut ids = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = None;
        for chunk in tokens[..max_tokens.min(tokens.len())].chunks_exact(bs) {
            let hash = block_hash(parent, chunk);
            let Some(&id) = self.by_hash.get(&hash) else {
                break;
            };
            let same = self.blocks[id as usize]
                .cached
                .as_ref()
                .is_some_and(|k| k.parent == parent && *k.tokens == *chunk);
            if !same {
                break;
            }
            ids.push(id);
            hashes.push(hash);
            parent = Some(hash);
        }
        (ids, hashes)
    }

    /// How many of `ids` are free now, i.e. would leave the free pool when taken.
    fn count_free(&self, ids: &[u32]) -> usize {
        ids.iter()
            .filter(|&&id| self.blocks[id as usize].refs == 0)
            .count()
    }

    /// Adds a reference to each of `ids` (cached blocks found by [`Self::match_prefix`]).
    fn take(&mut self, ids: &[u32]) {
        for &id in ids {
            let meta = &mut self.blocks[id as usize];
            if meta.refs == 0 {
                if let Some(key) = meta.free_key.take() {
                    self.free.remove(&key);
                }
            }
            meta.refs += 1;
        }
    }

    /// Hands out `n` blocks with one reference each, evicting cached prefixes as needed, or
    /// `None` (and nothing changes) when fewer than `n` are free.
    fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let (_, id) = self.free.pop_first()?;
            let meta = &mut self.blocks[id as usize];
            meta.free_key = None;
            meta.refs = 1;
            meta.used = true;
            if let Some(key) = meta.cached.take() {
                if self.by_hash.get(&key.hash) == Some(&id) {
                    self.by_hash.remove(&key.hash);
                }
            }
            out.push(id);
        }
        Some(out)
    }

    /// Makes the block table `table` cover `upto` tokens: appends `cached` (prefix blocks
    /// found by [`Self::match_prefix`], taken with a reference each), then fresh blocks for
    /// the rest. All or nothing: when too few blocks are free, returns false and changes
    /// nothing. The one place the scheduler gets blocks, for running and new sequences alike.
    pub fn allocate_slots(&mut self, table: &mut Vec<u32>, cached: &[u32], upto: usize) -> bool {
        let fresh = upto
            .div_ceil(self.block_size)
            .saturating_sub(table.len() + cached.len());
        // Cached blocks nobody holds leave the free pool when taken.
        if fresh + self.count_free(cached) > self.num_free() {
            return false;
        }
        self.take(cached);
        table.extend_from_slice(cached);
        match self.allocate(fresh) {
            Some(new) => table.extend(new),
            // Cannot happen after the check above; undo so the pool stays consistent.
            None => {
                self.free(cached);
                table.truncate(table.len() - cached.len());
                return false;
            }
        }
        true
    }

    /// Drops one reference to each of `ids`. Pass a sequence's table in order: blocks are
    /// released last first, so a sequence's tail (least likely to be shared) is evicted
    /// before its head.
    pub fn free(&mut self, ids: &[u32]) {
        for &id in ids.iter().rev() {
            let meta = &mut self.blocks[id as usize];
            if meta.refs == 0 {
                // A double free is a bookkeeping bug; ignoring it keeps the pool consistent.
                tracing::error!(block = id, "KV block freed twice");
                continue;
            }
            meta.refs -= 1;
            if meta.refs == 0 {
                self.push_free(id);
            }
        }
    }

    /// Records that block `id` is full and holds `tokens` after the prefix `parent`, so later
    /// sequences can reuse it. Returns the block's hash (the next block's parent). When
    /// another block already holds the same prefix, this one stays private.
    pub fn register_full(
        &mut self,
        id: u32,
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> BlockHash {
        let hash = block_hash(parent, tokens);
        if !self.by_hash.contains_key(&hash) && self.blocks[id as usize].cached.is_none() {
            self.by_hash.insert(hash, id);
            self.blocks[id as usize].cached = Some(CachedKey {
                hash,
                parent,
                tokens: tokens.into(),
            });
        }
        hash
    }

    /// Reference count of a block (tests and invariant checks).
    pub fn refs(&self, id: u32) -> u32 {
        self.blocks.get(id as usize).map_or(0, |m| m.refs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_and_free_round_trip() {
        let mut m = BlockManager::new(4, 2);
        let a = m.allocate(3).expect("3 free");
        assert_eq!(m.num_free(), 1);
        assert!(m.allocate(2).is_none());
        assert_eq!(m.num_free(), 1, "a failed allocation changes nothing");
        m.free(&a);
        assert_eq!(m.num_free(), 4);
    }

    #[test]
    fn prefix_is_found_shared_and_evicted_tail_first() {
        let mut m = BlockManager::new(4, 2);
        let toks = [1, 2, 3, 4, 5];
        let a = m.allocate(3).expect("blocks");
        let h0 = m.register_full(a[0], None, &toks[0..2]);
        m.register_full(a[1], Some(h0), &toks[2..4]);
        let (ids, _) = m.match_prefix(&toks, 4);
        assert_eq!(ids, a[..2]);
        // Shared while the first holder still runs.
        m.take(&ids);
        assert_eq!(m.refs(a[0]), 2);
        m.free(&ids);
        m.free(&a);
        assert_eq!(m.num_free(), 4);
        // The used block without a prefix goes first; the prefix survives it.
        assert_eq!(m.allocate(1), Some(vec![a[2]]));
        assert_eq!(m.match_prefix(&toks, 4).0.len(), 2);
        // Then the prefix's tail before its head, both before the never-used block.
        assert_eq!(m.allocate(1), Some(vec![a[1]]));
        assert_eq!(m.match_prefix(&toks, 4).0, vec![a[0]]);
        assert_eq!(m.allocate(1), Some(vec![a[0]]));
        assert_eq!(m.allocate(1), Some(vec![3]));
    }

    #[test]
    fn used_blocks_are_reused_before_new_ones() {
        // What the cache touches stays what was in use at once: a sequence of two blocks
        // coming and going 100 times only ever uses the same two.
        let mut m = BlockManager::new(64, 4);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let b = m.allocate(2).expect("blocks");
            seen.extend(b.iter().copied());
            m.free(&b);
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        // Most recently freed first.
        let b = m.allocate(1).expect("block");
        let c = m.allocate(1).expect("block");
        m.free(&c);
        m.free(&b);
        assert_eq!(m.allocate(1), Some(b));
    }

    #[test]
    fn different_prefix_does_not_match() {
        let mut m = BlockManager::new(4, 2);
        let a = m.allocate(2).expect("blocks");
        let h0 = m.register_full(a[0], None, &[1, 2]);
        m.register_full(a[1], Some(h0), &[3, 4]);
        assert_eq!(m.match_prefix(&[1, 2, 9, 4, 5], 4).0, vec![a[0]]);
        assert!(m.match_prefix(&[9, 2, 3, 4, 5], 4).0.is_empty());
        // The cap keeps the last token out of the match.
        assert_eq!(m.match_prefix(&[1, 2, 3, 4], 3).0, vec![a[0]]);
    }
}
