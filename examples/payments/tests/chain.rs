//! The example's chain end to end, as real processes against real
//! PostgreSQL and Apache Kafka: `payments-example` (the service, then
//! `--produce N`), `txbox-relay --mode exactly-once` and `ledger-example`.
//!
//! Every payment request settles once and has exactly one ledger row, in
//! order per account, with nothing dead-lettered ([`Report::problems`]).
//! Then the ledger is stopped, its positions are moved back to the start of
//! `payments.settled` and it is started again: it reads every settled
//! payment a second time, and its inbox drops each one as a duplicate (its
//! `/metrics` counts them) while the ledger keeps one row per payment.
//!
//! `txbox-relay` is another package's binary, so Cargo gives no
//! `CARGO_BIN_EXE_` for it: the test runs the one built next to this
//! package's binaries (`cargo test --workspace` builds it; otherwise
//! `cargo build -p txbox-relay` first), or `TXBOX_RELAY_BIN`.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use payments_example::check::{Chain, Report};
use payments_example::events::SETTLED;
use payments_example::{LEDGER_GROUP, LEDGER_SCHEMA};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use txbox::inbox::{PositionReset, ResetTo};
use txbox::Schema;
use txbox_testkit::process::Child;
use txbox_testkit::{free_port, kafka, unique_name, TestDb};

/// Payment requests per run: every account gets several, on every partition.
const N: u64 = 60;

const PAYMENTS: &str = env!("CARGO_BIN_EXE_payments-example");
const LEDGER: &str = env!("CARGO_BIN_EXE_ledger-example");

