//! Structured output below HTTP, on real tokenizers: every vocabulary (byte-level BPE and
//! SentencePiece, from GGUF and tokenizer.json) maps to the bytes its tokens stand for; a
//! compiled grammar lets the real tokenization of a matching text through token by token
//! and ends it, stops a text that does not match, and a grammar we cannot compile is an
//! error naming the part that failed.

use crate::common;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use candlewick::engine::constraint::{Grammar, GrammarError, Grammars};
use candlewick::model::Tokenizer;
use serde_json::json;

fn gguf_tokenizer(name: &str) -> Tokenizer {
    let path = common::test_model(name);
    let mut file = std::fs::File::open(&path).expect("open GGUF");
    let md: HashMap<String, GgufValue> = Content::read(&mut file).expect("GGUF").metadata;
    Tokenizer::from_gguf(&md).expect("tokenizer from GGUF")
}

/// Every kind of tokenizer the server loads.
fn tokenizers() -> Vec<(&'static str, Tokenizer)> {
    vec![
        ("smollm2 gguf", gguf_tokenizer(common::SMOLLM2_GGUF)),
        ("qwen2.5 gguf", gguf_tokenizer(common::QWEN_GGUF)),
        (
            "gemma3 gguf (spm)",
            gguf_tokenizer("gemma-3-270m-q4_k_m.gguf"),
        ),
        (
            "llama spm gguf",
            gguf_tokenizer("ggml-vocab-llama-spm.gguf"),
        ),
        (
            "qwen3 tokenizer.json",
            Tokenizer::from_file(&common::qwen_tokenizer_dir().join("tokenizer.json"))
                .expect("qwen3 tokenizer"),
        ),
        (
            "mistral tokenizer.json (spm)",
            Tokenizer::from_file(&common::test_model("mistral-tokenizer.json"))
                .expect("mistral tokenizer"),
        ),
    ]
}

const TEXT: &str = "Hello {\"a\": [1, 2.5e-3]}\n\tnaïve 日本語 🎉 <b>x</b>";

#[test]
fn token_bytes_spell_the_text() {
    for (name, tok) in tokenizers() {
        let bytes = tok.vocab_bytes().expect(name);
        assert_eq!(bytes.len(), tok.vocab_size(), "{name}");
        let ids = tok.encode(TEXT, false).expect("encode");
        let mut spelled = Vec::new();
        for id in &ids {
            let e = bytes[*id as usize]
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: id {id} has no bytes"));
            assert!(!e.special, "{name}: text token {id} marked special");
            spelled.extend_from_slice(&e.bytes);
        }
        // SentencePiece puts a space in front of the text.
        let spelled = String::from_utf8(spelled).expect("utf-8");
        assert_eq!(spelled.trim_start_matches(' '), TEXT, "{name}");
        for eos in tok.eos_ids() {
            let e = bytes[*eos as usize].as_ref().expect("eos entry");
            assert!(e.special, "{name}: eos {eos} is special");
        }
    }
}

/// The tokens of `text` as a model would write it mid-reply: byte-level BPE encodes a
/// fragment as the model does; SentencePiece would put a space in front, so there the text
/// is cut greedily into the longest vocabulary entries (another spelling a model may use).
fn tokens_of(tok: &Tokenizer, text: &str) -> Vec<u32> {
    if tok.is_byte_level() {
        return tok.encode(text, false).expect("encode");
    }
    let mut by_bytes: HashMap<Vec<u8>, u32> = HashMap::new();
    for (id, e) in tok.vocab_bytes().expect("bytes").into_iter().enumerate() {
        if let Some(e) = e.filter(|e| !e.special && !e.bytes.is_empty()) {
            by_bytes.entry(e.bytes).or_insert(id as u32);
        }
    }
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (len, id) = (1..=(bytes.len() - at).min(64))
            .rev()
            .find_map(|n| by_bytes.get(&bytes[at..at + n]).map(|&id| (n, id)))
            .expect("every byte has a token");
        out.push(id);
        at += len;
    }
    out
}

/// Walks `text`'s own tokenization through a fresh constraint: `Ok` when every token is
/// allowed and the grammar may end after it, else the index of the first refused token.
fn walk(g: &Grammars, tok: &Tokenizer, grammar: &Grammar, text: &str) -> Result<(), String> {
    let mut c = g.compile(grammar).expect("compiles");
    let ids = tokens_of(tok, text);
    let vocab = c.vocab();
    for (i, id) in ids.iter().enumerate() {
        let mut row = vec![0.0f32; vocab];
        c.apply(&mut row).map_err(|e| format!("mask at {i}: {e}"))?;
        if !row[*id as usize].is_finite() {
            return Err(format!("token {i} ({id}) refused"));
        }
        c.commit(*id).map_err(|e| format!("commit {i}: {e}"))?;
    }
    if c.is_finished() || c.is_accepting() {
        Ok(())
    } else {
        Err("the grammar may not end here".into())
    }
}

