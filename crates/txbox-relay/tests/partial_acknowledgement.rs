//! A batch that Kafka acknowledges in part, for real: a topic whose
//! `max.message.bytes` is 4 KiB and one batch of 30 rows over 6 keys and 3
//! partitions whose 16th row is 8 KB. The broker refuses the record batch
//! holding that row (all rows of its partition in the produce request:
//! the limit is on the record batch) with MESSAGE_TOO_LARGE, and accepts
//! the other partitions' rows. The relay records the rows acknowledged
//! before the first failed one, finds the row Kafka refuses by sending the
//! rest one row at a time, and dead-letters that row or stops on it; the
//! acknowledged rows after the first failed one are sent again (ADR 0004's
//! third duplicate window). Apache Kafka, Mode::AtLeastOnce and
//! Mode::ExactlyOnce.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::*;
use txbox_relay::{Error, Mode, OnReject, RelayConfig};
use txbox_testkit::kafka::Consumed;
use txbox_testkit::{kafka, TestDb};

const ROWS: usize = 30;
const BIG: usize = 15;
const BIG_KEY: &str = "k3";

/// The staged batch, in publishing order.
struct Staged {
    topic: String,
    /// (event id, key) of every row, in `(txid, id)` order.
    rows: Vec<(String, String)>,
    big_id: String,
    big_outbox_id: i64,
}

impl Staged {
    fn ids(&self) -> Vec<String> {
        self.rows.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Per key, its event ids in staging order, without the big row.
    fn by_key(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, key) in &self.rows {
            if *id != self.big_id {
                out.entry(key.clone()).or_default().push(id.clone());
            }
        }
        out
    }
}

