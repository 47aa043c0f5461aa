//! Which order one key's events are published in, across transactions.

/// The order the relay publishes the events of one key (one topic, one
/// key) in when several transactions stage them. Within one transaction
/// events are always published in staging order.
///
/// The relay publishes outbox rows in `(txid, id)` order, and PostgreSQL
/// gives a transaction its id at its *first write*, not at commit. Two
/// transactions that overlap are therefore published in the order they
/// began writing, even when a row lock made the later one commit first:
/// when a transaction's first write comes before it locks the account (an
/// inbox batch's event-id insert once a duplicate has put its partition on
/// the checked form; in the steady state the ids are inserted after the
/// handler), two transactions updating one account can publish its events
/// in the opposite order to their balances.
///
/// [`KeyOrder::Commit`] makes each key's publish order its commit order,
/// which is the business order whenever the event is derived under a row
/// lock held to commit (a balance read by `UPDATE ... RETURNING`). It
/// costs one upsert per distinct key staged, serializes the transactions
/// that stage one key (each waits for the previous one to commit), and
/// makes staging fail with a serialization failure (SQLSTATE 40001) when a
/// transaction that began writing later already staged the key and
/// committed. The inbox retries that for you when the error reaches it
/// (`?` on [`Outbox::stage`](crate::Outbox::stage) in a handler); elsewhere
/// retry the whole transaction, as for any serialization failure
/// ([`db::is_transient`](crate::db::is_transient) says so): a new attempt
/// gets a later transaction id and passes.
///
/// Every writer of a key must use the same mode: a row staged in
/// [`KeyOrder::FirstWrite`] takes no part in the check, so it is ordered
/// against the others by its first write. Keyless events carry no order in
/// either mode, and the same key in two topics is two keys.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> txbox::Result<()> {
/// use txbox::outbox::KeyOrder;
/// use txbox::{Outbox, OutboxEvent, Schema};
///
/// let outbox = Outbox::new(Schema::default()).key_order(KeyOrder::Commit);
/// loop {
///     let mut tx = pool.begin().await?;
///     let (balance,): (i64,) =
///         sqlx::query_as("UPDATE account SET balance = balance + 1 WHERE id = $1 RETURNING balance")
///             .bind("a-1")
///             .fetch_one(&mut *tx)
///             .await?;
///     let event = OutboxEvent::json("balances", &serde_json::json!({ "balance": balance }))?.key("a-1");
///     match outbox.stage(&mut tx, event).await {
///         Ok(_) => {}
///         // A later writer of "a-1" committed first: try again.
///         Err(e) if e.is_transient() => continue,
///         Err(e) => return Err(e),
///     }
///     tx.commit().await?;
///     break;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyOrder {
    /// The order in which the staging transactions made their first write
    /// (which gives them their transaction id), then staging order. Equal
    /// to commit order for transactions that do not overlap. No extra cost.
    #[default]
    FirstWrite,
    /// The order in which the staging transactions committed, then staging
    /// order. Staging may fail with SQLSTATE 40001; retry the transaction.
    Commit,
}
