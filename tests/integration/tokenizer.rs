//! The tokenizer against real model files: a vocabulary rebuilt from GGUF metadata must
//! tokenize exactly as the model's own tokenizer.json does, round-trip text, and know the
//! ids that start and end generation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value};
use candlewick::engine::detok::IncrementalDecoder;
use candlewick::model::tokenizer::{Decode, Tokenizer};
use candlewick::model::WeightSource;
use tokenizers::NormalizedString;

/// A file from the test-model cache; a missing one fails the test with how to get it.
fn test_model(name: &str) -> PathBuf {
    let dir = match std::env::var_os("WICK_TEST_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is not set"))
            .join(".cache/candlewick/test-models"),
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "test model file {} is missing: run scripts/fetch-test-models.sh",
        path.display()
    );
    path
}

const QWEN_GGUF: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
const SMOL_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const QWEN_JSON: &str = "qwen3-tokenizer.json";

fn gguf_metadata(name: &str) -> HashMap<String, Value> {
    let path = test_model(name);
    let mut file = std::fs::File::open(&path).unwrap();
    Content::read(&mut file).unwrap().metadata
}

fn gguf_tokens(metadata: &HashMap<String, Value>) -> Vec<String> {
    metadata["tokenizer.ggml.tokens"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_string().unwrap().clone())
        .collect()
}

struct Gguf {
    tokenizer: Tokenizer,
    tokens: Vec<String>,
    merges: Vec<String>,
}

fn load_gguf(name: &str) -> Gguf {
    let metadata = gguf_metadata(name);
    let merges = metadata["tokenizer.ggml.merges"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_string().unwrap().clone())
        .collect();
    Gguf {
        tokenizer: Tokenizer::from_gguf(&metadata).unwrap(),
        tokens: gguf_tokens(&metadata),
        merges,
    }
}

// Rebuilding a 150k vocabulary takes a moment; the tests share one of each.
fn qwen_gguf() -> &'static Gguf {
    static CELL: OnceLock<Gguf> = OnceLock::new();
    CELL.get_or_init(|| load_gguf(QWEN_GGUF))
}

fn smol_gguf() -> &'static Gguf {
    static CELL: OnceLock<Gguf> = OnceLock::new();
    CELL.get_or_init(|| load_gguf(SMOL_GGUF))
}

fn qwen_json() -> &'static Tokenizer {
    static CELL: OnceLock<Tokenizer> = OnceLock::new();
    CELL.get_or_init(|| Tokenizer::from_file(&test_model(QWEN_JSON)).unwrap())
}

/// Text that exercises every branch of the pre-tokenizer regexes and the byte-level map.
const CORPUS: &[&str] = &[
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, \
     and the clocks were striking thirteen.",
    "我们今天去公园散步，天气很好。机器学习是人工智能的一个分支。",
    "東京は日本の首都です。ひらがなとカタカナ、そして漢字を使います。",
    "fn main() {\n    let x = 42;\n\tif x > 1 {\n\t\tprintln!(\"{x}\");\n\t}\n}\n",
    "def f(a, b):\n        return a ** 2 + b  # comment\n\n\nclass C:\n\tpass\n",
    "👍🏽 👨\u{200d}👩\u{200d}👧\u{200d}👦 🇯🇵🇺🇸🇩🇪 ❤\u{fe0f} 🏳\u{fe0f}\u{200d}🌈",
    "a     b\t\t  c   \u{a0}\u{3000} d        ",
    "\n\n\n\nend\r\n\r\n\r\n \n \n",
    "1234567 3.14159 2024-01-01 0x1F 1,000,000 ١٢٣ ④",
    "don't I'll we've She'S THEY'RE it'd you're 'quoted'",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call><|endoftext|>",
    "Cafe\u{301} A\u{30a}ngstro\u{308}m \u{212b} n\u{303} café naïve Ω \u{2126}",
    "Ελληνικά Русский текст العربية עברית हिन्दी 한국어",
    "   leading spaces and trailing   ",
    "",
];

