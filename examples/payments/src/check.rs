//! What the databases say about the chain, read from them alone: for a
//! test, a demo's summary, or a checker after processes were killed and
//! restarted at random.
//!
//! The payments service and the ledger may use one database (the default:
//! schemas `txbox` and `ledger`) or two; ids are compared in this process.

use std::collections::HashSet;
use std::fmt;

use sqlx::PgPool;
use txbox::Schema;

use crate::error::Result;

/// Where each service keeps its tables.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a> {
    /// The payments service's database.
    pub payments: &'a PgPool,
    /// The payments service's txbox schema (`txbox`).
    pub payments_schema: &'a Schema,
    /// The ledger service's database.
    pub ledger: &'a PgPool,
    /// The ledger service's txbox schema (`ledger`).
    pub ledger_schema: &'a Schema,
    /// The ledger service's consumer group (`ledger`).
    pub ledger_group: &'a str,
}

/// Counts over the two services' tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Rows in `payments_settlements`.
    pub settlements: i64,
    /// Distinct payment ids among them.
    pub settled_payments: i64,
    /// The payments group's rows in `inbox_dead_letters`.
    pub payments_dead_letters: i64,
    /// Rows in `ledger_entries`.
    pub ledger_entries: i64,
    /// Distinct payment ids among them.
    pub ledger_payments: i64,
    /// Distinct source event ids among them.
    pub ledger_events: i64,
    /// The ledger group's event ids in `inbox_processed` (applied or
    /// dead-lettered).
    pub ledger_processed: i64,
    /// Ledger rows whose event id is not in the ledger's
    /// `inbox_processed`: a business write committed without its dedupe
    /// record.
    pub ledger_unrecorded: i64,
    /// The ledger group's rows in `inbox_dead_letters`.
    pub ledger_dead_letters: i64,
    /// Settled payments with no ledger row.
    pub not_in_ledger: i64,
    /// Ledger rows' payments the payments service never settled.
    pub not_settled: i64,
    /// Ledger rows whose balance is not below the one before for the same
    /// account (in the order the ledger appended them): the ledger applied
    /// that account's settlements out of their order.
    pub out_of_order: i64,
    /// Up to ten payment ids with more than one ledger row, and how many.
    pub ledger_twice: Vec<(String, i64)>,
}

