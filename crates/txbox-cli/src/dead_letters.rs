//! `txbox dead-letters`: list, show, replay and discard inbox dead letters
//! (or, with `--relay`, relay dead letters).

use anyhow::Context as _;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use sqlx::PgPool;
use txbox::inbox::{DeadLetter, DeadLetterFilter, DeadLetters};
use txbox::Schema;

/// `txbox dead-letters` arguments.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  txbox dead-letters --group ledger --error timeout
  txbox dead-letters show 42
  txbox dead-letters replay --id 42                  # dry run: what would be replayed
  txbox dead-letters replay --group ledger --since 2026-12-01T00:00:00Z --execute
  txbox dead-letters discard --id 42 --reason 'test data' --execute
  txbox dead-letters --relay                         # rows Kafka refused for good
  txbox dead-letters replay --relay --id 7 --execute # stage the row again

An inbox replay is carried out by a running inbox of the dead letter's group
(one with a handler for its topic): it runs the handler in a transaction of
its own, with the message's event id and position, and removes the dead
letter only when that commits; a replay that fails keeps the dead letter,
with the error in `replay_error`. A relay replay stages the row into the
outbox again (same event id), to be published after the current backlog.
Replays and discards are dry runs unless --execute, and each leaves a row in
`dead_letter_audit` (the dead letter as it was, who, when, why).")]
pub struct DeadLettersArgs {
    /// Relay dead letters (outbox rows Kafka refused) instead of inbox ones.
    #[arg(long, global = true)]
    pub relay: bool,
    /// What to do (default: list).
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Which dead letters to list.
    #[command(flatten)]
    pub select: Selection,
    /// At most this many rows (1 or more: a listing of none would read as
    /// "no dead letters").
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
    pub limit: i64,
}

/// `txbox dead-letters` actions.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// One dead letter in full: key, payload (text, or base64), headers.
    Show {
        /// Its id.
        id: i64,
    },
    /// Replay the selected dead letters (dry run unless --execute).
    Replay {
        /// Which dead letters.
        #[command(flatten)]
        select: Selection,
        /// Carry it out.
        #[arg(long)]
        execute: bool,
        /// Who asks, for the audit trail [default: $USER].
        #[arg(long)]
        actor: Option<String>,
    },
    /// Delete the selected dead letters, keeping them in the audit trail
    /// (dry run unless --execute).
    Discard {
        /// Which dead letters.
        #[command(flatten)]
        select: Selection,
        /// Why (required, recorded).
        #[arg(long)]
        reason: String,
        /// Carry it out.
        #[arg(long)]
        execute: bool,
        /// Who discards, for the audit trail [default: $USER].
        #[arg(long)]
        actor: Option<String>,
    },
}

/// Which dead letters a command applies to; every option narrows it.
#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct Selection {
    /// These ids (repeatable).
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<i64>,
    /// Inbox: this consumer group.
    #[arg(long)]
    pub group: Option<String>,
    /// This topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Inbox: this partition.
    #[arg(long)]
    pub partition: Option<i32>,
    /// Relay: this stream.
    #[arg(long)]
    pub stream: Option<i32>,
    /// Failed at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub since: Option<DateTime<Utc>>,
    /// Failed before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub until: Option<DateTime<Utc>>,
    /// The error contains this text (case-insensitive).
    #[arg(long = "error", value_name = "TEXT")]
    pub error_contains: Option<String>,
    /// Replay or discard everything (a replay or discard with no other
    /// selection is refused without it).
    #[arg(long)]
    pub all: bool,
}

impl Selection {
    fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.group.is_none()
            && self.topic.is_none()
            && self.partition.is_none()
            && self.stream.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.error_contains.is_none()
    }

    /// Refuses a change that would select every dead letter by accident.
    fn for_change(&self, what: &str) -> anyhow::Result<&Self> {
        anyhow::ensure!(
            self.all || !self.is_empty(),
            "{what} selects every dead letter: narrow it (--id, --group, --topic, --since, ...) \
             or pass --all"
        );
        Ok(self)
    }

    fn inbox(&self, relay_only: bool) -> anyhow::Result<DeadLetterFilter> {
        anyhow::ensure!(
            !relay_only,
            "--stream selects relay dead letters: add --relay"
        );
        Ok(DeadLetterFilter {
            ids: (!self.ids.is_empty()).then(|| self.ids.clone()),
            group: self.group.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            since: self.since,
            until: self.until,
            error_contains: self.error_contains.clone(),
        })
    }
}