/// NFC form of `text`, which is what a Qwen tokenizer decodes back to.
fn nfc(text: &str) -> String {
    let mut n = NormalizedString::from(text);
    n.nfc();
    n.get().to_string()
}

#[test]
fn qwen_gguf_tokenizes_exactly_like_tokenizer_json() {
    let gguf = &qwen_gguf().tokenizer;
    let json = qwen_json();
    for text in CORPUS {
        let ours = gguf.encode(text, false).unwrap();
        let theirs = json.encode(text, false).unwrap();
        assert_eq!(ours, theirs, "ids differ for {text:?}");
        let decoded = gguf.decode(&ours, false).unwrap();
        assert_eq!(decoded, nfc(text), "round trip of {text:?}");
    }
    // And all of it at once, so pieces interact across boundaries.
    let all = CORPUS.concat();
    let ours = gguf.encode(&all, false).unwrap();
    assert_eq!(ours, json.encode(&all, false).unwrap());
    assert_eq!(gguf.decode_ids(&ours).unwrap(), nfc(&all));
}

#[test]
fn qwen_nfc_changes_combining_characters() {
    // The corpus's combining characters really are normalised: otherwise the test above
    // would not show that the NFC step is there.
    let text = "Cafe\u{301}";
    assert_ne!(nfc(text), text);
    let tok = &qwen_gguf().tokenizer;
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids, tok.encode("Café", false).unwrap());
    assert_eq!(tok.decode(&ids, false).unwrap(), "Café");
}

#[test]
fn qwen_special_tokens_are_single_ids() {
    let tok = &qwen_gguf().tokenizer;
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&151644));
    assert_eq!(ids.last(), Some(&151645));
    assert_eq!(tok.token_str(151644).as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.token_id("<|im_end|>"), Some(151645));
    // Control tokens go away when skipping specials; text stays.
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>user\nhi<|im_end|>"
    );
    // Qwen splits numbers into single digits.
    let digits = tok.encode("1234567", false).unwrap();
    assert_eq!(digits.len(), 7);
}

#[test]
fn qwen_bos_and_eos() {
    let gguf = &qwen_gguf();
    let tok = &gguf.tokenizer;
    assert!(tok.eos_ids().contains(&151645), "{:?}", tok.eos_ids());
    assert_eq!(tok.eos_ids().first(), Some(&151645));
    assert!(
        tok.eos_ids().contains(&151643),
        "<|endoftext|> ends generation too"
    );
    assert!(!tok.add_bos());
    assert_eq!(tok.bos_id(), Some(151643));
    // add_bos(false) model: asking for bos adds nothing.
    assert_eq!(
        tok.encode("hi", true).unwrap(),
        tok.encode("hi", false).unwrap()
    );
    assert_eq!(tok.vocab_size(), gguf.tokens.len());

    let json = qwen_json();
    assert_eq!(json.eos_ids().first(), Some(&151645), "config eos first");
    assert!(json.eos_ids().contains(&151643));
    assert_eq!(json.bos_id(), None);
    assert!(!json.add_bos());
}

