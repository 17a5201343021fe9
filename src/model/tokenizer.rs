//! Text <-> token ids for every supported model, from either a Hugging Face `tokenizer.json`
//! or the vocabulary embedded in a GGUF file.
//!
//! Both paths end in the same `tokenizers::Tokenizer`: a GGUF vocabulary is rebuilt into
//! the pipeline the model's own `tokenizer.json` describes, so a model gives the same ids
//! whichever way it was loaded. Byte-level BPE (`tokenizer.ggml.model = gpt2`: Llama 3,
//! Qwen, SmolLM) gets its pre-tokenizer regex, byte-level decoder and added tokens;
//! SentencePiece BPE (`llama`: Mistral, Llama 2, TinyLlama, Gemma) gets merges derived from the
//! piece scores, byte fallback, the `▁` space handling and its decoder. On top of that this
//! module knows which ids begin a sequence (bos) and which end generation (eos, eot, eom
//! and the chat end markers).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::normalizers::{NormalizerWrapper, NFC};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{Error, Result};

/// Decoding a whole id sequence, as the incremental detokenizer needs it; nothing is skipped
/// so that special tokens the caller wants to see (or stop on) survive.
pub trait Decode {
    fn decode_ids(&self, ids: &[u32]) -> Result<String>;
}

/// Token strings that end generation whenever a vocabulary has them, whatever its config
/// names as eos: chat models end turns with these even when eos is something else
/// (llama.cpp treats the same set as end-of-generation).
const END_OF_GENERATION_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
];

/// Qwen2's pre-tokenizer split, as in its tokenizer.json: contractions, letter runs with at
/// most one leading non-letter, single digits, punctuation runs, newline runs, whitespace.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's split: Qwen2's, except that digits group in runs of up to three.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `tokenizer.ggml.token_type` values that matter here (llama.cpp's numbering; 6 is
/// a `<0xXX>` byte piece, which the BPE model's byte fallback finds by its text).
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_UNUSED: i64 = 5;

/// SentencePiece's stand-in for a space (U+2581), as pieces store it.
const SPM_SPACE: &str = "\u{2581}";

/// A model's tokenizer plus the ids that start and end its sequences.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    add_bos: bool,
    eos_ids: Vec<u32>,
    vocab_size: usize,
}

impl fmt::Debug for Tokenizer {
    // The inner tokenizer would print the whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("add_bos", &self.add_bos)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. A sibling `tokenizer_config.json` (for
    /// `qwen3-tokenizer.json`, `qwen3-tokenizer_config.json`) supplies bos/eos and
    /// `add_bos_token`, and a sibling `generation_config.json` further eos ids; both are
    /// optional.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;

        let config = read_json_if_present(&config_path(path))?;
        let generation = match path.parent() {
            Some(dir) => read_json_if_present(&dir.join("generation_config.json"))?,
            None => None,
        };

        let lookup = |key: &str| -> Option<u32> {
            let text = config.as_ref().and_then(|c| token_text(c.get(key)?))?;
            let id = inner.token_to_id(&text);
            if id.is_none() {
                tracing::warn!(
                    "{}: {key} '{text}' is not in the vocabulary",
                    path.display()
                );
            }
            id
        };

        // What the post-processor puts in front of an empty text is what the model expects
        // as its first token, for tokenizer.json files (Llama 3) that say so only there.
        let template_prefix = inner
            .encode_fast("", true)
            .ok()
            .and_then(|e| e.get_ids().first().copied());

        let bos_id = lookup("bos_token").or(template_prefix);
        let config_add_bos = config
            .as_ref()
            .and_then(|c| c.get("add_bos_token")?.as_bool());
        let add_bos = bos_id.is_some()
            && match config_add_bos {
                Some(add) => add,
                None => template_prefix.is_some() && template_prefix == bos_id,
            };