#[test]
fn grammars_accept_matching_text_and_refuse_the_rest() {
    for (name, tok) in tokenizers() {
        let g = Grammars::new(&tok, tok.vocab_size() + 7).expect(name);
        let schema = Grammar::JsonSchema(json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}
            },
            "required": ["name", "age"],
            "additionalProperties": false
        }));
        let ok = walk(
            &g,
            &tok,
            &schema,
            r#"{"name": "Zoë 🎉", "age": 42, "tags": ["b"]}"#,
        );
        assert_eq!(ok, Ok(()), "{name}");
        for bad in [
            r#"{"name": "x", "age": 200}"#,
            r#"{"age": 1, "name": "x"}"#,
            r#"{"name": "x"}"#,
            r#"{"name": "x", "age": 1, "tags": ["c"]}"#,
            r#"{"name": "x", "age": 1, "extra": 1}"#,
            r#"[1]"#,
        ] {
            assert!(walk(&g, &tok, &schema, bad).is_err(), "{name}: {bad}");
        }
        assert_eq!(
            walk(&g, &tok, &Grammar::JsonObject, "{\"k\": [true, null]}"),
            Ok(())
        );
        assert!(walk(&g, &tok, &Grammar::JsonObject, "\"text\"").is_err());
        let rx = Grammar::Regex(r"\d{3}-[a-z]+".into());
        assert_eq!(walk(&g, &tok, &rx, "123-abc"), Ok(()), "{name}");
        assert!(walk(&g, &tok, &rx, "12-abc").is_err(), "{name}");
        let choice = Grammar::Choice(vec!["red".into(), "green light".into()]);
        assert_eq!(walk(&g, &tok, &choice, "green light"), Ok(()), "{name}");
        assert!(walk(&g, &tok, &choice, "blue").is_err(), "{name}");
        let lark = Grammar::Lark(
            "start: greeting \" \" NAME\ngreeting: \"hi\" | \"hello\"\nNAME: /[A-Z][a-z]+/".into(),
        );
        assert_eq!(walk(&g, &tok, &lark, "hello Ada"), Ok(()), "{name}");
        assert!(walk(&g, &tok, &lark, "hey Ada").is_err(), "{name}");
    }
}

#[test]
fn uncompilable_grammars_name_the_problem() {
    let tok = gguf_tokenizer(common::SMOLLM2_GGUF);
    let g = Grammars::new(&tok, tok.vocab_size()).expect("grammars");
    let cases = [
        (
            Grammar::JsonSchema(json!({"type": "object", "not": {"required": ["a"]}})),
            "not",
        ),
        (
            Grammar::JsonSchema(json!({"type": "string", "format": "credit-card"})),
            "credit-card",
        ),
        (
            Grammar::JsonSchema(json!({"$ref": "#/$defs/missing"})),
            "missing",
        ),
        (Grammar::JsonSchema(json!({"type": "strnig"})), "strnig"),
        (Grammar::JsonSchema(json!([1, 2])), "must be an object"),
        (Grammar::Regex("(unclosed".into()), "regex"),
        (Grammar::Lark("start: foo".into()), "foo"),
        (Grammar::Lark("this is not lark".into()), "grammar"),
        (Grammar::Choice(vec![]), "empty"),
    ];
    for (grammar, needle) in cases {
        match g.compile(&grammar) {
            Err(GrammarError::Invalid(msg)) => {
                assert!(
                    msg.contains(needle),
                    "{grammar:?}: {msg:?} lacks {needle:?}"
                )
            }
            other => panic!("{grammar:?} compiled: {other:?}"),
        }
    }
}

#[test]
fn tool_call_grammars_follow_each_syntax_and_schema() {
    use candlewick::model::ToolSyntax;
    let tok = Tokenizer::from_file(&common::qwen_tokenizer_dir().join("tokenizer.json"))
        .expect("qwen3 tokenizer");
    let g = Grammars::new(&tok, tok.vocab_size()).expect("grammars");
    let tools = vec![
        (
            "get_weather".to_string(),
            json!({"type": "object", "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}),
        ),
        ("now".to_string(), serde_json::Value::Null),
    ];
    let opts = Grammar::default_json_options();
    let lark = |syntax: ToolSyntax, one: bool| {
        let rules = syntax.calls_grammar(&tools, one, &opts).expect("rules");
        Grammar::Lark(format!("start: calls\n{rules}"))
    };
    let tagged = lark(ToolSyntax::Tagged, false);
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>";
    assert_eq!(walk(&g, &tok, &tagged, call), Ok(()));
    let two =
        format!("{call}\n<tool_call>\n{{\"name\": \"now\", \"arguments\": {{}}}}\n</tool_call>");
    assert_eq!(walk(&g, &tok, &tagged, &two), Ok(()));
    assert!(walk(&g, &tok, &lark(ToolSyntax::Tagged, true), &two).is_err());
    for bad in [
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"k\"}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        "Sure! <tool_call>",
        "{\"name\": \"now\", \"arguments\": {}}",
    ] {
        assert!(walk(&g, &tok, &tagged, bad).is_err(), "{bad}");
    }
    let bare = lark(ToolSyntax::BareJson, true);
    let call = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\", \"unit\": \"f\"}}";
    assert_eq!(walk(&g, &tok, &bare, call), Ok(()));
    assert!(walk(&g, &tok, &bare, "{\"name\": \"now\", \"arguments\": {}}").is_err());
    assert!(ToolSyntax::None
        .calls_grammar(&tools, false, &opts)
        .is_none());
    let bad_params = vec![("f".to_string(), json!({"type": "object", "not": {}}))];
    let rules = ToolSyntax::Tagged
        .calls_grammar(&bad_params, true, &opts)
        .expect("rules");
    let err = g
        .compile(&Grammar::Lark(format!("start: calls\n{rules}")))
        .expect_err("an unsupported parameter schema");
    assert!(err.to_string().contains("not"), "{err}");
}
