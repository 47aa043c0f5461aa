//! The cursor's order and bounds, on PostgreSQL alone.

#![allow(clippy::unwrap_used)]

use txbox_relay::{Cursor, Position};
use txbox_testkit::TestDb;

/// Rows come in numeric `(txid, id)` order, also across a change in the
/// number of digits (text order would put txid 100 before 99), and the
/// position bound is exclusive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_numeric_txid_then_id_order() {
    let db = TestDb::new().await;
    // Explicit transaction ids below the current snapshot's xmin, so all
    // are finished whatever the cluster's age (a new cluster's ids start in
    // the hundreds: initdb and the migrations use that many).
    let xmin: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(xmin > 101, "xmin {xmin}: the cluster has hardly started");
    let last = u64::try_from(xmin - 1).unwrap();
    for (txid, topic) in [(100, "c"), (99, "b"), (99, "a2"), (last, "d"), (9, "a1")] {
        sqlx::query(
            "INSERT INTO txbox.outbox (txid, topic, event_id) VALUES ($1::text::xid8, $2, gen_random_uuid())",
        )
        .bind(txid.to_string())
        .bind(topic)
        .execute(db.pool())
        .await
        .unwrap();
    }
    let cursor = Cursor::new(db.schema(), 0);
    let rows = cursor.read(db.pool(), Position::START, 10).await.unwrap();
    let order: Vec<(u64, &str)> = rows.iter().map(|r| (r.txid, r.topic.as_str())).collect();
    assert_eq!(
        order,
        vec![(9, "a1"), (99, "b"), (99, "a2"), (100, "c"), (last, "d")],
        "txid numerically, then id (insertion order)"
    );
    let after = rows[2].position();
    let rest = cursor.read(db.pool(), after, 10).await.unwrap();
    assert_eq!(
        rest.iter().map(|r| r.txid).collect::<Vec<_>>(),
        vec![100, last]
    );
    let limited = cursor.read(db.pool(), Position::START, 2).await.unwrap();
    assert_eq!(limited.len(), 2);
    // Other streams are not read.
    let other = Cursor::new(db.schema(), 1);
    assert!(other
        .read(db.pool(), Position::START, 10)
        .await
        .unwrap()
        .is_empty());
}

/// Rows of a transaction still running are invisible, and so are rows of
/// transactions that started after it (they are at or above `xmin`), even
/// once committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_at_the_oldest_running_transaction() {
    let db = TestDb::new().await;
    let outbox = txbox::Outbox::new(db.schema().clone());
    let ev = |n: i32| txbox::OutboxEvent::new("t", n.to_string()).key("k");
    let mut conn = db.pool().acquire().await.unwrap();
    outbox.stage(&mut conn, ev(1)).await.unwrap();
    let mut open = db.pool().begin().await.unwrap();
    outbox.stage(&mut open, ev(2)).await.unwrap();
    outbox.stage(&mut conn, ev(3)).await.unwrap(); // committed, but after the open one began
    let cursor = Cursor::new(db.schema(), 0);
    let payloads = |rows: Vec<txbox_relay::OutboxRow>| -> Vec<Vec<u8>> {
        rows.into_iter().filter_map(|r| r.payload).collect()
    };
    // xmin is cluster-wide: transactions of tests running in parallel (in
    // other databases) can hold row 1 back for a moment too. Wait for it;
    // rows 2 and 3 must stay invisible while `open` is open.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let seen = loop {
        let seen = payloads(cursor.read(db.pool(), Position::START, 10).await.unwrap());
        if !seen.is_empty() || tokio::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        seen,
        vec![b"1".to_vec()],
        "held back by the open transaction"
    );
    open.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let seen = loop {
        let seen = payloads(cursor.read(db.pool(), Position::START, 10).await.unwrap());
        if seen.len() >= 3 || tokio::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(seen, vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]);
}
