//! The `txbox` command-line tool: applies migrations explicitly and
//! inspects a txbox schema. The binary is a thin wrapper over [`run`].
//!
//! ```text
//! txbox migrate [--dry-run]          apply pending migrations (under a lock)
//! txbox migrate status               list migrations and their state
//! txbox dead-letters [--group G]     list inbox dead letters
//! txbox offsets [--group G]          list inbox positions and epochs
//! txbox offsets reset --group G --topic T (--to-offset N | --shift-by N)
//!       [--partition P]... [--execute]  move positions (dry run unless --execute)
//! txbox relay-status                 list relay streams, owners and positions
//! ```
//!
//! Every command reads `--database-url` (`TXBOX_DATABASE_URL`) and
//! `--schema` (`TXBOX_SCHEMA`, default `txbox`).

#![warn(clippy::unwrap_used)]

mod inspect;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sqlx::postgres::PgPoolOptions;
use txbox::inbox::{PositionReset, ResetTo};
use txbox::schema::MigrationState;
use txbox::{Migrator, Schema};

/// Command-line options.
#[derive(Debug, Parser)]
#[command(
    name = "txbox",
    version,
    about = "Migrations and operations for txbox schemas"
)]
pub struct Opt {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "TXBOX_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// Schema holding txbox's tables.
    #[arg(long, env = "TXBOX_SCHEMA", default_value = Schema::DEFAULT, global = true)]
    pub schema: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations (or print them with --dry-run).
    Migrate {
        /// Print the SQL that would run, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// `status` lists migrations instead of applying them.
        #[command(subcommand)]
        sub: Option<MigrateCommand>,
    },
    /// List inbox dead letters, newest first.
    DeadLetters {
        /// Only this consumer group.
        #[arg(long)]
        group: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 50)]
        limit: u64,
    },
    /// List inbox positions (next offset and fencing epoch per partition),
    /// or move them (`reset`).
    Offsets {
        /// Only this consumer group.
        #[arg(long)]
        group: Option<String>,
        /// `reset` moves positions instead of listing them.
        #[command(subcommand)]
        sub: Option<OffsetsCommand>,
    },
    /// List relay streams: owner, lease, position, published count.
    RelayStatus,
}

/// `txbox migrate` subcommands.
#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// List every migration and whether it is applied.
    Status,
}

/// `txbox offsets` subcommands.
#[derive(Debug, Subcommand)]
pub enum OffsetsCommand {
    /// Move a group's stored positions on a topic and fence their owners.
    ///
    /// Stop the group's consumers first: a consumer still running on a moved
    /// partition is fenced and holds it, unprocessed, until it restarts or
    /// the group rebalances. Prints the plan and changes nothing unless
    /// `--execute` is given (as `kafka-consumer-groups --reset-offsets`).
    Reset {
        /// The consumer group.
        #[arg(long)]
        group: String,
        /// The topic.
        #[arg(long)]
        topic: String,
        /// Only this partition (repeatable; default: every stored one).
        #[arg(long = "partition")]
        partitions: Vec<i32>,
        /// Move to this offset (0: the start of the log).
        #[arg(
            long,
            conflicts_with = "shift_by",
            required_unless_present = "shift_by"
        )]
        to_offset: Option<i64>,
        /// Move by this many (negative: replay that many), floored at 0.
        #[arg(long, allow_hyphen_values = true)]
        shift_by: Option<i64>,
        /// Apply the reset (otherwise only print it).
        #[arg(long)]
        execute: bool,
    },
}

/// Runs one command.
pub async fn run(opt: Opt) -> anyhow::Result<()> {
    let url = opt
        .database_url
        .as_deref()
        .context("no database URL: pass --database-url or set TXBOX_DATABASE_URL")?;
    let schema = Schema::new(opt.schema.clone())?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the database at {}",
                txbox::db::redact_url(url)
            )
        })?;
    let migrator = Migrator::new(schema.clone());
    match opt.command {
        Command::Migrate {
            sub: Some(MigrateCommand::Status),
            ..
        } => {
            let status = migrator.status(&pool).await?;
            println!("schema {schema}");
            for s in status {
                let state = match s.state {
                    MigrationState::Applied { at } => {
                        format!("applied {}", at.format("%Y-%m-%d %H:%M:%S UTC"))
                    }
                    MigrationState::Pending => "pending".to_owned(),
                    MigrationState::Modified => "MODIFIED (checksum differs)".to_owned(),
                    MigrationState::Unknown => "unknown to this txbox".to_owned(),
                };
                println!("{:>4}  {:<10} {state}", s.version, s.name);
            }
        }
        Command::Migrate { dry_run: true, .. } => print!("{}", migrator.dry_run(&pool).await?),
        Command::Migrate { .. } => {
            let applied = migrator.run(&pool).await?;
            if applied.is_empty() {
                println!(
                    "schema {schema} is up to date (version {})",
                    migrator.latest_version()
                );
            }
            for m in applied {
                println!("applied {} {} to schema {schema}", m.version, m.name);
            }
        }
        Command::DeadLetters { group, limit } => {
            migrator.verify(&pool).await?;
            inspect::dead_letters(&pool, &schema, group.as_deref(), limit).await?;
        }
        Command::Offsets { group, sub: None } => {
            migrator.verify(&pool).await?;
            inspect::offsets(&pool, &schema, group.as_deref()).await?;
        }
        Command::Offsets {
            sub:
                Some(OffsetsCommand::Reset {
                    group,
                    topic,
                    partitions,
                    to_offset,
                    shift_by,
                    execute,
                }),
            ..
        } => {
            migrator.verify(&pool).await?;
            let to = match (to_offset, shift_by) {
                (Some(o), _) => ResetTo::Offset(o),
                (None, Some(n)) => ResetTo::Shift(n),
                (None, None) => anyhow::bail!("give --to-offset or --shift-by"),
            };
            let mut reset = PositionReset::new(schema.clone(), &group, &topic, to);
            if !partitions.is_empty() {
                reset = reset.partitions(partitions);
            }
            let changes = if execute {
                reset.apply(&pool).await?
            } else {
                reset.preview(&pool).await?
            };
            println!("group\ttopic\tpart\tfrom\tto\tfenced_owner");
            for c in &changes {
                println!(
                    "{group}\t{topic}\t{}\t{}\t{}\t{}",
                    c.partition,
                    c.from,
                    c.to,
                    c.fenced_owner.as_deref().unwrap_or("")
                );
            }
            if execute {
                println!("reset {} partitions", changes.len());
            } else {
                println!("dry run: nothing changed; add --execute to apply");
            }
        }
        Command::RelayStatus => {
            migrator.verify(&pool).await?;
            inspect::relay_streams(&pool, &schema).await?;
        }
    }
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}
