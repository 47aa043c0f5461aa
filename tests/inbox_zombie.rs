//! Zombie consumers: a consumer that lost its partition while inside a
//! transaction cannot commit for it, and cannot stall the consumer that
//! took it over. Real consumer processes in one group on Apache Kafka; the
//! first is frozen (SIGSTOP) inside a transaction until the group gives its
//! partition to the second.
//!
//! - Thawed, its commit must be fenced, and every message applied once:
//!   frozen inside its handler, or between two batches (its next
//!   transaction starts with the epoch it no longer holds); the same when
//!   an operator deleted the partition's offsets row meanwhile and the
//!   successor created it again at the same offset (epochs come from one
//!   sequence, so the new row's epoch is not the zombie's). A thawed
//!   zombie's Kafka client learns at once that it left the group; the
//!   zombies here hear of it 5 s late (`inbox.before_release`), as a
//!   consumer whose poll thread is stuck would, so their stale
//!   transactions meet the database's fence every time.
//! - Kept frozen, inside its handler (holding uncommitted rows the
//!   successor's handler must write too) or between its fenced advance and COMMIT
//!   (holding the offsets row the successor's claim updates), it must not
//!   stop the successor: PostgreSQL ends the zombie's idle transaction
//!   (`transaction_idle_timeout`, below the session timeout) and the
//!   successor finishes within a bound.

use std::path::Path;
use std::time::Duration;

use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, TestDb};
use txbox_tests::{Bank, Deposits};

const BIN: &str = env!("CARGO_BIN_EXE_inbox-chaos");

/// The group's session timeout in these tests: a frozen member is expelled
/// this long after its last heartbeat.
const SESSION_MS: &str = "6000";

/// A consumer process of `scene`'s group named `name` (its sessions'
/// `application_name`, recorded in `effects.applied_by`), with `extra`
/// environment.
fn consumer(scene: &Deposits, name: &str, extra: &[(&str, &str)]) -> Child {
    let mut env = vec![
        ("TXBOX_DATABASE_URL", scene.db.url()),
        ("TXBOX_KAFKA_BOOTSTRAP", scene.broker.bootstrap()),
        ("CHAOS_TOPIC", scene.topic.as_str()),
        ("CHAOS_GROUP", scene.group.as_str()),
        ("CHAOS_BATCH", "10"),
        ("CHAOS_SESSION_MS", SESSION_MS),
        ("CHAOS_NAME", name),
    ];
    env.extend_from_slice(extra);
    Child::spawn(Path::new(BIN), &[], &env)
}

/// The highest epoch stored for the group (0 with no row).
async fn epoch(scene: &Deposits) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(max(epoch), 0) FROM txbox.inbox_offsets WHERE consumer_group = $1",
    )
    .bind(&scene.group)
    .fetch_one(scene.db.pool())
    .await
    .unwrap()
}

