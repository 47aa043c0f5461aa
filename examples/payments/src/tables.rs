//! The services' business tables, created by each service at start
//! ([`create_tables`](crate::service::create_tables)), in the database's
//! default schema (`search_path`), beside txbox's schemas.
//!
//! Neither settlement nor ledger rows have a unique constraint on the
//! payment id: the inbox's dedupe is what keeps each payment to one row,
//! and a payment applied twice would show as two rows.

/// The payments service's tables: balances, and one row per settlement.
/// The ten demo accounts (`acct-0` .. `acct-9`) open with 1,000,000
/// each: `payments-example --produce N` sends request `i` to account
/// `i % 10` for `i % 5 + 1`, so up to N = 2,000,000 every request settles.
pub const PAYMENTS: &str = "
CREATE TABLE IF NOT EXISTS payments_account (
    id      text   PRIMARY KEY,
    balance bigint NOT NULL
);
INSERT INTO payments_account
    SELECT 'acct-' || g, 1000000 FROM generate_series(0, 9) g
    ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS payments_settlements (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id text        NOT NULL,
    account    text        NOT NULL,
    amount     bigint      NOT NULL,
    balance    bigint      NOT NULL,
    settled_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS payments_settlements_payment ON payments_settlements (payment_id);
";

/// The ledger service's table: one row appended per settled payment
/// applied, with where it came from and who applied it.
pub const LEDGER: &str = r#"
CREATE TABLE IF NOT EXISTS ledger_entries (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payment_id text        NOT NULL,
    account    text        NOT NULL,
    amount     bigint      NOT NULL,
    balance    bigint      NOT NULL,
    event_id   text        NOT NULL,
    topic      text        NOT NULL,
    partition  integer     NOT NULL,
    "offset"   bigint      NOT NULL,
    applied_by text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ledger_entries_payment ON ledger_entries (payment_id);
"#;
