//! Structured output: a request's [`Grammar`] (a JSON schema, any JSON object, a regex, a
//! Lark grammar or a list of choices) compiled with `llguidance` into a per-sequence
//! [`Constraint`] that says, before each sample, which tokens keep the output inside the
//! grammar.
//!
//! llguidance is the field's standard engine (llama.cpp, vLLM, SGLang and mistral.rs use
//! it): an Earley parser over lexemes compiled to derivative-based automata, walked over a
//! trie of the vocabulary, so a mask costs tens of microseconds, not a scan of every token.
//! Its tokenizer side is a `toktrie` trie built here from our own tokenizer's bytes
//! ([`crate::model::Tokenizer::vocab_bytes`]), the same for byte-level BPE and SentencePiece
//! vocabularies, from GGUF or tokenizer.json.
//!
//! Compiling happens on the request path (a bad schema is the client's error, answered
//! before anything streams); masks are computed on the engine side, per sequence, while the
//! step's forward pass runs (`worker`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use llguidance::api::{GrammarWithLexer, TopLevelGrammar};
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{
    InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv,
    INVALID_TOKEN,
};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::model::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (`format: "json"`, `response_format: json_object`).
    JsonObject,
    /// A JSON schema (draft 2020-12; see llguidance's list of supported keywords).
    JsonSchema(Value),
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// A grammar in llguidance's Lark syntax (which may embed `%json {...}` schemas).
    Lark(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

/// Whitespace allowed between JSON tokens unless a schema's own `x-guidance` says
/// otherwise: none, a space, or one or two newlines and some indentation (llama.cpp's
/// rule). Unbounded whitespace lets a small model pad forever.
const JSON_WHITESPACE: &str = r"[ ]|\n{1,2}[ \t]{0,20}";

impl Grammar {
    /// The `x-guidance` settings JSON schemas get unless they bring their own.
    pub fn default_json_options() -> Value {
        json!({"whitespace_pattern": JSON_WHITESPACE})
    }

    /// A JSON schema as we enforce it: our whitespace rule unless it brings its own
    /// settings, and no properties beyond those listed where it does not say (see
    /// [`close_objects`]).
    pub fn schema_with_defaults(schema: &Value) -> Value {
        let mut schema = schema.clone();
        close_objects(&mut schema);
        if let Value::Object(m) = &mut schema {
            m.entry("x-guidance")
                .or_insert_with(Self::default_json_options);
        }
        schema
    }

    /// The Lark expression for this grammar's output, to embed in a bigger grammar (tool
    /// calls beside an answer). `None` for a Lark grammar, which has its own `start`.
    pub fn as_lark_expr(&self) -> Option<String> {
        match self {
            Grammar::JsonObject => Some(format!(
                "%json {}",
                Self::schema_with_defaults(&json!({"type": "object"}))
            )),
            Grammar::JsonSchema(s) => Some(format!("%json {}", Self::schema_with_defaults(s))),
            Grammar::Regex(r) => Some(format!("/{}/", llguidance::regex_to_lark(r, ""))),
            Grammar::Choice(items) => Some(
                items
                    .iter()
                    .map(|s| Value::String(s.clone()).to_string())
                    .collect::<Vec<_>>()
                    .join(" | "),
            ),
            Grammar::Lark(_) => None,
        }
    }

    fn to_llguidance(&self) -> Result<TopLevelGrammar, GrammarError> {
        Ok(match self {
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(Self::schema_with_defaults(
                &json!({"type": "object"}),
            )),
            Grammar::JsonSchema(s) => {
                if !(s.is_object() || s.is_boolean()) {
                    return Err(GrammarError::Invalid(format!(
                        "a JSON schema must be an object, got {}",
                        short(&s.to_string())
                    )));
                }
                TopLevelGrammar::from_json_schema(Self::schema_with_defaults(s))
            }
            Grammar::Regex(r) => TopLevelGrammar::from_grammar(GrammarWithLexer::from_regex(r)),
            Grammar::Lark(g) => {
                if g.trim().is_empty() {
                    return Err(GrammarError::Invalid("the grammar is empty".into()));
                }
                TopLevelGrammar::from_lark(g.clone())
            }
            Grammar::Choice(items) => {
                if items.is_empty() {
                    return Err(GrammarError::Invalid("the list of choices is empty".into()));
                }
                let alternatives = self.as_lark_expr().unwrap_or_default();
                TopLevelGrammar::from_lark(format!("start: {alternatives}"))
            }
        })
    }

    /// What kind of constraint this is, for error messages.
    fn kind(&self) -> &'static str {
        match self {
            Grammar::JsonObject | Grammar::JsonSchema(_) => "JSON schema",
            Grammar::Regex(_) => "regex",
            Grammar::Lark(_) => "grammar",
            Grammar::Choice(_) => "choice",
        }
    }
}

