//! What a partition holds between the poll loop and its worker, and the
//! bounds at which the poll loop pauses and resumes its fetch.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A partition is paused once either bound is reached, and resumed once it
/// is at or below half of both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Messages handed to the worker and not yet taken.
    pub messages: usize,
    /// Their size ([`crate::inbox::InboxMessage::buffered_size`]).
    pub bytes: usize,
}

impl Bounds {
    fn reached(self, messages: usize, bytes: usize) -> bool {
        messages >= self.messages || bytes >= self.bytes
    }

    fn drained(self, messages: usize, bytes: usize) -> bool {
        messages <= self.messages / 2 && bytes <= self.bytes / 2
    }
}

/// Messages and bytes handed to a partition's worker and not yet taken,
/// shared by the poll loop (which adds) and the worker (which takes).
///
/// The two counters are not read as one: a take racing an add can make
/// [`Buffered::take`] miss the moment the partition drained. The poll
/// loop's periodic check ([`Buffered::is_drained`]) resumes it then.
#[derive(Debug, Default)]
pub(crate) struct Buffered {
    messages: AtomicUsize,
    bytes: AtomicUsize,
}

impl Buffered {
    /// Counts a message of `bytes` handed over; whether a bound is now
    /// reached (the partition should be paused).
    pub(crate) fn add(&self, bytes: usize, bounds: Bounds) -> bool {
        let messages = self.messages.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        bounds.reached(messages, bytes)
    }

    /// Takes back a message the worker will never receive.
    pub(crate) fn undo(&self, bytes: usize) {
        self.messages.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Counts `messages` of `bytes` in all received by the worker; whether
    /// that drained the partition from above its resume point (the poll
    /// loop should be told).
    pub(crate) fn take(&self, messages: usize, bytes: usize, bounds: Bounds) -> bool {
        let before = (
            self.messages.fetch_sub(messages, Ordering::Relaxed),
            self.bytes.fetch_sub(bytes, Ordering::Relaxed),
        );
        let after = (
            before.0.saturating_sub(messages),
            before.1.saturating_sub(bytes),
        );
        !bounds.drained(before.0, before.1) && bounds.drained(after.0, after.1)
    }

    /// Whether the partition is at or below half of both bounds.
    pub(crate) fn is_drained(&self, bounds: Bounds) -> bool {
        bounds.drained(
            self.messages.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        messages: 10,
        bytes: 1000,
    };

    #[test]
    fn either_bound_pauses() {
        let by_count = Buffered::default();
        assert!(!(0..9).any(|_| by_count.add(1, BOUNDS)));
        assert!(by_count.add(1, BOUNDS), "the 10th message");

        let by_size = Buffered::default();
        assert!(!by_size.add(600, BOUNDS));
        assert!(by_size.add(400, BOUNDS), "1000 bytes in 2 messages");

        let one_large = Buffered::default();
        assert!(
            one_large.add(5000, BOUNDS),
            "a message over the bound alone"
        );
    }

    #[test]
    fn resumes_at_half_of_both() {
        let b = Buffered::default();
        for _ in 0..10 {
            b.add(90, BOUNDS);
        }
        // 10 messages, 900 bytes: 5 taken leaves 5 and 450.
        assert!(!b.take(4, 360, BOUNDS), "6 messages left");
        assert!(b.take(1, 90, BOUNDS), "5 messages and 450 bytes left");
        assert!(b.is_drained(BOUNDS));
        assert!(!b.take(1, 90, BOUNDS), "already drained: told once");

        let large = Buffered::default();
        large.add(800, BOUNDS);
        large.add(800, BOUNDS);
        assert!(
            !large.take(1, 800, BOUNDS),
            "one message left but 800 bytes"
        );
        assert!(!large.is_drained(BOUNDS));
        assert!(large.take(1, 800, BOUNDS));
    }

    #[test]
    fn an_undone_message_is_not_counted() {
        let b = Buffered::default();
        b.add(700, BOUNDS);
        b.undo(700);
        assert!(b.is_drained(BOUNDS));
        assert!(!b.add(700, BOUNDS));
    }
}
