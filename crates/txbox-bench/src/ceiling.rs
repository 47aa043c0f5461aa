//! The database's own limit for the inbox's SQL, from a sqlx loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use txbox::inbox::SteadyStateSql;

use crate::Shape;

/// A scratch database with txbox migrated (and, after
/// [`BenchDb::add_ceiling`], the ceiling's tables), dropped by
/// [`BenchDb::drop_db`].
pub(crate) struct BenchDb {
    pub name: String,
    pub pool: PgPool,
    pub url: String,
    pub options: sqlx::postgres::PgConnectOptions,
    admin_url: String,
}

impl BenchDb {
    /// Creates the database on the server of `admin_url` and migrates it.
    pub(crate) async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("txbox_bench_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(admin_url).await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await?;
        let url = match admin_url.rfind('/') {
            Some(i) => format!("{}/{name}", &admin_url[..i]),
            None => anyhow::bail!("database URL has no database part"),
        };
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .test_before_acquire(false)
            .connect(&url)
            .await?;
        txbox::Migrator::new(txbox::Schema::default())
            .run(&pool)
            .await?;
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        Ok(BenchDb {
            name,
            pool,
            url,
            options,
            admin_url: admin_url.to_owned(),
        })
    }

    /// A second pool on the same database, as another service instance
    /// would have.
    pub(crate) async fn pool_like(&self) -> anyhow::Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(16)
            .test_before_acquire(false)
            .connect(&self.url)
            .await?)
    }

    /// Adds the tables of the ceiling runs and the inbox's handler.
    pub(crate) async fn add_ceiling(&self) -> anyhow::Result<()> {
        // The pg-ceiling schema, in its own schema; `account` is shared with
        // the inbox's handler.
        sqlx::raw_sql(
            "CREATE SCHEMA ceiling;
             CREATE TABLE ceiling.inbox_offsets(grp text, topic text, part int, next_offset bigint not null,
                 epoch bigint not null default 0, primary key(grp, topic, part));
             CREATE TABLE ceiling.inbox_events(grp text, event_id uuid, primary key(grp, event_id));
             CREATE TABLE ceiling.outbox(id bigserial primary key, txid xid8 not null default pg_current_xact_id(),
                 topic text, key text, payload jsonb, created_at timestamptz default now());
             INSERT INTO ceiling.inbox_offsets SELECT 'g', 't', p, 0 FROM generate_series(0, 15) p;
             CREATE TABLE account(id int primary key, balance bigint not null);
             INSERT INTO account SELECT g, 0 FROM generate_series(1, 100000) g;
             ANALYZE account;
             INSERT INTO txbox.inbox_offsets (consumer_group, topic, partition, next_offset, epoch)
               SELECT 'ceiling', 't', p, 0, 1 FROM generate_series(0, 15) p;",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Empties what the runs grow: both dedupe tables, both outboxes and
    /// the reference ceiling's ids, then vacuums `account`, so that every
    /// round of `txbox-bench inbox` starts from the same state. Without
    /// it the rounds drift apart: each inbox run has a new group, whose
    /// ids fill a fresh part of txbox's primary key (it leads with the
    /// group), while the hand-written consumer's one table of random ids
    /// grows past memory round after round. How the dedupe state's size
    /// costs is `txbox-bench dedupe`'s subject.
    pub(crate) async fn reset_round(&self) -> anyhow::Result<()> {
        sqlx::query(crate::baseline::TABLE)
            .execute(&self.pool)
            .await?;
        sqlx::raw_sql(
            "TRUNCATE processed_events, txbox.inbox_processed, txbox.outbox,
                      txbox.outbox_key_order, ceiling.inbox_events, ceiling.outbox",
        )
        .execute(&self.pool)
        .await?;
        sqlx::raw_sql("VACUUM ANALYZE account")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn drop_db(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let mut admin = sqlx::PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!("DROP DATABASE \"{}\" WITH (FORCE)", self.name))
            .execute(&mut admin)
            .await?;
        Ok(())
    }
}

/// Which SQL a ceiling run executes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Sql {
    /// `shared/bench/pg-ceiling`'s inbox1.sql / inbox100.sql.
    Reference,
    /// The statements a txbox inbox commit executes, on txbox's tables:
    /// its `BEGIN` (with its `SET LOCAL`s), business update, outbox
    /// staging, fenced offset advance with the event-id insert.
    Txbox,
}

