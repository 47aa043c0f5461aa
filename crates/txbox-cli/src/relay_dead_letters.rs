//! `txbox dead-letters --relay`: outbox rows Kafka refused for good
//! (`--on-reject dead-letter`): list, show, replay (stage the row again),
//! discard.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use txbox::Schema;

use crate::dead_letters::{bytes, report, Action, DeadLettersArgs, Selection};

/// The selection's placeholders, `$1` to `$6`, bound by [`bind`].
const WHERE: &str = "($1::int8[] IS NULL OR d.id = ANY($1))
      AND ($2::text IS NULL OR d.topic = $2)
      AND ($3::int4 IS NULL OR d.stream = $3)
      AND ($4::timestamptz IS NULL OR d.failed_at >= $4)
      AND ($5::timestamptz IS NULL OR d.failed_at < $5)
      AND ($6::text IS NULL OR strpos(lower(d.error), lower($6)) > 0)";

type Row = (
    i64,
    i32,
    i64,
    String,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    serde_json::Value,
    uuid::Uuid,
    String,
    DateTime<Utc>,
);

const COLUMNS: &str = "d.id, d.stream, d.outbox_id, d.topic, d.key, d.payload, d.headers,
    d.event_id, d.error, d.failed_at";

fn bind<'q, O>(
    q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    s: &'q Selection,
) -> anyhow::Result<sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>> {
    anyhow::ensure!(
        s.group.is_none() && s.partition.is_none(),
        "--group and --partition select inbox dead letters: drop --relay"
    );
    Ok(q.bind((!s.ids.is_empty()).then_some(s.ids.as_slice()))
        .bind(s.topic.as_deref())
        .bind(s.stream)
        .bind(s.since)
        .bind(s.until)
        .bind(s.error_contains.as_deref()))
}

pub(crate) async fn run(
    pool: &PgPool,
    schema: &Schema,
    args: DeadLettersArgs,
) -> anyhow::Result<()> {
    let table = schema.table("relay_dead_letters");
    let audit = schema.table("dead_letter_audit");
    let outbox = schema.table("outbox");
    match args.action {
        None => {
            let sql = format!(
                "SELECT {COLUMNS} FROM {table} d WHERE {WHERE} ORDER BY d.id DESC LIMIT $7"
            );
            let rows: Vec<Row> = bind(sqlx::query_as(&sql), &args.select)?
                .bind(args.limit.max(0))
                .fetch_all(pool)
                .await?;
            println!("id\tstream\toutbox_id\ttopic\tevent_id\tfailed_at\terror");
            for r in &rows {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    r.0,
                    r.1,
                    r.2,
                    r.3,
                    r.7,
                    r.9.to_rfc3339(),
                    r.8.replace(['\n', '\t'], " ")
                );
            }
            println!("({} rows)", rows.len());
        }
        Some(Action::Show { id }) => {
            let sql = format!("SELECT {COLUMNS} FROM {table} d WHERE d.id = $1");
            let r: Row = sqlx::query_as(&sql)
                .bind(id)
                .fetch_optional(pool)
                .await?
                .with_context(|| format!("no relay dead letter {id}"))?;
            let headers = txbox::Headers::from_json(&r.6)
                .with_context(|| format!("relay dead letter {id}: stored headers unreadable"))?;
            println!(
                "id:        {}\nstream:    {}\noutbox_id: {}\ntopic:     {}",
                r.0, r.1, r.2, r.3
            );
            println!(
                "event_id:  {}\nfailed_at: {}\nerror:     {}",
                r.7,
                r.9.to_rfc3339(),
                r.8
            );
            println!("key:       {}\nheaders:", bytes(r.4.as_deref()));
            for (name, value) in headers.iter() {
                println!("  {name}: {}", bytes(value));
            }
            println!("payload:\n{}", bytes(r.5.as_deref()));
        }
        Some(Action::Replay {
            select,
            execute,
            actor,
        }) => {
            // Staged again as a new outbox row (same stream, topic, key,
            // payload, headers and event id), published after the backlog.
            let sql = format!(
                "WITH gone AS (DELETE FROM {table} AS d WHERE {WHERE} RETURNING d.*),
                      audit AS (
                          INSERT INTO {audit} (kind, dead_letter_id, action, actor, dead_letter)
                          SELECT 'relay', g.id, 'replayed', $7, to_jsonb(g) FROM gone g),
                      staged AS (
                          INSERT INTO {outbox} (stream, topic, key, payload, headers, event_id)
                          SELECT stream, topic, key, payload, headers, event_id FROM gone
                          ORDER BY id)
                 SELECT id FROM gone"
            );
            change(
                pool,
                &sql,
                select.clone(),
                actor,
                None,
                execute,
                "staged again",
                "would stage again",
            )
            .await?;
        }
        Some(Action::Discard {
            select,
            reason,
            execute,
            actor,
        }) => {
            anyhow::ensure!(
                !reason.trim().is_empty(),
                "discarding dead letters needs a reason"
            );
            let sql = format!(
                "WITH gone AS (DELETE FROM {table} AS d WHERE {WHERE} RETURNING d.*),
                      audit AS (
                          INSERT INTO {audit} (kind, dead_letter_id, action, actor, reason, dead_letter)
                          SELECT 'relay', g.id, 'discarded', $7, $8, to_jsonb(g) FROM gone g)
                 SELECT id FROM gone"
            );
            change(
                pool,
                &sql,
                select.clone(),
                actor,
                Some(reason),
                execute,
                "discarded",
                "would discard",
            )
            .await?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn change(
    pool: &PgPool,
    sql: &str,
    select: Selection,
    actor: Option<String>,
    reason: Option<String>,
    execute: bool,
    done: &str,
    would: &str,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        select.all || select != Selection::default(),
        "this selects every relay dead letter: narrow it (--id, --topic, --stream, --since, ...) \
         or pass --all"
    );
    let who = crate::dead_letters::actor(actor);
    let mut tx = pool.begin().await?;
    let mut q = bind(sqlx::query_as::<_, (i64,)>(sql), &select)?.bind(who);
    if let Some(reason) = &reason {
        q = q.bind(reason);
    }
    let mut ids: Vec<i64> = q
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r| r.0)
        .collect();
    ids.sort_unstable();
    if execute {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    report(done, would, &ids, execute);
    Ok(())
}
