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
