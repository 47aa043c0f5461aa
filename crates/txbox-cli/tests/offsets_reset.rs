//! `txbox offsets reset`: a dry run by default, `--execute` to apply, a
//! clear failure for positions never stored; targets read from the
//! brokers (log start, end, time). Real Postgres and Apache Kafka.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{txbox, wait_log_ends};
use txbox::rdkafka::admin::{AdminClient, AdminOptions};
use txbox::rdkafka::client::DefaultClientContext;
use txbox::rdkafka::config::ClientConfig;
use txbox::rdkafka::{Offset, TopicPartitionList};
use txbox_testkit::kafka::Record;
use txbox_testkit::{kafka, TestDb};

/// `txbox offsets reset --group ledger --topic payments` and `args`.
fn reset(db: &TestDb, args: &[&str]) -> Output {
    let mut all = vec![
        "offsets", "reset", "--group", "ledger", "--topic", "payments",
    ];
    all.extend_from_slice(args);
    txbox(db, &all)
}

async fn positions(db: &TestDb) -> Vec<(i32, i64, i64)> {
    sqlx::query_as(
        "SELECT partition, next_offset, epoch FROM txbox.inbox_offsets
         WHERE consumer_group = 'ledger' ORDER BY partition",
    )
    .fetch_all(db.pool())
    .await
    .expect("positions")
}

#[tokio::test]
async fn offsets_reset_previews_then_executes_and_refuses_unknown_partitions() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO txbox.inbox_offsets (consumer_group, topic, partition, next_offset, epoch, owner)
         VALUES ('ledger', 'payments', 0, 120, 3, 'host-a:1'), ('ledger', 'payments', 1, 7, 1, 'host-a:1')",
    )
    .execute(db.pool())
    .await
    .expect("seed positions");
    let seeded = positions(&db).await;

    let dry = reset(&db, &["--shift-by", "-50"]);
    assert!(dry.status.success(), "{dry:?}");
    let out = String::from_utf8_lossy(&dry.stdout);
    assert!(
        out.contains("ledger\tpayments\t0\t120\t70\thost-a:1"),
        "{out}"
    );
    assert!(
        out.contains("ledger\tpayments\t1\t7\t0\thost-a:1"),
        "floored at 0: {out}"
    );
    assert!(out.contains("dry run"), "{out}");
    assert_eq!(positions(&db).await, seeded, "a dry run changes nothing");

    let run = reset(&db, &["--partition", "0", "--to-offset", "10", "--execute"]);
    assert!(run.status.success(), "{run:?}");
    assert_eq!(
        positions(&db).await,
        vec![(0, 10, 4), (1, 7, 1)],
        "partition 0 moved and fenced (epoch + 1), partition 1 untouched"
    );

    let missing = reset(&db, &["--partition", "9", "--to-offset", "0", "--execute"]);
    assert!(!missing.status.success(), "{missing:?}");
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("no stored inbox position") && err.contains("[9]"),
        "{err}"
    );
    assert_eq!(positions(&db).await, vec![(0, 10, 4), (1, 7, 1)]);

    // A shift past the largest offset saturates instead of failing.
    let far = reset(
        &db,
        &[
            "--partition",
            "1",
            "--shift-by",
            "9223372036854775807",
            "--execute",
        ],
    );
    assert!(far.status.success(), "{far:?}");
    assert_eq!(positions(&db).await, vec![(0, 10, 4), (1, i64::MAX, 2)]);

    let neither = reset(&db, &[]);
    assert!(!neither.status.success(), "needs --to-offset or --shift-by");
}

