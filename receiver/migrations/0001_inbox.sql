-- The receiver's own tables, in its own database: the inbox of webhook-ids, the last applied
-- sequence of each subject, and the sequences that were given up on.

CREATE TABLE receiver.subjects (
    subject       text PRIMARY KEY,
    last_sequence bigint NOT NULL DEFAULT 0 CHECK (last_sequence >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE receiver.subjects IS
    'One row per subject seen: how far its events have been applied. Its row lock serialises the subject.';
COMMENT ON COLUMN receiver.subjects.subject IS 'The events'' subject (ordering key).';
COMMENT ON COLUMN receiver.subjects.last_sequence IS
    'Every sequence up to this one is applied, or skipped (receiver.skipped); 0 before the first.';
COMMENT ON COLUMN receiver.subjects.updated_at IS 'When last_sequence last moved.';

CREATE TABLE receiver.inbox (
    webhook_id  text PRIMARY KEY,
    subject     text NOT NULL,
    sequence    bigint NOT NULL,
    type        text NOT NULL,
    status      text NOT NULL CHECK (status IN ('held', 'applied', 'late')),
    via         text NOT NULL CHECK (via IN ('webhook', 'backfill')),
    event       jsonb,
    received_at timestamptz NOT NULL DEFAULT now(),
    applied_at  timestamptz,
    CHECK ((status = 'applied') = (event IS NULL))
);
CREATE INDEX inbox_held ON receiver.inbox (subject, sequence) WHERE status = 'held';
COMMENT ON TABLE receiver.inbox IS
    'Every event received or backfilled, by webhook-id (= event id): a second delivery finds its row.';
COMMENT ON COLUMN receiver.inbox.webhook_id IS 'The webhook-id header, which is the event id.';
COMMENT ON COLUMN receiver.inbox.subject IS 'The event''s subject.';
COMMENT ON COLUMN receiver.inbox.sequence IS 'The event''s sequence within its subject.';
COMMENT ON COLUMN receiver.inbox.type IS 'The event''s type.';
COMMENT ON COLUMN receiver.inbox.status IS
    'held: arrived ahead of a gap, waits; applied: the handler ran, in order; late: arrived after its subject had moved past it (see docs).';
COMMENT ON COLUMN receiver.inbox.via IS 'webhook, or backfill (read from GET /v1/events to fill a gap).';
COMMENT ON COLUMN receiver.inbox.event IS 'The envelope while held, and of a late event; NULL once applied.';
COMMENT ON COLUMN receiver.inbox.received_at IS 'When it first arrived.';
COMMENT ON COLUMN receiver.inbox.applied_at IS 'When the handler (or the late handler) ran.';

CREATE TABLE receiver.skipped (
    subject    text NOT NULL,
    sequence   bigint NOT NULL,
    skipped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, sequence)
);
COMMENT ON TABLE receiver.skipped IS
    'Sequences given up on: the events API no longer had them when their gap was filled. An event arriving for one is late.';
COMMENT ON COLUMN receiver.skipped.subject IS 'The subject.';
COMMENT ON COLUMN receiver.skipped.sequence IS 'The missing sequence.';
COMMENT ON COLUMN receiver.skipped.skipped_at IS 'When the subject moved past it.';
