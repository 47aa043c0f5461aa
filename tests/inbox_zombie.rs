//! Zombie consumers: a consumer that lost its partition while inside a
//! transaction cannot commit for it. Two real consumer processes in one
//! group on Apache Kafka; the first is frozen (SIGSTOP) inside its handler's
//! transaction until the group gives its partition to the second, then
//! thawed: its commit must be fenced, and every message applied once. The
//! same when an operator deleted the partition's offsets row meanwhile and
//! the successor created it again at the same offset: epochs come from one
//! sequence, so the new row's epoch is not the zombie's.

use std::path::Path;
use std::time::Duration;

use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, TestDb};
use txbox_tests::Bank;

const BIN: &str = env!("CARGO_BIN_EXE_inbox-chaos");

async fn epoch(db: &TestDb, group: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(max(epoch), 0) FROM txbox.inbox_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(db.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_consumer_is_fenced_when_it_wakes() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("zombie", 1).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(60, 6);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let env = |slow: bool| {
        let mut e = vec![
            ("TXBOX_DATABASE_URL", db.url()),
            ("TXBOX_KAFKA_BOOTSTRAP", broker.bootstrap()),
            ("CHAOS_TOPIC", topic.as_str()),
            ("CHAOS_GROUP", group.as_str()),
            ("CHAOS_BATCH", "10"),
            ("CHAOS_SESSION_MS", "6000"),
        ];
        if slow {
            e.push(("CHAOS_SLOW_OFFSET", "25"));
            e.push(("CHAOS_SLOW_SECS", "2"));
        }
        e
    };
    let mut zombie = Child::spawn(Path::new(BIN), &[], &env(true));
    assert!(
        zombie
            .wait_for_stderr("TXBOX_CHAOS_IN_HANDLER 25", Duration::from_secs(60))
            .await,
        "zombie never reached the slow message:\n{}",
        zombie.stderr()
    );
    // Inside the transaction for offsets 20..30: freeze it there.
    zombie.freeze();
    let applied_before: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
        .fetch_one(db.pool())
        .await
        .unwrap();
    // Batches (at most 10) take what is already buffered, so the frozen one
    // starts somewhere in 16..=25; message 25 is in it and not applied.
    assert!(
        (16..=25).contains(&applied_before),
        "batches before the frozen one committed, the frozen one did not ({applied_before} applied)"
    );

    let mut successor = Child::spawn(Path::new(BIN), &[], &env(false));
    // The group expels the silent member and assigns the partition to the
    // successor, which claims it: the epoch moves to 2.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while epoch(&db, &group).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "successor never claimed the partition:\n{}",
            successor.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Wake the zombie: its handler finishes and it tries to commit.
    zombie.thaw();
    assert!(
        zombie
            .wait_for_stderr("fenced", Duration::from_secs(30))
            .await,
        "the zombie's commit was not fenced:\n{}",
        zombie.stderr()
    );
    let done = Bank::wait_processed(db.pool(), &group, 60, Duration::from_secs(60)).await;
    successor.terminate();
    zombie.terminate();
    successor.wait().await;
    zombie.wait().await;
    assert!(done, "successor did not finish:\n{}", successor.stderr());

    Bank::assert_exactly_once(db.pool(), &deposits).await;
}

/// An operator deletes the group's offsets row while its consumer is
/// frozen inside a transaction (expecting offset 0). The successor creates
/// the row again at the same offset 0; its epoch must be one never given
/// out before, or the zombie's epoch would match it and the zombie's commit
/// would pass the fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_is_fenced_after_its_offsets_row_was_deleted_and_recreated() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("zombie-deleted", 1).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(30, 3);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let env = |name: &'static str, slow: bool| {
        let mut e = vec![
            ("TXBOX_DATABASE_URL", db.url()),
            ("TXBOX_KAFKA_BOOTSTRAP", broker.bootstrap()),
            ("CHAOS_TOPIC", topic.as_str()),
            ("CHAOS_GROUP", group.as_str()),
            ("CHAOS_BATCH", "10"),
            ("CHAOS_SESSION_MS", "6000"),
            ("CHAOS_NAME", name),
        ];
        if slow {
            e.push(("CHAOS_SLOW_OFFSET", "0"));
            e.push(("CHAOS_SLOW_SECS", "2"));
        }
        e
    };
    let mut zombie = Child::spawn(Path::new(BIN), &[], &env("zombie", true));
    assert!(
        zombie
            .wait_for_stderr("TXBOX_CHAOS_IN_HANDLER 0", Duration::from_secs(60))
            .await,
        "zombie never reached the slow message:\n{}",
        zombie.stderr()
    );
    // Inside its first transaction, which expects offset 0: freeze it there.
    zombie.freeze();
    let zombie_epoch = epoch(&db, &group).await;
    sqlx::query("DELETE FROM txbox.inbox_offsets WHERE consumer_group = $1")
        .bind(&group)
        .execute(db.pool())
        .await
        .unwrap();

    let mut successor = Child::spawn(Path::new(BIN), &[], &env("successor", false));
    // The group expels the silent member and the successor claims the
    // partition: the row exists again, at offset 0.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while epoch(&db, &group).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "successor never claimed the partition:\n{}",
            successor.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let successor_epoch = epoch(&db, &group).await;

    // Wake the zombie: its handler finishes and it tries to commit offsets
    // 0.. with its old epoch.
    zombie.thaw();
    let done = Bank::wait_processed(db.pool(), &group, 30, Duration::from_secs(60)).await;
    successor.terminate();
    zombie.terminate();
    successor.wait().await;
    zombie.wait().await;
    assert!(done, "successor did not finish:\n{}", successor.stderr());
    let by_zombie: i64 =
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE applied_by = 'zombie'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(
        by_zombie,
        0,
        "the zombie (epoch {zombie_epoch}) committed after the successor claimed the \
         recreated row (epoch {successor_epoch}):\n{}",
        zombie.stderr()
    );
    assert_ne!(zombie_epoch, successor_epoch);
    Bank::assert_exactly_once(db.pool(), &deposits).await;
}

