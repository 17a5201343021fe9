//! Golden tests for chat-template rendering: every case in tests/fixtures/templates/*.json
//! was rendered by Python jinja2 set up like `transformers`
//! (scripts/render-template-fixtures.py); our output must match it byte for byte, and
//! where Python raised, we must return `Error::Template`, or `Error::TemplateRaised` with
//! the message verbatim where the template raised it itself.

use std::path::{Path, PathBuf};

use candlewick::model::chat_template::ChatTemplate;
use candlewick::model::Error;
use serde_json::{Map, Value};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn token(fixture: &Value, key: &str) -> Option<String> {
    fixture[key].as_str().map(str::to_owned)
}

/// Renders every case of `<name>.json` and reports all mismatches at once.
fn check_fixture(name: &str) {
    let dir = fixture_dir();
    let fixture: Value = serde_json::from_str(&read(&dir.join(format!("{name}.json"))))
        .unwrap_or_else(|e| panic!("{name}.json: {e}"));
    let source_file = fixture["template"].as_str().expect("template file name");
    let source = read(&dir.join(source_file));
    let template = ChatTemplate::new(
        &source,
        token(&fixture, "bos_token"),
        token(&fixture, "eos_token"),
    )
    .unwrap_or_else(|e| panic!("{source_file} does not compile: {e}"));
    assert_eq!(template.source(), source);

    let cases = fixture["cases"].as_array().expect("cases");
    assert!(!cases.is_empty(), "{name}: no cases");
    let mut failures = Vec::new();
    for case in cases {
        let case_name = case["name"].as_str().expect("case name");
        let messages = case["messages"].as_array().expect("messages");
        let tools = case.get("tools").and_then(Value::as_array);
        let add_generation_prompt = case
            .get("add_generation_prompt")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let extra = case
            .get("extra")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_else(Map::new);
        let got = template.render(
            messages,
            tools.map(Vec::as_slice),
            add_generation_prompt,
            &extra,
        );
        match (case.get("expected").and_then(Value::as_str), got) {
            (Some(want), Ok(got)) if got == want => {}
            (Some(want), Ok(got)) => failures.push(format!(
                "{name}/{case_name}: output differs\n{}",
                first_difference(want, &got)
            )),
            (Some(_), Err(e)) => {
                failures.push(format!("{name}/{case_name}: unexpected error: {e}"))
            }
            (None, Err(Error::Template(msg) | Error::TemplateRaised(msg))) => {
                // Raised by the template itself: the message must come through verbatim.
                let python = case["error"].as_str().expect("error");
                if let Some(raised) = python.strip_prefix("TemplateError: ") {
                    if msg != raised {
                        failures.push(format!(
                            "{name}/{case_name}: message {msg:?}, python raised {raised:?}"
                        ));
                    }
                }
            }
            (None, Err(e)) => failures.push(format!("{name}/{case_name}: wrong error kind: {e}")),
            (None, Ok(got)) => failures.push(format!(
                "{name}/{case_name}: python raised {:?} but we rendered {got:?}",
                case["error"]
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// Points at the first differing byte with some context, which is what one needs to see
/// in a multi-kilobyte prompt.
fn first_difference(want: &str, got: &str) -> String {
    let at = want
        .char_indices()
        .zip(got.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(want.len().min(got.len()));
    let context = |s: &str| {
        let mut start = at.saturating_sub(60);
        while !s.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = (at + 60).min(s.len());
        while !s.is_char_boundary(end) {
            end += 1;
        }
        s.get(start..end).unwrap_or_default().to_owned()
    };
    format!(
        "at byte {at} (lengths: want {}, got {})\n  want: {:?}\n  got:  {:?}",
        want.len(),
        got.len(),
        context(want),
        context(got)
    )
}

#[test]
fn serde_json_keeps_object_key_order() {
    // Tool schemas are printed with their keys in the order the client sent them; that
    // needs serde_json's `preserve_order` feature.
    let v: Value = serde_json::from_str(r#"{"type": 1, "function": 2}"#).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["type", "function"],
        "enable serde_json's `preserve_order` feature in Cargo.toml"
    );
}

#[test]
fn qwen2_5() {
    check_fixture("qwen2.5");
}

#[test]
fn qwen3() {
    check_fixture("qwen3");
}

#[test]
fn smollm2_chatml() {
    check_fixture("smollm2");
}

#[test]
fn llama3_1() {
    check_fixture("llama3.1");
}

/// The built-in template for Gemma GGUFs without one; the fixture holds a copy of it.
#[test]
fn gemma3_builtin() {
    let builtin = candlewick::model::chat_template::builtin(candlewick::model::Family::Gemma3)
        .expect("a Gemma template");
    assert_eq!(
        read(&fixture_dir().join("gemma3.jinja")),
        builtin,
        "rerun scripts/render-template-fixtures.py after changing the template"
    );
    check_fixture("gemma3");
}

#[test]
fn jinja2_features() {
    check_fixture("features");
}

#[test]
fn raise_exception_is_a_template_error() {
    let t = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok",
        None,
        None,
    )
    .unwrap();
    let system = serde_json::json!({"role": "system", "content": "x"});
    match t.render(&[system], None, false, &Map::new()) {
        Err(Error::TemplateRaised(msg)) => {
            assert_eq!(msg, "first message must be from the user")
        }
        other => panic!("expected a template error, got {other:?}"),
    }
    let user = serde_json::json!({"role": "user", "content": "x"});
    assert_eq!(t.render(&[user], None, false, &Map::new()).unwrap(), "ok");
}

#[test]
fn bad_template_is_a_template_error() {
    for source in [
        "{% for %}",
        "{{ unclosed",
        "{% endif %}",
        "{% unknown_tag %}",
    ] {
        match ChatTemplate::new(source, None, None) {
            Err(Error::Template(_)) => {}
            other => panic!("{source:?}: expected a template error, got {other:?}"),
        }
    }
}

#[test]
fn unknown_method_is_a_template_error() {
    let t = ChatTemplate::new("{{ messages[0].content.frobnicate() }}", None, None).unwrap();
    let msg = serde_json::json!({"role": "user", "content": "x"});
    assert!(matches!(
        t.render(&[msg], None, false, &Map::new()),
        Err(Error::Template(_))
    ));
}

#[test]
fn strftime_now_formats_the_local_date() {
    let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", None, None).unwrap();
    let out = t.render(&[], None, false, &Map::new()).unwrap();
    let now = chrono::Local::now();
    let today = now.format("%d %b %Y").to_string();
    // Allow for the render straddling midnight.
    let yesterday = (now - chrono::Duration::days(1))
        .format("%d %b %Y")
        .to_string();
    assert!(out == today || out == yesterday, "{out}");

    let bad = ChatTemplate::new("{{ strftime_now('%Q') }}", None, None).unwrap();
    assert!(matches!(
        bad.render(&[], None, false, &Map::new()),
        Err(Error::Template(_))
    ));
}

#[test]
fn extra_variables_and_core_variables() {
    let t = ChatTemplate::new(
        "{{ messages | length }} {{ add_generation_prompt }} {{ tools is none }} {{ bos_token }} {{ documents | length }}",
        Some("<s>".into()),
        None,
    )
    .unwrap();
    let mut extra = Map::new();
    extra.insert("messages".into(), serde_json::json!([1, 2, 3]));
    extra.insert("add_generation_prompt".into(), Value::Bool(false));
    extra.insert("bos_token".into(), Value::String("<bos>".into()));
    // `documents` is none unless the caller passes it, as in transformers.
    extra.insert("documents".into(), serde_json::json!([{"title": "t"}]));
    let out = t.render(&[], None, true, &extra).unwrap();
    assert_eq!(out, "0 True True <bos> 1");
}

#[test]
fn shared_between_threads() {
    let source = read(&fixture_dir().join("qwen3.jinja"));
    let t =
        std::sync::Arc::new(ChatTemplate::new(&source, None, Some("<|im_end|>".into())).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                let msg = serde_json::json!({"role": "user", "content": format!("n{i}")});
                t.render(&[msg], None, true, &Map::new()).unwrap()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.join().unwrap();
        assert_eq!(
            out,
            format!("<|im_start|>user\nn{i}<|im_end|>\n<|im_start|>assistant\n")
        );
    }
}