impl Report {
    /// Reads the counts.
    pub async fn read(chain: Chain<'_>) -> Result<Report> {
        let (settlements, settled_payments): (i64, i64) =
            sqlx::query_as("SELECT count(*), count(DISTINCT payment_id) FROM payments_settlements")
                .fetch_one(chain.payments)
                .await?;
        let (ledger_entries, ledger_payments, ledger_events): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT payment_id), count(DISTINCT event_id) FROM ledger_entries",
        )
        .fetch_one(chain.ledger)
        .await?;
        let ledger_processed: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE consumer_group = $1",
            chain.ledger_schema.table("inbox_processed")
        ))
        .bind(chain.ledger_group)
        .fetch_one(chain.ledger)
        .await?;
        let ledger_unrecorded: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM ledger_entries e WHERE NOT EXISTS
               (SELECT 1 FROM {} p WHERE p.consumer_group = $1 AND p.event_id = e.event_id)",
            chain.ledger_schema.table("inbox_processed")
        ))
        .bind(chain.ledger_group)
        .fetch_one(chain.ledger)
        .await?;
        let out_of_order: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (
               SELECT balance, lag(balance) OVER (PARTITION BY account ORDER BY id) AS before
               FROM ledger_entries) e
             WHERE e.balance >= e.before",
        )
        .fetch_one(chain.ledger)
        .await?;
        let ledger_twice: Vec<(String, i64)> = sqlx::query_as(
            "SELECT payment_id, count(*) FROM ledger_entries GROUP BY payment_id
             HAVING count(*) > 1 ORDER BY count(*) DESC, payment_id LIMIT 10",
        )
        .fetch_all(chain.ledger)
        .await?;
        let settled = payment_ids(chain.payments, "payments_settlements").await?;
        let ledgered = payment_ids(chain.ledger, "ledger_entries").await?;
        Ok(Report {
            settlements,
            settled_payments,
            payments_dead_letters: dead_letters(
                chain.payments,
                chain.payments_schema,
                crate::PAYMENTS_GROUP,
            )
            .await?,
            ledger_entries,
            ledger_payments,
            ledger_events,
            ledger_processed,
            ledger_unrecorded,
            ledger_dead_letters: dead_letters(
                chain.ledger,
                chain.ledger_schema,
                chain.ledger_group,
            )
            .await?,
            not_in_ledger: settled.difference(&ledgered).count() as i64,
            not_settled: ledgered.difference(&settled).count() as i64,
            out_of_order,
            ledger_twice,
        })
    }

    /// What is wrong for a run of `expected` payment requests, all of which
    /// can settle: empty when every payment settled once and has exactly
    /// one ledger row, applied in order, with nothing dead-lettered.
    pub fn problems(&self, expected: u64) -> Vec<String> {
        let n = expected as i64;
        let mut wrong = Vec::new();
        let mut want = |what: &str, got: i64, want: i64| {
            if got != want {
                wrong.push(format!("{what}: {got}, expected {want}"));
            }
        };
        want("settlements", self.settlements, n);
        want("payments settled", self.settled_payments, n);
        want("payments dead letters", self.payments_dead_letters, 0);
        want("ledger entries", self.ledger_entries, n);
        want("payments in the ledger", self.ledger_payments, n);
        want("source events in the ledger", self.ledger_events, n);
        want("event ids the ledger recorded", self.ledger_processed, n);
        want(
            "ledger entries without their event id recorded",
            self.ledger_unrecorded,
            0,
        );
        want("ledger dead letters", self.ledger_dead_letters, 0);
        want(
            "settled payments missing in the ledger",
            self.not_in_ledger,
            0,
        );
        want("ledger entries of unsettled payments", self.not_settled, 0);
        want("ledger entries out of order", self.out_of_order, 0);
        if !self.ledger_twice.is_empty() {
            wrong.push(format!(
                "payments with more than one ledger entry (up to ten): {:?}",
                self.ledger_twice
            ));
        }
        wrong
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "payments: {} settlements of {} payments, {} dead letters",
            self.settlements, self.settled_payments, self.payments_dead_letters
        )?;
        writeln!(
            f,
            "ledger:   {} entries of {} payments from {} events ({} event ids recorded, {} entries without), {} dead letters",
            self.ledger_entries,
            self.ledger_payments,
            self.ledger_events,
            self.ledger_processed,
            self.ledger_unrecorded,
            self.ledger_dead_letters
        )?;
        write!(
            f,
            "chain:    {} settled payments not in the ledger, {} ledger payments never settled, {} entries out of order per account",
            self.not_in_ledger, self.not_settled, self.out_of_order
        )
    }
}

async fn payment_ids(pool: &PgPool, table: &str) -> Result<HashSet<String>> {
    let ids: Vec<String> = sqlx::query_scalar(&format!("SELECT DISTINCT payment_id FROM {table}"))
        .fetch_all(pool)
        .await?;
    Ok(ids.into_iter().collect())
}

async fn dead_letters(pool: &PgPool, schema: &Schema, group: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE consumer_group = $1",
        schema.table("inbox_dead_letters")
    ))
    .bind(group)
    .fetch_one(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::Report;

    #[test]
    fn a_clean_run_has_no_problems_and_a_duplicate_is_named() {
        let clean = Report {
            settlements: 3,
            settled_payments: 3,
            ledger_entries: 3,
            ledger_payments: 3,
            ledger_events: 3,
            ledger_processed: 3,
            ..Report::default()
        };
        assert!(clean.problems(3).is_empty(), "{:?}", clean.problems(3));
        let twice = Report {
            ledger_entries: 4,
            ledger_twice: vec![("p1".into(), 2)],
            ..clean.clone()
        };
        let problems = twice.problems(3);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("ledger entries: 4"), "{problems:?}");
        assert!(problems[1].contains("p1"), "{problems:?}");
        assert_eq!(clean.problems(4).len(), 6, "{:?}", clean.problems(4));
    }
}
