//! A small bank used by txbox's end-to-end tests.
//!
//! Deposits arrive on a topic as JSON `{"account": "...", "amount": n}` with a
//! `ce_id` header. The handler adds the amount to the account, appends one
//! row to `effects` (no unique constraint: a second application would show
//! up as a second row; `applied_by` is the writing session's
//! `application_name`, so a test can tell which process applied it), and
//! stages a `BalanceChanged` event in the outbox.
//! [`Bank::check_exactly_once`] compares the database with the deposits
//! that were produced.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use txbox::inbox::{
    BatchError, BatchHandler, Handler, HandlerError, InboxBuilder, InboxMessage, Tx,
};
use txbox::{Outbox, OutboxEvent};
use txbox_testkit::kafka::Record;

/// The topic [`Bank`] stages its events to unless told otherwise.
pub const BALANCE_CHANGED: &str = "balance-changed";

/// The account whose deposits always fail (retryable), to test retries
/// and dead letters.
pub const ALWAYS_FAILS: &str = "always-fails";

/// A deposit message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Deposit {
    /// Account id.
    pub account: String,
    /// Amount.
    pub amount: i64,
}

/// The bank's tables and handler.
#[derive(Debug, Clone)]
pub struct Bank {
    outbox: Outbox,
    /// The topic of the staged `BalanceChanged` events.
    topic: String,
    /// The message whose handler sleeps ([`Bank::slow_at`],
    /// [`Bank::slow_once_at`]).
    slow: Option<Slow>,
    /// Sleep inside every message's transaction, to keep a stream flowing.
    pace: Option<Duration>,
}

/// A message whose handler sleeps, announcing
/// `TXBOX_CHAOS_IN_HANDLER <offset>` on stderr first.
#[derive(Debug, Clone)]
struct Slow {
    offset: i64,
    sleep: Duration,
    /// Set once it slept, when only its first attempt is slow.
    slept: Option<Arc<AtomicBool>>,
}

impl Bank {
    /// A bank staging into `outbox`.
    pub fn new(outbox: Outbox) -> Self {
        Bank {
            outbox,
            topic: BALANCE_CHANGED.to_owned(),
            slow: None,
            pace: None,
        }
    }

