//! One HTTP endpoint for operations: Prometheus metrics, `/health` and
//! `/ready` (feature `http`).
//!
//! - `GET /metrics`: everything recorded through the [`metrics`] facade, in
//!   Prometheus' text format (when the endpoint installed the recorder, see
//!   [`Endpoint::prometheus`]).
//! - `GET /health`: `200 ok` while the process serves requests (a liveness
//!   probe: restart when it fails).
//! - `GET /ready`: `200 ready` when every readiness check passes, otherwise
//!   `503` with one line per failing check (a readiness probe: stop routing
//!   to, or alert on, a process that cannot do its work).
//!
//! Anything else is `404`.
//!
//! # Examples
//!
//! A service that links the inbox, in one line, with readiness tied to its
//! database:
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> txbox::Result<()> {
//! use txbox::http::Endpoint;
//!
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! Endpoint::new("0.0.0.0:9187".parse().expect("address"))
//!     .prometheus()?
//!     .ready_when_database_answers(pool.clone())
//!     .spawn(shutdown.clone())
//!     .await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The outcome of one readiness check: `Err` says what is wrong.
pub type Readiness = std::result::Result<(), String>;

type Check = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Readiness> + Send>> + Send + Sync>;

/// How long one readiness check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Configures the operations endpoint; [`spawn`](Self::spawn) binds and
/// serves it.
#[derive(Clone)]
#[must_use]
pub struct Endpoint {
    addr: SocketAddr,
    metrics: Option<PrometheusHandle>,
    checks: Vec<(String, Check)>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("metrics", &self.metrics.is_some())
            .field(
                "checks",
                &self.checks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Endpoint {
    /// An endpoint on `addr` with no metrics and no readiness checks
    /// (`/ready` then answers like `/health`).
    pub fn new(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            metrics: None,
            checks: Vec::new(),
        }
    }

    /// Installs the Prometheus recorder as this process's global
    /// [`metrics`] recorder, served on `/metrics`.
    ///
    /// Fails with [`Error::Config`] when the process already has a
    /// recorder.
    pub fn prometheus(mut self) -> Result<Self> {
        let handle = PrometheusBuilder::new().install_recorder().map_err(|e| {
            Error::config(format!(
                "cannot serve metrics: {e} (does this process already have a metrics recorder?)"
            ))
        })?;
        self.metrics = Some(handle);
        Ok(self)
    }

    /// Serves the metrics of a Prometheus recorder installed elsewhere.
    pub fn metrics_handle(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Adds a readiness check named `name`, run on every `GET /ready` with
    /// a bound of [`CHECK_TIMEOUT`].
    pub fn ready<F, Fut>(mut self, name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Readiness> + Send + 'static,
    {
        self.checks
            .push((name.into(), Arc::new(move || Box::pin(check()))));
        self
    }

    /// Adds the check "the database answers `SELECT 1`" on `pool`.
    pub fn ready_when_database_answers(self, pool: sqlx::PgPool) -> Self {
        self.ready("postgres", move || {
            let pool = pool.clone();
            async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
    }

    /// Binds the address (a busy or invalid one is an error now, not
    /// later) and serves on a task until `shutdown` is cancelled. Returns
    /// the bound address (useful with port 0).
    pub async fn spawn(self, shutdown: CancellationToken) -> Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .map_err(|e| Error::config(format!("cannot listen on {}: {e}", self.addr)))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::config(format!("cannot listen on {}: {e}", self.addr)))?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/health", get(|| async { "ok\n" }))
            .route("/ready", get(ready))
            .with_state(Arc::new(self));
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(addr = %bound, error = %e, "the operations endpoint stopped");
            }
        });
        tracing::info!(addr = %bound, "serving /metrics, /health and /ready");
        Ok(bound)
    }
}

async fn metrics(State(endpoint): State<Arc<Endpoint>>) -> (StatusCode, String) {
    match &endpoint.metrics {
        Some(handle) => (StatusCode::OK, handle.render()),
        None => (
            StatusCode::NOT_FOUND,
            "no metrics recorder is served here\n".into(),
        ),
    }
}

async fn ready(State(endpoint): State<Arc<Endpoint>>) -> (StatusCode, String) {
    let results = futures::future::join_all(endpoint.checks.iter().map(|(name, check)| {
        let check = check.clone();
        async move {
            let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            (name, outcome)
        }
    }))
    .await;
    let failing: Vec<String> = results
        .into_iter()
        .filter_map(|(name, outcome)| outcome.err().map(|why| format!("{name}: {why}")))
        .collect();
    if failing.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", failing.join("\n")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .expect("request");
        let mut response = String::new();
        conn.read_to_string(&mut response).await.expect("response");
        let (head, body) = response.split_once("\r\n\r\n").expect("http");
        (head[9..12].parse().expect("status"), body.to_owned())
    }

    #[tokio::test]
    async fn ready_reports_each_failing_check_and_health_stays_up() {
        let healthy = Arc::new(AtomicBool::new(false));
        let flag = healthy.clone();
        let shutdown = CancellationToken::new();
        let addr = Endpoint::new("127.0.0.1:0".parse().expect("addr"))
            .ready("broker", move || {
                let ok = flag.load(Ordering::SeqCst);
                async move {
                    if ok {
                        Ok(())
                    } else {
                        Err("down".into())
                    }
                }
            })
            .ready("slow", || async {
                tokio::time::sleep(CHECK_TIMEOUT * 2).await;
                Ok(())
            })
            .spawn(shutdown.clone())
            .await
            .expect("bound");
        assert_eq!(get(addr, "/health").await, (200, "ok\n".into()));
        let (status, body) = get(addr, "/ready").await;
        assert_eq!(status, 503);
        assert!(body.contains("broker: down"), "{body}");
        assert!(body.contains("slow: no answer within"), "{body}");
        healthy.store(true, Ordering::SeqCst);
        let (_, body) = get(addr, "/ready").await;
        assert!(!body.contains("broker"), "{body}");
        assert_eq!(get(addr, "/metrics").await.0, 404, "no recorder served");
        assert_eq!(get(addr, "/other").await.0, 404);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_busy_address_is_an_error_at_once() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = busy.local_addr().expect("addr");
        let err = Endpoint::new(addr)
            .spawn(CancellationToken::new())
            .await
            .expect_err("busy");
        assert!(err.to_string().contains("cannot listen on"), "{err}");
    }
}
