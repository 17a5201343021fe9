//! The errors a request can meet, their HTTP status, and their body in each dialect:
//! Ollama's `{"error": "..."}`, OpenAI's `{"error": {"message", "type", "param", "code"}}`
//! and Anthropic's `{"type": "error", "error": {"type", "message"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::manager::LoadError;
use crate::engine::EngineError;
use crate::store::StoreError;

/// Everything that can go wrong serving a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing request body")]
    MissingBody,
    /// Malformed JSON or a field of the wrong type.
    #[error("{0}")]
    BadJson(String),
    #[error("invalid model name")]
    InvalidName,
    /// The name as the client sent it. The double-quoted form is the one every LobeChat
    /// version and the Ollama CLI recognise.
    #[error("model \"{0}\" not found, try pulling it first")]
    ModelNotFound(String),
    /// `/api/show`'s wording: the normalised short name with its tag.
    #[error("model '{0}' not found")]
    ShowNotFound(String),
    /// Ollama answers 500 here; it is the client's mistake, so we answer 400.
    #[error("option \"{name}\" must be of type {ty}")]
    BadOption { name: String, ty: &'static str },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Engine(EngineError),
    #[error("loading the model: {0}")]
    Load(crate::model::Error),
    #[error("{0}")]
    Store(StoreError),
    #[error("{0}")]
    Template(String),
    #[error("{0}")]
    Internal(String),
    #[error("request body too large (the limit is {} MiB)", .0 >> 20)]
    TooLarge(usize),
    #[error("unauthorized: a valid API key is required (Authorization: Bearer <key>)")]
    Unauthorized,
    /// A loopback-bound server asked for through another host name (DNS rebinding).
    #[error("host {0:?} is not allowed: this server answers local names only (WICK_ALLOWED_HOSTS adds more)")]
    HostNotAllowed(String),
    /// `OLLAMA_MAX_QUEUE` requests are already waiting (Ollama's words).
    #[error("server busy, please try again.  maximum pending requests exceeded")]
    Busy,
}

impl From<LoadError> for ApiError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Model(e) => ApiError::Load(e),
            LoadError::Engine(e) => ApiError::Engine(e),
            LoadError::Store(e) => e.into(),
            LoadError::Panicked(msg) => ApiError::Internal(format!("model loader panicked: {msg}")),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidName(_) => ApiError::InvalidName,
            e => ApiError::Store(e),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MissingBody
            | ApiError::BadJson(_)
            | ApiError::InvalidName
            | ApiError::BadOption { .. }
            | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::ShowNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::HostNotAllowed(_) => StatusCode::FORBIDDEN,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Engine(e) => match e {
                EngineError::EmptyPrompt
                | EngineError::EmbeddingOnly
                | EngineError::PromptTooLong { .. }
                | EngineError::BadToken { .. }
                | EngineError::Grammar(_)
                | EngineError::Sampling(_)
                | EngineError::TooManyLogprobs { .. }
                | EngineError::TooManyDrafts { .. } => StatusCode::BAD_REQUEST,
                EngineError::Busy => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::Store(StoreError::BadDigest(_)) => StatusCode::BAD_REQUEST,
            ApiError::Store(StoreError::NotFound(_)) => StatusCode::NOT_FOUND,
            ApiError::Load(_)
            | ApiError::Store(_)
            | ApiError::Template(_)
            | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI `type` for this status.
    fn openai_type(&self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST
            | StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            StatusCode::NOT_FOUND => "not_found_error",
            _ => "api_error",
        }
    }

    /// The OpenAI-shaped body (also used for mid-stream SSE errors).
    pub fn openai_body(&self) -> serde_json::Value {
        json!({"error": {
            "message": client_message(self),
            "type": self.openai_type(),
            "param": null,
            "code": match self {
                ApiError::Unauthorized => json!("invalid_api_key"),
                _ => json!(null),
            },
        }})
    }
}

/// The message a client sees: the error's text with every absolute file path replaced by
/// its last component (a blob keeps its digest name, `sha256-<hex>`), so answers never reveal
/// where the store or the temp directory lives. The full text goes to the server's log.
pub fn client_message(err: &ApiError) -> String {
    redact_paths(&err.to_string())
}

/// See [`client_message`]. A path starts at a `/` at the start of the text or after a space,
/// quote, parenthesis or `=` (so URLs keep theirs), and runs to the next space, quote, comma,
/// parenthesis or `: `.
pub fn redact_paths(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut prev: Option<char> = None;
    while let Some(c) = rest.chars().next() {
        let starts_path = c == '/'
            && prev.is_none_or(|p| p.is_whitespace() || "\"'(=".contains(p))
            && rest[1..].contains('/');
        if !starts_path {
            out.push(c);
            prev = Some(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let end = rest
            .char_indices()
            .find(|&(i, ch)| {
                ch.is_whitespace()
                    || "\"',()".contains(ch)
                    || (ch == ':' && rest[i + 1..].starts_with(' '))
                    || (ch == ':' && i + 1 == rest.len())
            })
            .map_or(rest.len(), |(i, _)| i);
        let path = &rest[..end];
        let last = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        out.push_str(last);
        prev = last.chars().last().or(prev);
        rest = &rest[end..];
    }
    out
}

/// `application/json; charset=utf-8`, as Ollama labels its JSON.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// An error in Ollama's shape.
pub struct OllamaError(pub ApiError);

impl<E: Into<ApiError>> From<E> for OllamaError {
    fn from(e: E) -> Self {
        OllamaError(e.into())
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        if self.0.status().is_server_error() {
            tracing::error!(error = %self.0, "request failed");
        }
        json_response(self.0.status(), &json!({"error": client_message(&self.0)}))
    }
}

/// An error in OpenAI's shape.
pub struct OpenAiError(pub ApiError);

impl<E: Into<ApiError>> From<E> for OpenAiError {
    fn from(e: E) -> Self {
        OpenAiError(e.into())
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        if self.0.status().is_server_error() {
            tracing::error!(error = %self.0, "request failed");
        }
        json_response(self.0.status(), &self.0.openai_body())
    }
}

/// An error in Anthropic's shape (`/v1/messages`).
pub struct AnthropicError(pub ApiError);

impl<E: Into<ApiError>> From<E> for AnthropicError {
    fn from(e: E) -> Self {
        AnthropicError(e.into())
    }
}

impl AnthropicError {
    /// The body, also sent as a mid-stream `error` event.
    pub fn body(e: &ApiError) -> serde_json::Value {
        let kind = match e.status() {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded_error",
            _ => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": client_message(e)}})
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        if self.0.status().is_server_error() {
            tracing::error!(error = %self.0, "request failed");
        }
        json_response(self.0.status(), &Self::body(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::redact_paths;

    #[test]
    fn paths_are_cut_to_their_last_component() {
        assert_eq!(
            redact_paths("loading the model: /root/.ollama/models/blobs/sha256-ab12: invalid model file: bad magic"),
            "loading the model: sha256-ab12: invalid model file: bad magic"
        );
        assert_eq!(
            redact_paths("/tmp/wick-123/config.json: missing field (\"/srv/x/y\")"),
            "config.json: missing field (\"y\")"
        );
        // URLs and ratios keep their slashes.
        let url = "pull from https://registry.ollama.ai/v2/library/x failed, 3/4 done";
        assert_eq!(redact_paths(url), url);
        assert_eq!(redact_paths("no path here"), "no path here");
    }
}
