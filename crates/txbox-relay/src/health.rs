//! What the relay's `/ready` checks: its streams, PostgreSQL and Kafka.
//!
//! A stream that runs is ready whether it holds its lease (publishing) or
//! waits for it while another instance holds it (a standby, as designed).
//! A stream that stopped with an error (a changed database history,
//! brokers without transactions, ...) needs a person: the relay is not
//! ready until it is restarted. PostgreSQL must answer `SELECT 1` and the
//! brokers a metadata request, each within [`txbox::http::CHECK_TIMEOUT`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::ClientConfig;
use txbox::http::{Endpoint, Readiness};

/// The streams that stopped with an error, and why.
#[derive(Debug, Default)]
pub(crate) struct StreamHealth {
    stopped: Mutex<BTreeMap<i32, String>>,
}

impl StreamHealth {
    /// Records that `stream` stopped with `error`.
    pub(crate) fn stopped(&self, stream: i32, error: &crate::Error) {
        self.stopped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(stream, error.to_string());
    }

    fn check(&self) -> Readiness {
        let stopped = self
            .stopped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if stopped.is_empty() {
            return Ok(());
        }
        Err(stopped
            .iter()
            .map(|(stream, why)| format!("stream {stream} stopped: {why}"))
            .collect::<Vec<_>>()
            .join("; "))
    }
}

/// Adds the relay's readiness checks to `endpoint`.
pub(crate) fn checks(
    endpoint: Endpoint,
    pool: sqlx::PgPool,
    kafka: ClientConfig,
    streams: Arc<StreamHealth>,
) -> crate::Result<Endpoint> {
    let probe: Arc<BaseProducer> = Arc::new(kafka.create().map_err(|e| {
        crate::Error::config(format!("kafka settings for the readiness check: {e}"))
    })?);
    Ok(endpoint
        .ready("streams", move || {
            let streams = streams.clone();
            async move { streams.check() }
        })
        .ready_when_database_answers(pool)
        .ready("kafka", move || {
            let probe = probe.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    probe
                        .client()
                        .fetch_metadata(None, Duration::from_millis(1500))
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(format!("metadata request failed: {e}")))
            }
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_stream_makes_the_relay_unready_and_is_named() {
        let health = StreamHealth::default();
        assert_eq!(health.check(), Ok(()));
        health.stopped(3, &crate::Error::config("history changed"));
        let why = health.check().expect_err("not ready");
        assert!(why.starts_with("stream 3 stopped: "), "{why}");
        assert!(why.contains("history changed"), "{why}");
    }
}
