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
//!
//! Across transactions, one key's events are published in the order the
//! transactions made their first write, or, with [`KeyOrder::Commit`], in
//! the order they committed.

mod event;
mod key_order;
mod stage;

pub use event::OutboxEvent;
pub use key_order::KeyOrder;
pub use stage::Outbox;

/// The namespace of [`derived_event_id`]'s name-based UUIDs (itself
/// `Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:txbox:derived-event")`).
pub const DERIVED_EVENT_NAMESPACE: uuid::Uuid = uuid::uuid!("a2f847a1-413a-50bf-834c-cea1b8baeb14");

/// A name-based (version 5) UUID for an event derived from the event
/// `source_event_id`, told apart from its siblings by `discriminator`:
/// the same inputs give the same id in every process and release. See
/// [`OutboxEvent::derived_from`].
///
/// # Examples
///
/// ```
/// let id = txbox::outbox::derived_event_id("req-42", "settled");
/// assert_eq!(id, txbox::outbox::derived_event_id("req-42", "settled"));
/// assert_eq!(id.get_version_num(), 5);
/// ```
pub fn derived_event_id(source_event_id: &str, discriminator: &str) -> uuid::Uuid {
    // Length-prefixed, so ("a:b", "c") and ("a", "b:c") differ.
    let name = format!(
        "{}:{source_event_id}:{discriminator}",
        source_event_id.len()
    );
    uuid::Uuid::new_v5(&DERIVED_EVENT_NAMESPACE, name.as_bytes())
}

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
    use super::{derived_event_id, stream_for_key, DERIVED_EVENT_NAMESPACE};

    /// Derived ids must not change between releases: downstream dedupe
    /// compares ids staged by different versions.
    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(
            DERIVED_EVENT_NAMESPACE,
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"urn:txbox:derived-event")
        );
        assert_eq!(
            derived_event_id("req-42", "settled").to_string(),
            "8cfdc59b-cc8d-571d-bd32-bd90d3e9f7c5"
        );
        assert_ne!(
            derived_event_id("a:b", "c"),
            derived_event_id("a", "b:c"),
            "the split between source and discriminator counts"
        );
        assert_ne!(
            derived_event_id("req-42", "settled"),
            derived_event_id("req-43", "settled")
        );
    }

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