/// Who acts, for the audit trail: `--actor`, else `$USER`.
pub(crate) fn actor(given: Option<String>) -> String {
    given
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "txbox-cli".into())
}

/// Runs `txbox dead-letters`.
pub(crate) async fn run(
    pool: &PgPool,
    schema: &Schema,
    args: DeadLettersArgs,
) -> anyhow::Result<()> {
    if args.relay {
        return crate::relay_dead_letters::run(pool, schema, args).await;
    }
    let dead = DeadLetters::new(schema.clone());
    match args.action {
        None => {
            let filter = args.select.inbox(args.select.stream.is_some())?;
            let rows = dead.list(pool, &filter, args.limit).await?;
            println!(
                "id\tgroup\ttopic\tpart\toffset\tevent_id\tattempts\tlast_failed_at\treplay\terror"
            );
            for d in &rows {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    d.id,
                    d.group,
                    d.topic,
                    d.partition,
                    d.offset,
                    d.event_id,
                    d.attempts,
                    d.last_failed_at.to_rfc3339(),
                    replay_state(d),
                    one_line(&d.error)
                );
            }
            println!("({} rows)", rows.len());
        }
        Some(Action::Show { id }) => {
            let filter = DeadLetterFilter {
                ids: Some(vec![id]),
                ..DeadLetterFilter::default()
            };
            let d = dead
                .list(pool, &filter, 1)
                .await?
                .pop()
                .with_context(|| format!("no inbox dead letter {id} (relay ones: --relay)"))?;
            show(&d);
        }
        Some(Action::Replay {
            select,
            execute,
            actor: who,
        }) => {
            let filter = select
                .for_change("replay")?
                .inbox(select.stream.is_some())?;
            let ids = dead
                .request_replay(pool, &filter, &actor(who), execute)
                .await?;
            report(
                "replay requested for",
                "would request a replay of",
                &ids,
                execute,
            );
            if execute && !ids.is_empty() {
                println!(
                    "a running inbox of each dead letter's group replays it within seconds; \
                     `txbox dead-letters --id ...` shows what is left and why"
                );
            }
        }
        Some(Action::Discard {
            select,
            reason,
            execute,
            actor: who,
        }) => {
            let filter = select
                .for_change("discard")?
                .inbox(select.stream.is_some())?;
            let ids = dead
                .discard(pool, &filter, &actor(who), &reason, execute)
                .await?;
            report("discarded", "would discard", &ids, execute);
        }
    }
    Ok(())
}

/// Prints what a change did, or would do without --execute.
pub(crate) fn report(done: &str, would: &str, ids: &[i64], execute: bool) {
    let list = ids
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if execute {
        println!("{done} {} dead letters: {list}", ids.len());
    } else {
        println!("{would} {} dead letters: {list}", ids.len());
        println!("dry run: nothing changed; add --execute to carry it out");
    }
}

fn replay_state(d: &DeadLetter) -> String {
    match (&d.replay_requested_at, &d.replay_error) {
        (Some(_), _) => "requested".into(),
        (None, Some(_)) => format!("failed x{}", d.replay_attempts),
        (None, None) => "-".into(),
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\t'], " ")
}

/// Bytes as UTF-8 text when they are, else base64.
pub(crate) fn bytes(b: Option<&[u8]>) -> String {
    match b {
        None => "(none)".into(),
        Some(b) => match std::str::from_utf8(b) {
            Ok(text) => text.to_owned(),
            Err(_) => format!(
                "base64:{}",
                base64::engine::general_purpose::STANDARD.encode(b)
            ),
        },
    }
}

fn show(d: &DeadLetter) {
    println!("id:              {}", d.id);
    println!("group:           {}", d.group);
    println!("position:        {}/{}@{}", d.topic, d.partition, d.offset);
    println!("event_id:        {}", d.event_id);
    println!("attempts:        {}", d.attempts);
    println!("first_failed_at: {}", d.first_failed_at.to_rfc3339());
    println!("last_failed_at:  {}", d.last_failed_at.to_rfc3339());
    println!("replay:          {}", replay_state(d));
    if let Some(e) = &d.replay_error {
        println!("replay_error:    {e}");
    }
    println!("error:           {}", d.error);
    println!("key:             {}", bytes(d.key.as_deref()));
    println!("headers:");
    for (name, value) in d.headers.iter() {
        println!("  {name}: {}", bytes(value));
    }
    println!("payload:\n{}", bytes(d.payload.as_deref()));
}
