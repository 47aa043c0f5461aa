//! The crash-point sweep: every crash point compiled into txbox and
//! txbox-relay ([`txbox::crash::POINTS`], checked against the sources by a
//! unit test of the txbox crate) is hit in turn by a real process, which is
//! SIGKILLed there, restarted without the point, and run to completion.
//!
//! The scenario, one fresh database per point and one shared broker: 30
//! deposits on a two-partition topic; an inbox service process
//! (`inbox-chaos`, the bank of `txbox_tests`) consumes them in batches of
//! 10, applying each to the bank's tables and staging a `BalanceChanged`
//! event in the outbox in the same transaction; at the same time a relay
//! process (`relay-chaos`, the `txbox-relay` command line) publishes the
//! outbox in exactly-once mode, 10 rows per Kafka transaction, and prunes
//! published rows 2 per statement. The point's process is started with
//! `FAILPOINTS=<point>=1*off->return`, so it dies on its second pass there,
//! with earlier batches committed; the other process runs on. A trigger
//! copies every committed outbox row's event id to `staged_audit`, so the
//! check still knows them after pruning deleted them.
//!
//! After the restart, each point's run must end with:
//! - every deposit applied exactly once (effects, balances, no event id
//!   processed twice: [`Bank::check_applied_once`]);
//! - one outbox row committed per deposit, and each visible exactly once
//!   to a `read_committed` consumer of the output topic, nothing else
//!   (no loss, no duplicate);
//! - nothing unpublished behind the relay's position, no dead letter in
//!   the inbox or the relay;
//! - both processes stopping cleanly on SIGTERM.
//!
//! The sweep fails if a listed point has no entry in [`WINDOWS`], an entry
//! names a point that no longer exists, or a point is not reached (the
//! timeout names it).
//!
//! What the windows prove:
//! - before the side effect (`inbox.before_business_write`,
//!   `outbox.before_stage`, `relay.after_produce`): nothing of the batch
//!   is visible, and the restart applies or publishes it once;
//! - after the side effect, before the commit
//!   (`inbox.after_business_write`, `inbox.before_commit`: effects and the
//!   fenced offset advance written, not committed;
//!   `relay.before_kafka_commit`: records written to Kafka in an open
//!   transaction): the open transaction is rolled back or aborted, and
//!   the restart does it again, once;
//! - after the commit (`inbox.after_commit`, `relay.after_db_position`):
//!   the restart neither repeats nor skips the committed batch;
//! - between the Kafka commit and the DB commit in the relay
//!   (`relay.after_kafka_commit`): the batch is on Kafka, the position in
//!   PostgreSQL behind it; the restarted relay recovers the position from
//!   the position topic and does not publish the batch again;
//! - in the middle of a prune round (`relay.during_prune`): what was
//!   deleted was published, nothing unpublished is deleted.
//!
//! The inbox's points are swept a second time with `Dedupe::OffsetsOnly`
//! (no event-id rows): there the stored position alone must keep every
//! redelivery after the restart from being applied again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use txbox_testkit::kafka::{consume_all, ConsumeOptions};
use txbox_testkit::process::Child;
use txbox_testkit::{kafka, unique_name, Broker, TestDb};
use txbox_tests::{dead_letters, Bank, Deposit};

const INBOX: &str = env!("CARGO_BIN_EXE_inbox-chaos");
const RELAY: &str = env!("CARGO_BIN_EXE_relay-chaos");

/// Deposits per point.
const N: usize = 30;
/// Messages per inbox transaction, rows per relay transaction.
const BATCH: &str = "10";
/// Bounds each wait (for the crash point, for completion).
const WAIT: Duration = Duration::from_secs(60);

/// The process a crash point is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    /// The inbox service (`inbox.*`, and `outbox.*`: its handler stages).
    Inbox,
    /// The relay.
    Relay,
}

/// One crash point of the sweep: which process of the scenario reaches it,
/// and where that is.
#[derive(Debug)]
struct Window {
    point: &'static str,
    victim: Victim,
    window: &'static str,
}

/// Every point of [`txbox::crash::POINTS`], and how the scenario reaches it.
const WINDOWS: &[Window] = &[
    Window {
        point: "inbox.before_business_write",
        victim: Victim::Inbox,
        window: "inbox transaction open, nothing written",
    },
    Window {
        point: "outbox.before_stage",
        victim: Victim::Inbox,
        window: "inside the handler: effects written, the event not yet staged",
    },
    Window {
        point: "inbox.after_business_write",
        victim: Victim::Inbox,
        window: "effects and outbox rows written, offset not advanced, not committed",
    },
    Window {
        point: "inbox.before_commit",
        victim: Victim::Inbox,
        window: "fenced offset advance written, not committed",
    },
    Window {
        point: "inbox.after_commit",
        victim: Victim::Inbox,
        window: "batch committed, the next not begun",
    },
    Window {
        point: "relay.after_produce",
        victim: Victim::Relay,
        window: "half a batch handed to the transactional producer",
    },
    Window {
        point: "relay.before_kafka_commit",
        victim: Victim::Relay,
        window: "whole batch and position written to Kafka, transaction open",
    },
    Window {
        point: "relay.after_kafka_commit",
        victim: Victim::Relay,
        window: "Kafka transaction committed, position not yet in PostgreSQL",
    },
    Window {
        point: "relay.after_db_position",
        victim: Victim::Relay,
        window: "position written to PostgreSQL, the next batch not begun",
    },
    Window {
        point: "relay.during_prune",
        victim: Victim::Relay,
        window: "some of a prune round's statements done (prune batch 2)",
    },
];

