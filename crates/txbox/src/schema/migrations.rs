//! The migrations this version of txbox carries (from `migrations/`).

use sha2::{Digest, Sha256};

/// One versioned SQL migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Version, increasing from 1.
    pub version: i64,
    /// Short name (the file name without version and extension).
    pub name: &'static str,
    /// The SQL, with unqualified table names (applied with `search_path` set
    /// to the txbox schema).
    pub sql: &'static str,
}

impl Migration {
    /// SHA-256 of the SQL text; an applied migration must keep it.
    pub fn checksum(&self) -> Vec<u8> {
        Sha256::digest(self.sql.as_bytes()).to_vec()
    }
}

/// All migrations, in version order. A service needs every one applied.
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "inbox",
        sql: include_str!("../../../../migrations/0001_inbox.sql"),
    },
    Migration {
        version: 2,
        name: "outbox",
        sql: include_str!("../../../../migrations/0002_outbox.sql"),
    },
    Migration {
        version: 3,
        name: "relay",
        sql: include_str!("../../../../migrations/0003_relay.sql"),
    },
    Migration {
        version: 4,
        name: "byte_order_keys",
        sql: include_str!("../../../../migrations/0004_byte_order_keys.sql"),
    },
    Migration {
        version: 5,
        name: "inbox_dead_letters_and_epochs",
        sql: include_str!("../../../../migrations/0005_inbox_dead_letters_and_epochs.sql"),
    },
    Migration {
        version: 6,
        name: "history",
        sql: include_str!("../../../../migrations/0006_history.sql"),
    },
    Migration {
        version: 7,
        name: "relay_dead_letter_ids",
        sql: include_str!("../../../../migrations/0007_relay_dead_letter_ids.sql"),
    },
    Migration {
        version: 8,
        name: "outbox_key_order",
        sql: include_str!("../../../../migrations/0008_outbox_key_order.sql"),
    },
    Migration {
        version: 9,
        name: "dead_letter_operations",
        sql: include_str!("../../../../migrations/0009_dead_letter_operations.sql"),
    },
    Migration {
        version: 10,
        name: "inbox_totals",
        sql: include_str!("../../../../migrations/0010_inbox_totals.sql"),
    },
    Migration {
        version: 11,
        name: "inbox_consumed_until",
        sql: include_str!("../../../../migrations/0011_inbox_consumed_until.sql"),
    },
];
