//! The `txbox` command-line tool: applies migrations explicitly and
//! inspects a txbox schema. The binary is a thin wrapper over [`run`].
//!
//! ```text
//! txbox migrate [--dry-run]          apply pending migrations (under a lock)
//! txbox migrate status               list migrations and their state
//! txbox dead-letters [--relay] [--group G] [--error TEXT] ...
//!                                    list dead letters (inbox, or relay)
//! txbox dead-letters show ID         one in full
//! txbox dead-letters replay|discard (--id N | filters) [--execute]
//!                                    replay through the handler, or discard
//!                                    with an audit row (dry run by default)
//! txbox offsets [--group G]          list inbox positions and epochs
//! txbox offsets reset --group G --topic T
//!       (--to-offset N | --shift-by N | --to-earliest | --to-latest)
//!       [--partition P]... [--brokers B] [--execute]
//!                                    move positions (dry run unless --execute)
//! txbox offsets reset ... --to-datetime 2024-05-01T12:00:00Z --brokers B
//!                                    move to the first message at that time
//! txbox status [--brokers B] [--json] [--hold-back-alert 60s]
//!                                    where everything stands; exit 2 when
//!                                    something needs a person
//! txbox relay-status                 list relay streams, owners and positions
//! txbox relay re-anchor --stream N [--execute]
//!                                    anchor a relay stream in this database's
//!                                    history (after a restore or failover)
//! ```
//!
//! Every command reads `--database-url` (`TXBOX_DATABASE_URL`) and
//! `--schema` (`TXBOX_SCHEMA`, default `txbox`).

#![warn(clippy::unwrap_used)]

mod brokers;
mod dead_letters;
mod inspect;
mod reanchor;
mod relay_dead_letters;
mod reset;
mod status;

pub use dead_letters::{Action as DeadLetterAction, DeadLettersArgs, Selection};
pub use reanchor::ReAnchorArgs;
pub use reset::ResetArgs;
pub use status::StatusArgs;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sqlx::postgres::PgPoolOptions;
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
    /// Log lines as text (colours only on a terminal) or json.
    #[arg(
        long,
        env = "TXBOX_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    pub log_format: txbox_relay::logging::LogFormat,
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
    /// List, show, replay or discard dead letters (inbox, or --relay).
    DeadLetters(DeadLettersArgs),
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
    // The help is StatusArgs' (a doc comment here would replace it).
    Status(StatusArgs),
    /// List relay streams: owner, lease, position, published count.
    RelayStatus,
    /// Relay stream operations (`re-anchor`).
    Relay {
        /// What to do.
        #[command(subcommand)]
        sub: RelayCommand,
    },
}

/// `txbox relay` subcommands.
#[derive(Debug, Subcommand)]
pub enum RelayCommand {
    // The help, with examples, is ReAnchorArgs'.
    ReAnchor(ReAnchorArgs),
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
    // The help, with examples, is ResetArgs'.
    Reset(ResetArgs),
}

/// How a command that ran ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done; nothing needs a person (exit code 0).
    Done,
    /// `txbox status` found something that needs a person (exit code 2).
    NeedsAttention,
}

impl Outcome {
    /// The process exit code: 0 or 2 (errors exit 1).
    pub fn exit_code(self) -> std::process::ExitCode {
        match self {
            Outcome::Done => std::process::ExitCode::SUCCESS,
            Outcome::NeedsAttention => std::process::ExitCode::from(2),
        }
    }
}

/// Runs one command.
pub async fn run(opt: Opt) -> anyhow::Result<Outcome> {
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
        Command::DeadLetters(args) => {
            migrator.verify(&pool).await?;
            dead_letters::run(&pool, &schema, args).await?;
        }
        Command::Offsets { group, sub: None } => {
            migrator.verify(&pool).await?;
            inspect::offsets(&pool, &schema, group.as_deref()).await?;
        }
        Command::Offsets {
            sub: Some(OffsetsCommand::Reset(args)),
            ..
        } => {
            migrator.verify(&pool).await?;
            reset::run(&pool, &schema, args).await?;
        }
        Command::Status(args) => {
            migrator.verify(&pool).await?;
            return status::run(&pool, &schema, args).await;
        }
        Command::RelayStatus => {
            migrator.verify(&pool).await?;
            inspect::relay_streams(&pool, &schema).await?;
        }
        Command::Relay {
            sub: RelayCommand::ReAnchor(args),
        } => {
            migrator.verify(&pool).await?;
            reanchor::run(&pool, &schema, args).await?;
        }
    }
    Ok(Outcome::Done)
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: txbox_relay::logging::LogFormat) {
    txbox_relay::logging::init(format);
}