/// Objects that list their `properties` and say nothing about others get
/// `additionalProperties: false`, as Ollama and llama.cpp read such schemas and as
/// xgrammar's strict mode (vLLM's default) does: a Pydantic model's schema lists every
/// field and means "these fields", and a small model left free invents more keys and
/// rambles in them. Only subsets of the schema's valid documents are excluded, so every
/// output still validates. Left alone: objects with `patternProperties` or
/// `unevaluatedProperties`, objects whose `required` names keys outside `properties`, and
/// the branches of an `allOf` (and objects beside one), whose properties merge.
pub fn close_objects(schema: &mut Value) {
    close_inner(schema, false);
}

fn close_inner(schema: &mut Value, in_merge: bool) {
    let Value::Object(m) = schema else {
        return;
    };
    // Properties beside a combinator or a reference merge with theirs.
    let merges = ["allOf", "anyOf", "oneOf", "$ref"]
        .iter()
        .any(|k| m.contains_key(*k));
    let listed: Option<Vec<String>> = m
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect());
    let has_properties = listed.is_some();
    if let Some(listed) = listed {
        let required_listed = m.get("required").and_then(Value::as_array).is_none_or(|r| {
            r.iter()
                .all(|k| k.as_str().is_some_and(|k| listed.iter().any(|l| l == k)))
        });
        let open_ended = [
            "additionalProperties",
            "patternProperties",
            "unevaluatedProperties",
        ]
        .iter()
        .any(|k| m.contains_key(*k));
        if !in_merge && !merges && !open_ended && required_listed {
            m.insert("additionalProperties".into(), Value::Bool(false));
        }
    }
    for (key, child) in m.iter_mut() {
        match key.as_str() {
            "properties" | "patternProperties" | "$defs" | "definitions" => {
                if let Value::Object(children) = child {
                    for c in children.values_mut() {
                        close_inner(c, false);
                    }
                }
            }
            "allOf" | "anyOf" | "oneOf" => {
                let merged = key == "allOf" || has_properties || in_merge;
                if let Value::Array(items) = child {
                    for c in items {
                        close_inner(c, merged);
                    }
                }
            }
            "prefixItems" => {
                if let Value::Array(items) = child {
                    for c in items {
                        close_inner(c, false);
                    }
                }
            }
            "items" | "additionalProperties" | "additionalItems" | "not" | "contains" => {
                close_inner(child, false)
            }
            _ => {}
        }
    }
}

/// Why a grammar cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    /// The client's grammar does not compile; the message names the part that failed.
    #[error("{0}")]
    Invalid(String),
    /// This model's tokenizer cannot be mapped to bytes.
    #[error("structured output is not available for this model: {0}")]
    Unavailable(String),
}

/// Long messages (whole schemas echoed back) are cut for the client.
fn short(s: &str) -> String {
    const MAX: usize = 600;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Our tokenizer as llguidance sees it: the trie of every token's bytes, and encoding for
/// the text llguidance wants tokenized (only used to force tokens, which we do not).
struct VocabEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
    /// Encoding a fragment gives the model's own tokens only for byte-level BPE;
    /// SentencePiece puts a space in front.
    canonical: bool,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(text.as_bytes()))
        })
    }

    fn tokenize_is_canonical(&self) -> bool {
        self.canonical
    }
}

/// One model's grammar compiler: the vocabulary trie and llguidance's per-tokenizer tables,
/// built once (on the first structured request) and shared by every request.
pub struct Grammars {
    factory: ParserFactory,
    vocab: usize,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.vocab)
            .finish_non_exhaustive()
    }
}

