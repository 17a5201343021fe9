//! What the store and `/api/show` need to know about a Hugging Face safetensors model, read
//! from its small files and the headers of its weight files only (no tensor data): family,
//! parameter count, dtype, the chat template, and `model_info` in the GGUF key names that
//! Ollama clients read (`general.architecture`, `<arch>.context_length`, ...).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::gguf::{human_params, GgufSummary};
use super::{io_err, ConfigBlob, StoreError, MEDIA_FILE, MEDIA_JSON, MEDIA_SAFETENSORS};

/// Files every model needs.
pub const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
/// The weights: an index naming the shards, or one file.
pub const INDEX: &str = "model.safetensors.index.json";
pub const SINGLE: &str = "model.safetensors";

/// The layer media type of a model file, by its extension.
pub fn media_type(file: &str) -> &'static str {
    if file.ends_with(".safetensors") {
        MEDIA_SAFETENSORS
    } else if file.ends_with(".json") {
        MEDIA_JSON
    } else {
        MEDIA_FILE
    }
}

/// A header larger than this is not a safetensors header (the format's own reader refuses
/// 100 MB as well); it protects us from allocating whatever a broken file claims.
const MAX_HEADER: u64 = 100 << 20;

/// Tensor element counts per dtype (`BF16`, `F16`, `F32`, ...) across the weight files.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WeightStats {
    pub elements: BTreeMap<String, u64>,
}

impl WeightStats {
    pub fn parameter_count(&self) -> u64 {
        self.elements.values().sum()
    }

    /// The dtype that holds most parameters, as Ollama names quantization levels.
    pub fn file_type(&self) -> String {
        self.elements
            .iter()
            .max_by_key(|(_, n)| **n)
            .map_or_else(|| "unknown".to_string(), |(d, _)| d.clone())
    }

    /// Adds the tensors of one file's header.
    pub fn add_file(&mut self, path: &Path) -> Result<(), StoreError> {
        let bad = |msg: String| StoreError::BadSafetensors {
            path: path.to_path_buf(),
            msg,
        };
        let mut file = File::open(path).map_err(io_err(path))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(io_err(path))?;
        let len = u64::from_le_bytes(len);
        let file_len = file.metadata().map_err(io_err(path))?.len();
        if len > MAX_HEADER || len + 8 > file_len {
            return Err(bad(format!("header length {len} does not fit the file")));
        }
        let mut header = vec![0u8; len as usize];
        file.read_exact(&mut header).map_err(io_err(path))?;
        let header: Map<String, Value> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        for (name, info) in &header {
            if name == "__metadata__" {
                continue;
            }
            let dtype = info
                .get("dtype")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("tensor {name} has no dtype")))?;
            let shape = info
                .get("shape")
                .and_then(Value::as_array)
                .ok_or_else(|| bad(format!("tensor {name} has no shape")))?;
            let count = shape
                .iter()
                .try_fold(1u64, |acc, d| d.as_u64().and_then(|d| acc.checked_mul(d)))
                .ok_or_else(|| bad(format!("tensor {name} has an odd shape")))?;
            *self.elements.entry(dtype.to_string()).or_default() += count;
        }
        Ok(())
    }
}

/// The weight files of a model directory given as `file name -> path`: the shards its
/// index names, or `model.safetensors`.
pub fn weight_files(files: &BTreeMap<String, PathBuf>) -> Result<Vec<PathBuf>, StoreError> {
    if let Some(index) = files.get(INDEX) {
        let names = index_shards(&read_json(index)?).ok_or_else(|| StoreError::BadSafetensors {
            path: index.clone(),
            msg: "no weight_map".into(),
        })?;
        return names
            .iter()
            .map(|n| {
                files
                    .get(n)
                    .cloned()
                    .ok_or_else(|| StoreError::BadSafetensors {
                        path: index.clone(),
                        msg: format!("shard {n} is not part of the model"),
                    })
            })
            .collect();
    }
    files
        .get(SINGLE)
        .map(|p| vec![p.clone()])
        .ok_or_else(|| StoreError::BadSafetensors {
            path: PathBuf::from(SINGLE),
            msg: "the model has no weights".into(),
        })
}

/// The shard file names of a `model.safetensors.index.json`, sorted, each once.
pub fn index_shards(index: &Value) -> Option<Vec<String>> {
    let mut names: Vec<String> = index
        .get("weight_map")?
        .as_object()?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Some(names)
}

