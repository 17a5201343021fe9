//! The client half of the command line: `wick pull`, `list`, `show`, `cp`, `rm`, `create`,
//! `run`, `ps` and `stop` talk to a running server (`wick serve`, or Ollama itself) at `OLLAMA_HOST`
//! over its HTTP API, the way Ollama's own CLI does. `create` reads a Modelfile (`FROM`,
//! `TEMPLATE`, `SYSTEM`, `PARAMETER`, `LICENSE`, `MESSAGE`) and uploads a local GGUF named
//! by `FROM` as a blob first, or each file of a safetensors model directory.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use candlewick::config::HostPort;
use candlewick::store::blobs::sha256_file;
use candlewick::store::StoreError;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};

/// What goes wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("could not reach the server at {base} ({msg}); is `wick serve` running?")]
    Connect { base: String, msg: String },
    /// The server's own error message.
    #[error("{0}")]
    Server(String),
    #[error("invalid OLLAMA_HOST: {0}")]
    Host(String),
    #[error("{path}: {msg}")]
    Modelfile { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Runtime(String),
}

type Result<T, E = CliError> = std::result::Result<T, E>;

#[derive(clap::Args)]
pub struct PullArgs {
    /// Model name, e.g. `smollm2:135m` or `hf.co/user/repo:Q4_K_M`.
    pub name: String,
    /// Allow plain HTTP to the registry.
    #[arg(long)]
    pub insecure: bool,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    pub name: String,
    /// Print the Modelfile.
    #[arg(long)]
    pub modelfile: bool,
    /// Print the template.
    #[arg(long)]
    pub template: bool,
    /// Print the system message.
    #[arg(long)]
    pub system: bool,
    /// Print the parameters.
    #[arg(long)]
    pub parameters: bool,
    /// Print the license.
    #[arg(long)]
    pub license: bool,
}

#[derive(clap::Args)]
pub struct CpArgs {
    pub source: String,
    pub destination: String,
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// One or more models.
    #[arg(required = true)]
    pub names: Vec<String>,
}

#[derive(clap::Args)]
pub struct CreateArgs {
    pub name: String,
    /// The Modelfile.
    #[arg(short = 'f', long = "file", default_value = "Modelfile")]
    pub file: PathBuf,
}

/// A client for the server at `OLLAMA_HOST`.
struct Client {
    http: reqwest::Client,
    base: String,
    rt: tokio::runtime::Runtime,
}

impl Client {
    fn new() -> Result<Client> {
        let raw = std::env::var("OLLAMA_HOST").unwrap_or_default();
        let raw = raw.trim().trim_matches(|c| c == '"' || c == '\'');
        let scheme = if raw.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        let mut hp = HostPort::parse(raw).map_err(CliError::Host)?;
        // A server bound to every interface is reached on loopback.
        match hp.host.as_str() {
            "0.0.0.0" => hp.host = "127.0.0.1".into(),
            "::" => hp.host = "::1".into(),
            _ => {}
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::Runtime(e.to_string()))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("wick/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Runtime(e.to_string()))?;
        Ok(Client {
            http,
            base: format!("{scheme}://{hp}"),
            rt,
        })
    }

    fn connect_err(&self, e: reqwest::Error) -> CliError {
        CliError::Connect {
            base: self.base.clone(),
            msg: e.to_string(),
        }
    }

    /// Sends a request; a non-2xx answer becomes the server's error message.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.connect_err(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{status}: {}", text.trim()));
        Err(CliError::Server(msg))
    }

    /// Uploads a local file as a blob unless the server has it (`HEAD` first, as Ollama's
    /// CLI does); returns its digest.
    fn upload_blob(&self, path: &Path) -> Result<String> {
        let digest = sha256_file(path)?;
        let url = format!("{}/api/blobs/{digest}", self.base);
        self.rt.block_on(async {
            let head = self
                .http
                .head(&url)
                .send()
                .await
                .map_err(|e| self.connect_err(e))?;
            if !head.status().is_success() {
                println!("copying file {digest} 100%");
                self.send(self.http.post(&url).body(file_body(path)?))
                    .await?;
            }
            Ok::<(), CliError>(())
        })?;
        Ok(digest)
    }

