//! `KeyOrder::Commit` against a real PostgreSQL: the order head of a key
//! admits only stagers with a higher transaction id than the last one that
//! committed, waits for one still running, and ignores what carries no
//! order (keyless events, other topics). Publishing order is tested with
//! the relay (`crates/txbox-relay/tests/key_order.rs`).

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use txbox::outbox::KeyOrder;
use txbox::{Migrator, Outbox, OutboxEvent, Schema};
use txbox_testkit::xid::sqlstate;
use txbox_testkit::TestDb;

fn commit_order() -> Outbox {
    Outbox::new(Schema::default()).key_order(KeyOrder::Commit)
}

fn event(topic: &str, key: Option<&str>) -> OutboxEvent {
    let e = OutboxEvent::new(topic, &b"{}"[..]);
    match key {
        Some(k) => e.key(k),
        None => e,
    }
}

async fn setup(db: &TestDb) {
    sqlx::query(
        "CREATE TABLE noise (id bigint GENERATED ALWAYS AS IDENTITY, at timestamptz DEFAULT now())",
    )
    .execute(db.pool())
    .await
    .unwrap();
}

/// [`txbox_testkit::xid::begin_writing`] into this test's `noise` table.
async fn begin_writing(pool: &PgPool) -> (Transaction<'static, Postgres>, u64) {
    txbox_testkit::xid::begin_writing(pool, "noise").await
}