/// Deletes the records of `partition` below `offset`, so its log starts there.
async fn delete_records_before(bootstrap: &str, topic: &str, partition: i32, offset: i64) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .expect("offset");
    let done = admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("delete_records");
    for e in done.elements() {
        assert!(e.error().is_ok(), "delete_records: {:?}", e.error());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_reset_to_the_log_start_or_end_reads_them_from_the_brokers() {
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("bounds", 2).await;
    let records = (0..8)
        .map(|i| Record::new(format!("m{i}")).partition(i32::from(i >= 5)))
        .collect();
    kafka::produce(broker.bootstrap(), &topic, records).await;
    wait_log_ends(broker.bootstrap(), &topic, &[5, 3]).await;
    sqlx::query(
        "INSERT INTO txbox.inbox_offsets (consumer_group, topic, partition, next_offset, epoch)
         VALUES ('ledger', $1, 0, 2, 1), ('ledger', $1, 1, 1, 1)",
    )
    .bind(&topic)
    .execute(db.pool())
    .await
    .expect("seed positions");
    let reset = |args: &[&str]| {
        let mut all = vec!["offsets", "reset", "--group", "ledger", "--topic", &topic];
        all.extend_from_slice(args);
        txbox(&db, &all)
    };

    let latest = reset(&["--to-latest", "--brokers", broker.bootstrap(), "--execute"]);
    assert!(latest.status.success(), "{latest:?}");
    assert_eq!(positions(&db).await, vec![(0, 5, 2), (1, 3, 2)]);

    // Partition 1's log starts at 2 once its first two records are deleted
    // (retention does the same): the earliest offset is not 0.
    delete_records_before(broker.bootstrap(), &topic, 1, 2).await;
    let earliest = reset(&[
        "--to-earliest",
        "--partition",
        "1",
        "--brokers",
        broker.bootstrap(),
        "--execute",
    ]);
    assert!(earliest.status.success(), "{earliest:?}");
    assert_eq!(positions(&db).await, vec![(0, 5, 2), (1, 2, 3)]);

    let no_brokers = reset(&["--to-latest"]);
    assert!(!no_brokers.status.success(), "{no_brokers:?}");
    assert!(
        String::from_utf8_lossy(&no_brokers.stderr).contains("--brokers"),
        "{no_brokers:?}"
    );
    let unknown = reset(&[
        "--to-latest",
        "--partition",
        "7",
        "--brokers",
        broker.bootstrap(),
    ]);
    assert!(
        !unknown.status.success(),
        "partition 7 does not exist: {unknown:?}"
    );
    let why = String::from_utf8_lossy(&unknown.stderr);
    assert!(why.contains("partition 7") || why.contains("[7]"), "{why}");
    assert_eq!(
        positions(&db).await,
        vec![(0, 5, 2), (1, 2, 3)],
        "refusals change nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_reset_to_a_datetime_moves_to_the_first_message_at_or_after_it() {
    let db = TestDb::new().await;
    let broker = kafka().await;
    let topic = broker.topic("by-time", 2).await;
    let batch = |from: i32| {
        (from..from + 6)
            .map(|i| Record::new(format!("m{i}")).partition(i % 2))
            .collect()
    };
    kafka::produce(broker.bootstrap(), &topic, batch(0)).await;
    wait_log_ends(broker.bootstrap(), &topic, &[3, 3]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = kafka::produce(broker.bootstrap(), &topic, batch(6)).await;
    wait_log_ends(broker.bootstrap(), &topic, &[6, 6]).await;
    let first_of_second = |p: i32| {
        second
            .iter()
            .filter(|(part, _)| *part == p)
            .map(|(_, o)| *o)
            .min()
            .expect("second batch on every partition")
    };
    assert_eq!((first_of_second(0), first_of_second(1)), (3, 3));
    sqlx::query(
        "INSERT INTO txbox.inbox_offsets (consumer_group, topic, partition, next_offset, epoch)
         VALUES ('ledger', $1, 0, 0, 1), ('ledger', $1, 1, 6, 1)",
    )
    .bind(&topic)
    .execute(db.pool())
    .await
    .expect("seed positions");
    let reset = |args: &[&str]| {
        let mut all = vec!["offsets", "reset", "--group", "ledger", "--topic", &topic];
        all.extend_from_slice(args);
        txbox(&db, &all)
    };
    let at = between.to_rfc3339();

    let dry = reset(&["--to-datetime", &at, "--brokers", broker.bootstrap()]);
    assert!(dry.status.success(), "{dry:?}");
    let out = String::from_utf8_lossy(&dry.stdout);
    assert!(
        out.contains(&format!("ledger\t{topic}\t0\t0\t3\t")),
        "{out}"
    );
    assert!(out.contains("dry run"), "{out}");
    assert_eq!(positions(&db).await, vec![(0, 0, 1), (1, 6, 1)]);

    let run = reset(&[
        "--to-datetime",
        &at,
        "--brokers",
        broker.bootstrap(),
        "--execute",
    ]);
    assert!(run.status.success(), "{run:?}");
    assert_eq!(
        positions(&db).await,
        vec![(0, 3, 2), (1, 3, 2)],
        "both partitions at the first offset of the second batch"
    );

    // After the last message: the log end.
    let later = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let end = reset(&[
        "--to-datetime",
        &later,
        "--brokers",
        broker.bootstrap(),
        "--execute",
    ]);
    assert!(end.status.success(), "{end:?}");
    assert_eq!(positions(&db).await, vec![(0, 6, 3), (1, 6, 3)]);

    let bad = reset(&[
        "--to-datetime",
        "yesterday",
        "--brokers",
        broker.bootstrap(),
    ]);
    assert!(!bad.status.success(), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"),
        "{bad:?}"
    );
    let no_brokers = reset(&["--to-datetime", &at]);
    assert!(!no_brokers.status.success(), "{no_brokers:?}");
    assert_eq!(positions(&db).await, vec![(0, 6, 3), (1, 6, 3)]);
}