    async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// `GET path` as JSON.
    fn get_json(&self, path: &str) -> Result<Value> {
        self.rt.block_on(async {
            let resp = self
                .send(self.http.get(format!("{}{path}", self.base)))
                .await?;
            resp.json().await.map_err(|e| self.connect_err(e))
        })
    }

    /// Reads an NDJSON body, handing each object to `each`; an `error` line ends it.
    async fn lines(&self, resp: reqwest::Response, mut each: impl FnMut(&Value)) -> Result<()> {
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk.map_err(|e| self.connect_err(e))?);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if let Some(e) = v["error"].as_str() {
                    return Err(CliError::Server(e.to_string()));
                }
                each(&v);
            }
        }
        Ok(())
    }

    /// Reads a status stream (pull, create), which must end in `success`.
    async fn stream(&self, resp: reqwest::Response, mut each: impl FnMut(&Value)) -> Result<()> {
        let mut success = false;
        self.lines(resp, |v| {
            success |= v["status"] == "success";
            each(v);
        })
        .await?;
        if success {
            Ok(())
        } else {
            Err(CliError::Server(
                "the server ended the stream without success".into(),
            ))
        }
    }
}

/// Decimal sizes as Ollama prints them (`98 MB`, `4.7 GB`).
fn human_bytes(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 || v >= 10.0 {
        format!("{v:.0} {}", units[i])
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// Draws pull/create progress: on a terminal one updating line per phase, otherwise one
/// line per phase.
struct ProgressPrinter {
    tty: bool,
    current: String,
}

impl ProgressPrinter {
    fn new() -> ProgressPrinter {
        ProgressPrinter {
            tty: std::io::stdout().is_terminal(),
            current: String::new(),
        }
    }

    fn show(&mut self, v: &Value) {
        let status = v["status"].as_str().unwrap_or_default().to_string();
        let total = v["total"].as_u64().unwrap_or(0);
        let done = v["completed"].as_u64().unwrap_or(0);
        let mut out = std::io::stdout().lock();
        let new = status != self.current;
        if new && self.tty && !self.current.is_empty() {
            let _ = writeln!(out);
        }
        if let Some(pct) = (done * 100).checked_div(total) {
            let text = format!(
                "{status}: {pct:>3}% {} / {}",
                human_bytes(done),
                human_bytes(total)
            );
            if self.tty {
                let _ = write!(out, "\r{text}");
            } else if new || done == total {
                let _ = writeln!(out, "{text}");
            }
        } else if new {
            let _ = if self.tty {
                write!(out, "{status}")
            } else {
                writeln!(out, "{status}")
            };
        }
        let _ = out.flush();
        self.current = status;
    }

    fn finish(&self) {
        if self.tty {
            println!();
        }
    }
}

pub fn pull(args: PullArgs) -> Result<()> {
    let c = Client::new()?;
    c.rt.block_on(async {
        let resp = c
            .post(
                "/api/pull",
                &json!({"model": args.name, "insecure": args.insecure, "stream": true}),
            )
            .await?;
        let mut p = ProgressPrinter::new();
        let r = c.stream(resp, |v| p.show(v)).await;
        p.finish();
        r
    })
}

/// "2 minutes ago" and friends.
fn ago(rfc3339: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(rfc3339) else {
        return rfc3339.to_string();
    };
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    let plural = |n: i64, unit: &str| {
        if n == 1 {
            format!("1 {unit} ago")
        } else {
            format!("{n} {unit}s ago")
        }
    };
    match secs {
        0..=59 => "Less than a minute ago".into(),
        60..=3599 => plural(secs / 60, "minute"),
        3600..=86399 => plural(secs / 3600, "hour"),
        _ => plural(secs / 86400, "day"),
    }
}

pub fn list() -> Result<()> {
    let c = Client::new()?;
    let v = c.get_json("/api/tags")?;
    let rows: Vec<[String; 4]> = v["models"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let digest = m["digest"].as_str().unwrap_or_default();
            [
                m["name"].as_str().unwrap_or_default().to_string(),
                digest.chars().take(12).collect(),
                human_bytes(m["size"].as_u64().unwrap_or(0)),
                ago(m["modified_at"].as_str().unwrap_or_default()),
            ]
        })
        .collect();
    print_table(["NAME", "ID", "SIZE", "MODIFIED"], &rows);
    Ok(())
}

fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut width = header.map(str::len);
    for r in rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}    ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

