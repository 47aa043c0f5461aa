//! `txbox-bench relay`: how fast the relay drains an outbox, against a
//! plain transactional producer and a plain idempotent producer, and how
//! long an event takes from its staging commit until a `read_committed`
//! consumer sees it.
//!
//! Steps, all in one run against one broker, on a fresh database (dropped
//! at the end):
//! 1. pre-fill the outbox with `--events` events of `--payload-bytes`
//!    bytes over 1,000 keys, in transactions of 10,000 rows;
//! 2. drain it with the relay (`--mode`, exactly-once by default: one
//!    Kafka transaction per batch of `--batch-size` rows) and report
//!    events/s, timed from the relay's start (its `init_transactions`,
//!    position recovery and probe transaction included);
//! 3. baseline (a): a plain transactional producer (its own
//!    `transactional.id`, `init_transactions`, then begin / produce
//!    `--batch-size` records / commit until the same number of records of
//!    the same size over the same keys is out), records/s, timed from
//!    `init_transactions`;
//! 4. baseline (b): a plain idempotent producer, same records, records/s;
//! 5. the ratios relay / (a) and relay / (b);
//! 6. stage `--rate` events/s (transactions of 10, with NOTIFY) for
//!    `--seconds` while the relay runs, and report the latency from each
//!    staging commit until a consumer with `isolation.level=read_committed`
//!    reads the record (p50, p99, max).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::PgPool;
use txbox_relay::{CancellationToken, Mode, RelayConfig};
use uuid::Uuid;

use crate::ceiling::BenchDb;

/// `txbox-bench relay`'s options.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The relay's mode.
    #[arg(long, value_enum, default_value_t = Mode::ExactlyOnce)]
    mode: Mode,
    /// Events to pre-fill and drain.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Relay batch size (rows per Kafka transaction in exactly-once mode),
    /// also the transaction size of baseline (a).
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Events per second in the latency phase.
    #[arg(long, default_value_t = 1000)]
    rate: usize,
    /// Length of the latency phase, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Skip the latency phase.
    #[arg(long)]
    no_latency: bool,
    /// Skip the baselines (relay drain and latency only).
    #[arg(long)]
    no_baselines: bool,
    /// Extra librdkafka option for the relay, key=value (repeatable).
    #[arg(long = "kafka-option", value_name = "KEY=VALUE", value_parser = txbox::kafka::parse_option)]
    kafka_options: Vec<(String, String)>,
    /// Extra librdkafka option for both baseline producers, key=value
    /// (repeatable).
    #[arg(
        long = "baseline-kafka-option",
        value_name = "KEY=VALUE",
        value_parser = txbox::kafka::parse_option
    )]
    baseline_kafka_options: Vec<(String, String)>,
}

/// Runs the benchmark on a fresh database of the server `database_url`,
/// dropped afterwards, against the brokers `bootstrap`.
pub(crate) async fn run(args: &Args, database_url: &str, bootstrap: &str) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let db = BenchDb::create(database_url).await?;
    let result = bench(args, &db, bootstrap).await;
    let dropped = db.drop_db().await;
    result.and(dropped)
}

