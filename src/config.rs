//! Every server setting in one place: the Ollama environment variables (`OLLAMA_HOST`,
//! `OLLAMA_MODELS`, `OLLAMA_ORIGINS`, `OLLAMA_KEEP_ALIVE`, `OLLAMA_NUM_PARALLEL`,
//! `OLLAMA_MAX_LOADED_MODELS`, `OLLAMA_MAX_QUEUE`, `OLLAMA_CONTEXT_LENGTH`) parsed with
//! Ollama's rules, plus the Go duration syntax that `keep_alive` shares with them, and our
//! own `WICK_*` settings, and for Hugging Face pulls `HF_ENDPOINT`, `HF_TOKEN` and
//! `WICK_CATALOG` (the user's catalog files). Nothing else in the crate reads the
//! environment: the server reads [`Config`], the CPU thread pool [`threads_from_env`], the
//! weight loader [`read_threads_from_env`] and the CLI client [`client_base_url`].

use crate::model::KvType;
use std::path::PathBuf;
use std::time::Duration;

/// A setting that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {name}={value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("neither OLLAMA_MODELS nor HOME is set; cannot find the model directory")]
    NoModelsDir,
}

/// How long a model stays loaded after its last request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Negative durations: never unload.
    Forever,
    /// Unload this long after the last request ends (zero: right after it).
    For(Duration),
}

impl KeepAlive {
    /// The env var form: a Go duration, or a bare number of seconds.
    pub fn parse_env(s: &str) -> Result<KeepAlive, String> {
        let s = s.trim();
        if let Ok(secs) = s.parse::<f64>() {
            return Ok(KeepAlive::from_secs_f64(secs));
        }
        parse_go_duration(s)
    }

    /// The request form: a JSON number is seconds; a string is a Go duration (a bare
    /// non-zero number in a string is an error, as in Ollama).
    pub fn from_json(v: &serde_json::Value) -> Result<Option<KeepAlive>, String> {
        match v {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::Number(n) => Ok(n.as_f64().map(KeepAlive::from_secs_f64)),
            serde_json::Value::String(s) => parse_go_duration(s.trim()).map(Some),
            other => Err(format!("invalid keep_alive value {other}")),
        }
    }

    fn from_secs_f64(secs: f64) -> KeepAlive {
        if secs < 0.0 {
            KeepAlive::Forever
        } else {
            KeepAlive::For(Duration::from_secs_f64(secs.min(1e12)))
        }
    }
}

/// Parses Go's `time.ParseDuration` syntax (`"5m"`, `"1h30m"`, `"1.5s"`, `"-1m"`, `"0"`);
/// negative values mean "forever". Error texts follow Go's.
pub fn parse_go_duration(s: &str) -> Result<KeepAlive, String> {
    let quoted = format!("{s:?}");
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Ok(KeepAlive::For(Duration::ZERO));
    }
    if rest.is_empty() {
        return Err(format!("time: invalid duration {quoted}"));
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("time: invalid duration {quoted}"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("time: invalid duration {quoted}"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "" => return Err(format!("time: missing unit in duration {quoted}")),
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("time: unknown unit {unit:?} in duration {quoted}")),
        };
        total += value * scale;
    }
    if neg && total > 0.0 {
        return Ok(KeepAlive::Forever);
    }
    Ok(KeepAlive::For(Duration::from_secs_f64(total.min(1e12))))
}

/// The address to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl HostPort {
    /// `OLLAMA_HOST`'s forms: `host`, `host:port`, `:port`, `[v6]:port`,
    /// `scheme://host[:port][/path]`. Without a scheme the port defaults to 11434; an explicit
    /// `http://` defaults to 80 and `https://` to 443, as in Ollama.
    pub fn parse(s: &str) -> Result<HostPort, String> {
        let s = s.trim();
        let (default_port, rest) = if let Some(r) = s.strip_prefix("http://") {
            (80, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (443, r)
        } else {
            (11434, s)
        };
        // A path after the authority (reverse-proxy prefixes) does not change where we bind.
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, tail) = v6.split_once(']').ok_or("unterminated [ in address")?;
            let port = match tail.strip_prefix(':') {
                Some(p) => Some(p),
                None if tail.is_empty() => None,
                None => return Err("junk after ]".into()),
            };
            (h.to_string(), port)
        } else if authority.matches(':').count() > 1 {
            // A bare IPv6 address without brackets has no port.
            (authority.to_string(), None)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("invalid port {p:?}"))?,
            None => default_port,
        };
        let host = if host.is_empty() {
            "127.0.0.1".to_string()
        } else {
            host
        };
        Ok(HostPort { host, port })
    }
}

