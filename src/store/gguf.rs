//! What the store and `/api/show` need to know about a GGUF file, read from its header only
//! (metadata and tensor shapes; no tensor data): family, parameter count, quantization, and
//! the metadata as JSON for `model_info`.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{Map, Value as Json};

use super::StoreError;

/// A GGUF header, summarised.
#[derive(Debug, Clone)]
pub struct GgufSummary {
    pub architecture: String,
    pub parameter_count: u64,
    /// e.g. `Q4_1`; `unknown` when `general.file_type` is absent or new to us.
    pub file_type: String,
    /// Every metadata pair except `general.name` and `tokenizer.chat_template`, arrays of
    /// more than five items emptied unless `verbose`.
    pub model_info: Map<String, Json>,
    pub chat_template: Option<String>,
}

/// Reads a GGUF header.
pub fn read_summary(path: &Path, verbose: bool) -> Result<GgufSummary, StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let content = Content::read(&mut reader).map_err(|e| StoreError::BadGguf {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let md = &content.metadata;
    let architecture = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    let parameter_count = match md.get("general.parameter_count").map(as_u64) {
        Some(Some(n)) => n,
        _ => content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum(),
    };
    let file_type = md
        .get("general.file_type")
        .and_then(as_u64)
        .map_or("unknown", file_type_name)
        .to_string();
    let chat_template = md
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let mut keys: Vec<&String> = md.keys().collect();
    keys.sort();
    let mut model_info = Map::new();
    for key in keys {
        if key == "general.name" || key == "tokenizer.chat_template" {
            continue;
        }
        let value = match &md[key] {
            Value::Array(items) if items.len() > 5 && !verbose => Json::Array(Vec::new()),
            v => to_json(v),
        };
        model_info.insert(key.clone(), value);
    }
    model_info
        .entry("general.parameter_count")
        .or_insert(Json::from(parameter_count));
    Ok(GgufSummary {
        architecture,
        parameter_count,
        file_type,
        model_info,
        chat_template,
    })
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(n) => Some(u64::from(*n)),
        Value::U16(n) => Some(u64::from(*n)),
        Value::U32(n) => Some(u64::from(*n)),
        Value::U64(n) => Some(*n),
        Value::I8(n) => u64::try_from(*n).ok(),
        Value::I16(n) => u64::try_from(*n).ok(),
        Value::I32(n) => u64::try_from(*n).ok(),
        Value::I64(n) => u64::try_from(*n).ok(),
        _ => None,
    }
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::U8(n) => Json::from(*n),
        Value::I8(n) => Json::from(*n),
        Value::U16(n) => Json::from(*n),
        Value::I16(n) => Json::from(*n),
        Value::U32(n) => Json::from(*n),
        Value::I32(n) => Json::from(*n),
        Value::U64(n) => Json::from(*n),
        Value::I64(n) => Json::from(*n),
        Value::F32(n) => serde_json::Number::from_f64(f64::from(*n)).map_or(Json::Null, Json::from),
        Value::F64(n) => serde_json::Number::from_f64(*n).map_or(Json::Null, Json::from),
        Value::Bool(b) => Json::from(*b),
        Value::String(s) => Json::from(s.as_str()),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
    }
}

/// llama.cpp's `llama_ftype` numbers, named as Ollama shows them.
fn file_type_name(n: u64) -> &'static str {
    match n {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        _ => "unknown",
    }
}

/// Ollama's human parameter size: `8.0B`, `134.52M`, `500K`.
pub fn human_params(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else if n >= 1e6 {
        let m = n / 1e6;
        if m.fract() == 0.0 {
            format!("{m:.0}M")
        } else {
            format!("{m:.2}M")
        }
    } else if n >= 1e3 {
        format!("{:.0}K", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::human_params;

    #[test]
    fn human_sizes() {
        assert_eq!(human_params(8_030_261_248), "8.0B");
        assert_eq!(human_params(134_515_008), "134.52M");
        assert_eq!(human_params(500_000), "500K");
    }
}
