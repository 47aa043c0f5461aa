//! What both services do around their inbox: connect, create their
//! business tables and their topics, serve the operations endpoint, and
//! stop on SIGTERM or Ctrl-C.

use std::net::SocketAddr;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::events::PARTITIONS;

/// A pool for one service: its inbox's workers (one per partition it
/// owns, three partitions here) and the endpoint's readiness check.
pub async fn connect(database_url: &str) -> Result<PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(database_url)
        .await?)
}

/// Runs a service's `CREATE TABLE IF NOT EXISTS ...` statements (txbox's
/// own tables come from `txbox migrate`; services never migrate those).
///
/// The statements run in one transaction under an advisory lock, so two
/// processes of the chain starting at once do not race to create the
/// same table.
pub async fn create_tables(pool: &PgPool, ddl: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('payments-example tables'))")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(ddl).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Creates `names` with [`PARTITIONS`] partitions each; a topic that
/// exists already is left as it is (txbox itself never creates topics).
pub async fn create_topics(brokers: &str, names: &[String]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    for created in admin.create_topics(&topics, &AdminOptions::new()).await? {
        match created {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, e)) => {
                return Err(Error::Config(format!("cannot create topic {topic}: {e}")))
            }
        }
    }
    Ok(())
}

/// Serves `GET /metrics` (the inbox's `txbox_inbox_*` counters, in
/// Prometheus' text format), `/health` and `/ready` (the database
/// answers) on `addr` until `shutdown` is cancelled.
pub async fn serve_endpoint(
    addr: SocketAddr,
    pool: &PgPool,
    shutdown: CancellationToken,
) -> Result<SocketAddr> {
    Ok(txbox::http::Endpoint::new(addr)
        .prometheus()?
        .ready_when_database_answers(pool.clone())
        .spawn(shutdown)
        .await?)
}

/// Completes on SIGTERM (what `kill`, Docker and the tests send) or on
/// Ctrl-C, after which an inbox finishes its transactions and leaves its
/// group.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for SIGTERM; stop with Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    };
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = terminate => tracing::info!("SIGTERM: shutting down"),
        () = interrupt => tracing::info!("Ctrl-C: shutting down"),
    }
}
