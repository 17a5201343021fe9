//! Broken model files give clear errors that name the file and the problem, never a panic.

use crate::common;

use std::fs;

use candle_core::Device;
use candlewick::model::{Error, Model};

fn load_err(path: &std::path::Path) -> Error {
    match Model::load(path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e,
    }
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let src = common::test_model(common::SMOLLM2_GGUF);
    let dir = common::ScratchDir::new("trunc");
    let bytes = fs::read(&src).expect("read");
    let path = dir.path().join("truncated.gguf");
    fs::write(&path, &bytes[..bytes.len() / 2]).expect("write");
    let e = load_err(&path);
    let msg = e.to_string();
    assert!(matches!(e, Error::BadTensor { .. }), "{msg}");
    assert!(
        msg.contains("truncated.gguf") && msg.contains("truncated"),
        "{msg}"
    );

    let path = dir.path().join("header-only.gguf");
    fs::write(&path, &bytes[..100]).expect("write");
    let msg = load_err(&path).to_string();
    assert!(
        msg.contains("header-only.gguf") && msg.contains("GGUF"),
        "{msg}"
    );

    let path = dir.path().join("not-a-model.gguf");
    fs::write(&path, b"hello world, definitely not gguf").expect("write");
    let msg = load_err(&path).to_string();
    assert!(msg.contains("not-a-model.gguf"), "{msg}");
}

#[test]
fn missing_file_and_unknown_arch() {
    let dir = common::ScratchDir::new("badcfg");
    let msg = load_err(&dir.path().join("nope.gguf")).to_string();
    assert!(msg.contains("nope.gguf"), "{msg}");

    let path = common::write_tiny_model(common::TinyArch::Qwen2, dir.path(), 9);
    let cfg = path.join("config.json");
    let text = fs::read_to_string(&cfg).expect("config");
    fs::write(&cfg, text.replace("\"qwen2\"", "\"gpt_neox\"")).expect("write");
    let e = load_err(&path);
    assert!(
        matches!(e, Error::UnsupportedArch(ref a) if a == "gpt_neox"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = common::ScratchDir::new("missing");
    let path = common::write_tiny_model(common::TinyArch::Qwen2, dir.path(), 10);
    // Keep every tensor but one.
    let st = path.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu).expect("load");
    let kept: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| k != "model.layers.1.mlp.up_proj.weight")
        .collect();
    candle_core::safetensors::save(&kept, &st).expect("save");
    let e = load_err(&path);
    let msg = e.to_string();
    assert!(matches!(e, Error::MissingTensor { .. }), "{msg}");
    assert!(msg.contains("model.layers.1.mlp.up_proj.weight"), "{msg}");
}