        let mut eos_ids = Vec::new();
        push_unique(&mut eos_ids, lookup("eos_token"));
        if let Some(gen) = &generation {
            match gen.get("eos_token_id") {
                Some(serde_json::Value::Array(ids)) => {
                    for id in ids {
                        push_unique(&mut eos_ids, json_u32(id));
                    }
                }
                Some(id) => push_unique(&mut eos_ids, json_u32(id)),
                None => {}
            }
        }
        for name in END_OF_GENERATION_TOKENS {
            push_unique(&mut eos_ids, inner.token_to_id(name));
        }

        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            bos_id,
            add_bos,
            eos_ids,
            vocab_size,
        })
    }

    /// Rebuilds the tokenizer from GGUF metadata (`tokenizer.ggml.*`): byte-level BPE
    /// (`tokenizer.ggml.model = gpt2`: Llama 3, Qwen, SmolLM) and SentencePiece BPE
    /// (`llama`: Llama 1/2, Mistral, TinyLlama, Phi-3).
    pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<Self> {
        let model = match metadata.get("tokenizer.ggml.model") {
            Some(v) => gguf_str(v, "tokenizer.ggml.model")?,
            None => {
                return Err(Error::Tokenizer(
                    "the GGUF file has no tokenizer (tokenizer.ggml.model is missing)".into(),
                ))
            }
        };
        match model {
            "gpt2" => Self::from_gguf_byte_level(metadata),
            "llama" => Self::from_gguf_sentencepiece(metadata),
            other => Err(Error::Tokenizer(format!(
                "GGUF tokenizer model '{other}' is not supported: only 'gpt2' (byte-level BPE, \
                 as in Llama 3, Qwen and SmolLM) and 'llama' (SentencePiece BPE, as in \
                 Mistral and Llama 2) are; a '{other}' model needs its tokenizer.json instead"
            ))),
        }
    }

    /// Byte-level BPE (`gpt2`): the vocabulary, its ranked merges and a pre-tokenizer regex
    /// chosen by `tokenizer.ggml.pre`.
    fn from_gguf_byte_level(metadata: &HashMap<String, Value>) -> Result<Self> {
        let tokens = gguf_strings(metadata, "tokenizer.ggml.tokens")?;
        let merges = gguf_strings(metadata, "tokenizer.ggml.merges")?;
        let types = gguf_token_types(metadata, tokens.len())?;
        let pre = match metadata.get("tokenizer.ggml.pre") {
            Some(v) => gguf_str(v, "tokenizer.ggml.pre")?,
            None => "default",
        };
        let pre = PreTokenizer::from_gguf_name(pre);

        let bos_id = gguf_special_id(metadata, "tokenizer.ggml.bos_token_id", tokens.len())?;
        let add_bos = gguf_bool(metadata, "tokenizer.ggml.add_bos_token")?
            .unwrap_or(pre.adds_bos_by_default())
            && bos_id.is_some();

        // Every token keeps its GGUF id: all of them (unused padding entries aside, which no
        // text encodes to and which decode to nothing) go into the BPE vocabulary, and the
        // added tokens below resolve to those same ids.
        let mut vocab = Vocab::default();
        let mut duplicates = 0usize;
        for (id, (token, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == TOKEN_TYPE_UNUSED {
                continue;
            }
            let id = u32::try_from(id)
                .map_err(|_| Error::Tokenizer("vocabulary larger than u32 ids".into()))?;
            if vocab.insert(token.to_string(), id).is_some() {
                duplicates += 1;
            }
        }
        if duplicates > 0 {
            tracing::warn!("GGUF vocabulary has {duplicates} duplicate token strings");
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("malformed merge '{m}'")))
            })
            .collect::<Result<Merges>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(pre.ignores_merges())
            .build()
            .map_err(|e| Error::Tokenizer(format!("GGUF vocabulary: {e}")))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        if pre.nfc() {
            inner
                .with_normalizer(Some(NFC))
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
        inner.with_pre_tokenizer(Some(pre.build()?));
        inner.with_decoder(Some(ByteLevel::new(false, false, false)));
        match bos_id.filter(|_| add_bos) {
            // Written out so that a saved tokenizer.json says, as Llama 3's does, that
            // sequences start with bos; encode() itself adds bos on its own.
            Some(bos) => {
                inner.with_post_processor(Some(bos_template(tokens[bos as usize], bos)?));
            }
            None => {
                inner.with_post_processor(Some(ByteLevel::new(false, false, false)));
            }
        }

        // Control and user-defined tokens are matched whole in raw text before any
        // splitting, as tokenizer.json's added tokens are; only control ones are "special"
        // (skipped when decoding with skip_special).
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| **ty == TOKEN_TYPE_CONTROL || **ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(token, ty)| {
                AddedToken::from(token.as_str(), *ty == TOKEN_TYPE_CONTROL).normalized(false)
            })
            .collect();
        inner
            .add_tokens(added)
            .map_err(|e| Error::Tokenizer(format!("added tokens: {e}")))?;

        let eos_ids = gguf_eos_ids(metadata, &inner, tokens.len())?;
        Ok(Self {
            inner,
            bos_id,
            add_bos,
            eos_ids,
            vocab_size: tokens.len(),
        })
    }

    /// SentencePiece BPE (`llama`), rebuilt the way Hugging Face converts a Llama or
    /// Mistral `tokenizer.model` into `tokenizer.json`, which is also what llama.cpp's SPM
    /// tokenizer computes: spaces become `▁` (and one is put in front of the text),
    /// characters are merged pairwise, the pair whose result has the highest score first,
    /// and characters outside the vocabulary fall back to `<0xXX>` byte pieces.
    fn from_gguf_sentencepiece(metadata: &HashMap<String, Value>) -> Result<Self> {
        let tokens = gguf_strings(metadata, "tokenizer.ggml.tokens")?;
        let types = gguf_token_types(metadata, tokens.len())?;
        let scores = match metadata.get("tokenizer.ggml.scores") {
            Some(v) => {
                let scores = gguf_array(v, "tokenizer.ggml.scores")?
                    .iter()
                    .map(|s| gguf_float(s, "tokenizer.ggml.scores"))
                    .collect::<Result<Vec<_>>>()?;
                if scores.len() != tokens.len() {
                    return Err(Error::Tokenizer(format!(
                        "tokenizer.ggml.scores has {} entries for {} tokens",
                        scores.len(),
                        tokens.len()
                    )));
                }
                scores
            }
            // llama.cpp reads a missing score as 0: then merges go by vocabulary order.
            None => vec![0.0; tokens.len()],
        };
        let n = tokens.len();
        let bos_id = gguf_special_id(metadata, "tokenizer.ggml.bos_token_id", n)?;
        // SentencePiece models start with bos unless they say otherwise (llama.cpp's
        // default for this vocabulary type too).
        let add_bos = gguf_bool(metadata, "tokenizer.ggml.add_bos_token")?.unwrap_or(true)
            && bos_id.is_some();
        // Gemma's SentencePiece model adds no dummy prefix; GGUFs converted by Ollama do not
        // say so (llama.cpp's write `add_space_prefix = false`).
        let gemma = metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .is_some_and(|a| a.starts_with("gemma"));
        let add_space_prefix =
            gguf_bool(metadata, "tokenizer.ggml.add_space_prefix")?.unwrap_or(!gemma);
        let unk_id = match gguf_special_id(metadata, "tokenizer.ggml.unknown_token_id", n)? {
            Some(id) => Some(id),
            None => types
                .iter()
                .position(|t| *t == TOKEN_TYPE_UNKNOWN)
                .and_then(|id| u32::try_from(id).ok()),
        };

        let mut vocab = Vocab::default();
        for (id, (token, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == TOKEN_TYPE_UNUSED {
                continue;
            }
            let id = u32::try_from(id)
                .map_err(|_| Error::Tokenizer("vocabulary larger than u32 ids".into()))?;
            vocab.insert(token.to_string(), id);
        }
        let merges = spm_merges(&tokens, &types, &scores, &vocab);
        let mut bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = unk_id {
            bpe = bpe.unk_token(tokens[unk as usize].to_string());
        }
        let bpe = bpe
            .build()
            .map_err(|e| Error::Tokenizer(format!("GGUF vocabulary: {e}")))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        let to_meta = Replace::new(" ", SPM_SPACE)
            .map_err(|e| Error::Tokenizer(format!("normalizer: {e}")))?;
        let from_meta =
            Replace::new(SPM_SPACE, " ").map_err(|e| Error::Tokenizer(format!("decoder: {e}")))?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            from_meta.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if add_space_prefix {
            let normalizers: Vec<NormalizerWrapper> =
                vec![Prepend::new(SPM_SPACE.to_string()).into(), to_meta.into()];
            inner
                .with_normalizer(Some(NormalizerSequence::new(normalizers)))
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            // The prefix space comes back off when decoding, once, at the very start.
            decoders.push(Strip::new(' ', 1, 0).into());
        } else {
            inner
                .with_normalizer(Some(to_meta))
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
        inner.with_decoder(Some(DecoderSequence::new(decoders)));
        if let Some(bos) = bos_id.filter(|_| add_bos) {
            inner.with_post_processor(Some(bos_template(tokens[bos as usize], bos)?));
        }

        // Control, unknown and user-defined pieces are matched whole in raw text, before the
        // space handling, as llama.cpp does with special parsing on (`<s>[INST]` in a chat
        // template is two ids); the text after each gets its own `▁` prefix, as there.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| {
                matches!(
                    **ty,
                    TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED | TOKEN_TYPE_UNKNOWN
                )
            })
            .map(|(token, ty)| {
                AddedToken::from(token.as_str(), *ty != TOKEN_TYPE_USER_DEFINED).normalized(false)
            })
            .collect();
        inner
            .add_tokens(added)
            .map_err(|e| Error::Tokenizer(format!("added tokens: {e}")))?;

        let eos_ids = gguf_eos_ids(metadata, &inner, n)?;
        Ok(Self {
            inner,
            bos_id,
            add_bos,
            eos_ids,
            vocab_size: n,
        })
    }

    /// Token ids for `text`. Special tokens written in the text (`<|im_start|>`) become
    /// their single ids; bos is put in front when `add_bos` is asked and the model wants it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        let ids = encoding.get_ids();
        match self.bos_id.filter(|_| add_bos && self.add_bos) {
            Some(bos) => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            None => Ok(ids.to_vec()),
        }
    }

    /// Text for `ids`; with `skip_special`, control tokens (bos, `<|im_end|>`) are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// Whether the model expects bos at the start of a prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Every id that ends generation; the configured eos comes first.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The vocabulary entry for `id` as stored (byte-level form, e.g. `Ġhello`); for
    /// special tokens that is their text, as chat templates want it.
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids the vocabulary spans (for GGUF: its token count, padding included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Byte-level BPE (Llama 3, Qwen, SmolLM), whose encoding of any fragment of text is the
    /// model's own; SentencePiece puts a space in front of a fragment.
    pub fn is_byte_level(&self) -> bool {
        decoder_kind(self.inner.get_decoder()) == Some(PieceKind::ByteLevel)
    }

    /// Every id as the bytes it puts into the text, for work that looks at tokens byte by
    /// byte (grammar masks): see [`Tokenizer::token_bytes`].
    pub fn vocab_bytes(&self) -> Result<Vec<Option<VocabEntry>>> {
        let kind = self.piece_kind()?;
        Ok((0..self.vocab_size as u32)
            .map(|id| self.entry(kind, id))
            .collect())
    }

    /// One id as the bytes it puts into the text (a logprob's `bytes`): byte-level
    /// vocabularies map their printable alphabet back to bytes, SentencePiece ones turn `▁`
    /// into a space and `<0xXX>` pieces into their byte. Special tokens (control tokens,
    /// skipped when decoding) are marked as such with their text; ids no text maps to
    /// (unused GGUF entries, padding) are `None`.
    pub fn token_bytes(&self, id: u32) -> Result<Option<VocabEntry>> {
        Ok(self.entry(self.piece_kind()?, id))
    }

    fn piece_kind(&self) -> Result<PieceKind> {
        decoder_kind(self.inner.get_decoder()).ok_or_else(|| {
            Error::Tokenizer(
                "this tokenizer's pieces cannot be mapped to bytes (neither byte-level BPE \
                 nor SentencePiece)"
                    .into(),
            )
        })
    }

    fn entry(&self, kind: PieceKind, id: u32) -> Option<VocabEntry> {
        let added = self.inner.get_added_vocabulary().get_added_tokens_decoder();
        if let Some(t) = added.get(&id) {
            return Some(VocabEntry {
                bytes: t.content.clone().into_bytes(),
                special: t.special,
            });
        }
        let piece = self.inner.id_to_token(id)?;
        let bytes = match kind {
            PieceKind::ByteLevel => piece
                .chars()
                .map(|c| GPT2_BYTES.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                // Not in the byte alphabet: a piece written as plain text.
                .unwrap_or_else(|| piece.clone().into_bytes()),
            PieceKind::SentencePiece => match spm_byte_piece(&piece) {
                Some(b) => vec![b],
                None => piece.replace(SPM_SPACE, " ").into_bytes(),
            },
        };
        Some(VocabEntry {
            bytes,
            special: false,
        })
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        std::fs::write(path, json).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

impl Decode for Tokenizer {
    fn decode_ids(&self, ids: &[u32]) -> Result<String> {
        self.decode(ids, false)
    }
}

/// One vocabulary entry as bytes (see [`Tokenizer::vocab_bytes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabEntry {
    /// The text's bytes; for a special token, its name (`<|im_end|>`).
    pub bytes: Vec<u8>,
    /// A control token: never part of the text.
    pub special: bool,
}

/// How a tokenizer's pieces spell bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceKind {
    /// GPT-2's printable alphabet, one character per byte.
    ByteLevel,
    /// Text with `▁` for spaces and `<0xXX>` byte pieces.
    SentencePiece,
}

/// Reads the piece spelling off the decoder: byte-level BPE decodes with `ByteLevel`,
/// SentencePiece with byte fallback (or `Metaspace` in older tokenizer.json files).
fn decoder_kind(decoder: Option<&DecoderWrapper>) -> Option<PieceKind> {
    match decoder? {
        DecoderWrapper::ByteLevel(_) => Some(PieceKind::ByteLevel),
        DecoderWrapper::ByteFallback(_) | DecoderWrapper::Metaspace(_) => {
            Some(PieceKind::SentencePiece)
        }
        DecoderWrapper::Sequence(seq) => {
            let kinds: Vec<PieceKind> = seq
                .get_decoders()
                .iter()
                .filter_map(|d| decoder_kind(Some(d)))
                .collect();
            // ByteLevel anywhere decides; otherwise any SentencePiece step does.
            kinds
                .iter()
                .copied()
                .find(|k| *k == PieceKind::ByteLevel)
                .or(kinds.first().copied())
        }
        _ => None,
    }
}

/// GPT-2's byte-level alphabet, reversed (built once).
static GPT2_BYTES: std::sync::LazyLock<HashMap<char, u8>> =
    std::sync::LazyLock::new(gpt2_byte_table);

/// GPT-2's byte-level alphabet, reversed: printable Latin-1 characters stand for their own
/// byte, the other 68 bytes for U+0100 onwards, in byte order.
fn gpt2_byte_table() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    let mut table = HashMap::with_capacity(256);
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        };
        table.insert(c, b);
    }
    table
}