async fn bench(args: &Args, db: &BenchDb, bootstrap: &str) -> anyhow::Result<()> {
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let relay_topic = format!("bench-relay-{run}");
    let txn_topic = format!("bench-txn-{run}");
    let plain_topic = format!("bench-plain-{run}");
    let latency_topic = format!("bench-latency-{run}");
    let broker = txbox_testkit::Broker::at(bootstrap);
    for t in [&relay_topic, &txn_topic, &plain_topic, &latency_topic] {
        broker.create_topic(t, args.partitions).await;
    }
    println!(
        "txbox-bench relay: {} events x {} B, relay {}, batch {}, {} partitions, broker {}",
        args.events, args.payload_bytes, args.mode, args.batch_size, args.partitions, bootstrap
    );

    // 1. Pre-fill.
    let t = Instant::now();
    prefill(&db.pool, &relay_topic, args.events, args.payload_bytes).await?;
    let fill = t.elapsed();
    println!(
        "prefill: {} rows in {:.1}s ({:.0} rows/s)",
        args.events,
        fill.as_secs_f64(),
        args.events as f64 / fill.as_secs_f64()
    );

    // 2. Drain with the relay.
    let mut config = RelayConfig::new(&db.url, bootstrap);
    config.mode = args.mode;
    config.batch_size = args.batch_size;
    config.poll_interval = Duration::from_millis(20);
    config.instance = format!("bench-{run}");
    // A transactional.id and position topic of this run's own: nothing
    // from an earlier run (or a test on the same broker) is recovered or
    // fenced.
    config.transactional_id_prefix = format!("txbox-bench-relay-{run}");
    config.position_topic = format!("bench-positions-{run}");
    config.kafka.extend(args.kafka_options.iter().cloned());
    let baseline_options = &args.baseline_kafka_options;
    let shutdown = CancellationToken::new();
    let t = Instant::now();
    let relay = tokio::spawn(txbox_relay::run(config, shutdown.clone()));
    let expected = i64::try_from(args.events)?;
    // The first batch recorded: (time since start, rows).
    let mut first_batch: Option<(Duration, i64)> = None;
    loop {
        let published: Option<i64> =
            sqlx::query_scalar("SELECT published FROM txbox.relay_streams WHERE stream = 0")
                .fetch_optional(&db.pool)
                .await?;
        let published = published.unwrap_or(0);
        if published > 0 && first_batch.is_none() {
            first_batch = Some((t.elapsed(), published));
        }
        if published >= expected {
            break;
        }
        if relay.is_finished() {
            bail!("relay stopped early: {:?}", relay.await);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = t.elapsed();
    let relay_rate = args.events as f64 / drain.as_secs_f64();
    println!(
        "relay drain ({}): {} events in {:.2}s = {:.0} events/s",
        args.mode,
        args.events,
        drain.as_secs_f64(),
        relay_rate
    );
    if let Some((at, rows)) = first_batch.filter(|(at, _)| *at < drain) {
        // Not what the ratios use: without the relay's start (lease,
        // init_transactions, position topic, probe transaction).
        println!(
            "  start to first batch recorded {:.2}s; from there {:.0} events/s",
            at.as_secs_f64(),
            (expected - rows) as f64 / (drain - at).as_secs_f64()
        );
    }

    if !args.no_baselines {
        let records = Arc::new(records(args.events, args.payload_bytes));
        // 3. Plain transactional producer, same records, same transaction size.
        let txn_rate = {
            let config = baseline_config(bootstrap, baseline_options);
            let (topic, records) = (txn_topic.clone(), records.clone());
            let transactional_id = format!("bench-txn-{run}");
            let per_txn = args.batch_size;
            tokio::task::spawn_blocking(move || {
                transactional_producer(config, &topic, &transactional_id, &records, per_txn)
            })
            .await??
        };
        println!(
            "(a) plain transactional producer: {} records in transactions of {} = {:.0} records/s",
            args.events, args.batch_size, txn_rate
        );
        // 4. Plain idempotent producer, same records.
        let plain_rate = plain_producer(
            baseline_config(bootstrap, baseline_options),
            &plain_topic,
            &records,
        )
        .await?;
        println!(
            "(b) plain idempotent producer: {} records = {:.0} records/s",
            args.events, plain_rate
        );
        // 5. Ratios.
        println!(
            "relay / (a) = {:.2}, relay / (b) = {:.2}",
            relay_rate / txn_rate,
            relay_rate / plain_rate
        );
    }

    // 6. Latency at a steady rate, with the relay still running.
    if !args.no_latency {
        latency(args, &db.pool, bootstrap, &latency_topic).await?;
    }
    shutdown.cancel();
    match relay.await? {
        Ok(report) => println!("relay stopped: published {}", report.published()),
        Err(e) => println!("relay stopped with an error: {e}"),
    }
    Ok(())
}

/// Server-side generated rows, in transactions of 10,000: keys `k0..k999`,
/// a payload of `bytes` bytes, headers as `Outbox::stage` writes them, all
/// on stream 0.
pub(crate) async fn prefill(
    pool: &PgPool,
    topic: &str,
    events: usize,
    bytes: usize,
) -> anyhow::Result<()> {
    prefill_streams(pool, topic, events, bytes, 1).await
}

/// [`prefill`] over `streams` streams: key `k{j}` on stream `j % streams`
/// (each key on one stream, the keys spread evenly).
pub(crate) async fn prefill_streams(
    pool: &PgPool,
    topic: &str,
    events: usize,
    bytes: usize,
    streams: u32,
) -> anyhow::Result<()> {
    const CHUNK: usize = 10_000;
    let mut start = 0usize;
    while start < events {
        let end = (start + CHUNK).min(events);
        sqlx::query(
            "INSERT INTO txbox.outbox (stream, topic, key, payload, headers, event_id)
             SELECT (i % 1000) % $5, $1, convert_to('k' || (i % 1000), 'UTF8'),
                    convert_to(rpad(i::text || ':', $4, 'x'), 'UTF8'),
                    jsonb_build_array(jsonb_build_object('key', 'ce_id', 'value', id::text),
                                      jsonb_build_object('key', 'ce_specversion', 'value', '1.0')),
                    id
               FROM (SELECT i, gen_random_uuid() AS id FROM generate_series($2::bigint, $3::bigint) i) g",
        )
        .bind(topic)
        .bind(i64::try_from(start)?)
        .bind(i64::try_from(end - 1)?)
        .bind(i32::try_from(bytes)?)
        .bind(i32::try_from(streams.max(1))?)
        .execute(pool)
        .await?;
        start = end;
    }
    // What autovacuum would do shortly after such a load; without
    // statistics the planner may sort instead of walking the index.
    sqlx::query("ANALYZE txbox.outbox").execute(pool).await?;
    Ok(())
}

/// A record of the baselines: key, payload, event id (the `ce_id` header).
type BenchRecord = (Vec<u8>, Vec<u8>, String);

/// The records the relay publishes for the pre-filled rows: keys
/// `k0..k999`, payloads of `bytes` bytes, a fresh event id each.
fn records(events: usize, bytes: usize) -> Vec<BenchRecord> {
    (0..events)
        .map(|i| {
            let mut payload = format!("{i}:").into_bytes();
            payload.resize(bytes, b'x');
            (
                format!("k{}", i % 1000).into_bytes(),
                payload,
                Uuid::new_v4().to_string(),
            )
        })
        .collect()
}

/// The headers the relay sends with every row.
fn headers(id: &str) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header {
            key: "ce_id",
            value: Some(id.as_bytes()),
        })
        .insert(Header {
            key: "ce_specversion",
            value: Some("1.0"),
        })
}