/// Where models run: `cpu`, or `cuda` / `cuda:N` (GPU ordinal N, default 0). A CUDA device
/// only parses in a build with the `cuda` feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<DeviceSpec, String> {
        let s = s.trim().to_ascii_lowercase();
        let ordinal = match s.as_str() {
            "cpu" => return Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => 0,
            _ => match s.strip_prefix("cuda:").or_else(|| s.strip_prefix("gpu:")) {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| format!("invalid GPU ordinal {n:?}"))?,
                None => return Err(format!("unknown device {s:?} (cpu, cuda or cuda:N)")),
            },
        };
        if !cfg!(feature = "cuda") {
            return Err("this build has no CUDA support (build with --features cuda)".into());
        }
        Ok(DeviceSpec::Cuda(ordinal))
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DeviceSpec::parse(s)
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The server's settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: HostPort,
    /// The model store root (`manifests/`, `blobs/`): the one store written to.
    pub models_dir: PathBuf,
    /// `WICK_MODELS_READONLY`: more stores (colon-separated directories, e.g. a model baked
    /// into the image), searched after `models_dir` and never written.
    pub models_readonly: Vec<PathBuf>,
    /// Extra CORS origins (`OLLAMA_ORIGINS`, comma-separated), on top of the built-in ones.
    pub origins: Vec<String>,
    pub keep_alive: KeepAlive,
    /// Sequences run at once per model; `None`: as many as the KV cache allows.
    pub num_parallel: Option<usize>,
    /// Models loaded at once (0 in the env means Ollama's CPU default, 3).
    pub max_loaded_models: usize,
    /// Requests waiting for a model before 503.
    pub max_queue: usize,
    /// Default `num_ctx`.
    pub context_length: usize,
    /// Bearer tokens accepted (`WICK_API_KEYS`, comma-separated); empty: no auth.
    pub api_keys: Vec<String>,
    /// Host names a loopback-bound server answers besides local ones
    /// (`WICK_ALLOWED_HOSTS`, comma-separated; `*.domain` for a domain's names).
    pub allowed_hosts: Vec<String>,
    /// After SIGTERM, how long streams in flight may take to finish
    /// (`WICK_SHUTDOWN_TIMEOUT`, seconds or a Go duration; default 30s).
    pub shutdown_timeout: Duration,
    /// How long a client may take to send a request's headers, and how long an idle
    /// keep-alive connection is kept (`WICK_HEADER_TIMEOUT`, default 30s).
    pub header_timeout: Duration,
    /// Where models run (`WICK_DEVICE`, or `wick serve --device`).
    pub device: DeviceSpec,
    /// The Hugging Face Hub (`HF_ENDPOINT`, e.g. a mirror); `None`: huggingface.co.
    pub hf_endpoint: Option<String>,
    /// `HF_TOKEN`, for gated and private repositories.
    pub hf_token: Option<Secret>,
    /// `WICK_CATALOG`: a directory of extra catalog files (`*.toml`), or one file.
    pub catalog: Option<PathBuf>,
    /// `WICK_PRELOAD`: models (comma-separated names) loaded as the server starts, before
    /// `/api/ready` answers 200.
    pub preload: Vec<String>,
    /// `WICK_MAX_BLOB_BYTES`: the largest blob `POST /api/blobs` takes (default 4 TiB, the
    /// largest a pull takes).
    pub max_blob_bytes: u64,
    /// `WICK_KV_CACHE_BYTES`: the KV cache budget per model; `None`: sized from the memory
    /// available (see `engine::kv_budget`).
    pub kv_cache_bytes: Option<usize>,
    /// `OLLAMA_KV_CACHE_TYPE`: the CPU KV cache's element type (`f16` default, `f32`, `q8_0`;
    /// `q4_0` is stored as q8_0 with a warning).
    pub kv_type: KvType,
    /// `WICK_NUM_DRAFT`: speculative decoding's draft tokens per step for requests that do
    /// not set `num_draft` (default 0: off).
    pub num_draft: usize,
    /// `WICK_MAX_BATCH_TOKENS`: tokens one forward step computes, decode tokens plus prompt
    /// chunks (default 512, vLLM's `--max-num-batched-tokens`). Smaller bounds how long a
    /// prompt's prefill holds up the sequences decoding beside it; larger prefills faster.
    pub max_batch_tokens: usize,
    /// `WICK_FETCH_IMAGES=1`: fetch http(s) image URLs clients send (off: only data URLs).
    pub fetch_images: bool,
}