/// A small-limit topic and the 30 rows, staged in one transaction (one
/// batch for the relay).
async fn stage_batch(db: &TestDb) -> Staged {
    let broker = kafka().await;
    let topic = broker
        .topic_with_configs("partial", 3, &[("max.message.bytes", "4096")])
        .await;
    let events = (0..ROWS)
        .map(|i| {
            if i == BIG {
                txbox::OutboxEvent::new(&topic, vec![b'x'; 8000]).key(BIG_KEY)
            } else {
                event(&topic, &format!("k{}", i % 6), 0, i)
            }
        })
        .collect::<Vec<_>>();
    assert_eq!(format!("k{}", BIG % 6), BIG_KEY);
    let big_id = events[BIG].id().to_string();
    stage(db.pool(), events).await;
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT event_id::text, key FROM txbox.outbox WHERE stream = 0 ORDER BY txid, id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let big_outbox_id = sqlx::query_scalar("SELECT id FROM txbox.outbox WHERE event_id::text = $1")
        .bind(&big_id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    Staged {
        topic,
        rows: rows
            .into_iter()
            .map(|(id, key)| (id, String::from_utf8(key).unwrap()))
            .collect(),
        big_id,
        big_outbox_id,
    }
}

async fn relay_config(db: &TestDb, mode: Mode, on_reject: OnReject) -> RelayConfig {
    let mut cfg = config(db, kafka().await.bootstrap(), mode);
    cfg.batch_size = 100;
    cfg.on_reject = on_reject;
    cfg.prune_interval = Duration::from_secs(3600);
    // All 30 rows are queued within a millisecond; a longer linger makes
    // sure each partition's rows travel as one record batch, as a busy
    // producer's do.
    cfg.kafka.insert("linger.ms".into(), "20".into());
    cfg
}

/// The relay's dead letters: (outbox id, event id, error).
async fn dead_letters(db: &TestDb) -> Vec<(i64, String, String)> {
    sqlx::query_as(
        "SELECT outbox_id, event_id::text, error FROM txbox.relay_dead_letters ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
}

/// Stages the batch, relays it in `mode` with `OnReject::DeadLetter` until
/// drained, and checks that the oversized row, and only it, was
/// dead-lettered. Returns the database (kept for the test's life), what
/// was staged and the dead letters.
async fn dead_letter_run(mode: Mode) -> (TestDb, Staged, Vec<(i64, String, String)>) {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let staged = stage_batch(&db).await;
    let relay = Relay::start(relay_config(&db, mode, OnReject::DeadLetter).await);
    drained(db.pool(), Duration::from_secs(60)).await;
    let report = relay.stop().await;
    let dead = dead_letters(&db).await;
    assert_eq!(
        dead.iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![staged.big_outbox_id],
        "only the oversized row is dead-lettered: {dead:?}"
    );
    assert_eq!(report.dead_lettered(), 1);
    (db, staged, dead)
}

/// The partition each key was published to.
fn partitions(seen: &[Consumed]) -> HashMap<String, i32> {
    seen.iter()
        .map(|c| {
            (
                String::from_utf8(c.key.clone().unwrap_or_default()).unwrap(),
                c.partition,
            )
        })
        .collect()
}

/// Per key, the event ids in the order a consumer saw them.
fn seen_by_key(seen: &[Consumed]) -> BTreeMap<String, Vec<String>> {
    by_key(seen)
        .into_iter()
        .map(|(k, ids)| (String::from_utf8(k).unwrap(), ids))
        .collect()
}

/// At-least-once, `on_reject = "dead-letter"`: only the big row is
/// dead-lettered; every other row reaches Kafka; the duplicates are rows of
/// the other partitions staged after the first row of the big row's
/// partition (acknowledged after the first failure), each sent twice at
/// most; per key, the rows appear in staging order, then at most one
/// re-sent suffix in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_dead_letters_only_the_refused_row_and_resends_the_acknowledged_rest() {
    let (_db, staged, dead) = dead_letter_run(Mode::AtLeastOnce).await;
    assert_eq!(dead[0].1, staged.big_id);
    assert!(dead[0].2.contains("MessageSizeTooLarge"), "{dead:?}");

    let seen = consume(kafka().await.bootstrap(), &staged.topic, ROWS - 1, false).await;
    let t = tally(&seen, &staged.ids());
    println!("at-least-once, a refused row mid-batch: {t:?}");
    assert_eq!(
        (t.missing, t.unexpected),
        (1, 0),
        "only the big row is not in Kafka: {t:?}"
    );
    assert!(!seen.iter().any(|c| ce_id(c) == staged.big_id));

    // The duplicate window: acknowledged, but after the first failed row.
    let part = partitions(&seen);
    let big_partition = part[BIG_KEY];
    let first_failed = staged
        .rows
        .iter()
        .position(|(_, k)| part[k] == big_partition)
        .unwrap();
    let window: HashSet<&str> = staged.rows[first_failed + 1..]
        .iter()
        .filter(|(_, k)| part[k] != big_partition)
        .map(|(id, _)| id.as_str())
        .collect();
    let mut copies: HashMap<String, usize> = HashMap::new();
    for c in &seen {
        *copies.entry(ce_id(c)).or_default() += 1;
    }
    let duplicated: Vec<&String> = copies
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        !duplicated.is_empty(),
        "the other partitions' rows were acknowledged in the failed batch and sent again"
    );
    for id in &duplicated {
        assert!(
            window.contains(id.as_str()),
            "{id} is duplicated outside the window"
        );
        assert_eq!(copies[*id], 2, "{id} sent more than twice");
    }
    assert_eq!(t.duplicates, duplicated.len());
    assert!(t.duplicates <= window.len(), "{t:?}");

    // Order per key: staging order, then one re-sent suffix at most; the
    // big row's partition fails as a whole and has no duplicates.
    let expected = staged.by_key();
    for (key, ids) in seen_by_key(&seen) {
        let runs = resend_runs(&ids, &expected[&key])
            .unwrap_or_else(|e| panic!("key {key}: {e}; seen {ids:?}"));
        assert!(runs.len() <= 2, "key {key}: {runs:?}");
        if part[&key] == big_partition {
            assert_eq!(
                runs.len(),
                1,
                "key {key} shares the big row's partition: {runs:?}"
            );
        }
    }
}

