//! `txbox status`: where every inbox partition and relay stream stands,
//! and whether something needs a person.

mod alerts;
mod inbox;
mod relay;
mod table;

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;
use sqlx::PgPool;
use txbox::Schema;

use crate::brokers::Log;
use crate::Outcome;

/// Where everything stands, and whether something needs a person.
///
/// Inbox: per group and partition the stored next offset, owner and
/// epoch; with --brokers the log end, the lag in messages and in seconds
/// (age of the message at the stored position), otherwise `?`. Relay: per
/// stream the owner and lease, position, published count, backlog (outbox
/// rows past the position) and the age of its oldest row, dead letters and
/// whether its stored history is this database's. Also the oldest running
/// transaction, which holds the relay back.
///
/// Exit codes:
///   0  nothing needs a person
///   1  error (cannot connect, schema not migrated...)
///   2  something needs a person, with the reasons printed: a relay stream
///      with a backlog and no live lease (no owner or lease expired), a
///      stream whose stored history is not this database's, dead letters
///      (inbox or relay), a transaction holding the relay back longer than
///      --hold-back-alert, --brokers given but an inbox partition's log end
///      unreadable (lag unknown)
///
/// Examples:
///
///   txbox status
///   txbox status --brokers kafka:9092 --json | jq '.inbox[] | .lag'
///   txbox status --hold-back-alert 5m || page-someone
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct StatusArgs {
    /// Kafka bootstrap servers, to read log ends (lag unknown without).
    #[arg(long, env = "TXBOX_KAFKA_BOOTSTRAP", value_name = "SERVERS")]
    pub brokers: Option<String>,
    /// Extra librdkafka option key=value (security, SASL...; repeatable).
    #[arg(long = "kafka-option", value_parser = txbox::kafka::parse_option, value_name = "KEY=VALUE")]
    pub kafka_options: Vec<(String, String)>,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
    /// A transaction holding the relay back longer than this needs a person.
    #[arg(long, default_value = "60s", value_parser = txbox_relay::parse_duration, value_name = "DURATION")]
    pub hold_back_alert: Duration,
}

/// Everything `txbox status` found.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    generated_at: DateTime<Utc>,
    /// Whether brokers were given (log ends and lag measured).
    brokers: bool,
    inbox: Vec<inbox::InboxPartition>,
    inbox_dead_letters: Vec<inbox::GroupDeadLetters>,
    relay: Vec<relay::RelayStream>,
    hold_back: Option<relay::HoldBack>,
    needs_attention: bool,
    reasons: Vec<String>,
}

/// Runs `txbox status`.
pub(crate) async fn run(
    pool: &PgPool,
    schema: &Schema,
    args: StatusArgs,
) -> anyhow::Result<Outcome> {
    let log = match &args.brokers {
        Some(b) => Some(Log::connect(b, &args.kafka_options)?),
        None => None,
    };
    let mut report = Report {
        generated_at: Utc::now(),
        brokers: log.is_some(),
        inbox: inbox::partitions(pool, schema, log).await?,
        inbox_dead_letters: inbox::dead_letters(pool, schema).await?,
        relay: relay::streams(pool, schema).await?,
        hold_back: relay::hold_back(pool).await?,
        needs_attention: false,
        reasons: Vec::new(),
    };
    report.reasons = alerts::reasons(&report, args.hold_back_alert);
    report.needs_attention = !report.reasons.is_empty();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("status as JSON")?
        );
    } else {
        table::print(&report);
    }
    Ok(if report.needs_attention {
        Outcome::NeedsAttention
    } else {
        Outcome::Done
    })
}
