//! Transaction ids on demand, for tests of what the relay's `(txid, id)`
//! order does with transactions that overlap.

use sqlx::{PgPool, Postgres, Transaction};

/// Begins a transaction and makes a first write unrelated to the outbox
/// (as an inbox batch's event-id insert is in the checked form), which
/// gives the transaction
/// its id; returns the transaction and the id. The write goes into
/// `table`, whose columns must all have defaults.
///
/// # Panics
/// If the database refuses.
pub async fn begin_writing(pool: &PgPool, table: &str) -> (Transaction<'static, Postgres>, u64) {
    let mut tx = pool.begin().await.expect("begin");
    let xid: String = sqlx::query_scalar(&format!(
        "WITH w AS (INSERT INTO {table} DEFAULT VALUES) SELECT pg_current_xact_id()::text"
    ))
    .fetch_one(&mut *tx)
    .await
    .expect("first write");
    (tx, xid.parse().expect("an xid8"))
}

/// The SQLSTATE of a database error `e` carries, if it is one.
pub fn sqlstate(e: &txbox::Error) -> Option<String> {
    match e {
        txbox::Error::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}
