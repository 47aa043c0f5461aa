//! Stored positions moved under the inbox: a topic deleted and recreated
//! (Kafka rewinds the partition), and an operator's position reset (replay
//! through dedupe, with the running owner fenced). Real Postgres, Apache
//! Kafka.

use std::time::Duration;

use txbox::inbox::{PositionChange, PositionReset, ResetTo};
use txbox::Schema;
use txbox_testkit::{kafka, unique_name, TestDb};
use txbox_tests::{
    bank_inbox, positions, recreated_topic_drill, wait_position, Bank, RunningInbox,
};

/// The topic is deleted and created again while the group is stopped: its
/// log restarts at offset 0, below the stored position. Kafka answers the
/// fetch past the new log's end with OFFSET_OUT_OF_RANGE, and the inbox
/// must follow the rewind instead of skipping the new log as consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recreated_topic_is_applied_from_its_start_not_skipped() {
    txbox_testkit::init_tracing();
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let broker = kafka().await;
    let topic = broker.topic("recreated", 1).await;
    recreated_topic_drill(db.pool(), broker.bootstrap(), &topic, async || {
        broker.delete_topic(&topic).await;
        broker.create_topic(&topic, 1).await;
        broker.bootstrap().to_owned()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_position_reset_replays_through_dedupe_and_fences_the_running_owner() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("reset", 2).await;
    let group = unique_name("bank");
    let first = Bank::deposits(100, 10);
    let placed = kafka::produce(broker.bootstrap(), &topic, Bank::records(&first)).await;
    let on = |p: i32, placed: &[(i32, i64)]| placed.iter().filter(|r| r.0 == p).count() as i64;
    let (p0, p1) = (on(0, &placed), on(1, &placed));
    assert!(p0 > 0 && p1 > 0, "deposits on both partitions");

    let inbox = RunningInbox::start(bank_inbox(db.pool(), broker.bootstrap(), &group, &topic));
    assert!(
        wait_position(db.pool(), &group, 0, p0).await
            && wait_position(db.pool(), &group, 1, p1).await
    );
    let before = positions(db.pool(), &group).await;

    // A preview changes nothing.
    let reset =
        PositionReset::new(Schema::default(), &group, &topic, ResetTo::Offset(0)).partitions([0]);
    let preview = reset.preview(db.pool()).await.expect("preview");
    assert_eq!(preview.len(), 1);
    assert_eq!(
        (preview[0].partition, preview[0].from, preview[0].to),
        (0, p0, 0)
    );
    assert_eq!(
        positions(db.pool(), &group).await,
        before,
        "preview changed nothing"
    );

    // The reset, while the inbox still owns partition 0: it is fenced.
    let applied: Vec<PositionChange> = reset.apply(db.pool()).await.expect("apply");
    assert_eq!(applied, preview);
    assert!(applied[0].fenced_owner.is_some(), "the owner is reported");
    let after = positions(db.pool(), &group).await;
    assert_eq!(
        (after[0].1, after[0].2),
        (0, before[0].2 + 1),
        "moved, epoch bumped"
    );
    assert_eq!(after[1], before[1], "partition 1 untouched");

    // More deposits on both partitions. Partition 1 goes on; the fenced
    // owner of partition 0 cannot commit there (without the epoch bump it
    // would resync to 0 and commit past the replay).
    let second = Bank::deposits(60, 10);
    let placed = kafka::produce(broker.bootstrap(), &topic, Bank::records(&second)).await;
    let (q0, q1) = (on(0, &placed), on(1, &placed));
    assert!(q0 > 0 && q1 > 0, "deposits on both partitions");
    assert!(
        wait_position(db.pool(), &group, 1, p1 + q1).await,
        "partition 1 goes on"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        positions(db.pool(), &group).await[0].1,
        0,
        "a fenced owner committed on partition 0"
    );
    inbox.stop().await;

    // Restarted, the group replays partition 0 from 0: the first deposits
    // are skipped as processed, the new ones applied once.
    let inbox = RunningInbox::start(bank_inbox(db.pool(), broker.bootstrap(), &group, &topic));
    assert!(
        wait_position(db.pool(), &group, 0, p0 + q0).await,
        "replayed to the end"
    );
    inbox.stop().await;
    let all: Vec<_> = first.into_iter().chain(second).collect();
    Bank::assert_exactly_once(db.pool(), &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_positions_never_stored_is_a_typed_error() {
    let db = TestDb::new().await;
    let group = unique_name("nobody");
    let err = PositionReset::new(Schema::default(), &group, "t", ResetTo::Shift(-5))
        .apply(db.pool())
        .await
        .expect_err("no positions stored");
    assert!(
        matches!(&err, txbox::Error::NoPosition { partitions, .. } if partitions.is_empty()),
        "{err:?}"
    );
    let err = PositionReset::new(Schema::default(), &group, "t", ResetTo::Offset(-1))
        .apply(db.pool())
        .await
        .expect_err("negative offset");
    assert!(matches!(err, txbox::Error::Config(_)), "{err:?}");
    let err = PositionReset::new(Schema::default(), &group, "t", ResetTo::Offset(0))
        .partitions([])
        .apply(db.pool())
        .await
        .expect_err("empty selection");
    assert!(matches!(err, txbox::Error::Config(_)), "{err:?}");
    let each = |pairs: &[(i32, i64)]| ResetTo::Each(pairs.iter().copied().collect());
    let err = PositionReset::new(Schema::default(), &group, "t", each(&[(0, 3), (1, -2)]))
        .apply(db.pool())
        .await
        .expect_err("negative per-partition offset");
    assert!(matches!(err, txbox::Error::Config(_)), "{err:?}");
    let err = PositionReset::new(Schema::default(), &group, "t", each(&[(0, 3)]))
        .partitions([0])
        .apply(db.pool())
        .await
        .expect_err("two selections");
    assert!(matches!(err, txbox::Error::Config(_)), "{err:?}");
    let err = PositionReset::new(Schema::default(), &group, "t", each(&[(4, 3)]))
        .apply(db.pool())
        .await
        .expect_err("never stored");
    assert!(
        matches!(&err, txbox::Error::NoPosition { partitions, .. } if partitions == &[4]),
        "{err:?}"
    );
}