impl Grammars {
    /// Builds the trie for `tokenizer` over `vocab` ids (the model's logits width, which may
    /// exceed the tokenizer's own count: padding ids are never allowed).
    pub fn new(tokenizer: &Tokenizer, vocab: usize) -> Result<Grammars, GrammarError> {
        let entries = tokenizer
            .vocab_bytes()
            .map_err(|e| GrammarError::Unavailable(e.to_string()))?;
        let mut words: Vec<Vec<u8>> = entries
            .into_iter()
            .map(|e| match e {
                Some(e) if e.special => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(&e.bytes);
                    w
                }
                Some(e) => e.bytes,
                None => Vec::new(),
            })
            .collect();
        words.resize(vocab.max(words.len()), Vec::new());
        let eos = tokenizer.eos_ids().to_vec();
        // Without an end token a grammar still ends the output by completing.
        let first_eos = eos.first().copied().unwrap_or(INVALID_TOKEN);
        let canonical = tokenizer.is_byte_level();
        let vocab = words.len();
        let build = move || -> anyhow::Result<ParserFactory> {
            let vocab_size = u32::try_from(words.len())?;
            let mut info = TokRxInfo::new(vocab_size, first_eos);
            info.tok_bos = tokenizer.bos_id();
            let mut trie = TokTrie::from(&info, &words);
            if eos.len() > 1 {
                trie = trie.with_eos_tokens(&eos);
            }
            let env: TokEnv = Arc::new(VocabEnv {
                trie,
                tokenizer: tokenizer.clone(),
                canonical,
            });
            let mut factory = ParserFactory::new(
                &env,
                InferenceCapabilities::default(),
                &SlicedBiasComputer::general_slices(),
            )?;
            // Grammar warnings go nowhere near stderr; errors come back as values.
            factory.quiet();
            Ok(factory)
        };
        // The trie builder asserts on malformed vocabularies; a panic here is a model we
        // cannot constrain, not a reason to take the server down.
        let factory = catch_unwind(AssertUnwindSafe(build))
            .map_err(|_| GrammarError::Unavailable("building the vocabulary trie failed".into()))?
            .map_err(|e| GrammarError::Unavailable(e.to_string()))?;
        Ok(Grammars { factory, vocab })
    }

    /// Compiles `grammar` for one sequence. The error names what is wrong or unsupported
    /// (llguidance's message: an unknown keyword, a bad regex, a Lark syntax error).
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, GrammarError> {
        let top = grammar.to_llguidance()?;
        let parser = catch_unwind(AssertUnwindSafe(|| self.factory.create_parser(top)))
            .map_err(|_| {
                GrammarError::Invalid(format!("the {} could not be compiled", grammar.kind()))
            })?
            .map_err(|e| {
                GrammarError::Invalid(format!(
                    "unsupported {}: {}",
                    grammar.kind(),
                    short(&e.to_string())
                ))
            })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid(format!(
                "unsupported {}: {}",
                grammar.kind(),
                short(&e)
            )));
        }
        Ok(Constraint {
            matcher,
            mask: None,
            vocab: self.vocab,
        })
    }
}

/// One sequence's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
    /// The allowed set for the next token, when computed ahead.
    mask: Option<SimpleVob>,
    vocab: usize,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .field("mask_ready", &self.mask.is_some())
            .finish_non_exhaustive()
    }
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Constraint {
            matcher: self.matcher.deep_clone(),
            mask: self.mask.clone(),
            vocab: self.vocab,
        }
    }
}

impl Constraint {
    /// Computes the next token's allowed set ahead of time (on another thread while the
    /// forward pass runs). An error is kept and reported by [`Constraint::apply`].
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            if let Ok(m) = self.matcher.compute_mask_or_eos() {
                self.mask = Some(m);
            }
        }
    }

    /// Sets every logit the grammar forbids to -inf. At least one token (or an end token)
    /// stays allowed; an error means the grammar cannot continue.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let mask = match self.mask.take() {
            Some(m) => m,
            None => self
                .matcher
                .compute_mask_or_eos()
                .map_err(|e| format!("structured output: {e}"))?,
        };
        if mask.is_zero() {
            return Err("structured output: no token can continue the grammar".into());
        }
        let words = mask.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (i, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << i) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    /// Moves past the sampled token.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.mask = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("structured output: {e}"))
    }

    /// The grammar is complete and allows nothing more: the output is finished.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The output so far could end here.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Ids the mask covers (the model's logits width).
    pub fn vocab(&self) -> usize {
        self.vocab
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_properties_close_their_objects_where_nothing_merges() {
        let mut s = json!({
            "type": "object",
            "properties": {
                "pet": {"type": "object", "properties": {"name": {"type": "string"}}},
                "tags": {"type": "array", "items": {"properties": {"t": {}}}},
                "map": {"type": "object", "additionalProperties": {"type": "integer"}},
                "either": {"anyOf": [{"properties": {"a": {}}}, {"type": "null"}]},
                "both": {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
                "odd": {"properties": {"a": {}}, "required": ["a", "b"]},
                "beside": {"properties": {"a": {}}, "anyOf": [{"properties": {"b": {}}}]}
            },
            "$defs": {"D": {"properties": {"x": {}}}}
        });
        close_objects(&mut s);
        let closed = |p: &str| {
            s.pointer(p)
                .and_then(|o| o.get("additionalProperties"))
                .cloned()
        };
        assert_eq!(closed(""), Some(json!(false)));
        assert_eq!(closed("/properties/pet"), Some(json!(false)));
        assert_eq!(closed("/properties/tags/items"), Some(json!(false)));
        assert_eq!(closed("/properties/map"), Some(json!({"type": "integer"})));
        assert_eq!(closed("/properties/either/anyOf/0"), Some(json!(false)));
        assert_eq!(closed("/properties/both/allOf/0"), None);
        assert_eq!(closed("/properties/odd"), None);
        assert_eq!(closed("/properties/beside"), None);
        assert_eq!(closed("/properties/beside/anyOf/0"), None);
        assert_eq!(closed("/$defs/D"), Some(json!(false)));
    }
}
