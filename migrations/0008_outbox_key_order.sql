-- Per-key commit order for the outbox (opt-in: `KeyOrder::Commit`).
--
-- The relay publishes in (txid, id) order, and a transaction's id is given
-- at its first write, not at commit: two transactions that overlap publish
-- in the order they began writing, even when a row lock made the later one
-- commit first. A writer in commit-order mode calls
-- `outbox_key_order_claim` for the keys it stages. It keeps, per (topic,
-- key), the id of the last transaction that staged it (its head), and
--
-- * locks the head until commit (ON CONFLICT DO UPDATE locks the row even
--   when its WHERE is false), so the stagers of one key go one at a time,
--   in commit order;
-- * refuses, with SQLSTATE 40001, to stage behind a head whose transaction
--   id is higher than its own: that transaction began writing later and
--   committed first, so this row would be published before it. A retry
--   gets a new, higher id and passes.
--
-- Each stager of a key that commits therefore has a higher id than the
-- previous one: (txid) order per key is commit order.
--
-- A head below the snapshot's xmin constrains nothing (every transaction
-- that can still stage has a higher id), so the relay deletes those.
-- `stream` lets each relay stream prune the heads of its own keys.
CREATE TABLE outbox_key_order (
    topic  text    COLLATE "C" NOT NULL,
    key    bytea   NOT NULL,
    stream integer NOT NULL,
    txid   xid8    NOT NULL,
    PRIMARY KEY (topic, key)
);

-- Claims the heads of the given keys (arrays of one length, as staged;
-- keyless events carry no order and are skipped) for the current
-- transaction, in (topic, key) order so that two claimers of the same keys
-- do not deadlock. Returns true, or raises 40001 (serialization_failure).
--
-- A head above every transaction id this server has completed cannot be
-- the id of a transaction we waited for: it comes from another database
-- history (a restored dump, a copy) and is taken over rather than obeyed,
-- or staging the key would fail until the counter passed it.
CREATE FUNCTION outbox_key_order_claim(streams integer[], topics text[], keys bytea[])
RETURNS boolean
LANGUAGE plpgsql
VOLATILE
SET search_path FROM CURRENT
AS $claim$
DECLARE
    me      constant xid8 := pg_current_xact_id();
    wanted  bigint;
    taken   bigint;
    later   record;
BEGIN
    WITH staged AS (
        SELECT DISTINCT ON (u.topic, u.key) u.stream, u.topic, u.key
          FROM (SELECT a.stream, a.topic COLLATE "C" AS topic, a.key
                  FROM unnest(streams, topics, keys) AS a(stream, topic, key)) u
         WHERE u.key IS NOT NULL AND u.topic IS NOT NULL
         ORDER BY u.topic, u.key
    ), claimed AS (
        INSERT INTO outbox_key_order AS h (topic, key, stream, txid)
        SELECT s.topic, s.key, s.stream, me
          FROM staged s
         ORDER BY s.topic, s.key
        ON CONFLICT (topic, key) DO UPDATE
           SET txid = excluded.txid, stream = excluded.stream
         WHERE h.txid <= excluded.txid
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM staged), (SELECT count(*) FROM claimed)
      INTO wanted, taken;
    IF taken = wanted THEN
        RETURN true;
    END IF;

    -- Some heads are higher than this transaction's id. They are locked by
    -- this transaction now, so their writers have ended; this statement's
    -- snapshot is taken after they did.
    SELECT h.topic, h.key, h.txid INTO later
      FROM outbox_key_order h
      JOIN unnest(topics, keys) AS u(topic, key)
        ON h.topic = u.topic AND h.key = u.key
     WHERE h.txid > me
       AND h.txid < pg_snapshot_xmax(pg_current_snapshot())
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'serialization_failure',
            MESSAGE = format(
                'txbox key order: transaction %s staged key %s of topic %L and committed while '
                'this transaction (%s, which began writing earlier) was running; staging behind it '
                'would publish this event before it',
                later.txid, left(encode(later.key, 'escape'), 200), later.topic, me),
            HINT = 'Retry the whole transaction: a new attempt gets a later transaction id and passes.';
    END IF;

    -- What remains above this transaction's id is from another history.
    UPDATE outbox_key_order h
       SET txid = me
      FROM unnest(topics, keys) AS u(topic, key)
     WHERE h.topic = u.topic AND h.key = u.key AND h.txid > me;
    RETURN true;
END
$claim$;