/// Queues `record` on `topic` with the relay's headers, waiting while
/// librdkafka's queue is full.
async fn send(
    producer: &FutureProducer,
    topic: &str,
    (key, payload, id): &BenchRecord,
) -> Result<DeliveryFuture, KafkaError> {
    let mut rec = FutureRecord::to(topic)
        .key(key.as_slice())
        .payload(payload.as_slice())
        .headers(headers(id));
    loop {
        match producer.send_result(rec) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Producer settings both baselines share (the relay's guarantees:
/// idempotence, `acks=all`, the Java client's key hashing), then `extra`.
fn baseline_config(bootstrap: &str, extra: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000");
    for (k, v) in extra {
        c.set(k, v);
    }
    c
}

/// Baseline (a): `init_transactions`, then one transaction per `per_txn`
/// records: begin, produce, wait for the delivery reports, commit.
/// Blocking; run off the async threads. Returns records/s, timed from
/// `init_transactions`.
///
/// The wait before the commit is what the relay does too, and it matters:
/// rust-rdkafka's `commit_transaction` first flushes with
/// `rd_kafka_flush(0)` and, while records are in flight, a `poll` of 100 ms
/// that runs to its end (`FutureProducer`: its own thread serves the
/// events), so committing straight after the last produce costs up to
/// 100 ms per transaction.
fn transactional_producer(
    mut config: ClientConfig,
    topic: &str,
    transactional_id: &str,
    records: &[BenchRecord],
    per_txn: usize,
) -> anyhow::Result<f64> {
    const TIMEOUT: Duration = Duration::from_secs(30);
    let producer: FutureProducer = config
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", "30000")
        .create()?;
    let t = Instant::now();
    producer
        .init_transactions(TIMEOUT)
        .context("(a) init_transactions")?;
    let mut pending = Vec::with_capacity(per_txn);
    for chunk in records.chunks(per_txn.max(1)) {
        producer
            .begin_transaction()
            .context("(a) begin_transaction")?;
        for record in chunk {
            let queued = futures::executor::block_on(send(&producer, topic, record));
            pending.push(queued.context("(a) transactional producer")?);
        }
        for delivery in pending.drain(..) {
            match futures::executor::block_on(delivery) {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => bail!("(a) transactional producer delivery: {e}"),
                Err(_) => bail!("(a) transactional producer: delivery report lost"),
            }
        }
        producer
            .commit_transaction(TIMEOUT)
            .context("(a) commit_transaction")?;
    }
    Ok(records.len() as f64 / t.elapsed().as_secs_f64())
}

/// Baseline (b): every record through an idempotent producer, then every
/// delivery report awaited. Returns records/s.
async fn plain_producer(
    config: ClientConfig,
    topic: &str,
    records: &[BenchRecord],
) -> anyhow::Result<f64> {
    let producer: FutureProducer = config.create()?;
    let events = records.len();
    let t = Instant::now();
    let mut pending = Vec::with_capacity(events);
    for record in records {
        pending.push(
            send(&producer, topic, record)
                .await
                .context("plain producer")?,
        );
    }
    for f in pending {
        if let Ok(Err((e, _))) = f.await {
            bail!("plain producer delivery: {e}");
        }
    }
    Ok(events as f64 / t.elapsed().as_secs_f64())
}

async fn latency(args: &Args, pool: &PgPool, bootstrap: &str, topic: &str) -> anyhow::Result<()> {
    let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("bench-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            // librdkafka's default, spelled out: the relay's aborted
            // transactions must not count, and a record becomes visible
            // only once its transaction's commit marker is written.
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "5")
            .set("fetch.min.bytes", "1")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..args.partitions {
            tpl.add_partition_offset(topic, p, Offset::End)?;
        }
        consumer.assign(&tpl)?;
        let committed = committed.clone();
        let latencies = latencies.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(10)) {
                    let now = Instant::now();
                    let id = m
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "ce_id").and_then(|h| h.value))
                        .map(|v| String::from_utf8_lossy(v).into_owned());
                    if let Some(id) = id {
                        let at = committed.lock().ok().and_then(|mut c| c.remove(&id));
                        if let (Some(at), Ok(mut l)) = (at, latencies.lock()) {
                            l.push(now.saturating_duration_since(at));
                        }
                    }
                }
            }
        })
    };
    // Let the consumer's assignment settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let outbox =
        txbox::Outbox::new(txbox::Schema::default()).notify(txbox::outbox::DEFAULT_NOTIFY_CHANNEL);
    let per_tx = 10usize;
    let interval = Duration::from_secs_f64(per_tx as f64 / args.rate.max(1) as f64);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut writers = tokio::task::JoinSet::new();
    let mut staged = 0usize;
    while Instant::now() < deadline {
        tick.tick().await;
        let pool = pool.clone();
        let outbox = outbox.clone();
        let committed = committed.clone();
        let topic = topic.to_owned();
        let bytes = args.payload_bytes;
        staged += per_tx;
        writers.spawn(async move {
            let events: Vec<_> = (0..per_tx)
                .map(|i| {
                    let mut payload = format!("{i}:").into_bytes();
                    payload.resize(bytes, b'x');
                    txbox::OutboxEvent::new(topic.clone(), payload).key(format!("k{i}"))
                })
                .collect();
            let ids: Vec<String> = events.iter().map(|e| e.id().to_string()).collect();
            let mut tx = pool.begin().await?;
            outbox.stage_all(&mut tx, events).await?;
            tx.commit().await?;
            let now = Instant::now();
            if let Ok(mut c) = committed.lock() {
                for id in ids {
                    c.insert(id, now);
                }
            }
            Ok::<_, anyhow::Error>(())
        });
        while let Some(done) = writers.try_join_next() {
            done??;
        }
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = reader.join();
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort();
    if l.is_empty() {
        bail!("latency: no event seen by the consumer");
    }
    let pct = |p: f64| l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1];
    println!(
        "latency commit -> read_committed consumer ({} relay) at {} events/s for {}s: {} of {} seen; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.mode,
        args.rate,
        args.seconds,
        l.len(),
        staged,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        l[l.len() - 1].as_secs_f64() * 1e3
    );
    Ok(())
}
