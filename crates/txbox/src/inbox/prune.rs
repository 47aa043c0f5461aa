//! Removing processed event ids older than the dedupe window, in small
//! batches that never hold locks a commit needs.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::shared::Shared;

pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(shared.opts.prune_interval) => {}
        }
        match prune_once(&shared, &stop).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "pruned processed event ids"),
            Err(e) => tracing::warn!(error = %e, "pruning processed event ids failed; will retry"),
        }
    }
}

/// Deletes expired ids batch by batch; returns how many.
pub(crate) async fn prune_once(
    shared: &Shared,
    stop: &CancellationToken,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    let secs = shared.opts.dedupe_retention.as_secs_f64();
    while !stop.is_cancelled() {
        let n = sqlx::query(&shared.sql.prune)
            .bind(&shared.group)
            .bind(secs)
            .bind(shared.opts.prune_batch)
            .execute(&shared.pool)
            .await?
            .rows_affected();
        total += n;
        if n < u64::try_from(shared.opts.prune_batch).unwrap_or(0) {
            break;
        }
        tokio::task::yield_now().await;
    }
    Ok(total)
}