    /// Stages its events to `topic` instead of [`BALANCE_CHANGED`] (a
    /// topic of the test's own, for a relay to publish to).
    pub fn publishing_to(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// Sleeps `d` inside every message's transaction, so a stream is still
    /// flowing (with transactions open) when a test breaks something.
    pub fn paced(mut self, d: Duration) -> Self {
        self.pace = Some(d);
        self
    }

    /// Sleeps `d` inside the transaction of the message at `offset`, at
    /// every attempt.
    pub fn slow_at(mut self, offset: i64, d: Duration) -> Self {
        self.slow = Some(Slow {
            offset,
            sleep: d,
            slept: None,
        });
        self
    }

    /// Sleeps `d` inside the transaction of the message at `offset`, at its
    /// first attempt only: a retry runs at full speed.
    pub fn slow_once_at(mut self, offset: i64, d: Duration) -> Self {
        self.slow = Some(Slow {
            offset,
            sleep: d,
            slept: Some(Arc::new(AtomicBool::new(false))),
        });
        self
    }

    /// Creates the bank's tables.
    pub async fn setup(pool: &PgPool) {
        sqlx::raw_sql(
            "CREATE TABLE account (id text PRIMARY KEY, balance bigint NOT NULL DEFAULT 0);
             CREATE TABLE effects (event_id text NOT NULL, account text NOT NULL, amount bigint NOT NULL,
                                   applied_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                                   applied_by text DEFAULT current_setting('application_name'));",
        )
        .execute(pool)
        .await
        .expect("bank tables");
    }

    /// `n` deposits over `accounts` accounts, each with a unique `ce_id`.
    pub fn deposits(n: usize, accounts: usize) -> Vec<(String, Deposit)> {
        (0..n)
            .map(|i| {
                (
                    format!("dep-{}-{i}", uuid::Uuid::new_v4().simple()),
                    Deposit {
                        account: format!("acct-{}", i % accounts),
                        amount: (i as i64 % 7) + 1,
                    },
                )
            })
            .collect()
    }

    /// Kafka records for deposits (keyed by account).
    pub fn records(deposits: &[(String, Deposit)]) -> Vec<Record> {
        deposits
            .iter()
            .map(|(id, d)| {
                Record::new(serde_json::to_vec(d).expect("json"))
                    .key(d.account.clone())
                    .header("ce_id", id.clone())
            })
            .collect()
    }

    async fn apply(
        &self,
        tx: &mut Tx,
        msg: &InboxMessage,
        d: &Deposit,
    ) -> Result<(), HandlerError> {
        if d.account == ALWAYS_FAILS {
            return Err(HandlerError::retryable(format!(
                "account {ALWAYS_FAILS} is unavailable"
            )));
        }
        if let Some(d) = self.pace {
            tokio::time::sleep(d).await;
        }
        if let Some(slow) = &self.slow {
            // `&&` keeps other offsets from using up the one slow attempt.
            if msg.offset() == slow.offset
                && slow
                    .slept
                    .as_ref()
                    .is_none_or(|slept| !slept.swap(true, Ordering::SeqCst))
            {
                eprintln!("TXBOX_CHAOS_IN_HANDLER {}", slow.offset);
                tokio::time::sleep(slow.sleep).await;
            }
        }
        sqlx::query(
            "INSERT INTO account (id, balance) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET balance = account.balance + EXCLUDED.balance",
        )
        .bind(&d.account)
        .bind(d.amount)
        .execute(&mut **tx)
        .await?;
        sqlx::query("INSERT INTO effects (event_id, account, amount) VALUES ($1, $2, $3)")
            .bind(msg.event_id())
            .bind(&d.account)
            .bind(d.amount)
            .execute(&mut **tx)
            .await?;
        let event = OutboxEvent::json(
            self.topic.clone(),
            &serde_json::json!({"account": d.account, "delta": d.amount}),
        )
        .map_err(HandlerError::permanent)?
        .key(d.account.clone())
        .event_type("BalanceChanged");
        self.outbox
            .stage(tx, event)
            .await
            .map_err(HandlerError::retryable)?;
        Ok(())
    }

    /// Final-state check: every deposit applied exactly once, balances equal
    /// the sums, one outbox event per deposit (to [`BALANCE_CHANGED`], none
    /// pruned). Returns a description of every violation (empty when
    /// exactly-once held).
    pub async fn check_exactly_once(pool: &PgPool, deposits: &[(String, Deposit)]) -> Vec<String> {
        let mut problems = Self::check_applied_once(pool, deposits).await;
        let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(pool)
            .await
            .expect("effects");
        let staged: i64 = sqlx::query_scalar("SELECT count(*) FROM txbox.outbox WHERE topic = $1")
            .bind(BALANCE_CHANGED)
            .fetch_one(pool)
            .await
            .expect("outbox");
        if staged != applied {
            problems.push(format!("{staged} outbox events for {applied} effects"));
        }
        problems
    }

    /// The database side of [`check_exactly_once`](Self::check_exactly_once),
    /// without the outbox: every deposit applied exactly once, balances
    /// equal the sums, no event id processed twice.
    pub async fn check_applied_once(pool: &PgPool, deposits: &[(String, Deposit)]) -> Vec<String> {
        let mut problems = Vec::new();
        let effects: Vec<(String, i64)> =
            sqlx::query_as("SELECT event_id, count(*) FROM effects GROUP BY event_id")
                .fetch_all(pool)
                .await
                .expect("effects");
        let counts: BTreeMap<String, i64> = effects.into_iter().collect();
        let mut expected: BTreeMap<String, i64> = BTreeMap::new();
        for (id, d) in deposits {
            if d.account == ALWAYS_FAILS {
                continue;
            }
            *expected.entry(d.account.clone()).or_default() += d.amount;
            match counts.get(id).copied().unwrap_or(0) {
                1 => {}
                0 => problems.push(format!("lost: {id}")),
                n => problems.push(format!("applied {n} times: {id}")),
            }
        }
        let balances: BTreeMap<String, i64> = sqlx::query_as("SELECT id, balance FROM account")
            .fetch_all(pool)
            .await
            .expect("balances")
            .into_iter()
            .collect();
        if balances != expected {
            problems.push(format!(
                "balances differ: got {balances:?}, want {expected:?}"
            ));
        }
        let dup_ids: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT event_id FROM txbox.inbox_processed GROUP BY consumer_group, event_id HAVING count(*) > 1) d",
        )
        .fetch_one(pool)
        .await
        .expect("processed");
        if dup_ids > 0 {
            problems.push(format!("{dup_ids} event ids processed more than once"));
        }
        problems
    }

    /// [`check_exactly_once`](Self::check_exactly_once), asserted.
    ///
    /// # Panics
    /// With every violation found.
    pub async fn assert_exactly_once(pool: &PgPool, deposits: &[(String, Deposit)]) {
        let problems = Self::check_exactly_once(pool, deposits).await;
        assert!(problems.is_empty(), "exactly-once violated: {problems:#?}");
    }

    /// Waits until `n` event ids are recorded for `group` (processed or
    /// dead-lettered). Returns false on timeout.
    pub async fn wait_processed(pool: &PgPool, group: &str, n: i64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM txbox.inbox_processed WHERE consumer_group = $1",
            )
            .bind(group)
            .fetch_one(pool)
            .await
            .unwrap_or(0);
            if done >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