/// One point's database, topics and processes' settings.
struct Scenario {
    db: TestDb,
    bootstrap: String,
    input: String,
    output: String,
    group: String,
    position_topic: String,
    txn_prefix: String,
    deposits: Vec<(String, Deposit)>,
    /// The inbox's `CHAOS_DEDUPE`.
    dedupe: &'static str,
}

impl Scenario {
    async fn new(broker: &Broker, dedupe: &'static str) -> Scenario {
        let db = TestDb::new().await;
        Bank::setup(db.pool()).await;
        sqlx::raw_sql(
            "CREATE TABLE staged_audit (event_id uuid NOT NULL, topic text NOT NULL);
             CREATE FUNCTION audit_staged() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO staged_audit VALUES (NEW.event_id, NEW.topic); RETURN NULL; END $$;
             CREATE TRIGGER audit_staged AFTER INSERT ON txbox.outbox
                FOR EACH ROW EXECUTE FUNCTION audit_staged();",
        )
        .execute(db.pool())
        .await
        .expect("audit trigger");
        let input = broker.topic("sweep-deposits", 2).await;
        let output = broker.topic("sweep-balances", 2).await;
        let deposits = Bank::deposits(N, 7);
        kafka::produce(broker.bootstrap(), &input, Bank::records(&deposits)).await;
        Scenario {
            db,
            bootstrap: broker.bootstrap().to_owned(),
            input,
            output,
            group: unique_name("sweep"),
            position_topic: unique_name("positions"),
            txn_prefix: unique_name("txn"),
            deposits,
            dedupe,
        }
    }

    fn spawn(&self, victim: Victim, failpoints: Option<&str>) -> Child {
        let mut envs = vec![("RUST_LOG", "warn,txbox=info,txbox_relay=info")];
        if let Some(fp) = failpoints {
            envs.push(("FAILPOINTS", fp));
        }
        match victim {
            Victim::Inbox => {
                envs.extend([
                    ("TXBOX_DATABASE_URL", self.db.url()),
                    ("TXBOX_KAFKA_BOOTSTRAP", &self.bootstrap),
                    ("CHAOS_TOPIC", &self.input),
                    ("CHAOS_GROUP", &self.group),
                    ("CHAOS_BATCH", BATCH),
                    ("CHAOS_SESSION_MS", "2000"),
                    ("CHAOS_OUTBOX_TOPIC", &self.output),
                    ("CHAOS_DEDUPE", self.dedupe),
                ]);
                Child::spawn(Path::new(INBOX), &[], &envs)
            }
            Victim::Relay => {
                let instance = unique_name("sweep-relay");
                let args = [
                    "--database-url",
                    self.db.url(),
                    "--brokers",
                    &self.bootstrap,
                    "--mode",
                    "exactly-once",
                    "--batch-size",
                    BATCH,
                    "--poll-interval",
                    "50ms",
                    "--lease-ttl",
                    "2s",
                    "--instance",
                    &instance,
                    "--position-topic",
                    &self.position_topic,
                    "--transactional-id-prefix",
                    &self.txn_prefix,
                    "--prune-batch",
                    "2",
                    "--prune-interval",
                    "100ms",
                ];
                Child::spawn(Path::new(RELAY), &args, &envs)
            }
        }
    }