/// Runs the ceiling SQL with `partitions` clients for `dur`; returns
/// messages/s. `key_order` is the txbox SQL's outbox mode (the reference
/// SQL has no such thing).
pub(crate) async fn run(
    db: &BenchDb,
    sql: Sql,
    shape: Shape,
    dur: Duration,
    key_order: txbox::outbox::KeyOrder,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for client in 0..shape.partitions {
        let pool = db.pool.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let outbox = txbox::Outbox::new(txbox::Schema::default()).key_order(key_order);
            let steady = SteadyStateSql::new(&txbox::Schema::default());
            let part = i32::try_from(client).unwrap_or(0);
            // Where the previous run left this client's row: the fence
            // must pass.
            let mut next_offset: i64 = sqlx::query_scalar(
                "SELECT next_offset FROM txbox.inbox_offsets
                 WHERE consumer_group = 'ceiling' AND topic = 't' AND partition = $1",
            )
            .bind(part)
            .fetch_one(&pool)
            .await?;
            while Instant::now() < deadline {
                let r = match sql {
                    Sql::Reference => one_txn(&pool, shape.batch).await,
                    Sql::Txbox => {
                        txbox_txn(&pool, &steady, &outbox, part, &mut next_offset, shape.batch)
                            .await
                    }
                };
                match r {
                    Ok(()) => {
                        done.fetch_add(shape.batch as u64, Ordering::Relaxed);
                    }
                    // Retried, as an inbox would; said, so that a run
                    // that measured retries is not taken for a slow one.
                    Err(e) if txbox::db::is_transient(&e) => {
                        tracing::warn!(client, error = %e, "ceiling transaction failed; retrying");
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await??;
    }
    let done = done.load(Ordering::Relaxed);
    if done == 0 {
        anyhow::bail!(
            "the {sql:?} ceiling committed no transaction in {} ms",
            started.elapsed().as_millis()
        );
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

async fn one_txn(pool: &PgPool, batch: usize) -> Result<(), sqlx::Error> {
    let (part, ids): (i32, Vec<i32>) = {
        let mut rng = rand::thread_rng();
        (
            rng.gen_range(0..16),
            (0..batch).map(|_| rng.gen_range(1..=100_000)).collect(),
        )
    };
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE ceiling.inbox_offsets SET next_offset = next_offset + $1 WHERE grp = 'g' AND topic = 't' AND part = $2")
        .bind(batch as i64)
        .bind(part)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO ceiling.inbox_events SELECT 'g', gen_random_uuid() FROM generate_series(1, $1)")
        .bind(batch as i32)
        .execute(&mut *tx)
        .await?;
    if batch == 1 {
        sqlx::query("UPDATE account SET balance = balance + 1 WHERE id = $1")
            .bind(ids[0])
            .execute(&mut *tx)
            .await?;
    } else {
        sqlx::query("UPDATE account SET balance = balance + 1 WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "INSERT INTO ceiling.outbox(topic, key, payload)
         SELECT 'out', g::text, '{\"kind\":\"PaymentSettled\",\"amount\":100}' FROM unnest($1::int4[]) g",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// One transaction of exactly the SQL a txbox inbox commit runs in the
/// steady state (its own statements from `txbox::inbox::SteadyStateSql`,
/// the handler's as the benchmark's handler sends them), without Kafka or
/// the runtime.
async fn txbox_txn(
    pool: &PgPool,
    sql: &SteadyStateSql,
    outbox: &txbox::Outbox,
    part: i32,
    next_offset: &mut i64,
    batch: usize,
) -> Result<(), sqlx::Error> {
    let ids: Vec<i32> = {
        let mut rng = rand::thread_rng();
        (0..batch).map(|_| rng.gen_range(1..=100_000)).collect()
    };
    let event_ids: Vec<String> = (0..batch)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let offsets: Vec<i64> = (0..batch as i64).map(|i| *next_offset + i).collect();
    let mut tx = pool.begin_with(sql.begin.clone()).await?;
    sqlx::query("UPDATE account SET balance = balance + 1 WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    let events = ids.iter().map(|id| {
        txbox::OutboxEvent::new("out", &br#"{"kind":"PaymentSettled","amount":100}"#[..])
            .key(id.to_string())
    });
    outbox
        .stage_all(&mut tx, events)
        .await
        .map_err(|e| match e {
            txbox::Error::Database(e) => e,
            other => sqlx::Error::Protocol(other.to_string()),
        })?;
    // The steady state's statement after the handler: the fenced advance,
    // then a plain insert of the ids, expected to be new (an inbox redoes
    // a batch with ON CONFLICT first only after a conflict).
    let new_offset = *next_offset + batch as i64;
    let (advanced, inserted): (i64, i64) = sqlx::query_as(&sql.advance_recording)
        .bind(new_offset)
        .bind("ceiling")
        .bind("t")
        .bind(part)
        .bind(1i64)
        .bind(*next_offset)
        .bind(batch as i64)
        .bind(0i64)
        .bind(0i64)
        .bind(&event_ids)
        .bind(&offsets)
        .fetch_one(&mut *tx)
        .await?;
    // Every client's row holds epoch 1: a run that fenced itself would
    // measure less work than an inbox does.
    if (advanced, inserted) != (1, batch as i64) {
        // Not a transient error (the loop would retry it silently).
        return Err(sqlx::Error::Configuration(
            format!(
                "the txbox SQL ceiling advanced {advanced} rows and recorded {inserted} ids, \
             not 1 and {batch}"
            )
            .into(),
        ));
    }
    tx.commit().await?;
    *next_offset = new_offset;
    Ok(())
}