#[async_trait]
impl Handler for Bank {
    async fn handle(&self, tx: &mut Tx, msg: &InboxMessage) -> Result<(), HandlerError> {
        let d: Deposit = msg.json()?;
        self.apply(tx, msg, &d).await
    }
}

/// The same bank as a batch handler (per-message statements in one
/// transaction; the index of a failing message is reported).
#[derive(Debug, Clone)]
pub struct BatchBank(pub Arc<Bank>);

#[async_trait]
impl BatchHandler for BatchBank {
    async fn handle_batch(&self, tx: &mut Tx, messages: &[InboxMessage]) -> Result<(), BatchError> {
        for (i, msg) in messages.iter().enumerate() {
            let d: Deposit = msg.json().map_err(|e| BatchError::at(i, e))?;
            self.0
                .apply(tx, msg, &d)
                .await
                .map_err(|e| BatchError::at(i, e))?;
        }
        Ok(())
    }
}

/// An inbox running in this process until [`RunningInbox::stop`].
#[derive(Debug)]
pub struct RunningInbox {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<txbox::Result<()>>,
}

impl RunningInbox {
    /// Builds the inbox and runs it on a task.
    ///
    /// # Panics
    /// If the configuration is invalid.
    pub fn start(builder: InboxBuilder) -> Self {
        let stop = CancellationToken::new();
        let s = stop.clone();
        let inbox = builder.build().expect("valid inbox config");
        let task = tokio::spawn(async move { inbox.run(async move { s.cancelled().await }).await });
        RunningInbox { stop, task }
    }

    /// True while its task has not ended (with or without an error).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Asks it to stop and waits.
    ///
    /// # Panics
    /// If it does not stop within 30 s or did not run cleanly.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("inbox stops")
            .expect("inbox task")
            .expect("inbox ran without error");
    }
}

/// Messages `group` has consumed: the sum of its partitions' next offsets.
pub async fn consumed(pool: &PgPool, group: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(next_offset), 0)::bigint FROM txbox.inbox_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await
    .expect("inbox offsets")
}

/// `group`'s running totals over its partitions, as stored with the
/// effects: (applied, duplicates, dead-lettered).
pub async fn totals(pool: &PgPool, group: &str) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT COALESCE(sum(applied), 0)::bigint, COALESCE(sum(duplicates), 0)::bigint,
                COALESCE(sum(dead_lettered), 0)::bigint
           FROM txbox.inbox_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await
    .expect("inbox totals")
}

/// Rows in the inbox's dead-letter table (all groups).
pub async fn dead_letters(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM txbox.inbox_dead_letters")
        .fetch_one(pool)
        .await
        .expect("inbox dead letters")
}