/// Waits until the stored epoch is above `before`: someone claimed the
/// partition after it.
async fn wait_claimed_after(scene: &Deposits, before: i64, by: &Child) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while epoch(scene).await <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partition was never claimed again:\n{}",
            by.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Freezes `zombie` inside its handler for the message at `offset` (the
/// handler sleeps there for 2 s, so the freeze lands inside it).
async fn freeze_in_handler(zombie: &Child, offset: i64) {
    assert!(
        zombie
            .wait_for_stderr(
                &format!("TXBOX_CHAOS_IN_HANDLER {offset}"),
                Duration::from_secs(60)
            )
            .await,
        "zombie never reached the slow message:\n{}",
        zombie.stderr()
    );
    zombie.freeze();
}

/// The zombies' failpoint that holds back the release of revoked
/// partitions 5 s (see the module docs); others join it with `;`.
const LATE_RELEASE: &str = "inbox.before_release=sleep(5000)";

/// Waits until the zombie logs that its commit was fenced.
async fn assert_fenced(zombie: &Child) {
    assert!(
        zombie
            .wait_for_stderr("fenced: partition reassigned", Duration::from_secs(30))
            .await,
        "the zombie's commit was not fenced:\n{}",
        zombie.stderr()
    );
}

/// Thaws `zombie`, which had applied `applied_before` messages, while
/// `successor` holds its partition: the zombie's next commit must be
/// fenced, it must apply nothing more, and the successor must finish with
/// every message applied once.
async fn wake_fenced(scene: &Deposits, mut zombie: Child, successor: Child, applied_before: i64) {
    zombie.thaw();
    assert_fenced(&zombie).await;
    // Killed while its release is held back: it never rejoins the group,
    // where it could be given the partition again and rightly apply what
    // the successor had not yet.
    zombie.kill().await;
    let done = scene.wait_processed(Duration::from_secs(60)).await;
    assert!(done, "successor did not finish:\n{}", successor.stderr());
    let zombie_applied = scene.applied(Some("zombie")).await;
    let zombie_log = zombie.stderr();
    stop(vec![successor]).await;
    assert_eq!(
        zombie_applied, applied_before,
        "the zombie committed after it woke:\n{zombie_log}"
    );
    Bank::assert_exactly_once(scene.db.pool(), &scene.deposits).await;
}

/// Stops both processes, thawing first (a stopped process does not act on
/// SIGTERM).
async fn stop(mut processes: Vec<Child>) {
    for p in &processes {
        p.thaw();
        p.terminate();
    }
    for p in &mut processes {
        p.wait_within(Duration::from_secs(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_consumer_is_fenced_when_it_wakes() {
    let scene = Deposits::produce("zombie", 60, 6).await;
    let slow = [
        ("CHAOS_SLOW_OFFSET", "25"),
        ("CHAOS_SLOW_SECS", "2"),
        ("FAILPOINTS", LATE_RELEASE),
    ];
    let zombie = consumer(&scene, "zombie", &slow);
    // Inside the transaction for offsets 20..30: freeze it there.
    freeze_in_handler(&zombie, 25).await;
    let applied_before = scene.applied(None).await;
    // Batches (at most 10) take what is already buffered, so the frozen one
    // starts somewhere in 16..=25; message 25 is in it and not applied.
    assert!(
        (16..=25).contains(&applied_before),
        "batches before the frozen one committed, the frozen one did not ({applied_before} applied)"
    );

    // The group expels the silent member and assigns the partition to the
    // successor, which claims it with a new epoch.
    let before = epoch(&scene).await;
    let successor = consumer(&scene, "successor", &[]);
    wait_claimed_after(&scene, before, &successor).await;

    // Wake the zombie: its handler finishes and it tries to commit (the
    // idle bound has ended its transaction meanwhile: it retries the batch
    // in a new one, with the epoch it had).
    wake_fenced(&scene, zombie, successor, applied_before).await;
}

/// The zombie is frozen right after a commit, outside any transaction, so
/// nothing of it ends while it sleeps. Thawed, it takes its next batch,
/// already fetched, and starts a transaction with the epoch the successor
/// replaced: the fenced advance must refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_frozen_between_batches_is_fenced_when_it_wakes() {
    let scene = Deposits::produce("zombie-between", 60, 6).await;
    // Its third commit freezes it.
    let points = format!("inbox.after_commit=2*off->return(freeze);{LATE_RELEASE}");
    let zombie = consumer(&scene, "zombie", &[("FAILPOINTS", points.as_str())]);
    zombie
        .wait_frozen_at("inbox.after_commit", Duration::from_secs(60))
        .await;
    let applied_before = scene.applied(Some("zombie")).await;
    let before = epoch(&scene).await;
    let successor = consumer(&scene, "successor", &[]);
    wait_claimed_after(&scene, before, &successor).await;

    wake_fenced(&scene, zombie, successor, applied_before).await;
}

/// An operator deletes the group's offsets row while its consumer is
/// frozen inside a transaction (expecting offset 0). The successor creates
/// the row again at the same offset 0; its epoch must be one never given
/// out before, or the zombie's epoch would match it and the zombie's commit
/// would pass the fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_is_fenced_after_its_offsets_row_was_deleted_and_recreated() {
    let scene = Deposits::produce("zombie-deleted", 30, 3).await;
    let slow = [
        ("CHAOS_SLOW_OFFSET", "0"),
        ("CHAOS_SLOW_SECS", "2"),
        ("FAILPOINTS", LATE_RELEASE),
    ];
    let zombie = consumer(&scene, "zombie", &slow);
    // Inside its first transaction, which expects offset 0: freeze it there.
    freeze_in_handler(&zombie, 0).await;
    let zombie_epoch = epoch(&scene).await;
    sqlx::query("DELETE FROM txbox.inbox_offsets WHERE consumer_group = $1")
        .bind(&scene.group)
        .execute(scene.db.pool())
        .await
        .unwrap();

    // The group expels the silent member and the successor claims the
    // partition: the row exists again, at offset 0.
    let successor = consumer(&scene, "successor", &[]);
    wait_claimed_after(&scene, 0, &successor).await;
    let successor_epoch = epoch(&scene).await;

    assert_ne!(
        zombie_epoch, successor_epoch,
        "the recreated row was given the zombie's epoch"
    );
    // Wake the zombie: its handler finishes and it tries to commit offsets
    // 0.. with its old epoch.
    wake_fenced(&scene, zombie, successor, 0).await;
}

/// How long the successor may take, from its start, to apply everything
/// while the zombie stays frozen: the session timeout (6 s) and the group's
/// rebalance, the zombie's idle bound (4 s, two thirds of the session
/// timeout, already over by then), and the work, with room for a loaded
/// machine. Without the bound the successor waits on the zombie's rows
/// until the zombie's backend dies, which for a frozen process is never.
const SUCCESSOR_BOUND: Duration = Duration::from_secs(40);

/// Starts a successor while `zombie` stays frozen; asserts that it applies
/// everything within [`SUCCESSOR_BOUND`]. Returns what the zombie applied.
async fn successor_finishes(scene: &Deposits, zombie: Child) -> i64 {
    let successor = consumer(scene, "successor", &[]);
    let done = scene.wait_processed(SUCCESSOR_BOUND).await;
    let zombie_applied = scene.applied(Some("zombie")).await;
    let successor_log = successor.stderr();
    stop(vec![successor, zombie]).await;
    assert!(
        done,
        "the successor was stalled by the frozen zombie:\n{successor_log}"
    );
    zombie_applied
}

/// The zombie is frozen inside its handler, its transaction holding the
/// rows the handler wrote (the accounts' balances, not committed), and
/// stays frozen. The successor's handler, writing the same rows, would
/// wait on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_frozen_in_its_handler_does_not_stall_the_successor() {
    let scene = Deposits::produce("zombie-held-ids", 60, 6).await;
    let slow = [("CHAOS_SLOW_OFFSET", "25"), ("CHAOS_SLOW_SECS", "2")];
    let zombie = consumer(&scene, "zombie", &slow);
    freeze_in_handler(&zombie, 25).await;
    let zombie_applied = successor_finishes(&scene, zombie).await;
    assert!(
        zombie_applied < 30,
        "the zombie's frozen batch never committed"
    );
    Bank::assert_exactly_once(scene.db.pool(), &scene.deposits).await;
}

/// The zombie is frozen after its fenced advance and before COMMIT (a crash
/// point that stops the process), its transaction holding the partition's
/// offsets row, and stays frozen. The successor's claim, inside its
/// rebalance callback, updates that row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_frozen_before_its_commit_does_not_stall_the_successor() {
    let scene = Deposits::produce("zombie-held-row", 60, 6).await;
    // Its third batch freezes there (the first two commit).
    let zombie = consumer(
        &scene,
        "zombie",
        &[("FAILPOINTS", "inbox.before_commit=2*off->return(freeze)")],
    );
    zombie
        .wait_frozen_at("inbox.before_commit", Duration::from_secs(60))
        .await;
    let zombie_log = zombie.stderr();
    let zombie_applied = successor_finishes(&scene, zombie).await;
    // Batches hold up to 10 messages but may hold fewer (linger), so the
    // count of what committed before the freeze is not exact; the frozen
    // third batch cannot have committed while the process is stopped.
    assert!(
        zombie_applied < 30,
        "the zombie committed its frozen batch ({zombie_applied} applied):\n{zombie_log}"
    );
    Bank::assert_exactly_once(scene.db.pool(), &scene.deposits).await;
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