    /// Waits until every deposit is processed and every staged row
    /// published.
    async fn wait_done(&self, inbox: &Child, relay: &Child) {
        let pool = self.db.pool();
        let deadline = Instant::now() + WAIT;
        loop {
            // The group's total of applied messages, kept in its positions'
            // rows (event-id rows are not written with offsets-only dedupe).
            let processed: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(applied), 0)::int8 FROM txbox.inbox_offsets
                 WHERE consumer_group = $1",
            )
            .bind(&self.group)
            .fetch_one(pool)
            .await
            .expect("applied total");
            // Applied with the effects and their events: all staged, all
            // published. (The checks count what is missing.)
            if processed >= N as i64 && unpublished(pool).await == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not done in {WAIT:?}: {processed} processed, {} staged, {} unpublished\n\
                 inbox stderr:\n{}\nrelay stderr:\n{}",
                audited(pool).await.len(),
                unpublished(pool).await,
                inbox.stderr(),
                relay.stderr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every guarantee, after both processes stopped.
    async fn check(&self, point: &str) {
        let pool = self.db.pool();
        let problems = Bank::check_applied_once(pool, &self.deposits).await;
        assert!(problems.is_empty(), "{point}: {problems:#?}");

        let staged = audited(pool).await;
        let distinct: BTreeSet<&String> = staged.iter().collect();
        assert_eq!(
            (staged.len(), distinct.len()),
            (N, N),
            "{point}: one committed outbox row per deposit"
        );

        let seen = consume_all(
            &self.bootstrap,
            &self.output,
            ConsumeOptions {
                read_committed: true,
                expect: N,
                timeout: Duration::from_secs(30),
            },
        )
        .await;
        let mut copies: BTreeMap<String, usize> = BTreeMap::new();
        for record in &seen {
            let id = record
                .header("ce_id")
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            *copies.entry(id).or_default() += 1;
        }
        let missing: Vec<_> = distinct
            .iter()
            .filter(|id| !copies.contains_key(id.as_str()))
            .collect();
        let duplicated: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).collect();
        let unexpected: Vec<_> = copies.keys().filter(|id| !distinct.contains(id)).collect();
        assert!(
            missing.is_empty() && duplicated.is_empty() && unexpected.is_empty(),
            "{point}: a read_committed consumer saw {} records; missing {missing:?}, \
             duplicated {duplicated:?}, not staged {unexpected:?}",
            seen.len()
        );

        assert_eq!(unpublished(pool).await, 0, "{point}: unpublished rows");
        assert_eq!(dead_letters(pool).await, 0, "{point}: inbox dead letters");
        let relay_dead: i64 = sqlx::query_scalar("SELECT count(*) FROM txbox.relay_dead_letters")
            .fetch_one(pool)
            .await
            .expect("relay dead letters");
        assert_eq!(relay_dead, 0, "{point}: relay dead letters");
    }
}

/// Event ids of every committed outbox row, pruned or not.
async fn audited(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT event_id::text FROM staged_audit")
        .fetch_all(pool)
        .await
        .expect("staged_audit")
}

/// Outbox rows of stream 0 behind no recorded position.
async fn unpublished(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM txbox.outbox o
           LEFT JOIN txbox.relay_streams r ON r.stream = o.stream
          WHERE o.stream = 0
            AND (r.stream IS NULL OR (o.txid, o.id) > (r.position_txid, r.position_id))",
    )
    .fetch_one(pool)
    .await
    .expect("unpublished rows")
}

/// Kills `w.victim` at `w.point`, restarts it, and checks every guarantee.
async fn drill(broker: &Broker, w: &Window, dedupe: &'static str) {
    let s = Scenario::new(broker, dedupe).await;
    let armed = format!("{}=1*off->return", w.point);
    let (mut victim, other) = (
        s.spawn(w.victim, Some(&armed)),
        s.spawn(
            match w.victim {
                Victim::Inbox => Victim::Relay,
                Victim::Relay => Victim::Inbox,
            },
            None,
        ),
    );
    victim.kill_at(w.point, WAIT).await;
    let victim = s.spawn(w.victim, None);
    let (mut inbox, mut relay) = match w.victim {
        Victim::Inbox => (victim, other),
        Victim::Relay => (other, victim),
    };
    s.wait_done(&inbox, &relay).await;
    inbox.stop().await;
    relay.stop().await;
    s.check(w.point).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_keeps_exactly_once() {
    txbox_testkit::init_tracing();
    let listed: BTreeSet<&str> = txbox::crash::POINTS.iter().copied().collect();
    let swept: BTreeSet<&str> = WINDOWS.iter().map(|w| w.point).collect();
    assert_eq!(
        listed, swept,
        "WINDOWS must name every point of txbox::crash::POINTS, and only those"
    );
    for w in WINDOWS {
        let expected = if w.point.starts_with("relay.") {
            Victim::Relay
        } else {
            Victim::Inbox
        };
        assert_eq!(w.victim, expected, "{}: in the wrong process", w.point);
    }
    let broker = kafka().await;
    let started = Instant::now();
    for w in WINDOWS {
        let t = Instant::now();
        drill(broker, w, "event-ids").await;
        println!(
            "{:<28} {:?} killed, restarted, exactly once ({:.1} s): {}",
            w.point,
            w.victim,
            t.elapsed().as_secs_f64(),
            w.window
        );
    }
    println!(
        "{} crash points swept in {:.1} s",
        WINDOWS.len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_crash_points_keep_exactly_once_with_offsets_only_dedupe() {
    txbox_testkit::init_tracing();
    let broker = kafka().await;
    for w in WINDOWS.iter().filter(|w| w.victim == Victim::Inbox) {
        let t = Instant::now();
        drill(broker, w, "offsets-only").await;
        println!(
            "{:<28} killed, restarted, exactly once with offsets only ({:.1} s): {}",
            w.point,
            t.elapsed().as_secs_f64(),
            w.window
        );
    }
}
