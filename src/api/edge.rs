//! The middleware every request passes: a request id (the gateway's `x-fc-request-id` or
//! `x-request-id`, else a new one) echoed back and attached to every log line of the
//! request, an access log line and the request counter, and optional bearer-token auth
//! (`WICK_API_KEYS`) answering 401 in the dialect's shape; oversized bodies get a 413 in
//! that shape too.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::error::{AnthropicError, ApiError, OllamaError, OpenAiError};
use super::metrics::Metrics;

const FC_REQUEST_ID: HeaderName = HeaderName::from_static("x-fc-request-id");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request id, access log and metrics.
pub async fn observe(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let given = [FC_REQUEST_ID, REQUEST_ID].into_iter().find_map(|h| {
        let v = req.headers().get(&h)?.to_str().ok()?.trim();
        // Ids end up in headers and logs: keep them short and printable.
        (!v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| (h, v.to_string()))
    });
    let id = given
        .as_ref()
        .map(|(_, v)| v.clone())
        .unwrap_or_else(new_id);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("request", id = %id);
    let start = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status();
    metrics.request(&route, status);
    span.in_scope(|| {
        tracing::info!(%method, %path, status = status.as_u16(), ms = start.elapsed().as_millis() as u64, "served");
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        let h = resp.headers_mut();
        h.insert(REQUEST_ID, v.clone());
        if let Some((name, _)) = given {
            h.insert(name, v);
        }
    }
    resp
}

/// 32 hex digits.
fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The accepted keys.
pub struct Keys(pub Vec<String>);

/// Bearer-token auth when keys are configured (Anthropic's clients send the key as
/// `x-api-key`, taken the same way). `/` stays open for health checks and preflights pass
/// (browsers send them without credentials).
pub async fn auth(State(keys): State<Arc<Keys>>, req: Request, next: Next) -> Response {
    if keys.0.is_empty() || req.method() == Method::OPTIONS || req.uri().path() == "/" {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| req.headers().get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim);
    let ok = token.is_some_and(|t| keys.0.iter().any(|k| same(k.as_bytes(), t.as_bytes())));
    if ok {
        return next.run(req).await;
    }
    in_dialect(req.uri().path(), ApiError::Unauthorized)
}

/// An error in the shape of the dialect `path` belongs to.
fn in_dialect(path: &str, err: ApiError) -> Response {
    if path.starts_with("/v1/messages") {
        AnthropicError(err).into_response()
    } else if path.starts_with("/v1/") {
        OpenAiError(err).into_response()
    } else {
        OllamaError(err).into_response()
    }
}

/// Gives axum's own body-size refusal (plain text) the dialect's JSON shape.
pub async fn body_limit(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    if resp.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        return in_dialect(&path, ApiError::TooLarge(super::BODY_LIMIT));
    }
    resp
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
