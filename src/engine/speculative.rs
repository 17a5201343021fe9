//! Speculative decoding by prompt lookup: draft tokens come from the sequence itself (its
//! prompt and its output so far), as vLLM's n-gram proposer and llama.cpp's lookup decoding
//! do, with no draft model.
//!
//! When the last few tokens also appear earlier in the sequence, the tokens that followed
//! them there are a good guess for what follows now: an edited file repeats most of the
//! original, an answer quotes its sources, code repeats its names. The scheduler puts the
//! guesses after the sequence's next token in one forward step (one row each, with logits),
//! and the engine samples each row in order as if it had been a decode step of its own,
//! keeping the guesses up to the first one the sampler disagrees with, plus the sampler's
//! own token there. Because each kept token is exactly what sampling that row gives, and a
//! row's logits do not depend on what else is in the batch (see ARCHITECTURE.md, batch
//! invariance), the output is the same token for token as without speculation, greedy or
//! seeded: the guesses only change how many tokens one step yields.
//!
//! A draft model ([`Drafter`], named by a model's `draft_model` parameter) guesses instead
//! where it is loaded: it reads everything, not only repeats, and the same check keeps the
//! output the target's.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::{Batch, KvCache, KvType, Model, Tokenizer};

use super::block_manager::BlockManager;
use super::scheduler::SeqId;
use super::EngineError;

/// The longest suffix looked up: longer matches predict better and are tried first.
const MAX_NGRAM: usize = 4;
/// The shortest: single tokens match too often to predict anything.
const MIN_NGRAM: usize = 2;

/// Up to `k` draft tokens for `tokens`: the tokens that followed the most recent earlier
/// occurrence of its longest matching suffix (of `MAX_NGRAM` down to `MIN_NGRAM` tokens).
/// Empty when no suffix occurs earlier.
pub fn ngram_draft(tokens: &[u32], k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    let len = tokens.len();
    for n in (MIN_NGRAM..=MAX_NGRAM.min(len.saturating_sub(1))).rev() {
        let suffix = &tokens[len - n..];
        // Most recent first: the nearer past predicts the near future best. Matches end
        // before the last token, so something always follows them.
        let found = (0..len - n).rev().find(|&i| tokens[i..i + n] == *suffix);
        if let Some(i) = found {
            let from = i + n;
            return tokens[from..(from + k).min(len)].to_vec();
        }
    }
    Vec::new()
}

/// A draft model and the name it was asked for by (`draft_model`).
#[derive(Clone)]
pub struct DraftModel {
    pub name: String,
    pub model: Arc<Model>,
}

/// Draft tokens per step when a draft model is loaded and neither the request nor the
/// server says how many.
pub const DEFAULT_MODEL_DRAFT: usize = 8;

/// After its first guess the draft goes on only while it gives its own guess at least this
/// probability (as llama.cpp's `--draft-p-min`): an unsure draft wastes the target's rows.
const MIN_DRAFT_PROB: f32 = 0.5;

/// Speculative decoding with a draft model: a smaller model with the same tokenizer
/// guesses the next tokens greedily, one forward step each, and the target checks them as
/// it checks prompt-lookup guesses (so the output is the target's, token for token). The
/// draft keeps its own paged KV cache; each sequence's entry remembers which tokens its
/// cache holds, so after the target keeps some guesses only the tokens that differ are fed
/// again.
pub struct Drafter {
    model: Arc<Model>,
    cache: Box<dyn KvCache + Send>,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Drafted>,
    /// Guesses must be tokens of the target's vocabulary.
    target_vocab: usize,
}

/// A sequence's state in the draft's cache.
#[derive(Default)]
struct Drafted {
    table: Vec<u32>,
    /// The tokens whose K/V the draft's cache holds, in order.
    fed: Vec<u32>,
}

/// Prompt tokens the draft reads per forward step while it catches up with a sequence.
const DRAFT_CHUNK: usize = 512;

impl Drafter {
    /// A drafter of `draft` for `target`, with a cache of `num_blocks` blocks of
    /// `block_size` tokens. The two must share a tokenizer: the same tokens under the same
    /// ids and the same end-of-turn tokens.
    pub fn new(
        draft: Arc<Model>,
        target: &Model,
        num_blocks: usize,
        block_size: usize,
        ty: KvType,
    ) -> Result<Self, EngineError> {
        same_vocabulary(&draft.tokenizer, &target.tokenizer)?;
        let cache = draft
            .new_kv_cache(num_blocks, block_size, ty)
            .map_err(EngineError::Cache)?;
        Ok(Self {
            cache,
            blocks: BlockManager::new(num_blocks, block_size),
            seqs: HashMap::new(),
            target_vocab: target.config().vocab_size.min(draft.config().vocab_size),
            model: draft,
        })
    }

