//! Bad input and outages: poison messages are retried then dead-lettered
//! with nothing lost; a partition can instead be stopped; a database outage
//! (the network cut, or the server stopped and restarted) stalls progress
//! without loss or duplicates.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use txbox::db::Backoff;
use txbox::inbox::{FailureAction, Handler, HandlerError, Inbox, InboxMessage, RetryPolicy, Tx};
use txbox::{Outbox, Schema};
use txbox_testkit::kafka::Record;
use txbox_testkit::proxy::TcpProxy;
use txbox_testkit::{kafka, unique_name, PgServer, TestDb};
use txbox_tests::{
    consumed, dead_letters, wait_consumed, Bank, Deposit, Deposits, RunningInbox, ALWAYS_FAILS,
};

/// event_id, offset, payload, attempts, error, headers
type DeadLetter = (String, i64, Option<Vec<u8>>, i32, String, serde_json::Value);

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::attempts(attempts).backoff(Backoff::new(
        Duration::from_millis(10),
        Duration::from_millis(50),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_and_nothing_is_lost() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("poison", 1).await;
    let group = unique_name("bank");

    let before = Bank::deposits(20, 5);
    let after = Bank::deposits(20, 5);
    let fails = Deposit {
        account: ALWAYS_FAILS.into(),
        amount: 1,
    };
    let no_id = Deposit {
        account: "acct-no-id".into(),
        amount: 9,
    };
    let mut records = Bank::records(&before);
    records.push(
        Record::new(&b"{not json"[..])
            .header("ce_id", "malformed-1")
            .header("trace", vec![0xde, 0xad]),
    );
    records.push(Record::new(serde_json::to_vec(&fails).unwrap()).header("ce_id", "fails-1"));
    records.push(
        Record {
            payload: None,
            ..Record::default()
        }
        .header("ce_id", "tombstone-1"),
    );
    records.push(Record::new(serde_json::to_vec(&no_id).unwrap())); // no event id header
    records.extend(Bank::records(&after));
    let positions = kafka::produce(broker.bootstrap(), &topic, records).await;
    let total = positions.len() as i64;

    let h = RunningInbox::start(
        Inbox::builder(db.pool().clone())
            .brokers(broker.bootstrap())
            .group_id(&group)
            .handler(&topic, Bank::new(Outbox::new(Schema::default())))
            .batch_size(10)
            .retry(fast_retry(3)),
    );
    assert!(
        wait_consumed(db.pool(), &group, total, Duration::from_secs(60)).await,
        "consumed past every message"
    );
    h.stop().await;

    let dead: Vec<DeadLetter> = sqlx::query_as(
        "SELECT event_id, \"offset\", payload, attempts, error, headers FROM txbox.inbox_dead_letters WHERE consumer_group = $1 ORDER BY \"offset\"",
    )
    .bind(&group)
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(dead.len(), 3, "{dead:#?}");
    let (id, off, payload, attempts, error, headers) = &dead[0];
    assert_eq!(
        (id.as_str(), *off, *attempts),
        ("malformed-1", 20, 1),
        "decode errors are permanent: one attempt"
    );
    assert_eq!(
        payload.as_deref(),
        Some(&b"{not json"[..]),
        "payload kept byte for byte"
    );
    assert!(error.contains("invalid JSON"), "{error}");
    let headers = txbox::Headers::from_json(headers).unwrap();
    assert_eq!(
        headers.get("trace"),
        Some(&[0xde, 0xad][..]),
        "binary header kept"
    );
    assert_eq!(
        (dead[1].0.as_str(), dead[1].1, dead[1].3),
        ("fails-1", 21, 3),
        "retryable: all attempts used"
    );
    assert!(dead[1].4.contains("unavailable"), "{}", dead[1].4);
    assert_eq!(
        (dead[2].0.as_str(), dead[2].1, dead[2].2.as_deref()),
        ("tombstone-1", 22, None)
    );

    // Everything else applied exactly once, including the message without
    // an id (deduped by position) and those after the poison.
    let mut good = before.clone();
    good.extend(after.clone());
    good.push((format!("{topic}/0/23"), no_id));
    Bank::assert_exactly_once(db.pool(), &good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_partition_policy_holds_the_poison_and_everything_after_it() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("stop", 1).await;
    let group = unique_name("bank");
    let before = Bank::deposits(15, 3);
    let after = Bank::deposits(15, 3);
    let mut records = Bank::records(&before);
    records.push(Record::new(&b"garbage"[..]).header("ce_id", "poison-1"));
    records.extend(Bank::records(&after));
    kafka::produce(broker.bootstrap(), &topic, records).await;

    let builder = || {
        Inbox::builder(db.pool().clone())
            .brokers(broker.bootstrap())
            .group_id(&group)
            .handler(&topic, Bank::new(Outbox::new(Schema::default())))
            .batch_size(4)
            .retry(fast_retry(2))
    };
    let h = RunningInbox::start(builder().on_failure(FailureAction::StopPartition));
    assert!(wait_consumed(db.pool(), &group, 15, Duration::from_secs(60)).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.stop().await;
    assert_eq!(
        consumed(db.pool(), &group).await,
        15,
        "stopped at the poison, not past it"
    );
    Bank::assert_exactly_once(db.pool(), &before).await;
    let dead = dead_letters(db.pool()).await;
    assert_eq!(dead, 0);

    // The operator switches to dead-lettering: the poison is moved aside
    // and the rest flows, each once.
    let h = RunningInbox::start(builder());
    assert!(wait_consumed(db.pool(), &group, 31, Duration::from_secs(60)).await);
    h.stop().await;
    let mut all = before;
    all.extend(after);
    Bank::assert_exactly_once(db.pool(), &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_restart_mid_stream_loses_nothing_and_applies_nothing_twice() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    // The shared test server cannot be stopped: this test has its own.
    let server = PgServer::start().await;
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&server.url("postgres"))
        .await
        .unwrap();
    txbox::Migrator::new(Schema::default())
        .run(&pool)
        .await
        .unwrap();
    Bank::setup(&pool).await;
    let topic = broker.topic("restart", 2).await;
    let group = unique_name("bank");
    let first = Bank::deposits(300, 11);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&first)).await;

    let h = RunningInbox::start(
        Inbox::builder(pool.clone())
            .brokers(broker.bootstrap())
            .group_id(&group)
            .handler(
                &topic,
                Bank::new(Outbox::new(Schema::default())).paced(Duration::from_millis(5)),
            )
            .batch_size(5)
            .retry(fast_retry(3)),
    );
    assert!(
        wait_consumed(&pool, &group, 50, Duration::from_secs(60)).await,
        "made progress before the outage"
    );
    // Stopped as a crash stops it, with transactions in flight: each one
    // either committed before the stop or is rolled back by recovery.
    server.stop();
    let second = Bank::deposits(100, 11);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&second)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(h.is_running(), "the inbox waits out a database outage");

    server.restart();
    let before_restart = consumed(&pool, &group).await;
    assert!(
        before_restart < 300,
        "the stop came mid-stream ({before_restart} of 300 consumed)"
    );
    assert!(
        wait_consumed(&pool, &group, 400, Duration::from_secs(60)).await,
        "resumed after the restart"
    );
    h.stop().await;
    let dead = dead_letters(&pool).await;
    assert_eq!(dead, 0, "an outage is not a poison message");
    let mut all = first;
    all.extend(second);
    Bank::assert_exactly_once(&pool, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_unreachable_stalls_then_resumes_without_loss_or_duplicates() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("outage", 2).await;
    let group = unique_name("bank");
    let first = Bank::deposits(200, 11);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&first)).await;

    // The inbox reaches Postgres only through a proxy we can cut.
    let direct = PgConnectOptions::from_str(db.url()).unwrap();
    let proxy = TcpProxy::start(&format!("{}:{}", direct.get_host(), direct.get_port())).await;
    let via_proxy = direct.clone().host("127.0.0.1").port(proxy.port());
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(via_proxy)
        .await
        .unwrap();

    let h = RunningInbox::start(
        Inbox::builder(pool)
            .brokers(broker.bootstrap())
            .group_id(&group)
            .handler(&topic, Bank::new(Outbox::new(Schema::default())))
            .batch_size(5)
            .retry(fast_retry(3)),
    );
    assert!(
        wait_consumed(db.pool(), &group, 20, Duration::from_secs(60)).await,
        "made progress before the outage"
    );

    proxy.cut();
    let second = Bank::deposits(200, 11);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&second)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = consumed(db.pool(), &group).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        consumed(db.pool(), &group).await,
        during,
        "nothing advances while the database is unreachable"
    );
    let dead = dead_letters(db.pool()).await;
    assert_eq!(dead, 0, "an outage is not a poison message");

    proxy.restore();
    assert!(
        wait_consumed(db.pool(), &group, 400, Duration::from_secs(60)).await,
        "resumed after the outage"
    );
    h.stop().await;
    let mut all = first;
    all.extend(second);
    Bank::assert_exactly_once(db.pool(), &all).await;
}

