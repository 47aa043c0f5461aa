//! `txbox-relay-bench`: how fast the relay drains an outbox, against a
//! plain producer, and how long an event takes from its staging commit to
//! a consumer.
//!
//! Run with (release build, a broker and PostgreSQL up):
//!
//! ```text
//! cargo run --release -p txbox-relay --bin txbox-relay-bench -- \
//!     --bootstrap 127.0.0.1:9092 --events 1000000
//! ```
//!
//! Steps, all in one run on a fresh database (dropped at the end):
//! 1. pre-fill the outbox with `--events` events of `--payload-bytes`
//!    bytes over 1,000 keys, in transactions of 10,000 rows;
//! 2. (a) drain it with the relay (at-least-once) and report events/s;
//! 3. (b) send the same number of records with a plain idempotent
//!    producer and report records/s, and (c) the ratio;
//! 4. (d) stage `--rate` events/s (transactions of 10, with NOTIFY) for
//!    `--seconds` while the relay runs, and report the latency from each
//!    staging commit until a consumer reads the record (p50, p99, max).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use txbox_relay::{CancellationToken, Mode, RelayConfig};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "txbox-relay-bench",
    about = "Relay throughput and latency benchmark"
)]
struct Args {
    /// Kafka bootstrap servers (e.g. the Apache Kafka started by scripts/dev-up).
    #[arg(long, env = "TXBOX_TEST_KAFKA")]
    bootstrap: String,
    /// PostgreSQL server URL; a fresh database is created on it.
    #[arg(
        long,
        env = "TXBOX_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Events to pre-fill and drain.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Relay batch size.
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
    /// Extra librdkafka option for the relay, key=value (repeatable).
    #[arg(long = "kafka-option", value_name = "KEY=VALUE")]
    kafka_options: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let db = BenchDb::create(&args.database_url).await?;
    let result = bench(&args, &db).await;
    db.drop_database().await;
    result
}