/// A schema migrated before epochs came from a sequence, with a stored
/// epoch of 7, is upgraded: every claim afterwards, on the existing row and
/// on a new one, gets an epoch above 7 (a new row starting again at 1 could
/// equal an epoch a consumer of a deleted row still holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_after_the_upgrade_start_above_every_stored_one() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let schema = txbox::Schema::new("upgraded").unwrap();
    let topic = broker.topic("upgraded", 2).await;
    let group = unique_name("bank");

    // The schema as migrations 1 to 4 left it, as `txbox migrate` records.
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::raw_sql(
        "CREATE SCHEMA upgraded;
         CREATE TABLE upgraded._txbox_migrations (version bigint PRIMARY KEY, name text NOT NULL,
             checksum bytea NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),
             execution_ms bigint NOT NULL);
         SET LOCAL search_path TO upgraded;",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    for m in txbox::schema::MIGRATIONS.iter().filter(|m| m.version <= 4) {
        sqlx::raw_sql(m.sql).execute(&mut *tx).await.unwrap();
        sqlx::query(
            "INSERT INTO upgraded._txbox_migrations (version, name, checksum, execution_ms)
             VALUES ($1, $2, $3, 0)",
        )
        .bind(m.version)
        .bind(m.name)
        .bind(m.checksum())
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO upgraded.inbox_offsets (consumer_group, topic, partition, next_offset, epoch)
         VALUES ($1, $2, 0, 0, 7)",
    )
    .bind(&group)
    .bind(&topic)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    txbox::Migrator::new(schema.clone())
        .run(db.pool())
        .await
        .unwrap();

    let records: Vec<_> = Bank::records(&Bank::deposits(4, 2))
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.partition(i as i32 % 2))
        .collect();
    kafka::produce(broker.bootstrap(), &topic, records).await;
    let h = txbox_tests::RunningInbox::start(
        txbox_tests::bank_inbox(db.pool(), broker.bootstrap(), &group, &topic).schema(schema),
    );
    let claimed = || async {
        sqlx::query_as::<_, (i32, i64)>(
            "SELECT partition, epoch FROM upgraded.inbox_offsets
             WHERE consumer_group = $1 AND next_offset = 2 ORDER BY partition",
        )
        .bind(&group)
        .fetch_all(db.pool())
        .await
        .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while claimed().await.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both partitions consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.stop().await;
    let epochs = claimed().await;
    assert!(
        epochs.iter().all(|e| e.1 > 7) && epochs[0].1 != epochs[1].1,
        "epochs above the stored 7, each its own: {epochs:?}"
    );
}