/// Fails its first `n` calls with a serialization failure (SQLSTATE 40001)
/// raised by the database, then applies like the bank.
struct Flaky {
    bank: Bank,
    left: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl Handler for Flaky {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        use std::sync::atomic::Ordering;
        if self.left.load(Ordering::SeqCst) > 0 {
            self.left.fetch_sub(1, Ordering::SeqCst);
            sqlx::query("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
                .execute(&mut **tx)
                .await?;
        }
        self.bank.handle(tx, msg).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serialization_failures_are_retried_without_using_up_attempts() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("flaky", 1).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(30, 3);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    // One attempt only: a 40001 counted as an attempt would dead-letter.
    let h = RunningInbox::start(
        Inbox::builder(db.pool().clone())
            .brokers(broker.bootstrap())
            .group_id(&group)
            .handler(
                &topic,
                Flaky {
                    bank: Bank::new(Outbox::new(Schema::default())),
                    left: std::sync::atomic::AtomicU32::new(5),
                },
            )
            .batch_size(4)
            .retry(fast_retry(1)),
    );
    assert!(wait_consumed(db.pool(), &group, 30, Duration::from_secs(60)).await);
    h.stop().await;
    let dead = dead_letters(db.pool()).await;
    assert_eq!(dead, 0, "40001 is transient: retried, never dead-lettered");
    Bank::assert_exactly_once(db.pool(), &deposits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_event_ids_are_pruned_and_recent_ones_kept() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("prune", 1).await;
    let group = unique_name("bank");
    // 2,500 ids processed two days ago (more than two prune batches), 10 an
    // hour ago.
    sqlx::query(
        "INSERT INTO txbox.inbox_processed (consumer_group, event_id, topic, partition, \"offset\", processed_at)
         SELECT $1, 'old-' || g, 'x', 0, g, now() - interval '2 days' FROM generate_series(1, 2500) g
         UNION ALL
         SELECT $1, 'recent-' || g, 'x', 0, g, now() - interval '1 hour' FROM generate_series(1, 10) g",
    )
    .bind(&group)
    .execute(db.pool())
    .await
    .unwrap();
    let deposits = Bank::deposits(20, 2);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;
    let h = RunningInbox::start(
        Inbox::builder(db.pool().clone())
            .brokers(broker.bootstrap())
            .group_id(&group)
            .handler(&topic, Bank::new(Outbox::new(Schema::default())))
            .dedupe_retention(Duration::from_secs(24 * 3600))
            .prune_interval(Duration::from_millis(200)),
    );
    assert!(wait_consumed(db.pool(), &group, 20, Duration::from_secs(60)).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let old: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM txbox.inbox_processed WHERE event_id LIKE 'old-%'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if old == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{old} expired ids left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.stop().await;
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM txbox.inbox_processed WHERE consumer_group = $1")
            .bind(&group)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(kept, 10 + 20, "recent and new ids are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_side_session_kills_mid_stream_lose_and_duplicate_nothing() {
    // What a Postgres restart does to a client: every session is terminated
    // by the server (SQLSTATE 57P01), open transactions roll back. The shared
    // test server cannot be stopped under parallel tests, so this test kills
    // every session of its own database, repeatedly, while the inbox works.
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("killed", 2).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(1200, 9);
    kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;

    let pool = PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(1))
        .connect(db.url())
        .await
        .unwrap();
    let h = RunningInbox::start(
        Inbox::builder(pool)
            .brokers(broker.bootstrap())
            .group_id(&group)
            .handler(&topic, Bank::new(Outbox::new(Schema::default())))
            .batch_size(2)
            .retry(fast_retry(2)),
    );
    let mut kills = 0;
    while consumed(db.pool(), &group).await < 1200 && kills < 20 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name <> 'txbox-test-observer') k",
        )
        .fetch_one(db.pool())
        .await
        .unwrap_or(0);
        if killed > 0 {
            kills += 1;
        }
    }
    assert!(
        kills >= 3,
        "sessions were killed mid-stream ({kills} times)"
    );
    assert!(
        wait_consumed(db.pool(), &group, 1200, Duration::from_secs(60)).await,
        "resumed after every kill"
    );
    h.stop().await;
    let dead = dead_letters(db.pool()).await;
    assert_eq!(dead, 0, "a killed session is not a poison message");
    Bank::assert_exactly_once(db.pool(), &deposits).await;
}

/// A handler that waits on a business row another transaction holds waits
/// at most the inbox's `lock_timeout`: its statement fails with 55P03 and
/// the transaction is retried without using up an attempt (one attempt and
/// `StopPartition` here, so a counted failure would stop the partition).
/// The test holds the row for 3 s and samples the inbox's lock waits: none
/// may last past the bound, and once the row is free every message is
/// applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_waits_are_bounded_and_retried_without_using_attempts() {
    let scene = Deposits::produce("lock-wait", 20, 2).await;
    let db = &scene.db;