async fn heads(pool: &PgPool) -> Vec<(String, Vec<u8>, String)> {
    sqlx::query_as("SELECT topic, key, txid::text FROM txbox.outbox_key_order ORDER BY topic, key")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// T1 begins writing first (lower id); T2 stages key k and commits; T1's
/// staging of k then fails with a serialization failure and leaves T1
/// aborted. Its retry (a new, higher id) passes. In first-write mode the
/// same sequence is accepted (and would publish T1's event first).
#[tokio::test]
async fn a_later_writer_that_committed_first_fails_the_earlier_one() {
    let db = TestDb::new().await;
    setup(&db).await;
    let outbox = commit_order();

    let (mut t1, x1) = begin_writing(db.pool()).await;
    let (mut t2, x2) = begin_writing(db.pool()).await;
    assert!(x1 < x2);
    outbox.stage(&mut t2, event("t", Some("k"))).await.unwrap();
    t2.commit().await.unwrap();
    let err = outbox
        .stage(&mut t1, event("t", Some("k")))
        .await
        .expect_err("staging behind a later committed writer is refused");
    assert_eq!(sqlstate(&err).as_deref(), Some("40001"), "{err}");
    assert!(err.is_transient(), "retryable as any serialization failure");
    assert!(err.to_string().contains("txbox key order"), "{err}");
    // PostgreSQL answers COMMIT of an aborted transaction with a rollback.
    let _ = t1.commit().await;
    assert_eq!(outbox_rows(db.pool()).await, 1, "nothing of T1 committed");

    let (mut retry, x3) = begin_writing(db.pool()).await;
    assert!(x3 > x2);
    outbox
        .stage(&mut retry, event("t", Some("k")))
        .await
        .unwrap();
    retry.commit().await.unwrap();
    assert_eq!(
        heads(db.pool()).await,
        vec![("t".to_owned(), b"k".to_vec(), x3.to_string())]
    );

    // First-write mode: the same interleaving is accepted.
    let plain = Outbox::new(Schema::default());
    let (mut t1, _) = begin_writing(db.pool()).await;
    let (mut t2, _) = begin_writing(db.pool()).await;
    plain.stage(&mut t2, event("t", Some("k2"))).await.unwrap();
    t2.commit().await.unwrap();
    plain.stage(&mut t1, event("t", Some("k2"))).await.unwrap();
    t1.commit().await.unwrap();
}

async fn outbox_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM txbox.outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A stager of a key waits for one still running: if that one has the
/// higher id and commits, the waiter fails; if it has the lower id, the
/// waiter passes once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stagers_of_one_key_wait_for_each_other() {
    let db = TestDb::new().await;
    setup(&db).await;
    let outbox = commit_order();

    for later_holds in [true, false] {
        let key = format!("k-{later_holds}");
        let (earlier, x1) = begin_writing(db.pool()).await;
        let (later, x2) = begin_writing(db.pool()).await;
        assert!(x1 < x2);
        let (mut holder, mut waiter) = if later_holds {
            (later, earlier)
        } else {
            (earlier, later)
        };
        outbox
            .stage(&mut holder, event("t", Some(&key)))
            .await
            .unwrap();
        let waiting = {
            let outbox = outbox.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let r = outbox.stage(&mut waiter, event("t", Some(&key))).await;
                (r, waiter)
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the second stager waits");
        holder.commit().await.unwrap();
        let (r, waiter) = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        if later_holds {
            let err = r.expect_err("the earlier writer may not stage behind the later one");
            assert_eq!(sqlstate(&err).as_deref(), Some("40001"), "{err}");
        } else {
            r.unwrap();
            waiter.commit().await.unwrap();
        }
    }
}

/// Keyless events and other topics carry no order: no head, no conflict.
/// A transaction restages its own keys freely, and one call staging a key
/// twice takes its head once.
#[tokio::test]
async fn what_carries_no_order_is_not_checked() {
    let db = TestDb::new().await;
    setup(&db).await;
    let outbox = commit_order();

    let (mut t1, _) = begin_writing(db.pool()).await;
    let (mut t2, x2) = begin_writing(db.pool()).await;
    outbox
        .stage_all(
            &mut t2,
            [
                event("t", None),
                event("t", Some("k")),
                event("t", Some("k")),
            ],
        )
        .await
        .unwrap();
    outbox.stage(&mut t2, event("t", Some("k"))).await.unwrap();
    t2.commit().await.unwrap();
    outbox.stage(&mut t1, event("t", None)).await.unwrap();
    outbox
        .stage(&mut t1, event("other", Some("k")))
        .await
        .unwrap();
    t1.commit().await.unwrap();
    assert_eq!(outbox_rows(db.pool()).await, 6);
    let h = heads(db.pool()).await;
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(h[1], ("t".to_owned(), b"k".to_vec(), x2.to_string()));
}

/// A head above every transaction id the server has completed comes from
/// another history (a dump restored into a new cluster): it is taken over,
/// not obeyed, or the key could not be staged until the counter passed it.
#[tokio::test]
async fn a_head_from_another_history_is_taken_over() {
    let db = TestDb::new().await;
    setup(&db).await;
    sqlx::query(
        "INSERT INTO txbox.outbox_key_order (topic, key, stream, txid)
         VALUES ('t', 'k', 0, (pg_current_xact_id()::text::numeric + 1000000000)::text::xid8)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let (mut tx, x) = begin_writing(db.pool()).await;
    commit_order()
        .stage(&mut tx, event("t", Some("k")))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        heads(db.pool()).await,
        vec![("t".to_owned(), b"k".to_vec(), x.to_string())]
    );
}

/// The claim function finds its table through the search path it was
/// created with, not the caller's: an oddly named schema, and a session
/// whose search path does not name it.
#[tokio::test]
async fn the_claim_works_in_any_schema_and_search_path() {
    let db = TestDb::new().await;
    setup(&db).await;
    let schema = Schema::new(r#"od"d; sch"#).unwrap();
    Migrator::new(schema.clone()).run(db.pool()).await.unwrap();
    sqlx::query("CREATE TABLE public.outbox_key_order (decoy int)")
        .execute(db.pool())
        .await
        .unwrap();
    let outbox = Outbox::new(schema.clone()).key_order(KeyOrder::Commit);
    let (mut t1, _) = begin_writing(db.pool()).await;
    let (mut t2, _) = begin_writing(db.pool()).await;
    for tx in [&mut t1, &mut t2] {
        sqlx::query("SET LOCAL search_path TO public")
            .execute(&mut **tx)
            .await
            .unwrap();
    }
    outbox.stage(&mut t2, event("t", Some("k"))).await.unwrap();
    t2.commit().await.unwrap();
    let err = outbox
        .stage(&mut t1, event("t", Some("k")))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("40001"), "{err}");
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}",
        schema.table("outbox_key_order")
    ))
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(n, 1);
}