/// GPT-2 style BPE written out plainly: merge the best-ranked adjacent pair until none is
/// left. Used only on ASCII words, where the byte-level alphabet is the identity but for
/// the space (`Ġ`).
fn reference_bpe(word: &str, ranks: &HashMap<(String, String), usize>) -> Vec<String> {
    let mut parts: Vec<String> = word
        .chars()
        .map(|c| {
            if c == ' ' {
                "Ġ".to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    loop {
        let best = (0..parts.len().saturating_sub(1))
            .filter_map(|i| {
                ranks
                    .get(&(parts[i].clone(), parts[i + 1].clone()))
                    .map(|r| (*r, i))
            })
            .min();
        let Some((_, i)) = best else { break };
        let right = parts.remove(i + 1);
        parts[i].push_str(&right);
    }
    parts
}

#[test]
fn smollm_matches_a_reference_bpe_over_the_gguf_merges() {
    let gguf = smol_gguf();
    let ranks: HashMap<(String, String), usize> = gguf
        .merges
        .iter()
        .enumerate()
        .map(|(rank, m)| {
            let (a, b) = m.split_once(' ').unwrap();
            ((a.to_string(), b.to_string()), rank)
        })
        .collect();
    let index: HashMap<&str, u32> = gguf
        .tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.as_str(), id as u32))
        .collect();

    // Pre-split by hand the way GPT-2's regex does it.
    let words = [
        "Hello",
        " world",
        ",",
        " the",
        " tokenizer",
        " works",
        " surprisingly",
        " well",
        " today",
    ];
    let expected: Vec<u32> = words
        .iter()
        .flat_map(|w| reference_bpe(w, &ranks))
        .map(|piece| index[piece.as_str()])
        .collect();
    let text = words.concat();
    let ids = gguf.tokenizer.encode(&text, false).unwrap();
    assert_eq!(ids, expected);
    // "Hello" is a single vocabulary entry, and it is the one used.
    assert_eq!(ids[0], index["Hello"]);
    assert_eq!(ids[1], index["Ġworld"]);
}

#[test]
fn smollm_round_trips_and_splits_digits() {
    let gguf = smol_gguf();
    let tok = &gguf.tokenizer;
    for text in CORPUS {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(&tok.decode(&ids, false).unwrap(), text, "round trip");
    }
    let all = CORPUS.concat();
    assert_eq!(
        tok.decode_ids(&tok.encode(&all, false).unwrap()).unwrap(),
        all
    );

    let id_of = |t: &str| gguf.tokens.iter().position(|x| x == t).unwrap() as u32;
    let digits = tok.encode("1234567", false).unwrap();
    let expected: Vec<u32> = "1234567".chars().map(|c| id_of(&c.to_string())).collect();
    assert_eq!(digits, expected);
    // The space before a number is a token of its own once digits are split off.
    assert_eq!(
        tok.encode(" 42", false).unwrap(),
        vec![id_of("Ġ"), id_of("4"), id_of("2")]
    );

    let chat = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(chat[0], 1);
    assert_eq!(chat.last(), Some(&2));
    assert_eq!(tok.token_str(1).as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.decode(&chat, true).unwrap(), "user\nhi");
}

#[test]
fn smollm_bos_and_eos() {
    let gguf = smol_gguf();
    let tok = &gguf.tokenizer;
    assert!(tok.eos_ids().contains(&2), "{:?}", tok.eos_ids());
    assert_eq!(tok.eos_ids().first(), Some(&2));
    assert_eq!(tok.bos_id(), Some(1));
    assert!(!tok.add_bos());
    assert_eq!(
        tok.encode("hi", true).unwrap(),
        tok.encode("hi", false).unwrap()
    );
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn a_saved_gguf_tokenizer_loads_back_as_tokenizer_json() {
    let dir = std::env::temp_dir().join(format!("candlewick-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    let original = &smol_gguf().tokenizer;
    original.save(&path).unwrap();
    let reloaded = Tokenizer::from_file(&path);
    std::fs::remove_dir_all(&dir).unwrap();
    let reloaded = reloaded.unwrap();

    let all = CORPUS.concat();
    let ids = original.encode(&all, false).unwrap();
    assert_eq!(reloaded.encode(&all, false).unwrap(), ids);
    assert_eq!(
        reloaded.decode(&ids, true).unwrap(),
        original.decode(&ids, true).unwrap()
    );
    assert!(reloaded.eos_ids().contains(&2));
}

#[test]
fn gguf_with_an_unknown_tokenizer_model_is_refused_clearly() {
    let mut metadata = HashMap::new();
    metadata.insert(
        "tokenizer.ggml.model".to_string(),
        Value::String("t5".to_string()),
    );
    metadata.insert(
        "tokenizer.ggml.tokens".to_string(),
        Value::Array(vec![Value::String("<pad>".to_string())]),
    );
    let err = Tokenizer::from_gguf(&metadata).unwrap_err().to_string();
    assert!(err.contains("'t5'"), "{err}");
    assert!(err.contains("not supported"), "{err}");
    assert!(err.contains("'llama'"), "names what is supported: {err}");

    let err = Tokenizer::from_gguf(&HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.ggml.model"), "{err}");
}

// SentencePiece ("llama") vocabularies.

const LLAMA_SPM_GGUF: &str = "ggml-vocab-llama-spm.gguf";
const PHI3_GGUF: &str = "ggml-vocab-phi-3.gguf";
const MISTRAL_JSON: &str = "mistral-tokenizer.json";

/// A GGUF's tokenizer, read through the loader's own GGUF reader.
fn spm_gguf(name: &str) -> Tokenizer {
    let src = WeightSource::open(&test_model(name)).unwrap();
    let WeightSource::Gguf(gguf) = &src else {
        panic!("{name} did not open as GGUF")
    };
    Tokenizer::from_gguf(gguf.metadata()).unwrap()
}

fn llama_spm() -> &'static Tokenizer {
    static CELL: OnceLock<Tokenizer> = OnceLock::new();
    CELL.get_or_init(|| spm_gguf(LLAMA_SPM_GGUF))
}

fn phi3_spm() -> &'static Tokenizer {
    static CELL: OnceLock<Tokenizer> = OnceLock::new();
    CELL.get_or_init(|| spm_gguf(PHI3_GGUF))
}

/// llama.cpp's tokenizer test for a vocabulary: its `.inp` holds the texts, separated by
/// `__ggml_vocab_test__` lines, its `.out` the ids the reference tokenizer gives each.
fn llama_cpp_cases(gguf: &str) -> Vec<(String, Vec<u32>)> {
    const SEP: &str = "\n__ggml_vocab_test__\n";
    let inp = std::fs::read_to_string(test_model(&format!("{gguf}.inp"))).unwrap();
    let out = std::fs::read_to_string(test_model(&format!("{gguf}.out"))).unwrap();
    let texts: Vec<&str> = inp.strip_suffix(SEP).unwrap().split(SEP).collect();
    let ids: Vec<Vec<u32>> = out
        .strip_suffix('\n')
        .unwrap()
        .split('\n')
        .map(|line| {
            line.split_whitespace()
                .map(|t| t.parse().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(texts.len(), ids.len(), "{gguf}.inp and .out disagree");
    assert!(texts.len() > 40, "only {} cases", texts.len());
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

#[test]
fn llama_spm_gguf_gives_llama_cpps_expected_ids() {
    let tok = llama_spm();
    for (text, expected) in llama_cpp_cases(LLAMA_SPM_GGUF) {
        let ids = tok.encode(&text, false).unwrap();
        assert_eq!(ids, expected, "ids for {text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "round trip");
    }
}

#[test]
fn llama_spm_bos_eos_and_special_tokens() {
    let tok = llama_spm();
    assert_eq!(tok.bos_id(), Some(1));
    assert!(tok.add_bos());
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.vocab_size(), 32000);
    // "Hello world" is llama.cpp's 15043 3186; bos goes in front when asked for.
    assert_eq!(
        tok.encode("Hello world", true).unwrap(),
        vec![1, 15043, 3186]
    );
    // Control tokens written in a chat template are single ids, and the text after each
    // gets its own space prefix, as in llama.cpp and Llama 2's tokenizer.json.
    let ids = tok.encode("<s>[INST] hi [/INST] ok</s>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(ids.iter().filter(|id| **id <= 2).count(), 2, "{ids:?}");
    assert_eq!(ids[1], tok.token_id("▁[").unwrap());
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<s> [INST] hi [/INST] ok</s>"
    );
    assert_eq!(tok.decode(&ids, true).unwrap(), "[INST] hi [/INST] ok");
    // A character outside the vocabulary becomes its UTF-8 bytes, and decodes back.
    let ids = tok.encode("🦙", false).unwrap();
    assert_eq!(ids, vec![29871, 243, 162, 169, 156]);
    assert_eq!(tok.token_str(243).as_deref(), Some("<0xF0>"));
    assert_eq!(tok.decode(&ids, false).unwrap(), "🦙");
}

#[test]
fn phi3_spm_gguf_user_and_control_tokens() {
    let tok = phi3_spm();
    // The same pieces as Llama 2, so llama.cpp's expected ids are the same.
    for (text, expected) in llama_cpp_cases(LLAMA_SPM_GGUF) {
        assert_eq!(tok.encode(&text, false).unwrap(), expected, "{text:?}");
    }
    let user = tok.token_id("<|user|>").unwrap();
    let end = tok.token_id("<|end|>").unwrap();
    let assistant = tok.token_id("<|assistant|>").unwrap();
    let ids = tok
        .encode("<|user|>\nhi<|end|>\n<|assistant|>\n", false)
        .unwrap();
    assert_eq!(ids[0], user);
    assert!(ids.contains(&end) && ids.contains(&assistant), "{ids:?}");
    // Text after a control token starts with its own "▁", as in llama.cpp: "\n" after
    // <|end|> is "▁" and <0x0A>, which decode to " \n".
    let nl = tok.encode("\n", false).unwrap();
    assert_eq!(nl, vec![29871, 13]);
    assert_eq!(&ids[ids.len() - 3..], &[assistant, 29871, 13]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "\nhi \n \n");
    // eos (<|endoftext|>) first, and <|end|> ends a turn.
    assert_eq!(tok.eos_ids().first(), Some(&32000));
    assert!(tok.eos_ids().contains(&end), "{:?}", tok.eos_ids());
}

#[test]
fn spm_ids_stream_through_the_incremental_decoder() {
    let tok = llama_spm();
    for text in CORPUS.iter().chain(SPM_CORPUS) {
        let ids = tok.encode(text, false).unwrap();
        let mut stream = IncrementalDecoder::new(tok);
        let mut out = String::new();
        for id in &ids {
            if let Some(piece) = stream.push(*id).unwrap() {
                assert!(!piece.contains('\u{fffd}'), "broken character in {piece:?}");
                out.push_str(&piece);
            }
        }
        out.push_str(&stream.flush().unwrap());
        assert_eq!(out, tok.decode(&ids, false).unwrap(), "streamed {text:?}");
        if spm_round_trips(text) {
            assert_eq!(out, *text);
        }
    }
}

/// Text for SentencePiece vocabularies on top of [`CORPUS`]: chat markers, and the
/// whitespace and byte-fallback cases that differ from byte-level BPE.
const SPM_CORPUS: &[&str] = &[
    "<s>[INST] What is 2+2? [/INST] 4</s><s>[INST] And 🦙? [/INST]",
    "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhello [/INST]",
    " leading space",
    "  two leading spaces\n\n  indented",
    "trailing space ",
    "tabs\tand\u{b}vertical\u{c}feeds",
    "κόσμε 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ \u{10ffff} \u{e000}",
    "▁ literal metaspace ▁▁",
    "<unk> <s> </s>",
];

/// Whether a SentencePiece tokenizer decodes `text` back to itself: not when it has a
/// control token in it (the text after one gets a space prefix of its own), nor a literal
/// `▁` (which is how pieces store a space, so it decodes to one).
fn spm_round_trips(text: &str) -> bool {
    !["<s>", "</s>", "<unk>", "▁"]
        .iter()
        .any(|t| text.contains(t))
}

/// Mistral's own tokenizer.json turned into the GGUF metadata llama.cpp's converter would
/// write: pieces in id order, token types, bos/eos/unk ids, and scores. The tokenizer.json
/// has no scores, but its merges are ranked by them (highest first), so each piece gets
/// minus the rank of the first merge that makes it: the order is all a score means here.
fn mistral_gguf_metadata() -> HashMap<String, Value> {
    let path = test_model(MISTRAL_JSON);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let model = &json["model"];
    assert_eq!(model["type"], "BPE");
    assert_eq!(model["byte_fallback"], true);
    let vocab = model["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (piece, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = piece.clone();
    }
    assert!(tokens.iter().all(|t| !t.is_empty()), "ids have gaps");

    let mut scores = vec![-1e9f32; tokens.len()];
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    for (rank, merge) in model["merges"].as_array().unwrap().iter().enumerate() {
        let merged = match merge {
            serde_json::Value::String(m) => m.replacen(' ', "", 1),
            serde_json::Value::Array(pair) => {
                format!("{}{}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap())
            }
            other => panic!("merge {other}"),
        };
        let id = index[merged.as_str()];
        if scores[id] == -1e9 {
            scores[id] = -(rank as f32);
        }
    }

    let special: HashMap<&str, bool> = json["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["content"].as_str().unwrap(),
                t["special"].as_bool().unwrap(),
            )
        })
        .collect();
    let types: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let ty = if t == "<unk>" {
                2
            } else if special.get(t.as_str()) == Some(&true) {
                3
            } else if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
                6
            } else {
                1
            };
            Value::I32(ty)
        })
        .collect();
    let id = |t: &str| Value::U32(index[t] as u32);
    HashMap::from([
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().cloned().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.bos_token_id".into(), id("<s>")),
        ("tokenizer.ggml.eos_token_id".into(), id("</s>")),
        ("tokenizer.ggml.unknown_token_id".into(), id("<unk>")),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
    ])
}

#[test]
fn mistral_gguf_tokenizes_exactly_like_its_tokenizer_json() {
    let json_path = test_model(MISTRAL_JSON);
    let json = Tokenizer::from_file(&json_path).unwrap();
    // Through a real GGUF file and the loader's reader, not just the in-memory map.
    let dir = std::env::temp_dir().join(format!("candlewick-spm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let gguf_path = dir.join("mistral-vocab.gguf");
    let metadata = mistral_gguf_metadata();
    {
        let entries: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(&gguf_path).unwrap();
        candle_core::quantized::gguf_file::write(&mut file, &entries, &[]).unwrap();
    }
    let gguf = {
        let src = WeightSource::open(&gguf_path).unwrap();
        let WeightSource::Gguf(g) = &src else {
            panic!("not GGUF")
        };
        Tokenizer::from_gguf(g.metadata()).unwrap()
    };
    let saved = dir.join("tokenizer.json");
    gguf.save(&saved).unwrap();
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    for text in CORPUS.iter().chain(SPM_CORPUS) {
        let ours = gguf.encode(text, true).unwrap();
        let theirs = json.encode(text, true).unwrap();
        assert_eq!(ours, theirs, "ids differ for {text:?}");
        assert_eq!(ours.first(), Some(&1), "bos first");
        assert_eq!(
            gguf.decode(&ours, false).unwrap(),
            json.decode(&ours, false).unwrap(),
            "decode of {text:?}"
        );
        if spm_round_trips(text) {
            assert_eq!(gguf.decode(&ours, true).unwrap(), *text, "round trip");
        }
    }
    let all: String = CORPUS.iter().chain(SPM_CORPUS).copied().collect();
    assert_eq!(
        gguf.encode(&all, false).unwrap(),
        json.encode(&all, false).unwrap()
    );

    // The merges derived from the scores are Mistral's own list, in its order.
    let theirs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    let pairs = |v: &serde_json::Value| -> Vec<String> {
        v["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(p) => {
                    format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap())
                }
                other => panic!("merge {other}"),
            })
            .collect()
    };
    let (ours, theirs) = (pairs(&saved), pairs(&theirs));
    assert_eq!(ours.len(), theirs.len(), "merge count");
    assert!(ours == theirs, "merge order differs");
    assert_eq!(saved["normalizer"], theirs_normalizer(&json_path));
}

/// The `normalizer` section of a tokenizer.json.
fn theirs_normalizer(path: &std::path::Path) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    json["normalizer"].clone()
}
