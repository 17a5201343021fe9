//! CORS the way Ollama does it: a built-in list of local origins plus `OLLAMA_ORIGINS`
//! (with `*` wildcards), a fixed allow-header list that covers the OpenAI SDKs'
//! `x-stainless-*` headers, 204 preflights, and a 403 for any origin not allowed.
//! Unlike Ollama we also answer Chromium's private-network preflight.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

const DEFAULT_ORIGINS: &[&str] = &[
    "http://localhost",
    "https://localhost",
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1",
    "https://127.0.0.1",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://0.0.0.0",
    "https://0.0.0.0",
    "http://0.0.0.0:*",
    "https://0.0.0.0:*",
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
];

const ALLOW_METHODS: &str = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS";
const ALLOW_HEADERS: &str = "Authorization,Content-Type,User-Agent,Accept,X-Requested-With,\
X-Api-Key,Anthropic-Version,Anthropic-Beta,Anthropic-Dangerous-Direct-Browser-Access,\
Openai-Beta,X-Stainless-Arch,X-Stainless-Async,X-Stainless-Custom-Poll-Interval,\
X-Stainless-Helper-Method,X-Stainless-Lang,X-Stainless-Os,X-Stainless-Package-Version,\
X-Stainless-Poll-Helper,X-Stainless-Retry-Count,X-Stainless-Runtime,\
X-Stainless-Runtime-Version,X-Stainless-Timeout";

/// One allowed origin: exact, or a prefix and suffix around a single `*`.
#[derive(Debug, Clone)]
enum Pattern {
    Exact(String),
    Wild { prefix: String, suffix: String },
}

impl Pattern {
    fn new(s: &str) -> Pattern {
        let s = s.to_ascii_lowercase();
        match s.split_once('*') {
            Some((prefix, suffix)) => Pattern::Wild {
                prefix: prefix.to_string(),
                suffix: suffix.to_string(),
            },
            None => Pattern::Exact(s),
        }
    }

    fn matches(&self, origin: &str) -> bool {
        match self {
            Pattern::Exact(o) => o == origin,
            Pattern::Wild { prefix, suffix } => {
                origin.len() >= prefix.len() + suffix.len()
                    && origin.starts_with(prefix.as_str())
                    && origin.ends_with(suffix.as_str())
            }
        }
    }
}

/// The allowed origins.
#[derive(Debug, Clone)]
pub struct Cors {
    any: bool,
    patterns: Vec<Pattern>,
}

impl Cors {
    /// The built-in origins plus `extra` (`OLLAMA_ORIGINS` entries; `*` allows all).
    pub fn new(extra: &[String]) -> Cors {
        let any = extra.iter().any(|o| o == "*");
        let patterns = DEFAULT_ORIGINS
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
            .map(Pattern::new)
            .collect();
        Cors { any, patterns }
    }

    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.any || self.patterns.iter().any(|p| p.matches(&origin))
    }
}

/// Ollama answers an empty 403; we say why and how to allow it.
fn forbidden(origin: &str) -> Response {
    let msg = format!(
        "origin {origin:?} is not allowed: add it to OLLAMA_ORIGINS (comma-separated, * wildcards)"
    );
    super::error::json_response(StatusCode::FORBIDDEN, &serde_json::json!({"error": msg}))
}

/// The middleware.
pub async fn layer(State(cors): State<Arc<Cors>>, req: Request, next: Next) -> Response {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string)
    else {
        return next.run(req).await;
    };
    if same_origin(req.headers(), &origin) {
        return next.run(req).await;
    }
    if !cors.allows(&origin) {
        return forbidden(&origin);
    }
    let allow_origin = if cors.any {
        HeaderValue::from_static("*")
    } else {
        match HeaderValue::from_str(&origin) {
            Ok(v) => v,
            Err(_) => return forbidden(&origin),
        }
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        let private = req
            .headers()
            .get("access-control-request-private-network")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("43200"),
        );
        if private {
            h.insert(
                "access-control-allow-private-network",
                HeaderValue::from_static("true"),
            );
        }
        if !cors.any {
            h.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
        return resp;
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
    if !cors.any {
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}

/// `Origin` equal to `http(s)://<Host>` is not a cross-origin request.
fn same_origin(headers: &HeaderMap, origin: &str) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| o.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::Cors;

    #[test]
    fn default_origins() {
        let cors = Cors::new(&[]);
        assert!(cors.allows("http://localhost:3210"));
        assert!(cors.allows("http://127.0.0.1"));
        assert!(cors.allows("app://obsidian.md"));
        assert!(!cors.allows("https://evil.example"));
        assert!(!cors.allows("chrome-extension://abc"));
    }

    #[test]
    fn extra_origins() {
        let cors = Cors::new(&["https://*.example.com".into(), "http://192.168.1.*".into()]);
        assert!(cors.allows("https://chat.example.com"));
        assert!(cors.allows("http://192.168.1.20:3210"));
        assert!(!cors.allows("https://example.org"));
        assert!(Cors::new(&["*".into()]).allows("https://evil.example"));
    }
}