/// The byte of a SentencePiece byte piece (`<0x0A>`).
fn spm_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// The pre-tokenizer families GGUF's `tokenizer.ggml.pre` names (llama.cpp's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizer {
    /// GPT-2's byte-level regex.
    Gpt2,
    /// Each digit alone, then GPT-2's regex (SmolLM, StarCoder).
    DigitsGpt2,
    /// Llama 3's regex.
    Llama3,
    /// Qwen2's regex, after NFC.
    Qwen2,
}

impl PreTokenizer {
    fn from_gguf_name(name: &str) -> Self {
        match name {
            "gpt2" | "gpt-2" | "default" | "phi-2" | "mpt" | "olmo" | "jais" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" | "codeshell" => Self::DigitsGpt2,
            "llama-bpe" | "llama3" | "llama-v3" | "dbrx" | "smaug-bpe" => Self::Llama3,
            "qwen2" => Self::Qwen2,
            other => {
                tracing::warn!(
                    "unknown GGUF pre-tokenizer '{other}', using gpt2's; tokenization may \
                     differ from the model's own"
                );
                Self::Gpt2
            }
        }
    }

    fn nfc(self) -> bool {
        self == Self::Qwen2
    }

    /// Llama 3's tokenizer takes a word that is itself in the vocabulary whole, without
    /// replaying merges.
    fn ignores_merges(self) -> bool {
        self == Self::Llama3
    }

