//! Staging derived events inside a business transaction.
//!
//! An [`OutboxEvent`] staged with [`Outbox::stage`] is a row in the txbox
//! `outbox` table, written by the caller's own transaction: it exists if and
//! only if that transaction commits. The relay (`txbox-relay`) publishes
//! committed rows to Kafka; rows from a rolled-back transaction never exist,
//! so they are never published.
//!
//! Every staged event carries an event id (a UUID, assigned if absent); the
//! relay sends it as the CloudEvents `ce_id` header (with `ce_specversion`),
//! so a txbox inbox downstream drops redeliveries.

mod event;
mod stage;

pub use event::OutboxEvent;
pub use stage::Outbox;

/// The NOTIFY channel the relay listens on unless configured otherwise.
pub const DEFAULT_NOTIFY_CHANNEL: &str = "txbox_outbox";

/// The stream (relay shard) a key belongs to with `streams` streams.
///
/// Stable across processes and releases (FNV-1a), so every writer puts a key
/// in the same stream, and so one relay stream sees all of a key's events.
pub fn stream_for_key(key: &[u8], streams: u32) -> i32 {
    if streams <= 1 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // `streams` fits in i32 (checked when the outbox is configured).
    i32::try_from(hash % u64::from(streams)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::stream_for_key;

    #[test]
    fn stream_is_stable_and_in_range() {
        assert_eq!(stream_for_key(b"acct-1", 1), 0);
        let s = stream_for_key(b"acct-1", 8);
        assert!((0..8).contains(&s));
        assert_eq!(s, stream_for_key(b"acct-1", 8));
        let spread: std::collections::HashSet<i32> = (0..200)
            .map(|i| stream_for_key(format!("k{i}").as_bytes(), 8))
            .collect();
        assert_eq!(spread.len(), 8);
    }
}
