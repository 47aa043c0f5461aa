//! Three inbox processes in one consumer group on Apache Kafka, under
//! load: one is SIGKILLed, one is frozen (SIGSTOP) past its session
//! timeout and then thawed, while deposits keep arriving. The group
//! rebalances around them; the thawed member's in-flight commit (if any) is
//! fenced. The business state must equal exactly one application of every
//! deposit.
//!
//! Run with both group protocols librdkafka speaks to Kafka 4: `classic`
//! (the client sets the session timeout: 6 s) and `consumer` (KIP-848; the
//! broker sets it: 10 s in `dev/kafka/server.properties`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, TestDb};
use txbox_tests::Bank;

const BIN: &str = env!("CARGO_BIN_EXE_inbox-chaos");
const DEPOSITS: usize = 3000;
const PARTITIONS: i32 = 6;

async fn processed(db: &TestDb, group: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM txbox.inbox_processed WHERE consumer_group = $1")
        .bind(group)
        .fetch_one(db.pool())
        .await
        .expect("processed count")
}

/// Waits until at least `n` deposits are processed.
async fn wait_for(db: &TestDb, group: &str, n: i64, members: &[&Child]) {
    assert!(
        Bank::wait_processed(db.pool(), group, n, Duration::from_secs(90)).await,
        "stuck at {} of {n}; members' logs:\n{}",
        processed(db, group).await,
        members
            .iter()
            .map(|m| m.stderr())
            .collect::<Vec<_>>()
            .join("\n-----\n")
    );
}

async fn kill_and_freeze_under_load(protocol: &str, session: Duration) {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    let db = TestDb::new().await;
    Bank::setup(db.pool()).await;
    let topic = broker.topic("group", PARTITIONS).await;
    let group = unique_name("bank");
    let deposits = Bank::deposits(DEPOSITS, 50);

    let session_ms = session.as_millis().to_string();
    let env = vec![
        ("TXBOX_DATABASE_URL", db.url()),
        ("TXBOX_KAFKA_BOOTSTRAP", broker.bootstrap()),
        ("CHAOS_TOPIC", topic.as_str()),
        ("CHAOS_GROUP", group.as_str()),
        ("CHAOS_BATCH", "20"),
        ("CHAOS_SESSION_MS", session_ms.as_str()),
        ("CHAOS_GROUP_PROTOCOL", protocol),
    ];
    let spawn = || Child::spawn(Path::new(BIN), &[], &env);
    let (mut killed, mut frozen, mut steady) = (spawn(), spawn(), spawn());

    // Deposits arrive in 60 slices, 350 ms apart: about 21 s, so that they
    // still arrive (on every partition) while a member is frozen. Each
    // partition's log end, as produced so far, is kept.
    let produced: Arc<Mutex<BTreeMap<i32, i64>>> = Arc::default();
    let producer = {
        let (bootstrap, topic) = (broker.bootstrap().to_owned(), topic.clone());
        let records = Bank::records(&deposits);
        let produced = produced.clone();
        tokio::spawn(async move {
            for slice in records.chunks(DEPOSITS / 60) {
                let written =
                    txbox_testkit::kafka::produce(&bootstrap, &topic, slice.to_vec()).await;
                {
                    let mut ends = produced.lock().expect("produced");
                    for (partition, offset) in written {
                        let end = ends.entry(partition).or_default();
                        *end = (*end).max(offset + 1);
                    }
                }
                tokio::time::sleep(Duration::from_millis(350)).await;
            }
        })
    };

    wait_for(&db, &group, 300, &[&killed, &frozen, &steady]).await;
    killed.kill().await;
    wait_for(&db, &group, 900, &[&frozen, &steady]).await;
    frozen.freeze();
    // Past the session timeout the group expels the silent member and hands
    // its partitions to the last one standing, which must then process
    // everything produced so far, on every partition, while the frozen
    // member is still frozen (its open transactions ended by PostgreSQL).
    tokio::time::sleep(session + Duration::from_secs(1)).await;
    let ends = produced.lock().expect("produced").clone();
    let target: i64 = ends.values().sum();
    assert!(
        ends.len() == PARTITIONS as usize && target < DEPOSITS as i64,
        "production ended before the check, or left a partition out: {ends:?}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stored: BTreeMap<i32, i64> = txbox_tests::positions(db.pool(), &group)
            .await
            .into_iter()
            .map(|(partition, next, _)| (partition, next))
            .collect();
        let behind: Vec<(i32, i64, i64)> = ends
            .iter()
            .map(|(p, end)| (*p, stored.get(p).copied().unwrap_or(0), *end))
            .filter(|(_, at, end)| at < end)
            .collect();
        if behind.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "partitions not taken over while a member was frozen, as (partition, stored, \
             produced): {behind:?}\n{}",
            steady.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    frozen.thaw();
    producer.await.expect("producer");
    wait_for(&db, &group, DEPOSITS as i64, &[&frozen, &steady]).await;
    // Time for a wrongly admitted late commit of the thawed member to land.
    tokio::time::sleep(Duration::from_secs(2)).await;

    frozen.terminate();
    steady.terminate();
    assert_eq!(frozen.wait_within(Duration::from_secs(30)).await, Some(0));
    assert_eq!(steady.wait_within(Duration::from_secs(30)).await, Some(0));
    println!("{protocol}: {target} processed while a member was frozen; all {DEPOSITS} processed");
    Bank::assert_exactly_once(db.pool(), &deposits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_protocol_member_killed_and_member_frozen_under_load() {
    kill_and_freeze_under_load("classic", Duration::from_secs(6)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_protocol_member_killed_and_member_frozen_under_load() {
    kill_and_freeze_under_load("consumer", Duration::from_secs(10)).await;
}