async fn bench(args: &Args, db: &BenchDb) -> anyhow::Result<()> {
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let relay_topic = format!("bench-relay-{run}");
    let plain_topic = format!("bench-plain-{run}");
    let latency_topic = format!("bench-latency-{run}");
    for t in [&relay_topic, &plain_topic, &latency_topic] {
        create_topic(&args.bootstrap, t, args.partitions).await?;
    }
    println!(
        "txbox-relay-bench: {} events x {} B, batch {}, {} partitions, broker {}",
        args.events, args.payload_bytes, args.batch_size, args.partitions, args.bootstrap
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
    let mut config = RelayConfig::new(&db.url, &args.bootstrap);
    config.mode = Mode::AtLeastOnce;
    config.batch_size = args.batch_size;
    config.poll_interval = Duration::from_millis(20);
    config.instance = format!("bench-{run}");
    for kv in &args.kafka_options {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--kafka-option {kv:?} must be key=value");
        };
        config.kafka.insert(k.to_owned(), v.to_owned());
    }
    let shutdown = CancellationToken::new();
    let t = Instant::now();
    let relay = tokio::spawn(txbox_relay::run(config, shutdown.clone()));
    let expected = i64::try_from(args.events)?;
    loop {
        let published: Option<i64> =
            sqlx::query_scalar("SELECT published FROM txbox.relay_streams WHERE stream = 0")
                .fetch_optional(&db.pool)
                .await?;
        if published.unwrap_or(0) >= expected {
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
        "(a) relay drain (at-least-once): {} events in {:.2}s = {:.0} events/s",
        args.events,
        drain.as_secs_f64(),
        relay_rate
    );

    // 3. Plain producer, same records.
    let plain_rate = plain_producer(
        &args.bootstrap,
        &plain_topic,
        args.events,
        args.payload_bytes,
    )
    .await?;
    println!(
        "(b) plain idempotent producer: {} records = {:.0} records/s",
        args.events, plain_rate
    );
    println!("(c) relay / plain = {:.2}", relay_rate / plain_rate);

    // 4. Latency at a steady rate, with the relay still running.
    if !args.no_latency {
        latency(args, &db.pool, &latency_topic).await?;
    }
    shutdown.cancel();
    match relay.await? {
        Ok(report) => println!("relay stopped: published {}", report.published()),
        Err(e) => println!("relay stopped with an error: {e}"),
    }
    Ok(())
}

/// Server-side generated rows, in transactions of 10,000: keys `k0..k999`,
/// a payload of `bytes` bytes, headers as `Outbox::stage` writes them.
async fn prefill(pool: &PgPool, topic: &str, events: usize, bytes: usize) -> anyhow::Result<()> {
    const CHUNK: usize = 10_000;
    let mut start = 0usize;
    while start < events {
        let end = (start + CHUNK).min(events);
        sqlx::query(
            "INSERT INTO txbox.outbox (stream, topic, key, payload, headers, event_id)
             SELECT 0, $1, convert_to('k' || (i % 1000), 'UTF8'),
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
        .execute(pool)
        .await?;
        start = end;
    }
    // What autovacuum would do shortly after such a load; without
    // statistics the planner may sort instead of walking the index.
    sqlx::query("ANALYZE txbox.outbox").execute(pool).await?;
    Ok(())
}

async fn plain_producer(
    bootstrap: &str,
    topic: &str,
    events: usize,
    bytes: usize,
) -> anyhow::Result<f64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .create()?;
    let records: Vec<(Vec<u8>, Vec<u8>, String)> = (0..events)
        .map(|i| {
            let mut payload = format!("{i}:").into_bytes();
            payload.resize(bytes, b'x');
            (
                format!("k{}", i % 1000).into_bytes(),
                payload,
                Uuid::new_v4().to_string(),
            )
        })
        .collect();
    let t = Instant::now();
    let mut pending = Vec::with_capacity(events);
    for (key, payload, id) in &records {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_id",
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            });
        let mut rec = FutureRecord::to(topic)
            .key(key.as_slice())
            .payload(payload.as_slice())
            .headers(headers);
        loop {
            match producer.send_result(rec) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => bail!("plain producer: {e}"),
            }
        }
    }
    for f in pending {
        if let Ok(Err((e, _))) = f.await {
            bail!("plain producer delivery: {e}");
        }
    }
    Ok(events as f64 / t.elapsed().as_secs_f64())
}

async fn latency(args: &Args, pool: &PgPool, topic: &str) -> anyhow::Result<()> {
    let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &args.bootstrap)
            .set("group.id", format!("bench-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
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
        "(d) latency commit -> consumer at {} events/s for {}s: {} of {} seen; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
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

async fn create_topic(bootstrap: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.create_topics([&topic], &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => bail!("cannot create topic {t}: {e}"),
        }
    }
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    for _ in 0..100 {
        let ready = tokio::task::block_in_place(|| {
            probe.fetch_metadata(Some(name), Duration::from_secs(5))
        })
        .ok()
        .and_then(|m| {
            m.topics()
                .first()
                .map(|t| t.error().is_none() && !t.partitions().is_empty())
        })
        .unwrap_or(false);
        if ready {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("topic {name} did not appear")
}

/// A database created for the run and dropped after it.
struct BenchDb {
    pool: PgPool,
    url: String,
    name: String,
    admin: String,
}

impl BenchDb {
    async fn create(admin: &str) -> anyhow::Result<BenchDb> {
        let name = format!("txbox_relay_bench_{}", Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(admin)
            .await
            .with_context(|| format!("connect to {admin}"))?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let opts: PgConnectOptions = admin.parse::<PgConnectOptions>()?.database(&name);
        let url = opts.to_url_lossy().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(opts)
            .await?;
        txbox::Migrator::new(txbox::Schema::default())
            .run(&pool)
            .await?;
        Ok(BenchDb {
            pool,
            url,
            name,
            admin: admin.to_owned(),
        })
    }

    async fn drop_database(&self) {
        self.pool.close().await;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await;
        }
    }
}
