//! Streaming text out of generated tokens: incremental detokenization that never emits a
//! broken UTF-8 character, and stop strings matched across token boundaries.
//!
//! Byte-level BPE vocabularies (Qwen, Llama 3, SmolLM2) split one Chinese character or emoji
//! over several tokens, and SentencePiece-style decoders treat a leading space differently at
//! the start of a decode. So a token is never decoded alone: [`IncrementalDecoder`] decodes a
//! short window with the already-emitted tokens before it as context and emits only the new
//! suffix, holding it back while it still ends in an incomplete character. [`StopMatcher`]
//! then works on that text, holding back anything that could still become a stop string.

use std::fmt;
use std::ops::Deref;

use crate::model::tokenizer::Decode;
use crate::model::Result;

/// U+FFFD: what a lossy decoder produces for an incomplete byte sequence.
const REPLACEMENT: char = '\u{FFFD}';

/// A UTF-8 character has at most 4 bytes and every token carries at least one, so a character
/// still incomplete after this many held-back tokens never will be: those bytes are invalid and
/// are let through as replacement characters rather than holding the stream forever.
const MAX_PENDING: usize = 8;

/// When forcing out invalid bytes, the last tokens are kept back in case they begin a
/// character (an incomplete character spans at most 3 bytes).
const FORCE_KEEP: usize = 3;

/// How many prompt tokens [`IncrementalDecoder::with_context`] keeps as context.
const CONTEXT_TOKENS: usize = 5;

/// Turns a stream of token ids into text pieces, each of them whole UTF-8 characters.
///
/// `D` is any pointer to a [`Decode`] (`Arc<Tokenizer>`, `&Tokenizer`, `Box<dyn Decode>`).
/// Internally it keeps a window of ids: `ids[..read]` has been emitted and is kept only as
/// context for the next decode; `ids[read..]` has not been emitted yet.
pub struct IncrementalDecoder<D> {
    decoder: D,
    ids: Vec<u32>,
    read: usize,
    /// The decode of `ids[..read]`, cached between pushes that emit nothing.
    prefix_text: Option<String>,
}

impl<D> fmt::Debug for IncrementalDecoder<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncrementalDecoder")
            .field("ids", &self.ids)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl<D> IncrementalDecoder<D>
where
    D: Deref,
    D::Target: Decode,
{
    /// A decoder with no context: the first token is decoded as the start of a text (a
    /// SentencePiece decoder drops its leading space, as it would for the whole output).
    pub fn new(decoder: D) -> Self {
        Self {
            decoder,
            ids: Vec::new(),
            read: 0,
            prefix_text: None,
        }
    }

    /// A decoder that continues after `context` (typically the prompt): the last few context
    /// ids are decoded in front of the first generated token, so a leading space on it is kept
    /// exactly as it would be inside the full text. Nothing of the context is emitted.
    pub fn with_context(decoder: D, context: &[u32]) -> Self {
        // An image's placeholder rows are no tokens to decode.
        let mut ids: Vec<u32> = context
            .iter()
            .rev()
            .filter(|&&t| t & crate::model::IMAGE_ID == 0)
            .take(CONTEXT_TOKENS)
            .copied()
            .collect();
        ids.reverse();
        let read = ids.len();
        Self {
            decoder,
            ids,
            read,
            prefix_text: None,
        }
    }

    /// Adds one generated token. Returns the text it completes, or `None` while it only adds
    /// to an incomplete character (or decodes to nothing).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix_text = match self.prefix_text.take() {
            Some(text) => text,
            None => self.decoder.decode_ids(&self.ids[..self.read])?,
        };
        let text = self.decoder.decode_ids(&self.ids)?;
        let piece = if !text.ends_with(REPLACEMENT) {
            let piece = new_suffix(&prefix_text, &text);
            self.advance(self.ids.len());
            piece
        } else if self.ids.len() - self.read > MAX_PENDING {
            let (upto, head) = self.forced_cut(&text)?;
            let piece = new_suffix(&prefix_text, &head);
            self.advance(upto);
            piece
        } else {
            self.prefix_text = Some(prefix_text);
            return Ok(None);
        };
        Ok((!piece.is_empty()).then_some(piece))
    }

    /// Whatever is still held back at the end of generation; an incomplete character comes
    /// out as U+FFFD here, and only here.
    pub fn flush(&mut self) -> Result<String> {
        if self.ids.len() == self.read {
            return Ok(String::new());
        }
        let prefix_text = match self.prefix_text.take() {
            Some(text) => text,
            None => self.decoder.decode_ids(&self.ids[..self.read])?,
        };
        let text = self.decoder.decode_ids(&self.ids)?;
        let piece = new_suffix(&prefix_text, &text);
        self.advance(self.ids.len());
        Ok(piece)
    }

    /// Where to cut a run of invalid bytes that is being forced out: the latest cut that
    /// keeps the last [`FORCE_KEEP`] tokens back and does not split a valid character (the
    /// two halves decode to the same text as the whole). Returns the cut and the head's text.
    fn forced_cut(&self, text: &str) -> Result<(usize, String)> {
        let latest = self.ids.len() - FORCE_KEEP;
        for upto in (self.read + 1..=latest).rev() {
            let head = self.decoder.decode_ids(&self.ids[..upto])?;
            let tail = self.decoder.decode_ids(&self.ids[upto..])?;
            if text.strip_prefix(head.as_str()) == Some(tail.as_str()) {
                return Ok((upto, head));
            }
        }
        Ok((latest, self.decoder.decode_ids(&self.ids[..latest])?))
    }

    /// Marks `ids[..upto]` as emitted. The old context is dropped: only the ids emitted last
    /// stay as context, which keeps every decode short however long the generation runs.
    fn advance(&mut self, upto: usize) {
        self.ids.drain(..self.read);
        self.read = upto - self.read;
        self.prefix_text = None;
    }
}

