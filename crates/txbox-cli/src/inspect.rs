//! Read-only views of a txbox schema, built with sea-query so table and
//! schema names are always quoted identifiers.

use sea_query::{Alias, Expr, Order, PostgresQueryBuilder, Query, SelectStatement};
use sea_query_binder::SqlxBinder;
use sqlx::{PgPool, Row};
use txbox::Schema;

fn table(schema: &Schema, name: &str) -> (Alias, Alias) {
    (Alias::new(schema.name()), Alias::new(name))
}

fn cols(q: &mut SelectStatement, names: &[&str]) {
    for n in names {
        q.expr(Expr::cust(format!("{n}::text")));
    }
}

pub(crate) async fn offsets(
    pool: &PgPool,
    schema: &Schema,
    group: Option<&str>,
) -> anyhow::Result<()> {
    let mut q = Query::select();
    cols(
        &mut q,
        &[
            "consumer_group",
            "topic",
            "partition",
            "next_offset",
            "epoch",
            "owner",
            "updated_at",
        ],
    );
    q.from(table(schema, "inbox_offsets"))
        .order_by(Alias::new("consumer_group"), Order::Asc)
        .order_by(Alias::new("topic"), Order::Asc)
        .order_by(Alias::new("partition"), Order::Asc);
    if let Some(g) = group {
        q.and_where(Expr::col(Alias::new("consumer_group")).eq(g));
    }
    print_rows(
        pool,
        &q,
        &[
            "group",
            "topic",
            "part",
            "next_offset",
            "epoch",
            "owner",
            "updated_at",
        ],
    )
    .await
}

pub(crate) async fn relay_streams(pool: &PgPool, schema: &Schema) -> anyhow::Result<()> {
    let mut q = Query::select();
    cols(
        &mut q,
        &[
            "stream",
            "owner",
            "fencing_token",
            "lease_expires_at",
            "position_txid",
            "position_id",
            "published",
        ],
    );
    q.from(table(schema, "relay_streams"))
        .order_by(Alias::new("stream"), Order::Asc);
    print_rows(
        pool,
        &q,
        &[
            "stream",
            "owner",
            "token",
            "lease_expires_at",
            "txid",
            "id",
            "published",
        ],
    )
    .await
}

async fn print_rows(pool: &PgPool, q: &SelectStatement, header: &[&str]) -> anyhow::Result<()> {
    let (sql, values) = q.build_sqlx(PostgresQueryBuilder);
    let rows = sqlx::query_with(&sql, values).fetch_all(pool).await?;
    println!("{}", header.join("\t"));
    for row in &rows {
        let cells: Vec<String> = (0..header.len())
            .map(|i| {
                row.try_get::<Option<String>, _>(i)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            })
            .collect();
        println!("{}", cells.join("\t"));
    }
    println!("({} rows)", rows.len());
    Ok(())
}
