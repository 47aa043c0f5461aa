//! The relay side of `txbox status`: per stream its lease, backlog,
//! dead letters and history, and the transaction holding the relay back.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use txbox::Schema;
use txbox_relay::{Backlogs, Histories, HistoryCheck};

/// One relay stream (from `relay_streams`, or only seen in the outbox or
/// its dead letters: then never leased).
#[derive(Debug, Serialize)]
pub(crate) struct RelayStream {
    pub(crate) stream: i32,
    pub(crate) owner: Option<String>,
    pub(crate) fencing_token: i64,
    pub(crate) lease_expires_at: Option<DateTime<Utc>>,
    /// An owner whose lease has not expired.
    pub(crate) lease_live: bool,
    /// The last published `(txid, id)`.
    pub(crate) position_txid: String,
    pub(crate) position_id: i64,
    pub(crate) published: i64,
    /// The last position write, lease acquisition or release.
    pub(crate) updated_at: Option<DateTime<Utc>>,
    /// Outbox rows past the position.
    pub(crate) backlog: i64,
    pub(crate) oldest_unpublished_at: Option<DateTime<Utc>>,
    pub(crate) oldest_unpublished_age_seconds: Option<f64>,
    pub(crate) dead_letters: i64,
    /// `same`, `unanchored` or `changed`.
    pub(crate) history: &'static str,
    /// Why the stored history is not this database's.
    pub(crate) history_error: Option<String>,
}

/// The oldest running transaction with an xid, which holds `xmin` (and
/// so the relay) back.
#[derive(Debug, Serialize)]
pub(crate) struct HoldBack {
    pub(crate) pid: i32,
    pub(crate) age_seconds: f64,
    pub(crate) xid_age: i32,
    pub(crate) database: Option<String>,
    pub(crate) query_start: Option<String>,
    pub(crate) query: Option<String>,
}

type StreamRow = (
    i32,
    Option<String>,
    i64,
    Option<DateTime<Utc>>,
    bool,
    String,
    i64,
    i64,
    DateTime<Utc>,
);

/// Every stream known to `relay_streams`, the outbox or its dead letters.
pub(crate) async fn streams(pool: &PgPool, schema: &Schema) -> anyhow::Result<Vec<RelayStream>> {
    let (streams_t, outbox_t, dead_t) = (
        schema.table("relay_streams"),
        schema.table("outbox"),
        schema.table("relay_dead_letters"),
    );
    let rows: Vec<StreamRow> = sqlx::query_as(&format!(
        "SELECT stream, owner, fencing_token, lease_expires_at,
                owner IS NOT NULL AND lease_expires_at IS NOT NULL AND lease_expires_at > now(),
                position_txid::text, position_id, published, updated_at
           FROM {streams_t} ORDER BY stream"
    ))
    .fetch_all(pool)
    .await?;
    // The outbox's streams by a skip scan of its primary key, not a full scan.
    let in_outbox: Vec<i32> = sqlx::query_scalar(&format!(
        "WITH RECURSIVE s(stream) AS (
             SELECT min(stream) FROM {outbox_t}
             UNION ALL
             SELECT (SELECT min(o.stream) FROM {outbox_t} o WHERE o.stream > s.stream)
               FROM s WHERE s.stream IS NOT NULL)
         SELECT stream FROM s WHERE stream IS NOT NULL"
    ))
    .fetch_all(pool)
    .await?;
    let dead: Vec<(i32, i64)> = sqlx::query_as(&format!(
        "SELECT stream, count(*) FROM {dead_t} GROUP BY stream"
    ))
    .fetch_all(pool)
    .await?;

    let mut out: Vec<RelayStream> = rows
        .into_iter()
        .map(
            |(
                stream,
                owner,
                fencing_token,
                lease_expires_at,
                lease_live,
                txid,
                id,
                published,
                at,
            )| {
                RelayStream {
                    stream,
                    owner,
                    fencing_token,
                    lease_expires_at,
                    lease_live,
                    position_txid: txid,
                    position_id: id,
                    published,
                    updated_at: Some(at),
                    ..never_leased(stream)
                }
            },
        )
        .collect();
    let known: BTreeSet<i32> = out.iter().map(|s| s.stream).collect();
    let others: BTreeSet<i32> = in_outbox
        .iter()
        .copied()
        .chain(dead.iter().map(|d| d.0))
        .filter(|s| !known.contains(s))
        .collect();
    out.extend(others.into_iter().map(never_leased));
    out.sort_by_key(|s| s.stream);

    let backlogs = Backlogs::new(schema);
    let histories = Histories::new(schema);
    for s in &mut out {
        // Exact: a command run on demand counts the whole backlog.
        let backlog = backlogs.measure(pool, s.stream, None).await?;
        s.backlog = backlog.rows;
        s.oldest_unpublished_at = backlog.oldest_at;
        s.oldest_unpublished_age_seconds = backlog.oldest_age.map(|a| a.as_secs_f64());
        s.dead_letters = dead.iter().find(|d| d.0 == s.stream).map_or(0, |d| d.1);
        match histories.verify_stream(pool, s.stream).await {
            Ok(HistoryCheck::Same) => s.history = "same",
            Ok(HistoryCheck::Unanchored) => s.history = "unanchored",
            Err(e @ txbox_relay::Error::HistoryChanged { .. }) => {
                s.history = "changed";
                s.history_error = Some(e.to_string());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

fn never_leased(stream: i32) -> RelayStream {
    RelayStream {
        stream,
        owner: None,
        fencing_token: 0,
        lease_expires_at: None,
        lease_live: false,
        position_txid: "0".to_owned(),
        position_id: 0,
        published: 0,
        updated_at: None,
        backlog: 0,
        oldest_unpublished_at: None,
        oldest_unpublished_age_seconds: None,
        dead_letters: 0,
        history: "unanchored",
        history_error: None,
    }
}

/// The transaction holding the relay back, if any.
pub(crate) async fn hold_back(pool: &PgPool) -> anyhow::Result<Option<HoldBack>> {
    Ok(txbox_relay::hold_back(pool).await?.map(|h| HoldBack {
        pid: h.pid,
        age_seconds: h.age.as_secs_f64(),
        xid_age: h.xid_age,
        database: h.database,
        query_start: h.query_start,
        query: h.query,
    }))
}
