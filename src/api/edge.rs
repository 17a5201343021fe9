//! The middleware every request passes: a request id (the gateway's `x-fc-request-id` or
//! `x-request-id`, else a new one) echoed back and attached to every log line of the
//! request, an access log line and the request counter, the `Host` check of a server bound
//! to loopback (DNS rebinding), and optional bearer-token auth (`WICK_API_KEYS`) answering
//! 401 in the dialect's shape; oversized bodies get a 413 in that shape too.

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

/// Which `Host` headers the server answers. A server bound to a loopback address is meant
/// for this machine only, and a web page can still reach it through a name it controls that
/// resolves to 127.0.0.1 (DNS rebinding): like Ollama, such a server answers only loopback
/// and private names and addresses (`localhost`, `*.localhost`, `*.local`, `*.internal`,
/// the machine's host name, loopback, private and unspecified IPs) and the names in
/// `WICK_ALLOWED_HOSTS` (`name` or `*.domain`). A server bound to any other address (a
/// container behind a gateway) answers every host.
pub struct Hosts {
    open: bool,
    allowed: Vec<String>,
    hostname: Option<String>,
}

impl Hosts {
    pub fn new(bound: std::net::IpAddr, allowed: &[String]) -> Hosts {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty());
        Hosts {
            open: !bound.is_loopback(),
            allowed: allowed.iter().map(|h| h.to_ascii_lowercase()).collect(),
            hostname,
        }
    }

    /// Whether a request with this `Host` header (without one: HTTP/1.0) is answered.
    pub fn allows(&self, host: Option<&str>) -> bool {
        if self.open {
            return true;
        }
        let Some(host) = host else {
            return true;
        };
        let host = host_name(host).to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        if host.is_empty() || host == "localhost" {
            return true;
        }
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return match ip {
                std::net::IpAddr::V4(v4) => {
                    v4.is_loopback() || v4.is_private() || v4.is_unspecified()
                }
                // Loopback, unspecified and unique local (fc00::/7).
                std::net::IpAddr::V6(v6) => {
                    v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00
                }
            };
        }
        if [".localhost", ".local", ".internal"]
            .iter()
            .any(|tld| host.ends_with(tld))
            || self.hostname.as_deref() == Some(host)
        {
            return true;
        }
        self.allowed.iter().any(|a| match a.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")) || host == domain,
            None => a == host,
        })
    }
}

/// The host of a `Host` header: without its port, IPv6 brackets removed.
fn host_name(header: &str) -> &str {
    if let Some(rest) = header.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match header.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => header,
    }
}

/// Refuses requests for hosts the server does not answer (see [`Hosts`]) with a 403 in the
/// dialect's shape.
pub async fn hosts(State(hosts): State<Arc<Hosts>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if hosts.allows(host.as_deref()) {
        return next.run(req).await;
    }
    let host = host.unwrap_or_default();
    tracing::warn!(%host, "request for a host this server does not answer");
    in_dialect(req.uri().path(), ApiError::HostNotAllowed(host))
}

/// The accepted keys.
pub struct Keys(pub Vec<String>);

/// Bearer-token auth when keys are configured (Anthropic's clients send the key as
/// `x-api-key`, taken the same way). `/` and `/api/ready` stay open for health checks and
/// preflights pass (browsers send them without credentials).
pub async fn auth(State(keys): State<Arc<Keys>>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/" | "/api/ready");
    if keys.0.is_empty() || req.method() == Method::OPTIONS || open {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110): `Bearer`, `bearer`, `BEARER`.
            let (scheme, token) = v.trim_start().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
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
pub fn in_dialect(path: &str, err: ApiError) -> Response {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn loopback_servers_answer_local_hosts_only() {
        let h = Hosts::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            &["chat.example.com".into(), "*.corp.example".into()],
        );
        for ok in [
            "localhost:11434",
            "LOCALHOST",
            "127.0.0.1:11434",
            "[::1]:11434",
            "10.1.2.3",
            "192.168.1.5:80",
            "0.0.0.0",
            "app.localhost",
            "box.local",
            "svc.internal:8080",
            "chat.example.com",
            "a.corp.example:1",
        ] {
            assert!(h.allows(Some(ok)), "{ok}");
        }
        assert!(h.allows(None));
        for bad in [
            "rebind.evil.example:11434",
            "evil.example",
            "8.8.8.8",
            "[2001:db8::1]:80",
            "localhost.evil.example",
            "chat.example.com.evil",
        ] {
            assert!(!h.allows(Some(bad)), "{bad}");
        }
        let open = Hosts::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), &[]);
        assert!(open.allows(Some("rebind.evil.example")));
    }
}