    fn adds_bos_by_default(self) -> bool {
        self == Self::Llama3
    }

    fn build(self) -> Result<PreTokenizerWrapper> {
        // After a regex split, ByteLevel only maps bytes to its printable alphabet.
        let split_then_bytes = |pattern: &str| -> Result<PreTokenizerWrapper> {
            let split = Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])
            .into())
        };
        match self {
            Self::Gpt2 => Ok(ByteLevel::new(false, true, true).into()),
            Self::DigitsGpt2 => Ok(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into()),
            Self::Llama3 => split_then_bytes(LLAMA3_PATTERN),
            Self::Qwen2 => split_then_bytes(QWEN2_PATTERN),
        }
    }
}

/// `tokenizer.json` -> `tokenizer_config.json`, `x-tokenizer.json` ->
/// `x-tokenizer_config.json`; other names look for plain `tokenizer_config.json`.
fn config_path(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match name.strip_suffix("tokenizer.json") {
        Some(prefix) => path.with_file_name(format!("{prefix}tokenizer_config.json")),
        None => path.with_file_name("tokenizer_config.json"),
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
}

/// A token in tokenizer_config.json: a plain string or an AddedToken object.
fn token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn json_u32(value: &serde_json::Value) -> Option<u32> {
    value.as_u64().and_then(|v| u32::try_from(v).ok())
}

fn push_unique(ids: &mut Vec<u32>, id: Option<u32>) {
    if let Some(id) = id {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
}

/// SentencePiece merges as Hugging Face's converter derives them from a `tokenizer.model`
/// (and so as a Llama or Mistral `tokenizer.json` lists them): every way of splitting a
/// piece into two pieces of the vocabulary is a merge, and merges rank by the score of the
/// piece they make, highest first; equal scores keep vocabulary order, and a piece's own
/// splits go by the ids of their halves. A lower rank merges first, so this is llama.cpp's
/// "highest-scoring pair first" in the form a BPE model takes. Only normal and
/// user-defined pieces are made by merging: control, byte and unused ones never come out of
/// text that way (SentencePiece keeps them out of its merge table too).
fn spm_merges(tokens: &[&String], types: &[i64], scores: &[f32], vocab: &Vocab) -> Merges {
    let mut ranked: Vec<(f32, usize, u32, u32, &str, &str)> = Vec::new();
    for (id, ((piece, ty), score)) in tokens.iter().zip(types).zip(scores).enumerate() {
        if !matches!(*ty, TOKEN_TYPE_NORMAL | TOKEN_TYPE_USER_DEFINED) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(l), Some(r)) = (vocab.get(left), vocab.get(right)) {
                ranked.push((*score, id, *l, *r, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    ranked
        .into_iter()
        .map(|(_, _, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

/// A post-processor that puts bos in front, as a model's own tokenizer.json says it.
fn bos_template(bos_text: &str, bos: u32) -> Result<TemplateProcessing> {
    TemplateProcessing::builder()
        .try_single(format!("{bos_text} $A"))
        .and_then(|b| b.try_pair(format!("{bos_text} $A {bos_text}:1 $B:1")))
        .map_err(|e| Error::Tokenizer(format!("bos template: {e}")))?
        .special_tokens(vec![(bos_text.to_string(), bos)])
        .build()
        .map_err(|e| Error::Tokenizer(format!("bos template: {e}")))
}

/// A BERT WordPiece tokenizer from GGUF metadata (`tokenizer.ggml.model = bert`), as
/// llama.cpp's converter writes it for Ollama's `all-minilm` and `mxbai-embed-large`: word
/// starts carry a leading `▁` ("phantom space") where the original vocabulary had none, and
/// continuations lose their `##`; `[CLS]`-style names stay as they are. The original
/// vocabulary is restored and wrapped as BERT's tokenizer.json does (clean-up, Chinese
/// characters split, lowercase and accents stripped, as llama.cpp's WPM tokenizer always
/// does; `[CLS] text [SEP]`).
pub fn wordpiece_from_gguf(metadata: &HashMap<String, Value>) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::bert::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;

    let model = metadata
        .get("tokenizer.ggml.model")
        .map(|v| gguf_str(v, "tokenizer.ggml.model"))
        .transpose()?;
    if model != Some("bert") {
        return Err(Error::Tokenizer(format!(
            "GGUF embedding models need a WordPiece tokenizer (tokenizer.ggml.model = bert), \
             this one has {}",
            model.unwrap_or("none")
        )));
    }
    let tokens = gguf_strings(metadata, "tokenizer.ggml.tokens")?;
    let bracketed = |t: &str| t.len() > 2 && t.starts_with('[') && t.ends_with(']');
    let mut vocab = Vocab::default();
    for (id, t) in tokens.iter().enumerate() {
        let word = if bracketed(t) {
            t.to_string()
        } else if let Some(start) = t.strip_prefix(SPM_SPACE) {
            start.to_string()
        } else {
            format!("##{t}")
        };
        // The first of two spellings that map to one word keeps it (none in real vocabularies).
        vocab.entry(word).or_insert(id as u32);
    }
    let named = |key: &str, name: &str| -> Result<u32> {
        gguf_special_id(metadata, key, tokens.len())?
            .or_else(|| vocab.get(name).copied())
            .ok_or_else(|| Error::Tokenizer(format!("the vocabulary has no {name} ({key})")))
    };
    let cls = named("tokenizer.ggml.cls_token_id", "[CLS]")?;
    // llama.cpp's key is spelled this way.
    let sep = named("tokenizer.ggml.seperator_token_id", "[SEP]")?;
    let unk = gguf_special_id(metadata, "tokenizer.ggml.unknown_token_id", tokens.len())?
        .map(|id| tokens[id as usize].to_string())
        .unwrap_or_else(|| "[UNK]".into());
    let text = |id: u32| tokens[id as usize].to_string();
    let wordpiece = WordPiece::builder()
        .vocab(vocab)
        .unk_token(unk)
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(|e| Error::Tokenizer(format!("WordPiece vocabulary: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(wordpiece);
    let err = |e: tokenizers::Error| Error::Tokenizer(format!("BERT tokenizer: {e}"));
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
        .map_err(err)?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    let template = TemplateProcessing::builder()
        .try_single(format!("{} $A {}", text(cls), text(sep)))
        .and_then(|b| {
            b.try_pair(format!(
                "{} $A {} $B:1 {}:1",
                text(cls),
                text(sep),
                text(sep)
            ))
        })
        .map_err(|e| Error::Tokenizer(format!("BERT template: {e}")))?
        .special_tokens(vec![(text(cls), cls), (text(sep), sep)])
        .build()
        .map_err(|e| Error::Tokenizer(format!("BERT template: {e}")))?;
    tok.with_post_processor(Some(template));
    // BERT's own special tokens are never split (as in its tokenizer.json; `[unusedN]` are
    // plain vocabulary there).
    let added: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .into_iter()
        .filter(|s| tok.token_to_id(s).is_some())
        .map(|s| AddedToken::from(s, true))
        .collect();
    tok.add_special_tokens(added).map_err(err)?;
    Ok(tok)
}

/// `tokenizer.ggml.token_type`, one per token; all normal when absent.
fn gguf_token_types(metadata: &HashMap<String, Value>, n_tokens: usize) -> Result<Vec<i64>> {
    let Some(v) = metadata.get("tokenizer.ggml.token_type") else {
        return Ok(vec![TOKEN_TYPE_NORMAL; n_tokens]);
    };
    let types = gguf_array(v, "tokenizer.ggml.token_type")?
        .iter()
        .map(|t| gguf_int(t, "tokenizer.ggml.token_type"))
        .collect::<Result<Vec<_>>>()?;
    if types.len() != n_tokens {
        return Err(Error::Tokenizer(format!(
            "tokenizer.ggml.token_type has {} entries for {n_tokens} tokens",
            types.len()
        )));
    }
    Ok(types)
}

/// A token id under `key`, if it names a token of the vocabulary.
fn gguf_special_id(
    metadata: &HashMap<String, Value>,
    key: &str,
    n_tokens: usize,
) -> Result<Option<u32>> {
    let Some(v) = metadata.get(key) else {
        return Ok(None);
    };
    let id = gguf_int(v, key)?;
    // Some converters write -1 (or an out-of-range id) for "none".
    match u32::try_from(id) {
        Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
        _ => Ok(None),
    }
}

fn gguf_bool(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<bool>> {
    metadata
        .get(key)
        .map(|v| {
            v.to_bool()
                .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))
        })
        .transpose()
}

/// The ids that end generation: the GGUF's eos, eot and eom, then the usual end markers
/// the vocabulary has.
fn gguf_eos_ids(
    metadata: &HashMap<String, Value>,
    inner: &tokenizers::Tokenizer,
    n_tokens: usize,
) -> Result<Vec<u32>> {
    let mut eos_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        push_unique(&mut eos_ids, gguf_special_id(metadata, key, n_tokens)?);
    }
    for name in END_OF_GENERATION_TOKENS {
        push_unique(&mut eos_ids, inner.token_to_id(name));
    }
    Ok(eos_ids)
}

fn gguf_str<'a>(value: &'a Value, key: &str) -> Result<&'a str> {
    value
        .to_string()
        .map(String::as_str)
        .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))
}

fn gguf_array<'a>(value: &'a Value, key: &str) -> Result<&'a [Value]> {
    value
        .to_vec()
        .map(Vec::as_slice)
        .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))
}

