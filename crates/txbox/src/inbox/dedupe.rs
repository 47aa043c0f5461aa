//! What the inbox records to drop duplicates: event ids, or offsets alone.

use super::commit::Position;
use super::InboxMessage;

/// How the inbox tells a duplicate from a new event.
///
/// Every inbox transaction advances its partition's stored position, so a
/// redelivery of an offset already consumed (after a crash, a rebalance, a
/// zombie's rollback) is dropped by the position alone: the partition's
/// `consumed_until` watermark, the highest position the group has
/// committed on the partition's log, covers it. Event-id rows in
/// `inbox_processed` are needed only for duplicates that arrive under a
/// *new* offset: a producer's retry without idempotence, a republish, the
/// at-least-once relay's window, the same event on two topics.
///
/// # Examples
///
/// ```
/// use txbox::inbox::{Dedupe, Handler, HandlerError, Inbox, InboxMessage, Tx};
///
/// struct Ledger;
///
/// #[async_trait::async_trait]
/// impl Handler for Ledger {
///     async fn handle(&self, _tx: &mut Tx, _msg: &InboxMessage) -> Result<(), HandlerError> {
///         Ok(())
///     }
/// }
///
/// # fn demo(pool: sqlx::PgPool) -> txbox::Result<()> {
/// // `payments` is written only by txbox relays in exactly-once mode: no
/// // event reaches it twice, so offsets are all the dedupe state.
/// let inbox = Inbox::builder(pool)
///     .brokers("127.0.0.1:9092")
///     .group_id("ledger")
///     .handler("payments", Ledger)
///     .dedupe(Dedupe::OffsetsOnly)
///     .build()?;
/// # let _ = inbox; Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dedupe {
    /// The default: each message's event id ([`EventIdSource`]) is recorded
    /// in `inbox_processed` and a message whose id was recorded before (for
    /// [`dedupe_retention`]) is a duplicate, whatever its offset. A message
    /// with no id of its own (its id is its position,
    /// `topic/partition/offset`) gets no row: a position repeats only as a
    /// redelivery of the same offset, which the watermark drops.
    ///
    /// [`EventIdSource`]: super::EventIdSource
    /// [`dedupe_retention`]: super::InboxBuilder::dedupe_retention
    #[default]
    EventIds,
    /// No event-id rows at all: a message is a duplicate if and only if its
    /// offset is below the partition's watermark. The dedupe state is one
    /// row per partition, however long the inbox runs, and each transaction
    /// writes one index entry less per message.
    ///
    /// Safe only when **no event can reach the topic twice under two
    /// offsets**: every producer of the topic writes each event once, e.g.
    /// the txbox relay in exactly-once mode (one Kafka transaction holds the
    /// rows and the relay's position; the inbox reads `read_committed`, so
    /// an aborted attempt is never seen), or a Kafka Streams application
    /// with `exactly_once_v2`. Not safe with the relay's at-least-once mode,
    /// a producer that retries without idempotence or restarts and sends
    /// again, a republish or mirror of the topic, or events that also
    /// arrive on another topic of the group: each of those copies is
    /// applied. A dead letter's replay is still applied once (the dead
    /// letter is deleted in the replay's transaction).
    OffsetsOnly,
}

impl Dedupe {
    /// Whether `m`'s event id is recorded in `inbox_processed`.
    pub(crate) fn records(self, m: &InboxMessage) -> bool {
        match self {
            Dedupe::EventIds => !m.id_is_position,
            Dedupe::OffsetsOnly => false,
        }
    }

    /// Whether `m` is dropped by the watermark alone: its id is not recorded
    /// and its offset was consumed on this log (only after a replay by hand
    /// moved the position back below the watermark).
    pub(crate) fn covered(self, m: &InboxMessage, pos: &Position) -> bool {
        !self.records(m) && m.offset < pos.consumed_until
    }
}
