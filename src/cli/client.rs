//! The HTTP client of the CLI: requests to the server at `OLLAMA_HOST`, its error
//! messages, NDJSON status streams, and blob uploads.

use std::io::Read;
use std::path::Path;

use candlewick::config::client_base_url;
use candlewick::store::blobs::sha256_file;
use futures_util::StreamExt;
use serde_json::Value;

use indicatif::ProgressBar;

use super::progress::{byte_bar, Progress};
use super::{CliError, Result};

/// A client for the server at `OLLAMA_HOST`.
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub rt: tokio::runtime::Runtime,
}

impl Client {
    pub fn new() -> Result<Client> {
        let base = client_base_url().map_err(|e| CliError::Host(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::Runtime(e.to_string()))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("wick/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Runtime(e.to_string()))?;
        Ok(Client { http, base, rt })
    }

    pub fn connect_err(&self, e: reqwest::Error) -> CliError {
        CliError::Connect {
            base: self.base.clone(),
            msg: e.to_string(),
        }
    }

    /// Sends a request; a non-2xx answer becomes the server's error message.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
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
    pub fn upload_blob(&self, path: &Path) -> Result<String> {
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
                let bar = byte_bar(format!("copying file {digest}"), file_len(path)?);
                self.send(self.http.post(&url).body(file_body(path, bar.clone())?))
                    .await?;
                if bar.is_hidden() {
                    println!("copying file {digest} 100%");
                }
                bar.finish();
            }
            Ok::<(), CliError>(())
        })?;
        Ok(digest)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// `GET path` as JSON.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        self.rt.block_on(async {
            let resp = self
                .send(self.http.get(format!("{}{path}", self.base)))
                .await?;
            resp.json().await.map_err(|e| self.connect_err(e))
        })
    }

    /// Reads an NDJSON body, handing each object to `each`; an `error` line ends it.
    pub async fn lines(&self, resp: reqwest::Response, mut each: impl FnMut(&Value)) -> Result<()> {
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

    /// Posts a request whose answer is a status stream (pull, create), shows its progress,
    /// and checks that it ends in `success`.
    pub async fn post_with_progress(&self, path: &str, body: &Value) -> Result<()> {
        let resp = self.post(path, body).await?;
        let mut progress = Progress::new();
        let mut success = false;
        let read = self
            .lines(resp, |v| {
                success |= v["status"] == "success";
                progress.show(v);
            })
            .await;
        progress.finish();
        read?;
        if success {
            Ok(())
        } else {
            Err(CliError::Server(
                "the server ended the stream without success".into(),
            ))
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |source| CliError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).map_err(io_err(path))?.len())
}

/// Streams a local file as a request body, advancing `bar` as it is read.
fn file_body(path: &Path, bar: ProgressBar) -> Result<reqwest::Body> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let chunks = futures_util::stream::unfold(Some(file), move |file| {
        let bar = bar.clone();
        async move {
            let mut file = file?;
            let mut buf = vec![0u8; 1 << 20];
            match file.read(&mut buf) {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    bar.inc(n as u64);
                    Some((Ok(buf), Some(file)))
                }
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    Ok(reqwest::Body::wrap_stream(chunks))
}
