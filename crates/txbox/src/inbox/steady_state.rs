//! The inbox's own statements of a steady-state transaction, for
//! benchmarks that run the inbox's SQL without its runtime.

use super::config::Waits;
use super::sql::Statements;
use crate::schema::Schema;

/// The statements of an inbox transaction in the steady state (ADR 0013)
/// that are the inbox's own, as an inbox with the default settings sends
/// them: the `BEGIN` that opens it and the statement after the handler.
///
/// Not a stable API: it exists so that a benchmark of the inbox's SQL runs
/// these very texts, and stays in step with them when they change.
///
/// ```
/// use txbox::inbox::SteadyStateSql;
/// use txbox::Schema;
///
/// let sql = SteadyStateSql::new(&Schema::default());
/// assert!(sql.begin.starts_with("BEGIN;"));
/// assert!(sql.advance_recording.contains("inbox_processed"));
/// ```
#[doc(hidden)]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SteadyStateSql {
    /// Opens the transaction: `BEGIN` with its `SET LOCAL`s (lock and idle
    /// bounds), one round trip. For `sqlx::Pool::begin_with`.
    pub begin: String,
    /// The fenced advance and, only if it moved the position, the plain
    /// insert of the batch's event ids. Parameters: $1 the new
    /// `next_offset`, $2 group, $3 topic, $4 partition, $5 epoch, $6 the
    /// expected `next_offset`, $7 applied, $8 duplicates, $9 dead-lettered
    /// ($1 and $5 to $9 `int8`, $2 and $3 `text`, $4 `int4`), $10 the ids
    /// (`text[]`), $11 their offsets (`int8[]`). Returns one row: (rows
    /// advanced, ids inserted), both `int8`.
    pub advance_recording: String,
}

impl SteadyStateSql {
    /// The statements for txbox's tables in `schema`.
    pub fn new(schema: &Schema) -> Self {
        let Statements {
            begin,
            advance_recording,
            ..
        } = Statements::new(schema, Waits::default());
        SteadyStateSql {
            begin,
            advance_recording,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounds an inbox built with the defaults resolves to are the
    /// ones these statements carry.
    #[test]
    fn a_default_inbox_begins_with_these_bounds() -> crate::Result<()> {
        let built = Waits::resolve(Waits::default().lock, None, None)?;
        let schema = Schema::default();
        assert_eq!(
            SteadyStateSql::new(&schema).begin,
            Statements::new(&schema, built).begin
        );
        Ok(())
    }
}