/// The part of `text` after the already-emitted `prefix`. When the decoder rewrote the end of
/// the context (a character completed across the context boundary, clean-up of spaces),
/// emit what follows the longest common prefix instead.
fn new_suffix(prefix: &str, text: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_owned();
    }
    let common = prefix
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(text.len()), |((i, _), _)| i);
    text.get(common..).unwrap_or_default().to_owned()
}

/// The result of feeding text to a [`StopMatcher`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that can be sent to the client now.
    pub emit: String,
    /// A stop string was found: generation ends, and `emit` is the text before it.
    pub stopped: bool,
}

/// Finds stop strings in streamed text, however the text is split into pieces. Text that could
/// still be the beginning of a stop string is held back; the stop string itself and anything
/// after it is never emitted (as Ollama and OpenAI do).
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
    /// The stop string that ended the text.
    matched: Option<String>,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        let mut stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        stops.sort();
        stops.dedup();
        Self {
            stops,
            held: String::new(),
            stopped: false,
            matched: None,
        }
    }

    /// The stop string that was found (Anthropic reports it as `stop_sequence`).
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Whether a stop string has been found.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds the next piece of generated text. After a stop, further pushes emit nothing.
    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.stopped {
            return StopOutput {
                emit: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(text);
        // The earliest match wins: text before it is all the client may see.
        if let Some((at, stop)) = self
            .stops
            .iter()
            .filter_map(|stop| Some((self.held.find(stop.as_str())?, stop)))
            .min()
        {
            self.matched = Some(stop.clone());
            let mut emit = std::mem::take(&mut self.held);
            emit.truncate(at);
            self.stopped = true;
            return StopOutput {
                emit,
                stopped: true,
            };
        }
        let keep = self.partial_match_len();
        let split = self.held.len() - keep;
        // A stop's prefix starts on a character boundary, so `split` is one; checked anyway
        // so that a mistake here holds text back instead of panicking.
        let emit = if self.held.is_char_boundary(split) {
            let rest = self.held.split_off(split);
            std::mem::replace(&mut self.held, rest)
        } else {
            String::new()
        };
        StopOutput {
            emit,
            stopped: false,
        }
    }

    /// The text still held back at the end of generation (empty after a stop).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            self.held.clear();
        }
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of the held text that is a proper prefix of some
    /// stop string.
    fn partial_match_len(&self) -> usize {
        self.stops
            .iter()
            .map(|stop| {
                let longest = (stop.len() - 1).min(self.held.len());
                (1..=longest)
                    .rev()
                    .find(|&k| stop.get(..k).is_some_and(|p| self.held.ends_with(p)))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Error;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::cell::Cell;

    /// A byte-level vocabulary: each id is a raw byte sequence, decoded lossily like the
    /// byte-level BPE decoder does.
    struct ByteTable {
        pieces: Vec<Vec<u8>>,
        /// Strip one leading space of the whole decode, as a SentencePiece decoder does.
        strip_leading_space: bool,
        calls: Cell<usize>,
        fail: Cell<bool>,
    }

    // "中" = E4 B8 AD, "文" = E6 96 87, "😀" = F0 9F 98 80.
    const HELLO: u32 = 0;
    const WORLD: u32 = 1;
    const ZH_1: u32 = 2;
    const ZH_2: u32 = 3;
    const ZH_3: u32 = 4;
    const EMOJI_12: u32 = 5;
    const EMOJI_3: u32 = 6;
    const EMOJI_4: u32 = 7;
    const BANG: u32 = 8;
    const WEN_12: u32 = 9;
    const WEN_3: u32 = 10;
    const SPACE: u32 = 11;
    const INVALID: u32 = 12;
    const EMPTY: u32 = 13;
    const SPACE_ZH_1: u32 = 14;
    const ZH_3_INVALID: u32 = 15;

    fn table() -> ByteTable {
        ByteTable {
            pieces: vec![
                b"Hello".to_vec(),
                b" world".to_vec(),
                vec![0xE4],
                vec![0xB8],
                vec![0xAD],
                vec![0xF0, 0x9F],
                vec![0x98],
                vec![0x80],
                b"!".to_vec(),
                vec![0xE6, 0x96],
                vec![0x87],
                b" ".to_vec(),
                vec![0xFF],
                Vec::new(),
                vec![b' ', 0xE4],
                vec![0xAD, 0xFF],
            ],
            strip_leading_space: false,
            calls: Cell::new(0),
            fail: Cell::new(false),
        }
    }

    impl Decode for ByteTable {
        fn decode_ids(&self, ids: &[u32]) -> Result<String> {
            self.calls.set(self.calls.get() + 1);
            if self.fail.get() {
                return Err(Error::Tokenizer("boom".into()));
            }
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&id| self.pieces[id as usize].iter().copied())
                .collect();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            Ok(match text.strip_prefix(' ') {
                Some(rest) if self.strip_leading_space => rest.to_owned(),
                _ => text,
            })
        }
    }

    /// Every piece pushed, then the flush.
    fn stream(t: &ByteTable, ids: &[u32]) -> (Vec<Option<String>>, String) {
        let mut d = IncrementalDecoder::new(t);
        let pieces = ids.iter().map(|&id| d.push(id).unwrap()).collect();
        (pieces, d.flush().unwrap())
    }

    #[test]
    fn multibyte_characters_stream_whole() {
        let t = table();
        let ids = [
            HELLO, ZH_1, ZH_2, ZH_3, EMOJI_12, EMOJI_3, EMOJI_4, WORLD, WEN_12, WEN_3, BANG,
        ];
        let (pieces, rest) = stream(&t, &ids);
        let expect: Vec<Option<String>> = [
            Some("Hello"),
            None,
            None,
            Some("中"),
            None,
            None,
            Some("😀"),
            Some(" world"),
            None,
            Some("文"),
            Some("!"),
        ]
        .iter()
        .map(|p| p.map(str::to_owned))
        .collect();
        assert_eq!(pieces, expect);
        assert_eq!(rest, "");
        let joined: String = pieces.into_iter().flatten().collect();
        assert_eq!(joined, t.decode_ids(&ids).unwrap());
        assert_eq!(joined, "Hello中😀 world文!");
    }

    #[test]
    fn character_split_with_a_leading_space() {
        let t = table();
        let (pieces, _) = stream(&t, &[HELLO, SPACE_ZH_1, ZH_2, ZH_3]);
        assert_eq!(
            pieces,
            vec![Some("Hello".into()), None, None, Some(" 中".into())]
        );
    }

    #[test]
    fn random_streams_concatenate_to_the_full_decode() {
        let t = table();
        let groups: [&[u32]; 8] = [
            &[HELLO],
            &[WORLD],
            &[ZH_1, ZH_2, ZH_3],
            &[EMOJI_12, EMOJI_3, EMOJI_4],
            &[BANG],
            &[WEN_12, WEN_3],
            &[SPACE],
            &[SPACE_ZH_1, ZH_2, ZH_3],
        ];
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..200 {
            let len = rng.random_range(1..40);
            let ids: Vec<u32> = (0..len)
                .flat_map(|_| groups[rng.random_range(0..groups.len())].iter().copied())
                .collect();
            let (pieces, rest) = stream(&t, &ids);
            assert_eq!(rest, "");
            let mut joined = String::new();
            for piece in pieces.into_iter().flatten() {
                assert!(!piece.contains(REPLACEMENT), "{piece:?} in {ids:?}");
                assert!(!piece.is_empty());
                joined.push_str(&piece);
            }
            assert_eq!(joined, t.decode_ids(&ids).unwrap());
        }
    }

    #[test]
    fn leading_space_is_kept_inside_the_text() {
        let mut t = table();
        t.strip_leading_space = true;
        // The whole text starts with a space that a SentencePiece decoder drops...
        let (pieces, _) = stream(&t, &[WORLD, WORLD]);
        assert_eq!(pieces, vec![Some("world".into()), Some(" world".into())]);
        // ...but a token after context keeps its space.
        let mut d = IncrementalDecoder::with_context(&t, &[HELLO]);
        assert_eq!(d.push(WORLD).unwrap(), Some(" world".into()));
        assert_eq!(d.push(SPACE).unwrap(), Some(" ".into()));
        assert_eq!(d.push(WORLD).unwrap(), Some(" world".into()));
        assert_eq!(d.flush().unwrap(), "");
    }

    #[test]
    fn context_is_not_emitted() {
        let t = table();
        let prompt = [HELLO, WORLD, BANG, HELLO, WORLD, WORLD, BANG, SPACE];
        let mut d = IncrementalDecoder::with_context(&t, &prompt);
        assert_eq!(d.push(ZH_1).unwrap(), None);
        assert_eq!(d.push(ZH_2).unwrap(), None);
        assert_eq!(d.push(ZH_3).unwrap(), Some("中".into()));
        assert_eq!(d.flush().unwrap(), "");
        // A prompt ending inside a character: the completed character comes out.
        let mut d = IncrementalDecoder::with_context(&t, &[HELLO, ZH_1]);
        assert_eq!(d.push(ZH_2).unwrap(), None);
        assert_eq!(d.push(ZH_3).unwrap(), Some("中".into()));
        // Empty context behaves like `new`.
        let mut d = IncrementalDecoder::with_context(&t, &[]);
        assert_eq!(d.push(HELLO).unwrap(), Some("Hello".into()));
    }

    #[test]
    fn flush_emits_an_incomplete_tail_once() {
        let t = table();
        let mut d = IncrementalDecoder::new(&t);
        assert_eq!(d.push(HELLO).unwrap(), Some("Hello".into()));
        assert_eq!(d.push(EMOJI_12).unwrap(), None);
        assert_eq!(d.push(EMOJI_3).unwrap(), None);
        assert_eq!(d.flush().unwrap(), "\u{FFFD}");
        assert_eq!(d.flush().unwrap(), "");
        // Nothing pending at all.
        let mut d = IncrementalDecoder::new(&t);
        assert_eq!(d.flush().unwrap(), "");
    }

    #[test]
    fn tokens_that_decode_to_nothing_emit_nothing() {
        let t = table();
        let (pieces, rest) = stream(&t, &[EMPTY, HELLO, EMPTY, EMPTY, BANG]);
        assert_eq!(
            pieces,
            vec![None, Some("Hello".into()), None, None, Some("!".into())]
        );
        assert_eq!(rest, "");
    }

    #[test]
    fn invalid_bytes_do_not_block_the_stream() {
        let t = table();
        // An invalid byte followed by a valid character is let through at once.
        let (pieces, _) = stream(&t, &[INVALID, HELLO]);
        assert_eq!(pieces, vec![None, Some("\u{FFFD}Hello".into())]);
        // A long run of invalid bytes is forced out instead of held forever...
        let mut d = IncrementalDecoder::new(&t);
        let mut out = String::new();
        for _ in 0..20 {
            if let Some(p) = d.push(INVALID).unwrap() {
                out.push_str(&p);
            }
        }
        assert!(out.chars().count() >= 10, "{out:?}");
        assert!(out.chars().all(|c| c == REPLACEMENT));
        // ...without breaking a real character that starts right after it.
        for id in [ZH_1, ZH_2, ZH_3] {
            if let Some(p) = d.push(id).unwrap() {
                out.push_str(&p);
            }
        }
        out.push_str(&d.flush().unwrap());
        assert_eq!(out, format!("{}中", "\u{FFFD}".repeat(20)));
    }

    #[test]
    fn forced_output_does_not_split_a_valid_character() {
        // Every prefix ends in an invalid byte, so nothing streams until the run is forced
        // out; the cut must not fall inside the "中" completed by the token [AD FF].
        let t = table();
        let ids = [
            INVALID,
            INVALID,
            INVALID,
            INVALID,
            INVALID,
            ZH_1,
            ZH_2,
            ZH_3_INVALID,
            INVALID,
            INVALID,
        ];
        let (pieces, rest) = stream(&t, &ids);
        let emitted: Vec<String> = pieces.into_iter().flatten().collect();
        assert!(!emitted.is_empty());
        let joined = emitted.concat() + &rest;
        assert_eq!(joined, t.decode_ids(&ids).unwrap());
        assert!(joined.contains('中'));
    }

    #[test]
    fn window_stays_short() {
        let t = table();
        let mut d = IncrementalDecoder::new(&t);
        for i in 0..1000 {
            let id = [HELLO, ZH_1, ZH_2, ZH_3, WORLD][i % 5];
            d.push(id).unwrap();
            assert!(d.ids.len() <= 4, "{}", d.ids.len());
        }
        // At most three decodes per token, whatever the length so far.
        assert!(t.calls.get() <= 3 * 1000, "{}", t.calls.get());
    }

    #[test]
    fn decode_errors_propagate() {
        let t = table();
        let mut d = IncrementalDecoder::new(&t);
        assert_eq!(d.push(HELLO).unwrap(), Some("Hello".into()));
        t.fail.set(true);
        assert!(matches!(d.push(WORLD), Err(Error::Tokenizer(_))));
        assert!(d.flush().is_err());
        // Recovers once decoding works again, without losing the token.
        t.fail.set(false);
        assert_eq!(d.push(BANG).unwrap(), Some(" world!".into()));
    }

    #[test]
    fn works_through_a_boxed_trait_object() {
        let d: Box<dyn Decode> = Box::new(table());
        let mut d = IncrementalDecoder::new(d);
        assert_eq!(d.push(ZH_1).unwrap(), None);
        assert_eq!(d.push(ZH_2).unwrap(), None);
        assert_eq!(d.push(ZH_3).unwrap(), Some("中".into()));
    }

    #[test]
    fn new_suffix_handles_rewritten_context() {
        assert_eq!(new_suffix("ab", "abc"), "c");
        assert_eq!(new_suffix("", "abc"), "abc");
        assert_eq!(new_suffix("a\u{FFFD}", "a中b"), "中b");
        assert_eq!(new_suffix("abc", "ab"), "");
        assert_eq!(new_suffix("中x", "中文"), "文");
    }

    fn out(emit: &str, stopped: bool) -> StopOutput {
        StopOutput {
            emit: emit.into(),
            stopped,
        }
    }

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn no_stops_pass_everything_through() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("Hello"), out("Hello", false));
        assert_eq!(m.push(""), out("", false));
        assert_eq!(m.finish(), "");
        // Empty stop strings are ignored.
        let mut m = matcher(&["", ""]);
        assert_eq!(m.push("abc"), out("abc", false));
        assert!(!m.is_stopped());
    }

    #[test]
    fn stop_split_over_three_pushes() {
        let mut m = matcher(&["<|end|>"]);
        assert_eq!(m.push("Hello <|"), out("Hello ", false));
        assert_eq!(m.push("en"), out("", false));
        assert_eq!(m.push("d|> and more"), out("", true));
        assert!(m.is_stopped());
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn held_text_is_released_when_the_match_fails() {
        let mut m = matcher(&["<|end|>"]);
        assert_eq!(m.push("a <|e"), out("a ", false));
        assert_eq!(m.push("x"), out("<|ex", false));
        assert_eq!(m.push("<"), out("", false));
        assert_eq!(m.finish(), "<");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn overlapping_prefixes() {
        // Two stops sharing a prefix.
        let mut m = matcher(&["abc", "abd"]);
        assert_eq!(m.push("xab"), out("x", false));
        assert_eq!(m.push("d"), out("", true));
        let mut m = matcher(&["abc", "abd"]);
        assert_eq!(m.push("xab"), out("x", false));
        assert_eq!(m.push("e"), out("abe", false));
        // A stop that is a prefix of another stops as soon as it appears.
        let mut m = matcher(&["abc", "ab"]);
        assert_eq!(m.push("a"), out("", false));
        assert_eq!(m.push("bc"), out("", true));
        // A stop overlapping itself: "aaab" holds "aa" until the "b" decides.
        let mut m = matcher(&["aab"]);
        assert_eq!(m.push("a"), out("", false));
        assert_eq!(m.push("a"), out("", false));
        assert_eq!(m.push("a"), out("a", false));
        assert_eq!(m.push("b"), out("", true));
        // The longest partial match is held, not the first one found.
        let mut m = matcher(&["xyz", "zz"]);
        assert_eq!(m.push("axyz"), out("a", true));
        let mut m = matcher(&["abcd", "cd!"]);
        assert_eq!(m.push("abc"), out("", false));
        assert_eq!(m.push("d"), out("", true));
    }

    #[test]
    fn multiple_stops_earliest_wins() {
        let mut m = matcher(&["world", "lo"]);
        assert_eq!(m.push("hello world"), out("hel", true));
        let mut m = matcher(&["\n\n", "User:", "###"]);
        assert_eq!(m.push("Sure.\nUs"), out("Sure.\n", false));
        assert_eq!(m.push("er: hi"), out("", true));
    }

    #[test]
    fn stop_at_the_very_start() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("STOP here"), out("", true));
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("ST"), out("", false));
        assert_eq!(m.push("OP"), out("", true));
    }

    #[test]
    fn nothing_after_the_stop_is_emitted() {
        let mut m = matcher(&["END"]);
        assert_eq!(m.push("foo END bar"), out("foo ", true));
        assert_eq!(m.push("more text"), out("", true));
        assert_eq!(m.push(""), out("", true));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn unicode_stops() {
        let mut m = matcher(&["停止", "😀!"]);
        assert_eq!(m.push("你好停"), out("你好", false));
        assert_eq!(m.push("下"), out("停下", false));
        assert_eq!(m.push("停"), out("", false));
        assert_eq!(m.push("止了"), out("", true));
        let mut m = matcher(&["😀!"]);
        assert_eq!(m.push("a😀"), out("a", false));
        assert_eq!(m.push("😀"), out("😀", false));
        assert_eq!(m.push("!x"), out("", true));
        // A stop whose first byte matches a multi-byte character's first byte does not split it.
        let mut m = matcher(&["中文"]);
        assert_eq!(m.push("中"), out("", false));
        assert_eq!(m.push("国"), out("中国", false));
    }

    #[test]
    fn finish_returns_held_text() {
        let mut m = matcher(&["</s>"]);
        assert_eq!(m.push("abc</"), out("abc", false));
        assert_eq!(m.finish(), "</");
    }

    #[test]
    fn decoder_and_matcher_together() {
        let t = table();
        let mut d = IncrementalDecoder::new(&t);
        let mut m = matcher(&["中😀"]);
        let mut shown = String::new();
        let mut stopped = false;
        for id in [HELLO, ZH_1, ZH_2, ZH_3, EMOJI_12, EMOJI_3, EMOJI_4, WORLD] {
            if let Some(piece) = d.push(id).unwrap() {
                let o = m.push(&piece);
                shown.push_str(&o.emit);
                if o.stopped {
                    stopped = true;
                    break;
                }
            }
        }
        assert!(stopped);
        assert_eq!(shown, "Hello");
    }
}
