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
//! The two variants that insert ids take turns going first (ABBA over four
//! rounds), and each is followed by a pause for PostgreSQL's statistics to
//! settle
//! ([`crate::pg_io`]): printed per message are the primary keys' blocks
//! read from outside shared buffers, the full-page images and the WAL
//! bytes each wrote, which is where the time goes as the index outgrows
//! memory. `--prewarm` loads both primary keys into shared buffers first,
//! as a running service's would be if they fit. The first size starts
//! with `--warmup` rounds (default 1) that are printed but not counted, so
//! that the first touches of a fresh broker and database do not lower the
//! figure the later sizes are judged against. `--end-empty` empties both
//! tables after the last size and measures the empty state once more, so
//! that a trend over the run (the machine or the broker getting faster or
//! slower) shows, and each size is also judged against both empty runs.
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
use crate::pg_io::{measured, RunIo, Snapshot, SETTLE};
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
    #[arg(long, default_value_t = 4)]
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
    /// variants' messages/s, both primary keys' MB, and `end`: 1 for the
    /// empty state measured at the end) to this CSV file.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// Load both dedupe tables' primary keys into shared buffers
    /// (`pg_prewarm`) after each prefill, as a running service's would be
    /// when `shared_buffers` holds them. Without it the runs start with
    /// the indexes just built, outside shared buffers.
    #[arg(long)]
    prewarm: bool,
    /// Rounds run at the first size before its counted ones, and not
    /// counted: the broker's, PostgreSQL's and the page cache's first
    /// touches otherwise fall on the first size alone, which every later
    /// size is compared against.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// After the last size, empty both dedupe tables and measure the empty
    /// state again (printed as `0 end`): the sizes run in ascending order,
    /// so a trend over the run falls on the growth ratios alone; with the
    /// empty state at both ends, each size is also printed against their
    /// mean. The end run has no warm-up rounds: only the first size's
    /// counted rounds start with the warm-up's ids in the table.
    #[arg(long)]
    end_empty: bool,
}

/// One round's messages/s.
#[derive(Debug, Clone, Copy)]
struct Round {
    hand_written: f64,
    ids: f64,
    positions: f64,
    offsets_only: f64,
}

/// One round's PostgreSQL work per message, for the two variants that
/// write id rows.
#[derive(Debug, Clone, Copy)]
struct RoundIo {
    hand_written: RunIo,
    ids: RunIo,
}

/// The dedupe tables' primary keys, schema-qualified: the inbox's, then
/// the hand-written consumer's. Their block reads are counted, their sizes
/// printed, and `--prewarm` loads them.
const DEDUPE_INDEXES: [&str; 2] = ["txbox.inbox_processed_pkey", "processed_events_pkey"];

