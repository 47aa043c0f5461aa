//! `txbox relay re-anchor`: move a relay stream into the database's
//! current history after a restore, a cutover or a failover.

use clap::Args;
use sqlx::PgPool;
use txbox::Schema;
use txbox_relay::{Histories, Position};

/// Anchor a relay stream in this database's current history.
///
/// The relay stops a stream whose stored position was recorded in another
/// database history (a dump restored into a new cluster, a logical
/// replication cutover) or lies past the database's transaction counter (a
/// failover to a standby that was behind, a point-in-time recovery): rows
/// staged since could sort below it and be skipped, then pruned.
///
/// Re-anchoring records the current history and moves the stream's
/// position back to the start: every row still in the stream's outbox is
/// published again. Rows published before the restore and not yet pruned
/// are so published twice (with their event ids, which a txbox inbox
/// downstream drops); no row is lost. Rows whose transaction ids lie in
/// this history's future (copied from a cluster that had run further) get
/// the re-anchoring transaction's id, so they are published now. The
/// stream's holder, if any, is fenced. Stop the stream's relays first. Prints the plan and changes
/// nothing unless `--execute` is given.
///
/// Examples:
///
///   txbox relay re-anchor --stream 0             # what would change
///   txbox relay re-anchor --stream 0 --execute   # apply
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ReAnchorArgs {
    /// The relay stream.
    #[arg(long)]
    pub stream: i32,
    /// Also give the schema a new installation id: for a copy of a database
    /// (CREATE DATABASE ... TEMPLATE, a dump restored beside the original)
    /// that runs as a service of its own. Re-anchor every other stream of
    /// the schema afterwards.
    #[arg(long)]
    pub new_installation: bool,
    /// Apply (otherwise only print what would change).
    #[arg(long)]
    pub execute: bool,
}

/// Runs `txbox relay re-anchor`.
pub async fn run(pool: &PgPool, schema: &Schema, args: ReAnchorArgs) -> anyhow::Result<()> {
    let plan = Histories::new(schema)
        .re_anchor(pool, args.stream, args.new_installation, args.execute)
        .await?;
    println!("relay stream {}:", plan.stream);
    println!(
        "  stored position {} in history {}",
        plan.stored_position,
        plan.stored_history.as_deref().unwrap_or("(none recorded)")
    );
    println!(
        "  this database: history {}, next transaction id {}",
        plan.current, plan.xmax
    );
    let (verb, done) = match &plan.anchor {
        Some(anchor) => ("now", format!("re-anchored as {anchor}")),
        None => (
            "would be",
            "dry run: nothing changed (add --execute to apply)".to_owned(),
        ),
    };
    println!(
        "  position {verb} {}, in history {}; the {} row(s) in the stream's outbox (of which {} carry \
         transaction ids from this history's future) {verb} given the re-anchoring transaction's id and \
         published again",
        Position::START,
        plan.current,
        plan.backlog,
        plan.future
    );
    println!("{done}");
    Ok(())
}
