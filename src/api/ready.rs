//! Readiness: `WICK_PRELOAD`'s models are loaded in the background as the server starts,
//! and `GET /api/ready` answers 503 until they all are (and again once shutdown begins),
//! 200 after, for Kubernetes' readiness probe and a serverless function's health check;
//! `/` stays the liveness answer throughout. Preloaded models stay loaded (keep-alive
//! forever) unless a request says otherwise: an instance that paid for the load keeps it.

use std::sync::Mutex;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::error::json_response;
use super::AppState;
use crate::config::KeepAlive;

/// Where the server is on its way to serving.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// These preloads are not done yet.
    Loading(Vec<String>),
    Ready,
    /// A preload failed; the server serves, but is not ready until restarted.
    Failed(String),
    /// Shutdown began: no new work should be sent here.
    Draining,
}

/// The readiness state every handler shares.
#[derive(Debug)]
pub struct Readiness {
    phase: Mutex<Phase>,
    /// The preloaded models, as configured.
    preload: Vec<String>,
}

impl Readiness {
    pub fn new(preload: Vec<String>) -> Readiness {
        let phase = if preload.is_empty() {
            Phase::Ready
        } else {
            Phase::Loading(preload.clone())
        };
        Readiness {
            phase: Mutex::new(phase),
            preload,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Phase) -> T) -> T {
        match self.phase.lock() {
            Ok(mut p) => f(&mut p),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.with(|p| *p == Phase::Ready)
    }

    /// Shutdown began: readiness goes (and stays) 503 so load balancers stop sending.
    pub fn drain(&self) {
        self.with(|p| *p = Phase::Draining);
    }

    fn loaded(&self, name: &str) {
        self.with(|p| {
            if let Phase::Loading(left) = p {
                left.retain(|n| n != name);
                if left.is_empty() {
                    *p = Phase::Ready;
                }
            }
        });
    }

    fn failed(&self, msg: String) {
        self.with(|p| {
            if matches!(p, Phase::Loading(_)) {
                *p = Phase::Failed(msg);
            }
        });
    }
}

/// Loads every `WICK_PRELOAD` model, one after the other (they share the memory budget),
/// keeping each loaded for good. The first failure makes readiness fail with its reason.
pub async fn preload(state: AppState) {
    let names = state.ready.preload.clone();
    for name in names {
        let t0 = Instant::now();
        let result = async {
            let info = super::infer::resolve(&state, &name)?;
            let in_use = state
                .models
                .acquire(&state.store, &info, Some(KeepAlive::Forever))
                .await?;
            drop(in_use);
            Ok::<(), super::ApiError>(())
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(model = %name, secs = t0.elapsed().as_secs_f64(), "preloaded");
                state.ready.loaded(&name);
            }
            Err(e) => {
                let msg = format!("preloading {name}: {e}");
                tracing::error!(error = %msg, "WICK_PRELOAD failed; /api/ready stays 503");
                state.ready.failed(msg);
                return;
            }
        }
    }
}

/// `GET /api/ready` (and `HEAD`): 200 once the preloaded models are loaded, else 503 with
/// what it waits for.
pub async fn ready(State(state): State<AppState>) -> Response {
    let (status, body) = state.ready.with(|p| match p {
        Phase::Ready => (StatusCode::OK, json!({"status": "ready"})),
        Phase::Loading(left) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "loading", "waiting_for": left}),
        ),
        Phase::Failed(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "failed", "error": e}),
        ),
        Phase::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "shutting down"}),
        ),
    });
    json_response(status, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases() {
        assert!(Readiness::new(vec![]).is_ready());
        let r = Readiness::new(vec!["a".into(), "b".into()]);
        assert!(!r.is_ready());
        r.loaded("a");
        assert!(!r.is_ready());
        r.loaded("b");
        assert!(r.is_ready());
        r.drain();
        assert!(!r.is_ready());
        let r = Readiness::new(vec!["a".into()]);
        r.failed("no".into());
        r.loaded("a");
        assert!(!r.is_ready(), "a failure stays");
    }
}