pub fn show(args: ShowArgs) -> Result<()> {
    let c = Client::new()?;
    let v: Value = c.rt.block_on(async {
        let resp = c.post("/api/show", &json!({"model": args.name})).await?;
        resp.json().await.map_err(|e| c.connect_err(e))
    })?;
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let pick = [
        (args.modelfile, "modelfile"),
        (args.template, "template"),
        (args.system, "system"),
        (args.parameters, "parameters"),
        (args.license, "license"),
    ];
    if let Some((_, key)) = pick.iter().find(|(on, _)| *on) {
        println!("{}", text(key));
        return Ok(());
    }
    let info = &v["model_info"];
    let arch = info["general.architecture"].as_str().unwrap_or_default();
    let d = &v["details"];
    let mut model = vec![
        ("architecture", arch.to_string()),
        (
            "parameters",
            d["parameter_size"].as_str().unwrap_or_default().to_string(),
        ),
    ];
    for (label, key) in [
        ("context length", "context_length"),
        ("embedding length", "embedding_length"),
    ] {
        if let Some(n) = info[format!("{arch}.{key}")].as_u64() {
            model.push((label, n.to_string()));
        }
    }
    model.push((
        "quantization",
        d["quantization_level"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ));
    println!("  Model");
    for (k, val) in &model {
        println!("    {k:<20}{val}");
    }
    if let Some(caps) = v["capabilities"].as_array() {
        println!("\n  Capabilities");
        for cap in caps {
            println!("    {}", cap.as_str().unwrap_or_default());
        }
    }
    for (title, key) in [
        ("Parameters", "parameters"),
        ("System", "system"),
        ("License", "license"),
    ] {
        let t = text(key);
        if !t.is_empty() {
            println!("\n  {title}");
            for l in t
                .lines()
                .take(if key == "license" { 2 } else { usize::MAX })
            {
                println!("    {l}");
            }
        }
    }
    Ok(())
}

pub fn cp(args: CpArgs) -> Result<()> {
    let c = Client::new()?;
    c.rt.block_on(c.post(
        "/api/copy",
        &json!({"source": args.source, "destination": args.destination}),
    ))?;
    println!("copied '{}' to '{}'", args.source, args.destination);
    Ok(())
}

pub fn rm(args: RmArgs) -> Result<()> {
    let c = Client::new()?;
    for name in &args.names {
        c.rt.block_on(
            c.send(
                c.http
                    .delete(format!("{}/api/delete", c.base))
                    .json(&json!({"model": name})),
            ),
        )?;
        println!("deleted '{name}'");
    }
    Ok(())
}

/// A parsed Modelfile.
#[derive(Debug, Default, PartialEq)]
struct Modelfile {
    from: String,
    template: Option<String>,
    system: Option<String>,
    license: Vec<String>,
    parameters: Map<String, Value>,
    messages: Vec<Value>,
}

/// A `PARAMETER` value as Ollama's CLI types it: numbers and booleans as JSON, `stop`
/// (repeatable) as a list, the rest as strings.
fn param_value(v: &str) -> Value {
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

fn parse_modelfile(text: &str) -> Result<Modelfile, String> {
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
fn local_from(from: &str, modelfile: &Path) -> Option<PathBuf> {
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

/// The files of a safetensors model directory that Ollama's CLI uploads: the weights, every
/// JSON file (config, tokenizer, generation config, the shard index), `tokenizer.model`
/// when there is no tokenizer.json, and a `chat_template.jinja`. Sorted, top level only.
fn model_dir_files(dir: &Path) -> Result<Vec<PathBuf>> {
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
        let wanted = name.ends_with(".safetensors")
            || name.ends_with(".json")
            || name == "tokenizer.model"
            || name == "chat_template.jinja";
        if wanted && !name.starts_with('.') && path.is_file() {
            out.push(path);
        }
    }
    if out.iter().any(|p| p.ends_with("tokenizer.json")) {
        out.retain(|p| !p.ends_with("tokenizer.model"));
    }
    out.sort();
    Ok(out)
}

/// Streams a local file as a request body.
fn file_body(path: &Path) -> Result<reqwest::Body> {
    let file = std::fs::File::open(path).map_err(|source| CliError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let chunks = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(reqwest::Body::wrap_stream(chunks))
}

pub fn create(args: CreateArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file).map_err(|source| CliError::Io {
        path: args.file.clone(),
        source,
    })?;
    let mf = parse_modelfile(&text).map_err(|msg| CliError::Modelfile {
        path: args.file.clone(),
        msg,
    })?;
    let c = Client::new()?;
    let mut req = json!({"model": args.name, "stream": true});
    if let Some(path) = local_from(&mf.from, &args.file) {
        let modelfile_err = |msg: String| CliError::Modelfile {
            path: args.file.clone(),
            msg,
        };
        // A GGUF file is one blob; a safetensors directory is one blob per file, which the
        // server puts together as the Hugging Face pull does.
        let paths = if path.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(modelfile_err(format!(
                    "FROM {}: not a safetensors model directory (no config.json)",
                    path.display()
                )));
            }
            model_dir_files(&path)?
        } else if path.is_file() {
            vec![path.clone()]
        } else {
            return Err(modelfile_err(format!(
                "FROM {}: no such file",
                path.display()
            )));
        };
        println!("gathering model components");
        let mut files = Map::new();
        for p in &paths {
            let digest = c.upload_blob(p)?;
            let file_name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model.gguf".into());
            files.insert(file_name, digest.into());
        }
        req["files"] = Value::Object(files);
    } else {
        req["from"] = mf.from.clone().into();
    }
    if let Some(t) = mf.template {
        req["template"] = t.into();
    }
    if let Some(s) = mf.system {
        req["system"] = s.into();
    }
    if !mf.license.is_empty() {
        req["license"] = json!(mf.license);
    }
    if !mf.parameters.is_empty() {
        req["parameters"] = Value::Object(mf.parameters);
    }
    if !mf.messages.is_empty() {
        req["messages"] = json!(mf.messages);
    }
    c.rt.block_on(async {
        let resp = c.post("/api/create", &req).await?;
        let mut p = ProgressPrinter::new();
        let r = c.stream(resp, |v| p.show(v)).await;
        p.finish();
        r
    })
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

    #[test]
    fn sizes_print_like_ollama() {
        assert_eq!(human_bytes(98_362_432), "98 MB");
        assert_eq!(human_bytes(4_661_224_676), "4.7 GB");
        assert_eq!(human_bytes(512), "512 B");
    }
}

#[derive(clap::Args)]
pub struct RunArgs {
    pub model: String,
    /// Allow plain HTTP to the registry if the model has to be pulled.
    #[arg(long)]
    pub insecure: bool,
    /// One prompt to answer; without it, an interactive chat (`/bye` or end of input quits).
    pub prompt: Vec<String>,
}

#[derive(clap::Args)]
pub struct StopArgs {
    pub model: String,
}

/// Streams one chat turn to stdout and returns the assistant's text.
async fn chat_turn(
    c: &Client,
    model: &str,
    messages: &[Value],
    options: &Map<String, Value>,
) -> Result<String> {
    let resp = c
        .post(
            "/api/chat",
            &json!({"model": model, "messages": messages, "options": options, "stream": true}),
        )
        .await?;
    let mut answer = String::new();
    let mut out = std::io::stdout();
    let mut thinking = false;
    c.lines(resp, |v| {
        let msg = &v["message"];
        if let Some(t) = msg["thinking"].as_str().filter(|t| !t.is_empty()) {
            if !thinking {
                let _ = writeln!(out, "Thinking...");
                thinking = true;
            }
            let _ = write!(out, "{t}");
        }
        if let Some(t) = msg["content"].as_str().filter(|t| !t.is_empty()) {
            if thinking {
                let _ = write!(out, "\n...done thinking.\n\n");
                thinking = false;
            }
            answer.push_str(t);
            let _ = write!(out, "{t}");
        }
        if let Some(calls) = msg["tool_calls"].as_array() {
            for call in calls {
                let _ = writeln!(out, "[tool call] {}", call["function"]);
            }
        }
        let _ = out.flush();
    })
    .await?;
    let _ = writeln!(out);
    Ok(answer)
}

/// `wick run`: pulls the model if the server lacks it, then answers one prompt or chats.
pub fn run(args: RunArgs) -> Result<()> {
    let c = Client::new()?;
    c.rt.block_on(async {
        let show = c.post("/api/show", &json!({"model": args.model})).await;
        if let Err(CliError::Server(msg)) = &show {
            if msg.contains("not found") {
                let resp = c
                    .post(
                        "/api/pull",
                        &json!({"model": args.model, "insecure": args.insecure, "stream": true}),
                    )
                    .await?;
                let mut p = ProgressPrinter::new();
                let r = c.stream(resp, |v| p.show(v)).await;
                p.finish();
                r?;
            }
        } else {
            show?;
        }
        let mut messages: Vec<Value> = Vec::new();
        let mut options = Map::new();
        if !args.prompt.is_empty() {
            messages.push(json!({"role": "user", "content": args.prompt.join(" ")}));
            chat_turn(&c, &args.model, &messages, &options).await?;
            return Ok(());
        }
        let stdin = std::io::stdin();
        let interactive = stdin.is_terminal();
        loop {
            if interactive {
                print!(">>> ");
                let _ = std::io::stdout().flush();
            }
            let mut line = String::new();
            let n = stdin.read_line(&mut line).map_err(|source| CliError::Io {
                path: PathBuf::from("<stdin>"),
                source,
            })?;
            let line = line.trim();
            if n == 0 || line == "/bye" {
                return Ok(());
            }
            if line.is_empty() {
                continue;
            }
            // `/set parameter NAME VALUE`, as in Ollama's REPL.
            if let Some(rest) = line.strip_prefix("/set parameter ") {
                match rest.trim().split_once(char::is_whitespace) {
                    Some((k, v)) => {
                        options.insert(k.to_string(), param_value(v.trim()));
                        println!("Set parameter '{k}' to '{}'", v.trim());
                    }
                    None => println!("Usage: /set parameter NAME VALUE"),
                }
                continue;
            }
            messages.push(json!({"role": "user", "content": line}));
            let answer = chat_turn(&c, &args.model, &messages, &options).await?;
            messages.push(json!({"role": "assistant", "content": answer}));
        }
    })
}

/// `wick ps`: the loaded models.
pub fn ps() -> Result<()> {
    let c = Client::new()?;
    let v = c.get_json("/api/ps")?;
    let rows: Vec<[String; 5]> = v["models"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let size = m["size"].as_u64().unwrap_or(0);
            let vram = m["size_vram"].as_u64().unwrap_or(0);
            let processor = if vram == 0 {
                "100% CPU".to_string()
            } else if vram >= size {
                "100% GPU".to_string()
            } else {
                format!("{}% GPU", vram * 100 / size.max(1))
            };
            [
                m["name"].as_str().unwrap_or_default().to_string(),
                m["digest"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(12)
                    .collect(),
                human_bytes(size),
                processor,
                until(m["expires_at"].as_str().unwrap_or_default()),
            ]
        })
        .collect();
    print_table(["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL"], &rows);
    Ok(())
}

/// "4 minutes from now", or "Forever" for far-future keep-alives.
fn until(rfc3339: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(rfc3339) else {
        return rfc3339.to_string();
    };
    let secs = (t.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
    match secs {
        s if s > 100 * 365 * 86400 => "Forever".into(),
        s if s < 60 => "Less than a minute from now".into(),
        s if s < 3600 => format!("{} minutes from now", s / 60),
        s if s < 86400 => format!("{} hours from now", s / 3600),
        s => format!("{} days from now", s / 86400),
    }
}

/// `wick stop`: unloads a model now (`keep_alive: 0`, as Ollama's CLI does).
pub fn stop(args: StopArgs) -> Result<()> {
    let c = Client::new()?;
    c.rt.block_on(async {
        c.post(
            "/api/generate",
            &json!({"model": args.model, "keep_alive": 0, "stream": false}),
        )
        .await
        .map(drop)
    })
}
