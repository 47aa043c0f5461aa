//! Waking streams early with PostgreSQL NOTIFY.
//!
//! `txbox::Outbox::notify(channel)` sends `pg_notify(channel, stream)` in
//! the staging transaction; it is delivered on commit. One LISTEN
//! connection per process wakes the stream named in the payload. This is a
//! hint only: streams also poll, so a lost notification (or a pooler that
//! cannot LISTEN, such as PgBouncer in transaction mode) costs latency,
//! never rows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One wake-up signal per stream.
#[derive(Clone, Debug, Default)]
pub(crate) struct Wakeups {
    streams: Arc<HashMap<i32, Arc<Notify>>>,
}

impl Wakeups {
    pub(crate) fn new(streams: &[i32]) -> Self {
        Wakeups {
            streams: Arc::new(
                streams
                    .iter()
                    .map(|s| (*s, Arc::new(Notify::new())))
                    .collect(),
            ),
        }
    }

    /// The signal of `stream`.
    pub(crate) fn of(&self, stream: i32) -> Arc<Notify> {
        self.streams.get(&stream).cloned().unwrap_or_default()
    }

    fn wake(&self, stream: i32) {
        if let Some(n) = self.streams.get(&stream) {
            n.notify_one();
        }
    }

    fn wake_all(&self) {
        for n in self.streams.values() {
            n.notify_one();
        }
    }

    /// Listens on `channel` until `cancel`, waking streams by payload.
    pub(crate) fn spawn_listener(&self, pool: PgPool, channel: String, cancel: CancellationToken) {
        let wakeups = self.clone();
        tokio::spawn(async move {
            let mut listener = loop {
                let attempt = async {
                    let mut l = PgListener::connect_with(&pool).await?;
                    l.listen(&channel).await?;
                    Ok::<_, sqlx::Error>(l)
                };
                match attempt.await {
                    Ok(l) => break l,
                    Err(e) => {
                        tracing::warn!(channel = %channel, error = %e, "LISTEN failed; polling only, retrying in 10s");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(10)) => {}
                        }
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    () = cancel.cancelled() => return,
                    n = listener.try_recv() => n,
                };
                match next {
                    Ok(Some(n)) => match n.payload().trim().parse::<i32>() {
                        Ok(stream) => wakeups.wake(stream),
                        Err(_) => wakeups.wake_all(),
                    },
                    // The connection dropped and will be re-established on
                    // the next call; notifications may have been missed.
                    Ok(None) => wakeups.wake_all(),
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN connection error");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
    }
}