/// `WICK_MAX_BATCH_TOKENS`' range: a step must hold a decode token for each of many
/// sequences (and drafts), and one step's activations must stay a bounded size.
const MIN_BATCH_TOKENS: usize = 16;
const MAX_BATCH_TOKENS: usize = 16384;

/// Ollama trims whitespace and surrounding quotes from every value; empty means unset.
fn clean(v: Option<String>) -> Option<String> {
    v.map(|v| v.trim().trim_matches(['"', '\'']).trim().to_string())
        .filter(|v| !v.is_empty())
}

/// CPU compute threads: `WICK_NUM_THREADS`, else `RAYON_NUM_THREADS`; `None` (unset or not a
/// positive number): the CPUs this process may use. Read by the thread pool when it starts,
/// which is before any [`Config`] exists.
pub fn threads_from_env() -> Option<usize> {
    ["WICK_NUM_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|v| clean(std::env::var(v).ok())?.parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// Threads that read a weight file ahead of the loader (`WICK_READ_THREADS`; default 4;
/// 0: none, the loader's page faults on the memory map read the file). Read by the weight
/// loader, which has no [`Config`].
pub fn read_threads_from_env() -> usize {
    clean(std::env::var("WICK_READ_THREADS").ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(4)
        .min(64)
}

/// The server the CLI talks to: `OLLAMA_HOST` as an `http(s)://host:port` base URL, with a
/// server bound to every interface reached on loopback.
pub fn client_base_url() -> Result<String, ConfigError> {
    let raw = clean(std::env::var("OLLAMA_HOST").ok()).unwrap_or_default();
    let scheme = if raw.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    let mut hp = HostPort::parse(&raw).map_err(|reason| ConfigError::Invalid {
        name: "OLLAMA_HOST",
        value: raw.clone(),
        reason,
    })?;
    match hp.host.as_str() {
        "0.0.0.0" => hp.host = "127.0.0.1".into(),
        "::" => hp.host = "::1".into(),
        _ => {}
    }
    Ok(format!("{scheme}://{hp}"))
}

/// A value that must not reach logs: `Debug` shows that it is set, not what it is.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `get` (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let var = |name: &str| clean(get(name));
        let invalid = |name: &'static str, value: &str, reason: String| ConfigError::Invalid {
            name,
            value: value.to_string(),
            reason,
        };
        let number = |name: &'static str| -> Result<Option<usize>, ConfigError> {
            match var(name) {
                None => Ok(None),
                Some(v) => v
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|e| invalid(name, &v, e.to_string())),
            }
        };
        // A number that must lie in `range`, `default` when unset.
        let ranged = |name: &'static str,
                      range: std::ops::RangeInclusive<usize>,
                      default: usize|
         -> Result<usize, ConfigError> {
            match number(name)? {
                None => Ok(default),
                Some(n) if range.contains(&n) => Ok(n),
                Some(n) => Err(invalid(
                    name,
                    &n.to_string(),
                    format!("expected {} to {}", range.start(), range.end()),
                )),
            }
        };
        let host = match var("OLLAMA_HOST") {
            Some(v) => HostPort::parse(&v).map_err(|e| invalid("OLLAMA_HOST", &v, e))?,
            None => HostPort {
                host: "127.0.0.1".into(),
                port: 11434,
            },
        };
        let models_dir = match var("OLLAMA_MODELS") {
            Some(v) => PathBuf::from(v),
            None => {
                let home = get("HOME")
                    .filter(|h| !h.is_empty())
                    .ok_or(ConfigError::NoModelsDir)?;
                PathBuf::from(home).join(".ollama").join("models")
            }
        };
        let models_readonly = var("WICK_MODELS_READONLY")
            .map(|v| {
                v.split(':')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        // Seconds or a Go duration (`30s`, `2m`).
        let duration = |name: &'static str, default_secs: u64| match var(name) {
            None => Ok(Duration::from_secs(default_secs)),
            Some(v) => match KeepAlive::parse_env(&v) {
                Ok(KeepAlive::For(d)) => Ok(d),
                _ => Err(invalid(
                    name,
                    &v,
                    "expected seconds or a duration such as 30s".into(),
                )),
            },
        };
        // Comma-separated lists, empty entries dropped.
        let list = |name: &str| -> Vec<String> {
            var(name)
                .map(|v| {
                    v.split(',')
                        .map(|o| o.trim().to_string())
                        .filter(|o| !o.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let origins = list("OLLAMA_ORIGINS");
        let keep_alive = match var("OLLAMA_KEEP_ALIVE") {
            Some(v) => KeepAlive::parse_env(&v).map_err(|e| invalid("OLLAMA_KEEP_ALIVE", &v, e))?,
            None => KeepAlive::For(Duration::from_secs(300)),
        };
        Ok(Config {
            host,
            models_dir,
            models_readonly,
            origins,
            keep_alive,
            num_parallel: number("OLLAMA_NUM_PARALLEL")?.filter(|&n| n > 0),
            max_loaded_models: number("OLLAMA_MAX_LOADED_MODELS")?
                .filter(|&n| n > 0)
                .unwrap_or(3),
            max_queue: number("OLLAMA_MAX_QUEUE")?
                .filter(|&n| n > 0)
                .unwrap_or(512),
            context_length: number("OLLAMA_CONTEXT_LENGTH")?
                .filter(|&n| n > 0)
                .unwrap_or(4096),
            api_keys: list("WICK_API_KEYS"),
            allowed_hosts: list("WICK_ALLOWED_HOSTS"),
            shutdown_timeout: duration("WICK_SHUTDOWN_TIMEOUT", 30)?,
            header_timeout: duration("WICK_HEADER_TIMEOUT", 30)?,
            device: match var("WICK_DEVICE") {
                Some(v) => DeviceSpec::parse(&v).map_err(|e| invalid("WICK_DEVICE", &v, e))?,
                None => DeviceSpec::Cpu,
            },
            hf_endpoint: match var("HF_ENDPOINT") {
                Some(v) if v.starts_with("http://") || v.starts_with("https://") => {
                    Some(v.trim_end_matches('/').to_string())
                }
                Some(v) => {
                    return Err(invalid(
                        "HF_ENDPOINT",
                        &v,
                        "expected an http:// or https:// URL".into(),
                    ))
                }
                None => None,
            },
            hf_token: var("HF_TOKEN").map(Secret),
            catalog: var("WICK_CATALOG").map(PathBuf::from),
            kv_cache_bytes: number("WICK_KV_CACHE_BYTES")?,
            kv_type: match var("OLLAMA_KV_CACHE_TYPE").map(|v| v.to_ascii_lowercase()) {
                None => KvType::F16,
                Some(v) if v == "f16" => KvType::F16,
                Some(v) if v == "f32" => KvType::F32,
                Some(v) if v == "q8_0" => KvType::Q8_0,
                Some(v) if v == "q4_0" => {
                    // Ollama accepts it: the nearest type we have keeps the server starting.
                    tracing::warn!("OLLAMA_KV_CACHE_TYPE=q4_0 is not supported; using q8_0");
                    KvType::Q8_0
                }
                Some(v) => {
                    return Err(invalid(
                        "OLLAMA_KV_CACHE_TYPE",
                        &v,
                        "expected f16, f32, q8_0 or q4_0".into(),
                    ))
                }
            },
            preload: list("WICK_PRELOAD"),
            num_draft: ranged("WICK_NUM_DRAFT", 0..=crate::engine::MAX_DRAFT, 0)?,
            max_batch_tokens: ranged(
                "WICK_MAX_BATCH_TOKENS",
                MIN_BATCH_TOKENS..=MAX_BATCH_TOKENS,
                crate::engine::DEFAULT_STEP_TOKENS,
            )?,
            fetch_images: matches!(
                var("WICK_FETCH_IMAGES")
                    .as_deref()
                    .map(str::to_ascii_lowercase)
                    .as_deref(),
                Some("1" | "true" | "yes")
            ),
            max_blob_bytes: number("WICK_MAX_BLOB_BYTES")?
                .map_or(crate::store::blobs::MAX_BLOB_BYTES, |n| n as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn host_forms() {
        let hp = |s: &str| HostPort::parse(s).map(|h| h.to_string());
        assert_eq!(hp("0.0.0.0").as_deref(), Ok("0.0.0.0:11434"));
        assert_eq!(hp("127.0.0.1:8080").as_deref(), Ok("127.0.0.1:8080"));
        assert_eq!(hp(":9000").as_deref(), Ok("127.0.0.1:9000"));
        assert_eq!(hp("http://example:1234").as_deref(), Ok("example:1234"));
        assert_eq!(hp("http://example").as_deref(), Ok("example:80"));
        assert_eq!(hp("https://example/x").as_deref(), Ok("example:443"));
        assert_eq!(hp("[::1]:5000").as_deref(), Ok("[::1]:5000"));
        assert!(HostPort::parse("host:notaport").is_err());
    }

    #[test]
    fn defaults() {
        let c = cfg(&[("HOME", "/home/u")]).unwrap();
        assert_eq!(c.host.to_string(), "127.0.0.1:11434");
        assert_eq!(c.models_dir, PathBuf::from("/home/u/.ollama/models"));
        assert_eq!(c.keep_alive, KeepAlive::For(Duration::from_secs(300)));
        assert_eq!(c.max_queue, 512);
        assert_eq!(c.context_length, 4096);
        assert_eq!(c.max_loaded_models, 3);
        assert!(c.origins.is_empty());
        assert!(c.models_readonly.is_empty());
        assert!(c.preload.is_empty());
        let c = cfg(&[
            ("HOME", "/h"),
            ("WICK_PRELOAD", "qwen2.5:0.5b, smollm2:135m,"),
        ])
        .unwrap();
        assert_eq!(c.preload, vec!["qwen2.5:0.5b", "smollm2:135m"]);
    }

    #[test]
    fn read_only_stores() {
        let c = cfg(&[
            ("OLLAMA_MODELS", "/nas/models"),
            ("WICK_MODELS_READONLY", " /opt/baked: :/srv/share/models:"),
        ])
        .unwrap();
        assert_eq!(
            c.models_readonly,
            vec![
                PathBuf::from("/opt/baked"),
                PathBuf::from("/srv/share/models")
            ]
        );
    }

    #[test]
    fn env_values() {
        let c = cfg(&[
            ("OLLAMA_HOST", " \"0.0.0.0:1\" "),
            ("OLLAMA_MODELS", "/m"),
            ("OLLAMA_ORIGINS", "*, app://x"),
            ("OLLAMA_KEEP_ALIVE", "30"),
            ("OLLAMA_NUM_PARALLEL", "4"),
            ("OLLAMA_CONTEXT_LENGTH", "8192"),
        ])
        .unwrap();
        assert_eq!(c.host.to_string(), "0.0.0.0:1");
        assert_eq!(c.origins, vec!["*", "app://x"]);
        assert_eq!(c.keep_alive, KeepAlive::For(Duration::from_secs(30)));
        assert_eq!(c.num_parallel, Some(4));
        assert_eq!(c.context_length, 8192);
        assert_eq!(c.max_batch_tokens, 512);
        assert!(cfg(&[("OLLAMA_MODELS", "/m"), ("OLLAMA_MAX_QUEUE", "x")]).is_err());
        let batch = |v: &str| cfg(&[("OLLAMA_MODELS", "/m"), ("WICK_MAX_BATCH_TOKENS", v)]);
        assert_eq!(batch("128").map(|c| c.max_batch_tokens), Ok(128));
        for bad in ["0", "15", "16385", "x"] {
            assert!(batch(bad).is_err(), "WICK_MAX_BATCH_TOKENS={bad}");
        }
    }

    #[test]
    fn hugging_face_settings() {
        let c = cfg(&[("OLLAMA_MODELS", "/m")]).unwrap();
        assert_eq!((c.hf_endpoint, c.hf_token, c.catalog), (None, None, None));
        let c = cfg(&[
            ("OLLAMA_MODELS", "/m"),
            ("HF_ENDPOINT", "https://hf-mirror.com/"),
            ("HF_TOKEN", "hf_secret"),
            ("WICK_CATALOG", "/etc/wick/catalog"),
        ])
        .unwrap();
        assert_eq!(c.hf_endpoint.as_deref(), Some("https://hf-mirror.com"));
        assert_eq!(c.hf_token, Some(Secret("hf_secret".into())));
        assert!(!format!("{c:?}").contains("hf_secret"));
        assert_eq!(c.catalog, Some(PathBuf::from("/etc/wick/catalog")));
        assert!(cfg(&[("OLLAMA_MODELS", "/m"), ("HF_ENDPOINT", "hf-mirror.com")]).is_err());
    }

    #[test]
    fn go_durations() {
        let d = |s: &str| parse_go_duration(s);
        assert_eq!(d("5m"), Ok(KeepAlive::For(Duration::from_secs(300))));
        assert_eq!(d("1h30m"), Ok(KeepAlive::For(Duration::from_secs(5400))));
        assert_eq!(d("300ms"), Ok(KeepAlive::For(Duration::from_millis(300))));
        assert_eq!(d("0"), Ok(KeepAlive::For(Duration::ZERO)));
        assert_eq!(d("-1m"), Ok(KeepAlive::Forever));
        assert_eq!(
            d("300"),
            Err("time: missing unit in duration \"300\"".to_string())
        );
        assert!(d("5x").is_err());
        assert_eq!(
            KeepAlive::from_json(&serde_json::json!(-1)),
            Ok(Some(KeepAlive::Forever))
        );
        assert_eq!(
            KeepAlive::from_json(&serde_json::json!(0)),
            Ok(Some(KeepAlive::For(Duration::ZERO)))
        );
    }

    #[test]
    fn devices() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse(" CPU "), Ok(DeviceSpec::Cpu));
        assert!(DeviceSpec::parse("tpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
        let c = cfg(&[("OLLAMA_MODELS", "/m")]).expect("defaults");
        assert_eq!(c.device, DeviceSpec::Cpu);
        if cfg!(feature = "cuda") {
            assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
            assert_eq!(DeviceSpec::parse("cuda:1"), Ok(DeviceSpec::Cuda(1)));
            assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        } else {
            let e = DeviceSpec::parse("cuda:1").expect_err("no cuda in this build");
            assert!(e.contains("no CUDA support"), "{e}");
            let e = cfg(&[("OLLAMA_MODELS", "/m"), ("WICK_DEVICE", "cuda")])
                .expect_err("no cuda in this build")
                .to_string();
            assert!(
                e.contains("WICK_DEVICE") && e.contains("no CUDA support"),
                "{e}"
            );
        }
    }
}