fn gguf_strings<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a String>> {
    let value = metadata
        .get(key)
        .ok_or_else(|| Error::Tokenizer(format!("GGUF metadata has no {key}")))?;
    gguf_array(value, key)?
        .iter()
        .map(|v| {
            v.to_string()
                .map_err(|e| Error::Tokenizer(format!("{key}: {e}")))
        })
        .collect()
}

fn gguf_float(value: &Value, key: &str) -> Result<f32> {
    match value {
        Value::F32(v) => Ok(*v),
        // Scores only order merges; f32 keeps that order for any real vocabulary.
        Value::F64(v) => Ok(*v as f32),
        other => Err(Error::Tokenizer(format!(
            "{key}: expected a float, found {:?}",
            other.value_type()
        ))),
    }
}

/// Any integer GGUF value: writers disagree on the width and sign of ids and types.
fn gguf_int(value: &Value, key: &str) -> Result<i64> {
    match value {
        Value::U8(v) => Ok(i64::from(*v)),
        Value::I8(v) => Ok(i64::from(*v)),
        Value::U16(v) => Ok(i64::from(*v)),
        Value::I16(v) => Ok(i64::from(*v)),
        Value::U32(v) => Ok(i64::from(*v)),
        Value::I32(v) => Ok(i64::from(*v)),
        Value::U64(v) => {
            i64::try_from(*v).map_err(|_| Error::Tokenizer(format!("{key}: {v} is out of range")))
        }
        Value::I64(v) => Ok(*v),
        other => Err(Error::Tokenizer(format!(
            "{key}: expected an integer, found {:?}",
            other.value_type()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_follows_the_tokenizer_file_name() {
        assert_eq!(
            config_path(Path::new("/m/tokenizer.json")),
            Path::new("/m/tokenizer_config.json")
        );
        assert_eq!(
            config_path(Path::new("/m/qwen3-tokenizer.json")),
            Path::new("/m/qwen3-tokenizer_config.json")
        );
        assert_eq!(
            config_path(Path::new("/m/vocab.json")),
            Path::new("/m/tokenizer_config.json")
        );
    }

    #[test]
    fn token_text_reads_strings_and_objects() {
        let v: serde_json::Value = serde_json::json!({"content": "<s>", "lstrip": false});
        assert_eq!(token_text(&v).as_deref(), Some("<s>"));
        assert_eq!(
            token_text(&serde_json::json!("</s>")).as_deref(),
            Some("</s>")
        );
        assert_eq!(token_text(&serde_json::Value::Null), None);
    }

    #[test]
    fn unknown_pre_tokenizer_falls_back_to_gpt2() {
        assert_eq!(
            PreTokenizer::from_gguf_name("no-such-thing"),
            PreTokenizer::Gpt2
        );
        assert_eq!(PreTokenizer::from_gguf_name("qwen2"), PreTokenizer::Qwen2);
    }
}
