//! `txbox-bench dedupe`: the inbox's dedupe as its state grows, and the
//! offset watermark (ADR 0011), against the hand-written consumer, in one
//! run.
//!
//! For each size of pre-filled dedupe state (`--prefill`, default 0, 10 M
//! and 50 M ids), both dedupe tables (txbox's `inbox_processed`, for the
//! benchmark's group, and the hand-written consumer's `processed_events`)
//! are filled to that many random ids (UUID text, as the inputs' `ce_id`),
//! vacuumed and analyzed, their sizes printed; then, per round, on fresh
//! topics of the same shape:
//! - **hand-written**: the baseline consumer ([`crate::baseline`]) over
//!   messages with ids;
//! - **ids**: the inbox with `Dedupe::EventIds` (the default) over the same
//!   messages: one id row per message, into the pre-filled table;
//! - **positions**: the inbox over messages without ids (their ids are
//!   their positions: no row, the watermark dedupes them);
//! - **offsets-only**: the inbox with `Dedupe::OffsetsOnly` over messages
//!   with ids: no row.
//!
//! Pruning runs at its defaults (every 60 s, ids older than 14 days: the
//! pre-filled ids are dated over the last 13 days, so it deletes none, as in
//! a service whose traffic is steady).

use std::time::Instant;

use sqlx::PgPool;
use txbox::inbox::Dedupe;
use txbox::outbox::KeyOrder;

use crate::ceiling::BenchDb;
use crate::inbox::{filled, inbox, Consumers, Filled, Ids};
use crate::{median, Shape};

/// The group whose dedupe state is pre-filled.
const GROUP: &str = "bench-dedupe";

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Sizes of the pre-filled dedupe state, in ids, ascending (repeatable).
    #[arg(long = "prefill", default_values_t = [0u64, 10_000_000, 50_000_000])]
    prefill: Vec<u64>,
    /// Messages per run.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Rounds per size (each runs every variant).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The shape, `BATCHxPARTITIONS`.
    #[arg(long, value_parser = crate::parse_shape, default_value = "100x4")]
    shape: Shape,
    /// The inputs' event ids, and the pre-filled ones: random (UUID v4)
    /// or time-ordered (as UUID v7: the pre-filled ids sort before every
    /// new one, as older events' ids do).
    #[arg(long, value_enum, default_value_t = Ids::Random)]
    ids: Ids,
    /// Write each size's medians (prefill, both tables' MB, the four
    /// variants' messages/s) to this CSV file.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
}

/// One round's messages/s.
#[derive(Debug, Clone, Copy)]
struct Round {
    hand_written: f64,
    ids: f64,
    positions: f64,
    offsets_only: f64,
}

pub(crate) async fn run(args: &Args, database_url: &str, bootstrap: &str) -> anyhow::Result<()> {
    let db = BenchDb::create(database_url).await?;
    db.add_ceiling().await?;
    sqlx::query(crate::baseline::TABLE)
        .execute(&db.pool)
        .await?;
    let shape = args.shape;
    println!(
        "txbox-bench dedupe: database {}, broker {bootstrap}, {} messages per run, batch {}, {} partitions, ids {:?}",
        db.name, args.messages, shape.batch, shape.partitions, args.ids
    );
    println!(
        "{:>11} {:>9} {:>9} {:>9} | {:>12} {:>9} {:>6} {:>9} {:>6} {:>12} {:>6}",
        "prefill",
        "txbox MB",
        "hand MB",
        "fill s",
        "hand-written",
        "ids",
        "ratio",
        "positions",
        "ratio",
        "offsets-only",
        "ratio"
    );
    let mut filled_to = 0u64;
    let mut empty: Option<Round> = None;
    let mut csv =
        String::from("prefill,txbox_mb,hand_written_mb,hand_written,ids,positions,offsets_only\n");
    for &size in &args.prefill {
        anyhow::ensure!(size >= filled_to, "--prefill sizes must ascend");
        let t = Instant::now();
        prefill(&db.pool, filled_to, size, args.ids).await?;
        filled_to = size;
        let fill_s = t.elapsed().as_secs_f64();
        let (txbox_mb, hand_mb) = sizes(&db.pool).await?;
        let mut rounds = Vec::new();
        // The inbox over `input`, at the shape's batch size, one instance.
        let consume = async |input: &Filled, dedupe: Dedupe, group: Option<&str>| {
            let c = Consumers {
                batch: shape.batch,
                key_order: KeyOrder::FirstWrite,
                dedupe,
                group,
                instances: 1,
                kafka: &[],
            };
            inbox(&db, bootstrap, input, c).await
        };
        for _ in 0..args.rounds {
            let with_ids = filled(bootstrap, shape.partitions, args.messages, args.ids).await?;
            let hand_written = crate::baseline::run(
                &db.pool,
                bootstrap,
                &with_ids.topic,
                shape.partitions,
                shape.batch,
                args.messages,
            )
            .await?;
            let ids = consume(&with_ids, Dedupe::EventIds, Some(GROUP)).await?;
            let offsets_only = consume(&with_ids, Dedupe::OffsetsOnly, None).await?;
            let without = filled(bootstrap, shape.partitions, args.messages, Ids::None).await?;
            let positions = consume(&without, Dedupe::EventIds, Some(GROUP)).await?;
            let r = Round {
                hand_written,
                ids,
                positions,
                offsets_only,
            };
            print_row(&format!("{size}"), txbox_mb, hand_mb, fill_s, &r);
            rounds.push(r);
        }
        let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        let med = Round {
            hand_written: m(|r| r.hand_written),
            ids: m(|r| r.ids),
            positions: m(|r| r.positions),
            offsets_only: m(|r| r.offsets_only),
        };
        print_row(&format!("{size} med."), txbox_mb, hand_mb, fill_s, &med);
        csv.push_str(&format!(
            "{size},{txbox_mb:.0},{hand_mb:.0},{:.0},{:.0},{:.0},{:.0}\n",
            med.hand_written, med.ids, med.positions, med.offsets_only
        ));
        let base = *empty.get_or_insert(med);
        println!(
            "{:>11} against the first size: hand-written {:.2}, ids {:.2}, positions {:.2}, offsets-only {:.2}",
            "",
            med.hand_written / base.hand_written,
            med.ids / base.ids,
            med.positions / base.positions,
            med.offsets_only / base.offsets_only
        );
    }
    db.drop_db().await?;
    if let Some(path) = &args.csv {
        std::fs::write(path, csv)?;
        println!("medians written to {}", path.display());
    }
    Ok(())
}