fn read_json(path: &Path) -> Result<Value, StoreError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|e| StoreError::BadSafetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// The config blob of a safetensors model: `model_type` of config.json as the family, the
/// parameter count and dominant dtype from the weight headers. `diff_ids` lists every file.
pub fn config_blob(
    files: &BTreeMap<String, PathBuf>,
    digests: &[String],
) -> Result<ConfigBlob, StoreError> {
    let config = files
        .get("config.json")
        .ok_or_else(|| StoreError::BadSafetensors {
            path: PathBuf::from("config.json"),
            msg: "the model has no config.json".into(),
        })?;
    let family = architecture(&read_json(config)?);
    let mut stats = WeightStats::default();
    for f in weight_files(files)? {
        stats.add_file(&f)?;
    }
    Ok(ConfigBlob {
        model_format: "safetensors".into(),
        model_family: family.clone(),
        model_families: Some(vec![family]),
        model_type: human_params(stats.parameter_count()),
        file_type: stats.file_type(),
        architecture: "amd64".into(),
        os: "linux".into(),
        rootfs: Some(serde_json::json!({"type": "layers", "diff_ids": digests})),
    })
}

/// config.json's `model_type` (`qwen2`, `llama`, `mistral`, ...), which is also what the
/// GGUF conversions of these models call their architecture; Gemma 3's text model
/// (`gemma3_text`) is `gemma3` there, as its multimodal wrapper is here.
fn architecture(config: &Value) -> String {
    match config.get("model_type").and_then(Value::as_str) {
        Some("gemma3_text") => "gemma3".to_string(),
        Some(t) => t.to_string(),
        None => "unknown".to_string(),
    }
}

/// The config of the text model: a multimodal wrapper's `text_config`, else the whole.
fn text_config(config: &Value) -> &Value {
    config
        .get("text_config")
        .filter(|t| t.is_object())
        .unwrap_or(config)
}

/// The summary `/api/show` gives of a safetensors model, in the GGUF key names clients
/// know: config.json's sizes under `<arch>.*`, the parameter count from the headers, the
/// token ids, and the chat template of `chat_template.jinja` or tokenizer_config.json.
pub fn summary(
    files: &BTreeMap<String, PathBuf>,
    verbose: bool,
) -> Result<GgufSummary, StoreError> {
    let config_path = files
        .get("config.json")
        .ok_or_else(|| StoreError::BadSafetensors {
            path: PathBuf::from("config.json"),
            msg: "the model has no config.json".into(),
        })?;
    let config = read_json(config_path)?;
    let arch = architecture(&config);
    let mut stats = WeightStats::default();
    for f in weight_files(files)? {
        stats.add_file(&f)?;
    }
    let mut info = Map::new();
    info.insert("general.architecture".into(), arch.clone().into());
    info.insert(
        "general.parameter_count".into(),
        stats.parameter_count().into(),
    );
    // (GGUF key suffix, config.json key); the first present config key wins.
    let keys: &[(&str, &[&str])] = &[
        ("context_length", &["max_position_embeddings"]),
        ("embedding_length", &["hidden_size"]),
        ("block_count", &["num_hidden_layers"]),
        ("feed_forward_length", &["intermediate_size"]),
        ("attention.head_count", &["num_attention_heads"]),
        (
            "attention.head_count_kv",
            &["num_key_value_heads", "num_attention_heads"],
        ),
        ("attention.key_length", &["head_dim"]),
        ("attention.value_length", &["head_dim"]),
        ("attention.layer_norm_rms_epsilon", &["rms_norm_eps"]),
        ("rope.freq_base", &["rope_theta"]),
        ("vocab_size", &["vocab_size"]),
    ];
    let text = text_config(&config);
    for (suffix, from) in keys {
        if let Some(v) = from.iter().find_map(|k| text.get(*k)) {
            if !v.is_null() {
                info.insert(format!("{arch}.{suffix}"), v.clone());
            }
        }
    }
    // A vision tower, under the keys Ollama's GGUF gives it.
    if let Some(vision) = config.get("vision_config") {
        for (suffix, key) in [
            ("block_count", "num_hidden_layers"),
            ("embedding_length", "hidden_size"),
            ("image_size", "image_size"),
            ("patch_size", "patch_size"),
        ] {
            if let Some(v) = vision.get(key).filter(|v| !v.is_null()) {
                info.insert(format!("{arch}.vision.{suffix}"), v.clone());
            }
        }
    }
    for (gguf, hf) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
    ] {
        // A list of eos ids (Llama 3) is shown as its first, the one GGUF would carry.
        let v = match config.get(hf) {
            Some(Value::Array(ids)) => ids.first().cloned(),
            v => v.cloned(),
        };
        if let Some(v) = v.filter(|v| v.is_u64()) {
            info.insert(gguf.into(), v);
        }
    }
    if verbose {
        info.insert(
            "general.file_type".into(),
            Value::from(stats.file_type().as_str()),
        );
    }
    let mut keys: Vec<String> = info.keys().cloned().collect();
    keys.sort();
    let model_info = keys
        .into_iter()
        .filter_map(|k| info.remove(&k).map(|v| (k, v)))
        .collect();
    Ok(GgufSummary {
        architecture: arch,
        parameter_count: stats.parameter_count(),
        file_type: stats.file_type(),
        model_info,
        chat_template: chat_template(files)?,
    })
}