/// Waits until [`consumed`] reaches `want`. Returns false on timeout.
pub async fn wait_consumed(pool: &PgPool, group: &str, want: i64, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if consumed(pool, group).await >= want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// An inbox for `group` on `topic` whose handler is a [`Bank`] staging into
/// the default schema's outbox.
pub fn bank_inbox(pool: &PgPool, bootstrap: &str, group: &str, topic: &str) -> InboxBuilder {
    txbox::inbox::Inbox::builder(pool.clone())
        .brokers(bootstrap)
        .group_id(group)
        .handler(topic, Bank::new(Outbox::new(txbox::Schema::default())))
}

/// `(partition, next_offset, epoch)` of each stored position of `group`.
pub async fn positions(pool: &PgPool, group: &str) -> Vec<(i32, i64, i64)> {
    sqlx::query_as(
        "SELECT partition, next_offset, epoch FROM txbox.inbox_offsets
         WHERE consumer_group = $1 ORDER BY partition",
    )
    .bind(group)
    .fetch_all(pool)
    .await
    .expect("positions")
}

/// Waits up to 60 s until `partition` of `group` is stored at
/// `next_offset`. Returns false on timeout.
pub async fn wait_position(pool: &PgPool, group: &str, partition: i32, next_offset: i64) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if positions(pool, group)
            .await
            .iter()
            .any(|p| p.0 == partition && p.1 == next_offset)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A one-partition `topic` at `before` is consumed (30 deposits), then
/// `recreate` deletes it and creates it again, returning where it now is.
/// Its new log holds 10 new deposits and 5 of the old ones published again
/// (same event ids), at offsets 0 to 14, below the stored position 30. The
/// inbox must follow the new log to its end and apply the new deposits
/// once, the republished ones not again. Needs [`Bank::setup`] done.
///
/// # Panics
/// On any violation.
pub async fn recreated_topic_drill(
    pool: &PgPool,
    before: &str,
    topic: &str,
    recreate: impl AsyncFnOnce() -> String,
) {
    let group = txbox_testkit::unique_name("bank");
    let old = Bank::deposits(30, 5);
    txbox_testkit::kafka::produce(before, topic, Bank::records(&old)).await;
    let inbox = RunningInbox::start(bank_inbox(pool, before, &group, topic));
    assert!(
        wait_position(pool, &group, 0, 30).await,
        "first log consumed"
    );
    inbox.stop().await;

    let after = recreate().await;
    let new = Bank::deposits(10, 5);
    let mut records = Bank::records(&new);
    records.extend(Bank::records(&old[..5]));
    txbox_testkit::kafka::produce(&after, topic, records).await;

    let inbox = RunningInbox::start(bank_inbox(pool, &after, &group, topic));
    // Skipping the new log as "already consumed" would leave the position
    // at 30 and the new deposits unapplied.
    assert!(
        wait_position(pool, &group, 0, 15).await,
        "the position follows the new log to its end: {:?}",
        positions(pool, &group).await
    );
    inbox.stop().await;
    let all: Vec<_> = old.into_iter().chain(new).collect();
    Bank::assert_exactly_once(pool, &all).await;
}

/// One test's deposits on a topic of their own, already produced, for one
/// consumer group, with the bank's tables in a database of its own.
#[derive(Debug)]
pub struct Deposits {
    /// The shared broker.
    pub broker: &'static txbox_testkit::Broker,
    /// The test's database.
    pub db: txbox_testkit::TestDb,
    /// The topic (one partition).
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// What was produced, in order.
    pub deposits: Vec<(String, Deposit)>,
}

impl Deposits {
    /// Produces `n` deposits over `accounts` accounts to a new one-partition
    /// topic named after `name`.
    pub async fn produce(name: &str, n: usize, accounts: usize) -> Deposits {
        txbox_testkit::init_tracing();
        let broker = txbox_testkit::kafka().await;
        let db = txbox_testkit::TestDb::new().await;
        Bank::setup(db.pool()).await;
        let topic = broker.topic(name, 1).await;
        let group = txbox_testkit::unique_name("bank");
        let deposits = Bank::deposits(n, accounts);
        txbox_testkit::kafka::produce(broker.bootstrap(), &topic, Bank::records(&deposits)).await;
        Deposits {
            broker,
            db,
            topic,
            group,
            deposits,
        }
    }

    /// An inbox on the topic for the group, with a [`Bank`] handler.
    pub fn inbox(&self) -> InboxBuilder {
        bank_inbox(
            self.db.pool(),
            self.broker.bootstrap(),
            &self.group,
            &self.topic,
        )
    }

    /// Effects applied, all or those by the sessions named `by`.
    pub async fn applied(&self, by: Option<&str>) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE $1::text IS NULL OR applied_by = $1")
            .bind(by)
            .fetch_one(self.db.pool())
            .await
            .expect("effects")
    }

    /// Waits until every deposit's event id is recorded for the group
    /// (processed or dead-lettered). Returns false on timeout.
    pub async fn wait_processed(&self, within: Duration) -> bool {
        Bank::wait_processed(
            self.db.pool(),
            &self.group,
            self.deposits.len() as i64,
            within,
        )
        .await
    }
}
