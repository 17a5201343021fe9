//! The tokenizer against real model files: a vocabulary rebuilt from GGUF metadata must
//! tokenize exactly as the model's own tokenizer.json does, round-trip text, and know the
//! ids that start and end generation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value};
use candlewick::model::tokenizer::{Decode, Tokenizer};
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
fn gguf_with_sentencepiece_vocabulary_is_refused_clearly() {
    let mut metadata = HashMap::new();
    metadata.insert(
        "tokenizer.ggml.model".to_string(),
        Value::String("llama".to_string()),
    );
    metadata.insert(
        "tokenizer.ggml.tokens".to_string(),
        Value::Array(
            ["<unk>", "<s>", "</s>", "▁hello"]
                .iter()
                .map(|t| Value::String(t.to_string()))
                .collect(),
        ),
    );
    metadata.insert(
        "tokenizer.ggml.scores".to_string(),
        Value::Array(vec![Value::F32(0.0); 4]),
    );
    metadata.insert(
        "tokenizer.ggml.token_type".to_string(),
        Value::Array(vec![
            Value::I32(2),
            Value::I32(3),
            Value::I32(3),
            Value::I32(1),
        ]),
    );
    let err = Tokenizer::from_gguf(&metadata).unwrap_err().to_string();
    assert!(err.contains("'llama'"), "{err}");
    assert!(err.contains("not supported"), "{err}");

    let err = Tokenizer::from_gguf(&HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.ggml.model"), "{err}");
}