/// The model's own chat template: `chat_template.jinja`, else tokenizer_config.json's
/// `chat_template` (a string, or a list of named templates of which `default` wins).
pub fn chat_template(files: &BTreeMap<String, PathBuf>) -> Result<Option<String>, StoreError> {
    if let Some(path) = files.get("chat_template.jinja") {
        return std::fs::read_to_string(path)
            .map(Some)
            .map_err(io_err(path));
    }
    let Some(path) = files.get("tokenizer_config.json") else {
        return Ok(None);
    };
    Ok(match read_json(path)?.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or(list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    })
}

/// Files by name, for tests and callers that hold a directory rather than blobs.
pub fn dir_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>, StoreError> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        out.insert(name, entry.path());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_st(path: &Path, header: &Value) {
        let h = serde_json::to_vec(header).unwrap();
        let data_len: u64 = header
            .as_object()
            .unwrap()
            .values()
            .filter_map(|v| v.get("data_offsets")?.get(1)?.as_u64())
            .max()
            .unwrap_or(0);
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&h);
        bytes.resize(bytes.len() + data_len as usize, 0);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn counts_parameters_across_shards_and_reads_config() {
        let dir = std::env::temp_dir().join(format!("wick-st-{}", super::super::nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        write_st(
            &dir.join("a.safetensors"),
            &serde_json::json!({
                "__metadata__": {"format": "pt"},
                "x": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]},
            }),
        );
        write_st(
            &dir.join("b.safetensors"),
            &serde_json::json!({
                "y": {"dtype": "BF16", "shape": [10], "data_offsets": [0, 20]},
                "n": {"dtype": "F32", "shape": [3], "data_offsets": [20, 32]},
            }),
        );
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            r#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors","n":"b.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"model_type":"qwen2","max_position_embeddings":32768,"hidden_size":896,
                "num_key_value_heads":2,"eos_token_id":[7,8]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template":[{"name":"tool_use","template":"T"},{"name":"default","template":"D"}]}"#,
        )
        .unwrap();
        let files = dir_files(&dir).unwrap();
        let s = summary(&files, false).unwrap();
        assert_eq!(s.parameter_count, 45);
        assert_eq!(s.file_type, "BF16");
        assert_eq!(s.architecture, "qwen2");
        assert_eq!(s.model_info["qwen2.context_length"], 32768);
        assert_eq!(s.model_info["qwen2.embedding_length"], 896);
        assert_eq!(s.model_info["qwen2.attention.head_count_kv"], 2);
        assert_eq!(s.model_info["tokenizer.ggml.eos_token_id"], 7);
        assert_eq!(s.chat_template.as_deref(), Some("D"));
        let c = config_blob(&files, &[]).unwrap();
        assert_eq!(c.model_format, "safetensors");
        assert_eq!(c.model_family, "qwen2");
        assert_eq!(c.model_type, "45");

        // A multimodal wrapper is summarised by its text model.
        std::fs::write(
            dir.join("config.json"),
            r#"{"model_type":"gemma3","text_config":{"model_type":"gemma3_text",
                "hidden_size":2560,"num_hidden_layers":34}}"#,
        )
        .unwrap();
        let s = summary(&files, false).unwrap();
        assert_eq!(s.architecture, "gemma3");
        assert_eq!(s.model_info["gemma3.embedding_length"], 2560);
        assert_eq!(s.model_info["gemma3.block_count"], 34);

        // A header that claims more than the file holds is refused, not allocated.
        std::fs::write(dir.join("a.safetensors"), u64::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            summary(&files, false),
            Err(StoreError::BadSafetensors { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