pub(crate) async fn run(args: &Args, database_url: &str, bootstrap: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.end_empty || args.prefill.first() == Some(&0),
        "--end-empty compares with the empty state at the start: the first --prefill must be 0"
    );
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
    if args.prewarm {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
            .execute(&db.pool)
            .await?;
    }
    let mut csv = String::from(
        "prefill,txbox_mb,hand_written_mb,hand_written,ids,positions,offsets_only,\
         txbox_index_mb,hand_written_index_mb,end\n",
    );
    // Each size, and whether it is the empty state measured at the end.
    let plan = args
        .prefill
        .iter()
        .map(|&size| (size, false))
        .chain(args.end_empty.then_some((0, true)));
    // Each size's medians, for the comparison with both empty runs.
    let mut meds = Vec::new();
    for (size, end) in plan {
        if end {
            empty_tables(&db.pool).await?;
            filled_to = 0;
        }
        anyhow::ensure!(size >= filled_to, "--prefill sizes must ascend");
        let label = if end {
            format!("{size} end")
        } else {
            size.to_string()
        };
        let t = Instant::now();
        prefill(&db.pool, filled_to, size, args.ids).await?;
        filled_to = size;
        let fill_s = t.elapsed().as_secs_f64();
        let Sizes {
            txbox: txbox_mb,
            hand_written: hand_mb,
            txbox_key: txbox_index_mb,
            hand_written_key: hand_index_mb,
        } = sizes(&db.pool).await?;
        if args.prewarm && size > 0 {
            for index in DEDUPE_INDEXES {
                sqlx::query("SELECT pg_prewarm($1::regclass)")
                    .bind(index)
                    .execute(&db.pool)
                    .await?;
            }
        }
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
                max_buffered: None,
            };
            inbox(&db, bootstrap, input, c).await
        };
        // The prefill's statistics (and VACUUM's) settle before the first
        // run's are counted.
        tokio::time::sleep(SETTLE).await;
        let mut at = Snapshot::take(&db.pool, &DEDUPE_INDEXES).await?;
        let mut io = Vec::new();
        let warmup = if empty.is_none() { args.warmup } else { 0 };
        for turn in 0..warmup + args.rounds {
            let counted = turn >= warmup;
            let round = turn.saturating_sub(warmup);
            let with_ids = filled(bootstrap, shape.partitions, args.messages, args.ids).await?;
            let hand = || {
                crate::baseline::run(
                    &db.pool,
                    bootstrap,
                    &with_ids.topic,
                    shape.partitions,
                    shape.batch,
                    args.messages,
                )
            };
            let ids = || consume(&with_ids, Dedupe::EventIds, Some(GROUP));
            let (pool, n) = (&db.pool, args.messages);
            // The two variants that insert ids take turns going first, in
            // the order hand-written first, ids first, ids first,
            // hand-written first (and again): the one that runs right
            // after the prefill (or the other's run) meets another state
            // of the caches, and over four rounds each order meets each
            // place in the sequence.
            let hand_first = matches!(round % 4, 0 | 3);
            let ((hand_written, hand_io), (ids, ids_io)) = if hand_first {
                let (h, h_io, next) = measured(pool, &DEDUPE_INDEXES, n, at, hand()).await?;
                let (i, i_io, _) = measured(pool, &DEDUPE_INDEXES, n, next, ids()).await?;
                ((h, h_io), (i, i_io))
            } else {
                let (i, i_io, next) = measured(pool, &DEDUPE_INDEXES, n, at, ids()).await?;
                let (h, h_io, _) = measured(pool, &DEDUPE_INDEXES, n, next, hand()).await?;
                ((h, h_io), (i, i_io))
            };
            if !counted {
                println!(
                    "{:>11} warm-up, not counted: hand-written {hand_written:.0}, ids {ids:.0} messages/s",
                    format!("{label} w{}", turn + 1)
                );
                tokio::time::sleep(SETTLE).await;
                at = Snapshot::take(&db.pool, &DEDUPE_INDEXES).await?;
                continue;
            }
            let round_io = RoundIo {
                hand_written: hand_io,
                ids: ids_io,
            };
            print_io(
                &format!("{label} #{}", round + 1),
                if hand_first {
                    " (hand-written first)"
                } else {
                    " (ids first)"
                },
                &[round_io],
            );
            io.push(round_io);
            let offsets_only = consume(&with_ids, Dedupe::OffsetsOnly, None).await?;
            let without = filled(bootstrap, shape.partitions, args.messages, Ids::None).await?;
            let positions = consume(&without, Dedupe::EventIds, Some(GROUP)).await?;
            let r = Round {
                hand_written,
                ids,
                positions,
                offsets_only,
            };
            print_row(&label, txbox_mb, hand_mb, fill_s, &r);
            rounds.push(r);
            // The watermark variants' runs are not counted; the next
            // round's first run starts from a settled reading.
            tokio::time::sleep(SETTLE).await;
            at = Snapshot::take(&db.pool, &DEDUPE_INDEXES).await?;
        }
        print_io(&format!("{label} med."), "", &io);
        println!(
            "{:>11} primary keys: txbox {txbox_index_mb:.0} MB, hand-written {hand_index_mb:.0} MB{}",
            "",
            if args.prewarm && size > 0 { " (prewarmed)" } else { "" }
        );
        let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        let med = Round {
            hand_written: m(|r| r.hand_written),
            ids: m(|r| r.ids),
            positions: m(|r| r.positions),
            offsets_only: m(|r| r.offsets_only),
        };
        print_row(&format!("{label} med."), txbox_mb, hand_mb, fill_s, &med);
        csv.push_str(&format!(
            "{size},{txbox_mb:.0},{hand_mb:.0},{:.0},{:.0},{:.0},{:.0},{txbox_index_mb:.0},{hand_index_mb:.0},{}\n",
            med.hand_written,
            med.ids,
            med.positions,
            med.offsets_only,
            u8::from(end)
        ));
        let base = *empty.get_or_insert(med);
        print_against("", "the first size", &med, &base);
        meds.push((label, med));
    }
    // The first size and the last run, both the empty state with
    // `--end-empty`: each size against their mean.
    if let (true, Some((_, first)), Some((_, last))) = (args.end_empty, meds.first(), meds.last()) {
        let mean = |f: fn(&Round) -> f64| (f(first) + f(last)) / 2.0;
        let both = Round {
            hand_written: mean(|r| r.hand_written),
            ids: mean(|r| r.ids),
            positions: mean(|r| r.positions),
            offsets_only: mean(|r| r.offsets_only),
        };
        for (label, med) in &meds {
            print_against(label, "both empty runs' mean", med, &both);
        }
    }
    db.drop_db().await?;
    if let Some(path) = &args.csv {
        std::fs::write(path, csv)?;
        println!("medians written to {}", path.display());
    }
    Ok(())
}