    sqlx::query("INSERT INTO account (id, balance) VALUES ('acct-0', 0)")
        .execute(db.pool())
        .await
        .unwrap();
    let mut holder = db.pool().begin().await.unwrap();
    let holder_pid: i32 =
        sqlx::query_scalar("SELECT pg_backend_pid() FROM account WHERE id = 'acct-0' FOR UPDATE")
            .fetch_one(&mut *holder)
            .await
            .unwrap();

    let h = RunningInbox::start(
        scene
            .inbox()
            .lock_timeout(Duration::from_millis(300))
            .retry(fast_retry(1))
            .on_failure(FailureAction::StopPartition),
    );
    // Sample the waits on the held row for 3 s: (longest, samples waiting).
    let mut longest = Duration::ZERO;
    let mut waiting = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let wait_ms: Option<f64> = sqlx::query_scalar(
            // clock_timestamp(), not now(): a wait may begin after this
            // statement's transaction did (now() - state_change < 0).
            "SELECT max(greatest(extract(epoch FROM clock_timestamp() - state_change), 0) * 1000)::float8
             FROM pg_stat_activity
             WHERE datname = current_database() AND $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(holder_pid)
        .fetch_one(db.pool())
        .await
        .unwrap();
        if let Some(ms) = wait_ms {
            waiting += 1;
            longest = longest.max(Duration::from_secs_f64(ms / 1000.0));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(waiting > 0, "the inbox never waited on the held row");
    assert!(
        longest < Duration::from_millis(1500),
        "a lock wait lasted {longest:?}, past the 300 ms lock_timeout"
    );
    holder.commit().await.unwrap();

    assert!(
        scene.wait_processed(Duration::from_secs(30)).await,
        "every message applied once the row is free (no partition stopped)"
    );
    h.stop().await;
    assert_eq!(dead_letters(db.pool()).await, 0);
    Bank::assert_exactly_once(db.pool(), &scene.deposits).await;
}

/// A handler that keeps its transaction idle past the inbox's
/// `transaction_idle_timeout` (here a 1 s sleep against 300 ms) has its
/// session ended by PostgreSQL. That is the handler's failure, counted
/// against the attempts, not an outage to wait out forever: the message is
/// dead-lettered with an error that names the setting, the rest applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_idle_past_the_bound_fails_and_is_dead_lettered() {
    let scene = Deposits::produce("idle-handler", 10, 2).await;
    let (db, group) = (&scene.db, &scene.group);
    let h = RunningInbox::start(
        scene
            .inbox()
            .handler(
                &scene.topic,
                Bank::new(Outbox::new(Schema::default())).slow_at(4, Duration::from_secs(1)),
            )
            .transaction_idle_timeout(Duration::from_millis(300))
            .retry(fast_retry(2)),
    );
    assert!(
        scene.wait_processed(Duration::from_secs(60)).await,
        "consumed past every message"
    );
    h.stop().await;
    let dead: Vec<(i64, String, i32)> = sqlx::query_as(
        "SELECT \"offset\", error, attempts FROM txbox.inbox_dead_letters WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].0, dead[0].2), (4, 2), "{dead:?}");
    assert!(
        dead[0].1.contains("idle_in_transaction_session_timeout"),
        "the error names the bound: {}",
        dead[0].1
    );
    assert_eq!(
        scene.applied(None).await,
        9,
        "every other message applied once"
    );
}
