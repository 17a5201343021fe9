//! The client half of the command line: `wick pull`, `list`, `show`, `cp`, `rm`, `create`,
//! `run`, `ps` and `stop` talk to a running server (`wick serve`, or Ollama itself) at `OLLAMA_HOST`
//! over its HTTP API, the way Ollama's own CLI does. `create` reads a Modelfile (`FROM`,
//! `TEMPLATE`, `SYSTEM`, `PARAMETER`, `LICENSE`, `MESSAGE`) and uploads a local GGUF named
//! by `FROM` as a blob first, or each file of a safetensors model directory.

mod client;
mod modelfile;
mod progress;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use candlewick::store::StoreError;
use serde_json::{json, Map, Value};

use client::Client;
use modelfile::{local_from, model_dir_files, param_value, parse_modelfile};
use progress::human_bytes;

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

pub(crate) type Result<T, E = CliError> = std::result::Result<T, E>;

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

pub fn pull(args: PullArgs) -> Result<()> {
    let c = Client::new()?;
    c.rt.block_on(async {
        c.post_with_progress(
            "/api/pull",
            &json!({"model": args.name, "insecure": args.insecure, "stream": true}),
        )
        .await
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
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model.gguf".into());
            vec![(name, path.clone())]
        } else {
            return Err(modelfile_err(format!(
                "FROM {}: no such file",
                path.display()
            )));
        };
        println!("gathering model components");
        let mut files = Map::new();
        for (name, p) in &paths {
            let digest = c.upload_blob(p)?;
            files.insert(name.clone(), digest.into());
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
    c.rt.block_on(async { c.post_with_progress("/api/create", &req).await })
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
                c.post_with_progress(
                    "/api/pull",
                    &json!({"model": args.model, "insecure": args.insecure, "stream": true}),
                )
                .await?;
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
