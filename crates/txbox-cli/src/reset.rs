//! `txbox offsets reset`: move a group's stored positions on a topic.

use std::collections::BTreeMap;

use anyhow::Context as _;
use chrono::{DateTime, FixedOffset};
use clap::{ArgGroup, Args};
use sqlx::PgPool;
use txbox::inbox::{PositionReset, ResetTo};
use txbox::Schema;

use crate::brokers::Log;

/// Move a group's stored positions on a topic and fence their owners.
///
/// Stop the group's consumers first: a consumer still running on a moved
/// partition is fenced and holds it, unprocessed, until it restarts or the
/// group rebalances. Prints the plan and changes nothing unless `--execute`
/// is given (as `kafka-consumer-groups --reset-offsets`).
///
/// Examples:
///
///   txbox offsets reset --group ledger --topic payments --shift-by -100
///   txbox offsets reset --group ledger --topic payments --to-latest \
///       --brokers kafka:9092 --execute
///   txbox offsets reset --group ledger --topic payments \
///       --to-datetime 2024-05-01T12:00:00Z --brokers kafka:9092 --execute
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
#[command(group(
    ArgGroup::new("target")
        .required(true)
        .args(["to_offset", "shift_by", "to_earliest", "to_latest", "to_datetime"])
))]
pub struct ResetArgs {
    /// The consumer group.
    #[arg(long)]
    pub group: String,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// Only this partition (repeatable; default: every stored one).
    #[arg(long = "partition")]
    pub partitions: Vec<i32>,
    /// Move to this offset.
    #[arg(long)]
    pub to_offset: Option<i64>,
    /// Move by this many (negative: replay that many), floored at 0.
    #[arg(long, allow_hyphen_values = true)]
    pub shift_by: Option<i64>,
    /// Move to the oldest message the log still holds (needs --brokers).
    #[arg(long, requires = "brokers")]
    pub to_earliest: bool,
    /// Move to the end of the log: skip everything in it now (needs
    /// --brokers).
    #[arg(long, requires = "brokers")]
    pub to_latest: bool,
    /// Move to the first message at or after this time (RFC 3339, e.g.
    /// 2024-05-01T12:00:00Z), as the brokers index timestamps; a time after
    /// the last message moves to the log end (needs --brokers).
    #[arg(long, requires = "brokers", value_parser = parse_datetime, value_name = "RFC3339")]
    pub to_datetime: Option<DateTime<FixedOffset>>,
    /// Kafka bootstrap servers, to read the log's bounds.
    #[arg(long, env = "TXBOX_KAFKA_BOOTSTRAP", value_name = "SERVERS")]
    pub brokers: Option<String>,
    /// Extra librdkafka option key=value for reading the bounds (security,
    /// SASL...; repeatable).
    #[arg(long = "kafka-option", value_parser = txbox::kafka::parse_option, value_name = "KEY=VALUE")]
    pub kafka_options: Vec<(String, String)>,
    /// The topic was deleted and created again: forget what was consumed on
    /// the old log, so messages without an event id of their own (or every
    /// message, for an inbox with offsets-only dedupe) at offsets the old
    /// log had are applied, not skipped as replayed.
    #[arg(long)]
    pub new_log: bool,
    /// Apply the reset (otherwise only print it).
    #[arg(long)]
    pub execute: bool,
}

/// Runs `txbox offsets reset`.
pub(crate) async fn run(pool: &PgPool, schema: &Schema, args: ResetArgs) -> anyhow::Result<()> {
    let to = match (args.to_offset, args.shift_by) {
        (Some(o), _) => ResetTo::Offset(o),
        (None, Some(n)) => ResetTo::Shift(n),
        (None, None) => ResetTo::Each(log_bounds(pool, schema, &args).await?),
    };
    let each = matches!(to, ResetTo::Each(_));
    let mut reset = PositionReset::new(schema.clone(), &args.group, &args.topic, to);
    if !each && !args.partitions.is_empty() {
        reset = reset.partitions(args.partitions.iter().copied());
    }
    if args.new_log {
        reset = reset.new_log();
    }
    let changes = if args.execute {
        reset.apply(pool).await?
    } else {
        reset.preview(pool).await?
    };
    println!("group\ttopic\tpart\tfrom\tto\tfenced_owner");
    for c in &changes {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            args.group,
            args.topic,
            c.partition,
            c.from,
            c.to,
            c.fenced_owner.as_deref().unwrap_or("")
        );
    }
    if args.execute {
        println!("reset {} partitions", changes.len());
    } else {
        println!("dry run: nothing changed; add --execute to apply");
    }
    Ok(())
}

/// The selected partitions' log start (`--to-earliest`), end
/// (`--to-latest`) or first offset at a time (`--to-datetime`), read from
/// the brokers.
async fn log_bounds(
    pool: &PgPool,
    schema: &Schema,
    args: &ResetArgs,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let partitions = if args.partitions.is_empty() {
        stored_partitions(pool, schema, &args.group, &args.topic).await?
    } else {
        args.partitions.clone()
    };
    let brokers = args.brokers.clone().context(
        "--to-earliest, --to-latest and --to-datetime need --brokers (or TXBOX_KAFKA_BOOTSTRAP)",
    )?;
    let options = args.kafka_options.clone();
    let (topic, latest, at) = (
        args.topic.clone(),
        args.to_latest,
        args.to_datetime.map(|t| t.timestamp_millis()),
    );
    tokio::task::spawn_blocking(move || {
        let log = Log::connect(&brokers, &options)?;
        if let Some(millis) = at {
            return Ok(log
                .offsets_for_time(&topic, &partitions, millis)?
                .into_iter()
                .collect());
        }
        partitions
            .into_iter()
            .map(|p| {
                let (low, high) = log.bounds(&topic, p)?;
                Ok((p, if latest { high } else { low }))
            })
            .collect()
    })
    .await?
}

/// Parses an RFC 3339 time (`2024-05-01T12:00:00Z`, `...+02:00`).
fn parse_datetime(s: &str) -> Result<DateTime<FixedOffset>, String> {
    DateTime::parse_from_rfc3339(s)
        .map_err(|e| format!("{e}: expected RFC 3339, e.g. 2024-05-01T12:00:00Z"))
}

/// The partitions of `topic` with a stored position for `group`.
async fn stored_partitions(
    pool: &PgPool,
    schema: &Schema,
    group: &str,
    topic: &str,
) -> anyhow::Result<Vec<i32>> {
    let partitions: Vec<i32> = sqlx::query_scalar(&format!(
        "SELECT partition FROM {} WHERE consumer_group = $1 AND topic = $2 ORDER BY partition",
        schema.table("inbox_offsets")
    ))
    .bind(group)
    .bind(topic)
    .fetch_all(pool)
    .await?;
    if partitions.is_empty() {
        anyhow::bail!(txbox::Error::NoPosition {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partitions: Vec::new(),
        });
    }
    Ok(partitions)
}