    /// Up to `k` guesses of what follows `tokens` (the sequence `id` so far, its next token
    /// included). Empty when the draft cannot read the sequence (an image's rows) or its
    /// cache is full.
    pub fn propose(&mut self, id: SeqId, tokens: &[u32], k: usize) -> Vec<u32> {
        if k == 0 || tokens.is_empty() {
            return Vec::new();
        }
        match self.try_propose(id, tokens, k) {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(error = %e, "draft model step failed; no draft this step");
                self.forget(id);
                Vec::new()
            }
        }
    }

    fn try_propose(
        &mut self,
        id: SeqId,
        tokens: &[u32],
        k: usize,
    ) -> crate::model::Result<Vec<u32>> {
        let st = self.seqs.entry(id).or_default();
        // What the cache holds of this sequence: the tokens it shares with what it was fed
        // (the guesses the target refused differ), less at least the last token, whose
        // logits give the first guess.
        let same = st
            .fed
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        st.fed.truncate(same.min(tokens.len() - 1));
        // What it was fed was checked then; an image's placeholders are not tokens.
        let feed = &tokens[st.fed.len()..];
        if feed.iter().any(|&t| t as usize >= self.target_vocab) {
            return Ok(Vec::new());
        }
        // The last guess is not fed, so the cache needs `tokens.len() + k - 1` slots.
        if !self
            .blocks
            .allocate_slots(&mut st.table, &[], tokens.len() + k - 1)
        {
            self.forget(id);
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(k);
        let mut feed: Vec<u32> = feed.to_vec();
        while out.len() < k {
            let mut next = None;
            for chunk in feed.chunks(DRAFT_CHUNK) {
                let mut batch = Batch::default();
                let last = chunk.as_ptr_range().end == feed.as_ptr_range().end;
                batch.push_seq(chunk, st.fed.len(), st.table.clone(), last);
                let logits = self.model.decoder.forward(&batch, self.cache.as_mut())?;
                st.fed.extend_from_slice(chunk);
                if last {
                    let rows = logits.to_vec2::<f32>()?;
                    next = rows
                        .first()
                        .map(|r| best(&r[..self.target_vocab.min(r.len())]));
                }
            }
            let Some((t, p)) = next else { break };
            if !out.is_empty() && p < MIN_DRAFT_PROB {
                break;
            }
            out.push(t);
            feed = vec![t];
        }
        Ok(out)
    }

    /// Drops a finished sequence's state and blocks.
    pub fn forget(&mut self, id: SeqId) {
        if let Some(st) = self.seqs.remove(&id) {
            self.blocks.free(&st.table);
        }
    }

    /// Drops every sequence's state (after a failed step).
    pub fn reset(&mut self) {
        self.seqs.clear();
        self.blocks = BlockManager::new(self.blocks.num_blocks(), self.blocks.block_size());
    }
}

/// The index of the largest logit (the first of equals, as greedy sampling picks) and its
/// probability.
fn best(row: &[f32]) -> (u32, f32) {
    let mut top = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[top] {
            top = i;
        }
    }
    let max = row.get(top).copied().unwrap_or(0.0);
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    (top as u32, 1.0 / sum)
}

/// Checks that two tokenizers give the same ids to the same tokens and end turns alike.
fn same_vocabulary(draft: &Tokenizer, target: &Tokenizer) -> Result<(), EngineError> {
    let bad = |why: String| Err(EngineError::Draft(why));
    if draft.vocab_size() != target.vocab_size() {
        return bad(format!(
            "its tokenizer has {} tokens, the model's {}",
            draft.vocab_size(),
            target.vocab_size()
        ));
    }
    if draft.eos_ids() != target.eos_ids() {
        return bad("its end-of-turn tokens differ from the model's".into());
    }
    let n = u32::try_from(target.vocab_size()).unwrap_or(u32::MAX);
    if let Some(id) = (0..n).find(|&i| draft.token_str(i) != target.token_str(i)) {
        return bad(format!("its token {id} differs from the model's"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_the_most_recent_longest_match() {
        // "1 2 3" occurs at 0 and again at the end: the draft is what followed it.
        let t = [1, 2, 3, 4, 5, 6, 9, 1, 2, 3];
        assert_eq!(ngram_draft(&t, 3), vec![4, 5, 6]);
        assert_eq!(ngram_draft(&t, 10), vec![4, 5, 6, 9, 1, 2, 3]);
        // Two earlier occurrences of "7 8": the later one wins.
        let t = [7, 8, 1, 0, 7, 8, 2, 0, 7, 8];
        assert_eq!(ngram_draft(&t, 2), vec![2, 0]);
        // A longer match beats a more recent shorter one.
        let t = [5, 7, 8, 1, 9, 7, 8, 2, 5, 7, 8];
        assert_eq!(ngram_draft(&t, 1), vec![1]);
    }

    #[test]
    fn nothing_without_a_match() {
        assert!(ngram_draft(&[1, 2, 3, 4], 4).is_empty());
        assert!(ngram_draft(&[], 4).is_empty());
        assert!(
            ngram_draft(&[1, 1], 4).is_empty(),
            "a 2-gram needs a token after it"
        );
        assert!(ngram_draft(&[1, 2, 1, 2], 0).is_empty());
        // A single repeated token is below the shortest n-gram.
        assert!(ngram_draft(&[3, 1, 2, 3], 4).is_empty());
    }

    #[test]
    fn overlapping_repeats_extend_the_run() {
        // A run of one token: the match one back continues it.
        assert_eq!(ngram_draft(&[0, 6, 6, 6, 6], 2), vec![6]);
        assert_eq!(ngram_draft(&[1, 2, 1, 2, 1, 2], 4), vec![1, 2]);
    }
}