/// The `txbox-relay` binary: `TXBOX_RELAY_BIN`, or the one in the target
/// directory this package's binaries were built into.
fn relay_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("TXBOX_RELAY_BIN") {
        return bin.into();
    }
    let bin = Path::new(PAYMENTS)
        .with_file_name("txbox-relay")
        .with_extension(std::env::consts::EXE_EXTENSION);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build -p txbox-relay` first (`cargo test --workspace` \
         builds it), or set TXBOX_RELAY_BIN",
        bin.display()
    );
    bin
}

/// One run of the chain: a database with the schemas `txbox` (payments)
/// and `ledger`, topics of its own (`TXBOX_DEMO_TOPIC_PREFIX`).
struct Run {
    db: TestDb,
    brokers: String,
    prefix: String,
    ledger_schema: Schema,
}

impl Run {
    fn envs(&self) -> [(&str, &str); 2] {
        [
            ("TXBOX_DEMO_TOPIC_PREFIX", &self.prefix),
            ("RUST_LOG", "info,txbox=debug"),
        ]
    }

    /// A service binary with the connection options and `extra`.
    fn spawn(&self, bin: &str, extra: &[&str]) -> Child {
        let mut args = vec!["--database-url", self.db.url(), "--brokers", &self.brokers];
        args.extend_from_slice(extra);
        Child::spawn(Path::new(bin), &args, &self.envs())
    }

    /// The ledger service with its endpoint on `metrics`; returns once its
    /// inbox runs.
    async fn start_ledger(&self, metrics: &str) -> Child {
        let ledger = self.spawn(LEDGER, &["--metrics-listen", metrics]);
        started(&ledger, "ledger").await;
        ledger
    }

    async fn report(&self) -> Report {
        Report::read(Chain {
            payments: self.db.pool(),
            payments_schema: self.db.schema(),
            ledger: self.db.pool(),
            ledger_schema: &self.ledger_schema,
            ledger_group: LEDGER_GROUP,
        })
        .await
        .unwrap()
    }

    /// The ledger's stored positions on `payments.settled`, by partition.
    async fn ledger_positions(&self) -> Vec<(i32, i64)> {
        sqlx::query_as(&format!(
            "SELECT partition, next_offset FROM {} WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
            self.ledger_schema.table("inbox_offsets")
        ))
        .bind(LEDGER_GROUP)
        .bind(format!("{}{SETTLED}", self.prefix))
        .fetch_all(self.db.pool())
        .await
        .unwrap()
    }
}

/// Waits for a service's inbox to start.
async fn started(child: &Child, what: &str) {
    assert!(
        child
            .wait_for_stderr("inbox started", Duration::from_secs(60))
            .await,
        "the {what} service did not start:\n{}",
        child.stderr()
    );
}

/// Polls `probe` until it returns `Some`, for at most `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of `name{labels}` in the Prometheus text served at `addr`
/// (0 for a counter not recorded yet); `None` if nothing answers.
async fn scrape(addr: &str, name_and_labels: &str) -> Option<f64> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).await.ok()?;
    Some(
        response
            .lines()
            .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
            .unwrap_or(0.0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_payment_settles_once_and_has_exactly_one_ledger_entry() {
    txbox_testkit::init_tracing();
    let run = Run {
        db: TestDb::new().await,
        brokers: kafka().await.bootstrap().to_owned(),
        prefix: format!("{}.", unique_name("chain")),
        ledger_schema: Schema::new(LEDGER_SCHEMA).unwrap(),
    };
    // `txbox migrate --schema ledger`; the testkit migrated `txbox`.
    txbox::Migrator::new(run.ledger_schema.clone())
        .run(run.db.pool())
        .await
        .unwrap();
    let payments_metrics = format!("127.0.0.1:{}", free_port());
    let ledger_metrics = format!("127.0.0.1:{}", free_port());

    let mut payments = run.spawn(PAYMENTS, &["--metrics-listen", &payments_metrics]);
    let mut ledger = run.start_ledger(&ledger_metrics).await;
    started(&payments, "payments").await;
    let mut relay = Child::spawn(
        &relay_binary(),
        &[
            "--database-url",
            run.db.url(),
            "--brokers",
            &run.brokers,
            "--mode",
            "exactly-once",
            "--poll-interval",
            "50ms",
            "--position-topic",
            &unique_name("chain-positions"),
            "--transactional-id-prefix",
            &unique_name("chain"),
        ],
        &[("RUST_LOG", "info")],
    );
    let produced = tokio::process::Command::new(PAYMENTS)
        .args(["--database-url", run.db.url(), "--brokers", &run.brokers])
        .args(["--produce", &N.to_string()])
        .envs(run.envs())
        .output()
        .await
        .unwrap();
    assert!(produced.status.success(), "--produce: {produced:?}");

    let report = eventually(Duration::from_secs(120), "every ledger entry", || async {
        let r = run.report().await;
        (r.ledger_entries >= N as i64).then_some(r)
    })
    .await;
    // Anything applied twice would come after the last first application.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(run.report().await, report, "nothing more after a second");
    println!("{report}");
    assert_eq!(report.problems(N), Vec::<String>::new(), "{report}");
    let applied = r#"txbox_inbox_messages_total{outcome="applied"}"#;
    let duplicate = r#"txbox_inbox_messages_total{outcome="duplicate"}"#;
    assert_eq!(scrape(&payments_metrics, applied).await, Some(N as f64));
    assert_eq!(scrape(&ledger_metrics, applied).await, Some(N as f64));
    assert_eq!(
        scrape(&ledger_metrics, duplicate).await,
        Some(0.0),
        "none yet"
    );

    // Replay: the ledger reads every settled payment again.
    ledger.stop().await;
    let before = run.ledger_positions().await;
    assert_eq!(
        before.len(),
        3,
        "every partition of payments.settled was read"
    );
    let settled = format!("{}{SETTLED}", run.prefix);
    PositionReset::new(
        run.ledger_schema.clone(),
        LEDGER_GROUP,
        &settled,
        ResetTo::Offset(0),
    )
    .apply(run.db.pool())
    .await
    .unwrap();
    let mut ledger = run.start_ledger(&ledger_metrics).await;
    eventually(
        Duration::from_secs(60),
        "every settled payment read again, each dropped as a duplicate",
        || async { (scrape(&ledger_metrics, duplicate).await == Some(N as f64)).then_some(()) },
    )
    .await;
    assert_eq!(run.ledger_positions().await, before, "back where it was");
    assert_eq!(
        scrape(&ledger_metrics, applied).await,
        Some(0.0),
        "none applied"
    );
    let replayed = run.report().await;
    assert_eq!(replayed, report, "the replay changed nothing");

    for child in [&mut ledger, &mut relay, &mut payments] {
        child.stop().await;
    }
}