/// Each variant's median in `med` divided by its median in `base`.
fn print_against(label: &str, what: &str, med: &Round, base: &Round) {
    println!(
        "{label:>11} against {what}: hand-written {:.2}, ids {:.2}, positions {:.2}, offsets-only {:.2}",
        med.hand_written / base.hand_written,
        med.ids / base.ids,
        med.positions / base.positions,
        med.offsets_only / base.offsets_only
    );
}

/// Empties both dedupe tables (for the empty state measured again at the
/// end), then settles them as a prefill does.
async fn empty_tables(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql("TRUNCATE txbox.inbox_processed, processed_events")
        .execute(pool)
        .await?;
    settle_tables(pool).await
}

/// Vacuums and analyzes both dedupe tables, then takes a checkpoint.
async fn settle_tables(pool: &PgPool) -> anyhow::Result<()> {
    // Each on its own: VACUUM cannot run inside the implicit transaction
    // of a multi-statement query.
    for table in ["txbox.inbox_processed", "processed_events"] {
        sqlx::raw_sql(&format!("VACUUM ANALYZE {table}"))
            .execute(pool)
            .await?;
    }
    // After a prefill, the load and the index builds write gigabytes of
    // WAL and start checkpoints of their own; the pages written to the
    // WAL after the last of them need no full-page image at their first
    // change, the others do, and which are which is chance. A checkpoint
    // now puts both indexes where a service's stand after each checkpoint
    // (and writes out the load's dirty buffers before the runs).
    crate::pg_io::checkpoint(pool).await?;
    Ok(())
}

/// The id-writing variants' PostgreSQL work and CPU per message (the
/// median of `io`'s rounds), and the checkpoints counted during their runs
/// (summed).
fn print_io(label: &str, note: &str, io: &[RoundIo]) {
    let (h, i) = (medians(io, |r| &r.hand_written), medians(io, |r| &r.ids));
    println!(
        "{label:>11} per message: hand-written {:.2} index blocks read, {:.2} full-page images, \
         {:.0} WAL bytes, {} checkpoints; ids {:.2}, {:.2}, {:.0}, {}{note}",
        h.blocks_read,
        h.fpi,
        h.wal_bytes,
        h.checkpoints,
        i.blocks_read,
        i.fpi,
        i.wal_bytes,
        i.checkpoints,
    );
    println!(
        "{:>11} CPU us per message (consumer, postgres, broker): hand-written {:.1}, {:.1}, {:.1}; \
         ids {:.1}, {:.1}, {:.1}",
        "", h.cpu_own_us, h.cpu_postgres_us, h.cpu_broker_us, i.cpu_own_us, i.cpu_postgres_us, i.cpu_broker_us,
    );
}

/// One variant's figures over `io`'s rounds: the median of each, the
/// checkpoints summed.
fn medians(io: &[RoundIo], variant: fn(&RoundIo) -> &RunIo) -> RunIo {
    let m = |f: fn(&RunIo) -> f64| median(io.iter().map(|r| f(variant(r))).collect());
    RunIo {
        wal_bytes: m(|r| r.wal_bytes),
        fpi: m(|r| r.fpi),
        blocks_read: m(|r| r.blocks_read),
        checkpoints: io.iter().map(|r| variant(r).checkpoints).sum(),
        cpu_own_us: m(|r| r.cpu_own_us),
        cpu_postgres_us: m(|r| r.cpu_postgres_us),
        cpu_broker_us: m(|r| r.cpu_broker_us),
    }
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
    settle_tables(pool).await
}

/// Sizes, MB, of txbox's and the hand-written consumer's dedupe tables.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    /// Each table with its indexes.
    txbox: f64,
    hand_written: f64,
    /// Each table's primary key.
    txbox_key: f64,
    hand_written_key: f64,
}

async fn sizes(pool: &PgPool) -> anyhow::Result<Sizes> {
    let (a, b, c, d): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT pg_total_relation_size('txbox.inbox_processed'),
                pg_total_relation_size('processed_events'),
                pg_relation_size($1::regclass),
                pg_relation_size($2::regclass)",
    )
    .bind(DEDUPE_INDEXES[0])
    .bind(DEDUPE_INDEXES[1])
    .fetch_one(pool)
    .await?;
    let mb = |n: i64| n as f64 / 1e6;
    Ok(Sizes {
        txbox: mb(a),
        hand_written: mb(b),
        txbox_key: mb(c),
        hand_written_key: mb(d),
    })
}