/// At-least-once, `on_reject = "stop"`: the stream stops with an error
/// naming the big row (not the first row of its record batch); the rows
/// before it are published and recorded, the big row and the rows after it
/// wait in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_stops_on_the_refused_row_and_names_it() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    let staged = stage_batch(&db).await;
    let cfg = relay_config(&db, Mode::AtLeastOnce, OnReject::Stop).await;
    let err = txbox_relay::run(cfg, txbox_relay::CancellationToken::new())
        .await
        .expect_err("stops on the refused row");
    match &err {
        Error::Rejected {
            outbox_id, topic, ..
        } => assert_eq!(
            (*outbox_id, topic.as_str()),
            (staged.big_outbox_id, staged.topic.as_str()),
            "{err}"
        ),
        other => panic!("expected Rejected, got {other}"),
    }
    assert_eq!(
        unpublished(db.pool()).await,
        (ROWS - BIG) as i64,
        "the big row and the rows after it wait"
    );
    assert!(dead_letters(&db).await.is_empty());
    let seen = consume(kafka().await.bootstrap(), &staged.topic, BIG, false).await;
    let ids: HashSet<String> = seen.iter().map(ce_id).collect();
    for (id, _) in &staged.rows[..BIG] {
        assert!(ids.contains(id), "{id}, before the big row, is in Kafka");
    }
    assert!(!ids.contains(&staged.big_id));
}

/// Exactly-once: the failed transaction is aborted and the rows are sent
/// one transaction at a time until the big row is refused alone; a
/// read_committed consumer sees every other row once, per key in staging
/// order, and the big row is the only dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_dead_letters_only_the_refused_row() {
    let (_db, staged, _) = dead_letter_run(Mode::ExactlyOnce).await;
    let seen = consume(kafka().await.bootstrap(), &staged.topic, ROWS - 1, true).await;
    let t = tally(&seen, &staged.ids());
    assert_eq!(
        (t.missing, t.duplicates, t.unexpected),
        (1, 0, 0),
        "read_committed: every row but the big one, once: {t:?}"
    );
    assert_eq!(seen_by_key(&seen), staged.by_key());
}

/// The order check itself: a re-send that restarts earlier is accepted; a
/// gap, a swap, a missing end or an unknown id is not.
#[test]
fn resend_runs_accepts_only_in_order_restarts() {
    let staged: Vec<String> = (0..6).map(|i| format!("e{i}")).collect();
    let ids = |xs: &[usize]| xs.iter().map(|&i| staged[i].clone()).collect::<Vec<_>>();
    let whole = resend_runs(&ids(&[0, 1, 2, 3, 4, 5]), &staged).unwrap();
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0], 0..6);
    assert_eq!(
        resend_runs(&ids(&[0, 1, 2, 3, 1, 2, 3, 4, 5]), &staged),
        Ok(vec![0..4, 1..6])
    );
    assert_eq!(
        resend_runs(&ids(&[0, 1, 2, 1, 2, 3, 2, 3, 4, 5]), &staged),
        Ok(vec![0..3, 1..4, 2..6])
    );
    assert!(resend_runs(&ids(&[0, 1, 3, 4, 5]), &staged).is_err(), "gap");
    assert!(
        resend_runs(&ids(&[0, 2, 1, 3, 4, 5]), &staged).is_err(),
        "swap"
    );
    assert!(
        resend_runs(&ids(&[0, 1, 2]), &staged).is_err(),
        "end missing"
    );
    assert!(
        resend_runs(&ids(&[1, 2, 3, 4, 5]), &staged).is_err(),
        "start missing"
    );
    assert!(
        resend_runs(&["x".to_owned()], &staged).is_err(),
        "not staged"
    );
}