fn print_row(label: &str, txbox_mb: f64, hand_mb: f64, fill_s: f64, r: &Round) {
    println!(
        "{label:>11} {txbox_mb:>9.0} {hand_mb:>9.0} {fill_s:>9.0} | {:>12.0} {:>9.0} {:>6.2} {:>9.0} {:>6.2} {:>12.0} {:>6.2}",
        r.hand_written,
        r.ids,
        r.ids / r.hand_written,
        r.positions,
        r.positions / r.hand_written,
        r.offsets_only,
        r.offsets_only / r.hand_written
    );
}

/// Adds ids `from..to` to both dedupe tables. Their primary keys are
/// dropped for the load and built again after it (a sorted build, far
/// faster than 50 M random inserts); the result is the same index.
async fn prefill(pool: &PgPool, from: u64, to: u64, ids: Ids) -> anyhow::Result<()> {
    if to == from {
        return Ok(());
    }
    let (from, to) = (i64::try_from(from)?, i64::try_from(to)?);
    sqlx::raw_sql(
        "ALTER TABLE txbox.inbox_processed DROP CONSTRAINT inbox_processed_pkey;
         ALTER TABLE processed_events DROP CONSTRAINT processed_events_pkey;",
    )
    .execute(pool)
    .await?;
    // A random UUID, or one whose first 48 bits are a time in the last 13
    // days in milliseconds, as UUID v7 lays them out: it sorts before any
    // id made now.
    let id = if ids == Ids::TimeOrdered {
        "(SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-' || substr(h, 13, 4) || '-' ||
                 substr(h, 17, 4) || '-' || substr(h, 21, 12)
          FROM (SELECT lpad(to_hex((extract(epoch FROM now()) * 1000)::int8
                                   - (random() * 13 * 86400000)::int8), 12, '0')
                       || substr(md5(random()::text || g::text), 1, 20) AS h) x)"
    } else {
        "gen_random_uuid()::text"
    };
    // In slices of 1 M, each its own statement and transaction.
    let mut at = from;
    while at < to {
        let end = (at + 1_000_000).min(to);
        sqlx::query(&format!(
            "INSERT INTO txbox.inbox_processed (consumer_group, event_id, topic, partition, \"offset\", processed_at)
             SELECT $1, {id}, 'prefill', 0, g,
                    now() - make_interval(secs => random() * 13 * 86400)
             FROM generate_series($2::int8, $3::int8 - 1) g"
        ))
        .bind(GROUP)
        .bind(at)
        .bind(end)
        .execute(pool)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO processed_events (event_id, processed_at)
             SELECT {id}, now() - make_interval(secs => random() * 13 * 86400)
             FROM generate_series($1::int8, $2::int8 - 1) g"
        ))
        .bind(at)
        .bind(end)
        .execute(pool)
        .await?;
        at = end;
    }
    sqlx::raw_sql(
        "SET maintenance_work_mem = '1GB';
         ALTER TABLE txbox.inbox_processed ADD PRIMARY KEY (consumer_group, event_id);
         ALTER TABLE processed_events ADD PRIMARY KEY (event_id);
         RESET maintenance_work_mem;",
    )
    .execute(pool)
    .await?;
    // Each on its own: VACUUM cannot run inside the implicit transaction
    // of a multi-statement query.
    for table in ["txbox.inbox_processed", "processed_events"] {
        sqlx::raw_sql(&format!("VACUUM ANALYZE {table}"))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Table plus index size of txbox's and the hand-written dedupe table, MB.
async fn sizes(pool: &PgPool) -> anyhow::Result<(f64, f64)> {
    let (a, b): (i64, i64) = sqlx::query_as(
        "SELECT pg_total_relation_size('txbox.inbox_processed'),
                pg_total_relation_size('processed_events')",
    )
    .fetch_one(pool)
    .await?;
    Ok((a as f64 / 1e6, b as f64 / 1e6))
}
