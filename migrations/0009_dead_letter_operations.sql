-- Operating on dead letters: replay requests and an audit trail.
--
-- An inbox dead letter can only be replayed through its handler, which
-- lives in the service, not in the `txbox` command. So the command records
-- a request on the row, and a running inbox of the row's group (one that
-- has a handler for its topic) takes the request, runs the handler in a
-- transaction of its own, and removes the dead letter only when that
-- commits. A failed replay clears the request and keeps its error.
ALTER TABLE inbox_dead_letters
    ADD COLUMN replay_requested_at timestamptz,
    ADD COLUMN replay_requested_by text,
    ADD COLUMN replay_attempts     integer     NOT NULL DEFAULT 0,
    ADD COLUMN replay_error        text;
CREATE INDEX inbox_dead_letters_replay_requested
    ON inbox_dead_letters (consumer_group, replay_requested_at)
    WHERE replay_requested_at IS NOT NULL;

-- Every replay and discard leaves a row here, with the dead letter as it
-- was (so a discard can be undone by hand), who did it, when and why.
CREATE TABLE dead_letter_audit (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind           text        NOT NULL CHECK (kind IN ('inbox', 'relay')),
    dead_letter_id bigint      NOT NULL,
    action         text        NOT NULL CHECK (action IN ('replayed', 'discarded')),
    actor          text        NOT NULL,
    reason         text,
    at             timestamptz NOT NULL DEFAULT now(),
    dead_letter    jsonb       NOT NULL
);
