//! Modelfiles as `wick create` reads them (`FROM`, `TEMPLATE`, `SYSTEM`, `PARAMETER`,
//! `LICENSE`, `MESSAGE`), and the local files a `FROM` names.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{CliError, Result};

/// A parsed Modelfile.
#[derive(Debug, Default, PartialEq)]
pub struct Modelfile {
    pub from: String,
    pub template: Option<String>,
    pub system: Option<String>,
    pub license: Vec<String>,
    pub parameters: Map<String, Value>,
    pub messages: Vec<Value>,
}

/// A `PARAMETER` value as Ollama's CLI types it: numbers and booleans as JSON, `stop`
/// (repeatable) as a list, the rest as strings.
pub fn param_value(v: &str) -> Value {
    let v = unquote(v.trim());
    if let Ok(i) = v.parse::<i64>() {
        return i.into();
    }
    if let Ok(f) = v.parse::<f64>() {
        return json!(f);
    }
    match v.as_str() {
        "true" => true.into(),
        "false" => false.into(),
        _ => v.into(),
    }
}

fn unquote(s: &str) -> String {
    s.strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(s)
        .to_string()
}

pub fn parse_modelfile(text: &str) -> Result<Modelfile, String> {
    let mut mf = Modelfile::default();
    let mut lines = text.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (cmd, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        // `"""` opens a value that may span lines.
        let arg = if let Some(open) = rest.strip_prefix("\"\"\"") {
            if let Some(end) = open.find("\"\"\"") {
                open[..end].to_string()
            } else {
                let mut value = open.to_string();
                loop {
                    let Some((_, next)) = lines.next() else {
                        return Err(format!("line {}: unterminated \"\"\"", n + 1));
                    };
                    value.push('\n');
                    if let Some(end) = next.find("\"\"\"") {
                        value.push_str(&next[..end]);
                        break;
                    }
                    value.push_str(next);
                }
                value
            }
        } else {
            rest.to_string()
        };
        match cmd.to_ascii_uppercase().as_str() {
            "FROM" => mf.from = unquote(&arg),
            "TEMPLATE" => mf.template = Some(unquote(&arg)),
            "SYSTEM" => mf.system = Some(unquote(&arg)),
            "LICENSE" => mf.license.push(unquote(&arg)),
            "PARAMETER" => {
                let (k, v) = arg
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| format!("line {}: PARAMETER needs a name and a value", n + 1))?;
                let v = param_value(v);
                if k == "stop" {
                    let list = mf
                        .parameters
                        .entry("stop")
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Value::Array(a) = list {
                        a.push(Value::String(match v {
                            Value::String(s) => s,
                            other => other.to_string(),
                        }));
                    }
                } else {
                    mf.parameters.insert(k.to_string(), v);
                }
            }
            "MESSAGE" => {
                let (role, content) = arg
                    .split_once(char::is_whitespace)
                    .ok_or_else(|| format!("line {}: MESSAGE needs a role and content", n + 1))?;
                mf.messages
                    .push(json!({"role": role, "content": unquote(content.trim())}));
            }
            "ADAPTER" => return Err(format!("line {}: ADAPTER is not supported", n + 1)),
            other => return Err(format!("line {}: unknown instruction {other}", n + 1)),
        }
    }
    if mf.from.is_empty() {
        return Err("no FROM line".into());
    }
    Ok(mf)
}

/// `FROM` names a local file when it looks like a path or a file by that name exists.
pub fn local_from(from: &str, modelfile: &Path) -> Option<PathBuf> {
    let expanded = match from.strip_prefix("~/") {
        Some(rest) => PathBuf::from(std::env::var_os("HOME")?).join(rest),
        None => PathBuf::from(from),
    };
    let path = if expanded.is_absolute() {
        expanded
    } else {
        modelfile.parent().unwrap_or(Path::new(".")).join(expanded)
    };
    let looks_like_path = from.starts_with(['.', '/', '~']) || from.ends_with(".gguf");
    let model_dir = path.join("config.json").is_file();
    (looks_like_path || path.is_file() || model_dir).then_some(path)
}

/// The files of a safetensors model directory that Ollama's CLI uploads, by the names they
/// are sent under: the weights, every JSON file (config, tokenizer, generation config, the
/// shard index), `tokenizer.model` when there is no tokenizer.json, a `chat_template.jinja`,
/// and the JSON files one folder down (`1_Pooling/config.json` of a sentence-transformers
/// model, named with its folder). Sorted.
pub fn model_dir_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for (name, path) in dir_entries(dir)? {
        let wanted = name.ends_with(".safetensors")
            || name.ends_with(".json")
            || name == "tokenizer.model"
            || name == "chat_template.jinja";
        if wanted && path.is_file() {
            out.push((name, path));
        } else if path.is_dir() {
            for (sub, p) in dir_entries(&path)? {
                if sub.ends_with(".json") && p.is_file() {
                    out.push((format!("{name}/{sub}"), p));
                }
            }
        }
    }
    if out.iter().any(|(n, _)| n == "tokenizer.json") {
        out.retain(|(n, _)| n != "tokenizer.model");
    }
    out.sort();
    Ok(out)
}

/// The entries of `dir` with UTF-8 names that are not hidden.
fn dir_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let io = |source| CliError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with('.') {
            out.push((name.to_string(), path));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modelfiles_parse() {
        let mf = parse_modelfile(
            "# a comment\nFROM ./smol.gguf\nPARAMETER temperature 0.2\nPARAMETER num_ctx 2048\n\
             PARAMETER stop \"<|im_end|>\"\nPARAMETER stop <|im_start|>\n\
             TEMPLATE \"\"\"{{ .Prompt }}\n{{ .Response }}\"\"\"\nSYSTEM You are terse.\n\
             LICENSE \"\"\"MIT\"\"\"\nMESSAGE user Hi\n",
        )
        .unwrap();
        assert_eq!(mf.from, "./smol.gguf");
        assert_eq!(
            mf.template.as_deref(),
            Some("{{ .Prompt }}\n{{ .Response }}")
        );
        assert_eq!(mf.system.as_deref(), Some("You are terse."));
        assert_eq!(mf.license, ["MIT"]);
        assert_eq!(
            Value::Object(mf.parameters),
            json!({"temperature": 0.2, "num_ctx": 2048, "stop": ["<|im_end|>", "<|im_start|>"]})
        );
        assert_eq!(mf.messages, [json!({"role": "user", "content": "Hi"})]);
        assert!(parse_modelfile("SYSTEM hi").is_err());
        assert!(parse_modelfile("FROM x\nTEMPLATE \"\"\"open").is_err());
        assert!(parse_modelfile("FROM x\nBOGUS y").is_err());
    }
}
