"""A payment in one statement: outbox.publish, ledger_create_payment and api_create_payment.

`outbox.publish` is the publishing statement the application sent itself before (the merchant's
shared consumers lock, the subjects' sequences, the events, the fan-out, the NOTIFY when a relay
sleeps). `ledger_create_payment` is a payment's whole transaction body: lock both accounts in id
order, check, move, record, publish. `api_create_payment` is `POST /v1/payments` in one round
trip: authenticate, reserve the idempotency key (or answer from it), run the payment, render the
response and store it with the key. All three are PL/pgSQL, so their plans are cached per session, and they use generic plans
(`plan_cache_mode = force_generic_plan`): every statement in them is a key lookup or an insert
whose plan does not depend on the values, and the planner would otherwise plan the publishing
statement anew on every call; the small SQL helpers (id stamps,
timestamps, JSON) are single expressions declared no more volatile than their bodies, so the
planner inlines them instead of planning them anew on every call.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 21:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

SQL_UP = [
    # ledger/ids.py's time prefix from a microsecond clock reading: 10 Crockford base32
    # characters of milliseconds, 2 of the microsecond within it. A single expression, so it is
    # inlined into its callers.
    """
    CREATE FUNCTION id_stamp(n bigint) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT substr('0123456789abcdefghjkmnpqrstvwxyz', (((n / 1000) >> 45) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', (((n / 1000) >> 40) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', (((n / 1000) >> 35) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', (((n / 1000) >> 30) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', (((n / 1000) >> 25) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', (((n / 1000) >> 20) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', (((n / 1000) >> 15) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', (((n / 1000) >> 10) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', (((n / 1000) >> 5) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', ((n / 1000) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', (((n % 1000) >> 5) & 31)::int + 1, 1)
            || substr('0123456789abcdefghjkmnpqrstvwxyz', ((n % 1000) & 31)::int + 1, 1)
    $$
    """,
    "COMMENT ON FUNCTION id_stamp(bigint) IS "
    "'The time prefix of an id (ledger/ids.py) for a Unix time in microseconds.'",
    # The ids' position in the array comes next (ids made together keep their order), then the
    # last 13 characters of the given id.
    """
    CREATE FUNCTION restamp_ids(p_ids text[]) RETURNS text[]
    LANGUAGE plpgsql VOLATILE AS $fn$
    DECLARE
        -- A variable, not an argument expression: id_stamp is inlined, and would evaluate the
        -- clock once per reference.
        us bigint := (date_part('epoch', clock_timestamp()) * 1000000)::bigint;
        stamp text := id_stamp(us);
    BEGIN
        FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
            p_ids[i] := split_part(p_ids[i], '_', 1) || '_' || stamp
                        || substr('0123456789abcdefghjkmnpqrstvwxyz', i, 1) || right(p_ids[i], 13);
        END LOOP;
        RETURN p_ids;
    END
    $fn$
    """,
    "COMMENT ON FUNCTION restamp_ids(text[]) IS "
    "'Ids (ledger/ids.py format) re-stamped with the database clock, in array order.'",
    """
    CREATE FUNCTION rfc3339(moment timestamptz) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE AS $$
        SELECT to_char(moment AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    $$
    """,
    "COMMENT ON FUNCTION rfc3339(timestamptz) IS "
    "'A moment as the API writes it: UTC, microseconds, Z (2026-11-27T01:02:03.456789Z).'",
    """
    CREATE FUNCTION outbox.publish(
        p_ids text[], p_merchants text[], p_types text[], p_subjects text[], p_data jsonb[],
        p_time timestamptz
    ) RETURNS integer
    LANGUAGE plpgsql
    SET plan_cache_mode = force_generic_plan
    AS $fn$
    DECLARE
        fanned integer;
    BEGIN
        -- Held until commit; disabling a consumer of the merchant takes it exclusively, so the
        -- fan-out below reads `enabled` after any disable that got there first.
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('outbox.consumers:' || s.m, 0))
        FROM (SELECT DISTINCT m FROM unnest(p_merchants) AS m WHERE m IS NOT NULL) AS s
        ORDER BY s.m;
        -- The subject upsert's row lock serialises a subject's publishers until commit, so
        -- sequences are gap-free and in commit order; subjects are taken in sorted order.
        WITH input AS (
            SELECT * FROM unnest(p_ids, p_merchants, p_types, p_subjects, p_data)
                WITH ORDINALITY AS i(id, merchant_id, type, subject, data, ord)
        ), counts AS (
            SELECT subject, count(*) AS n FROM input GROUP BY subject ORDER BY subject
        ), seq AS (
            INSERT INTO outbox.subjects AS s (subject, last_sequence)
            SELECT subject, n FROM counts
            ON CONFLICT (subject)
                DO UPDATE SET last_sequence = s.last_sequence + excluded.last_sequence
            RETURNING subject, last_sequence
        ), ev AS (
            INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time, data)
            SELECT i.id, i.merchant_id, i.type, i.subject,
                   seq.last_sequence - c.n
                     + row_number() OVER (PARTITION BY i.subject ORDER BY i.ord),
                   p_time, i.data
            FROM input i JOIN seq USING (subject) JOIN counts c USING (subject)
            RETURNING id, merchant_id, type, subject, sequence, time
        ), fan AS (
            INSERT INTO outbox.deliveries (consumer, event_id, subject, sequence,
                                           next_attempt_at, created_at)
            SELECT c.name, ev.id, ev.subject, ev.sequence, ev.time, ev.time
            FROM ev
            JOIN outbox.consumers c
              ON c.enabled
             AND (c.merchant_id IS NULL OR c.merchant_id = ev.merchant_id)
             AND outbox.type_matches(c.event_types, ev.type)
            RETURNING 1
        )
        SELECT count(*) INTO fanned FROM fan;
        -- NOTIFY takes a global lock at commit: only when a relay said it is asleep.
        IF EXISTS (SELECT 1 FROM outbox.sleepers) THEN
            PERFORM pg_notify('outbox_wakeup', '');
        END IF;
        RETURN fanned;
    END
    $fn$
    """,
    "COMMENT ON FUNCTION outbox.publish(text[], text[], text[], text[], jsonb[], timestamptz) IS "
    "'Writes events (in array order) and one delivery per matching enabled consumer, in the "
    "caller''s transaction; returns the number of deliveries.'",
    """
    CREATE FUNCTION ledger_create_payment(
        p_merchant text, p_max_amount bigint, p_max_per_minute integer,
        p_source text, p_destination text, p_amount bigint, p_currency text,
        p_description text, p_metadata jsonb,
        p_payment_id text, p_entry_ids text[], p_event_ids text[],
        OUT outcome text, OUT param text, OUT held_currency text, OUT source_balance bigint,
        OUT moved_at timestamptz, OUT payment_object jsonb, OUT recent_payments bigint
    )
    LANGUAGE plpgsql
    SET plan_cache_mode = force_generic_plan
    AS $fn$
    DECLARE
        r accounts%ROWTYPE;
        src accounts%ROWTYPE;
        dst accounts%ROWTYPE;
        v_status text;
        v_failure text;
        src_after bigint;
        dst_after bigint;
    BEGIN
        moved_at := now();
        IF p_source = p_destination THEN
            outcome := 'same_account';
            param := 'destination';
            RETURN;
        END IF;
        FOR r IN
            SELECT * FROM accounts a
            WHERE a.merchant_id = p_merchant AND a.id IN (p_source, p_destination)
            ORDER BY a.id
            FOR UPDATE
        LOOP
            IF r.kind = 'customer' AND r.id = p_source THEN
                src := r;
            ELSIF r.kind = 'customer' THEN
                dst := r;
            END IF;
        END LOOP;
        IF src.id IS NULL THEN
            outcome := 'not_found'; param := 'source'; RETURN;
        ELSIF src.currency <> p_currency THEN
            outcome := 'currency_mismatch'; param := 'source'; held_currency := src.currency;
            RETURN;
        ELSIF dst.id IS NULL THEN
            outcome := 'not_found'; param := 'destination'; RETURN;
        ELSIF dst.currency <> p_currency THEN
            outcome := 'currency_mismatch'; param := 'destination';
            held_currency := dst.currency;
            RETURN;
        END IF;
        source_balance := src.balance;
        -- Stamped now that the accounts are locked: an account's entries sort in the order they
        -- were applied, whatever order the requests were made in.
        p_entry_ids := restamp_ids(p_entry_ids);
        p_event_ids := restamp_ids(p_event_ids);

        -- Nothing is written before this point: every refusal above leaves no trace.
        IF p_amount > p_max_amount THEN
            v_failure := 'risk_amount';
        ELSE
            SELECT count(*) INTO recent_payments FROM payments p
            WHERE p.source_id = p_source AND p.created_at > now() - interval '1 minute';
            IF recent_payments >= p_max_per_minute THEN
                v_failure := 'risk_velocity';
            ELSIF src.balance < p_amount THEN
                v_failure := 'insufficient_funds';
            END IF;
        END IF;

        IF v_failure IS NULL THEN
            UPDATE accounts a SET balance = a.balance - p_amount
            WHERE a.id = p_source RETURNING a.balance INTO src_after;
            UPDATE accounts a SET balance = a.balance + p_amount
            WHERE a.id = p_destination RETURNING a.balance INTO dst_after;
            INSERT INTO ledger_entries (id, account_id, amount, balance_after, currency, ref,
                                        created_at)
            VALUES (p_entry_ids[1], p_source, -p_amount, src_after, p_currency, p_payment_id,
                    moved_at),
                   (p_entry_ids[2], p_destination, p_amount, dst_after, p_currency,
                    p_payment_id, moved_at);
            v_status := 'succeeded';
        ELSE
            v_status := 'failed';
        END IF;
        INSERT INTO payments (id, merchant_id, source_id, destination_id, amount, currency,
                              status, failure_code, description, metadata, created_at)
        VALUES (p_payment_id, p_merchant, p_source, p_destination, p_amount, p_currency,
                v_status,
                CASE WHEN v_failure LIKE 'risk%' THEN 'risk_declined' ELSE v_failure END,
                p_description, p_metadata, moved_at);
        payment_object := jsonb_build_object(
            'id', p_payment_id, 'object', 'payment', 'source', p_source,
            'destination', p_destination, 'amount', p_amount, 'amount_refunded', 0,
            'currency', p_currency, 'status', v_status,
            'failure_code', CASE WHEN v_failure LIKE 'risk%' THEN 'risk_declined'
                                 ELSE v_failure END,
            'description', p_description, 'metadata', p_metadata,
            'created_at', rfc3339(moved_at));
        IF v_failure IS NULL THEN
            PERFORM outbox.publish(
                p_event_ids[1:3],
                ARRAY[p_merchant, p_merchant, p_merchant],
                ARRAY['payment.succeeded', 'account.balance_changed', 'account.balance_changed'],
                ARRAY[p_payment_id, p_source, p_destination],
                ARRAY[payment_object,
                      jsonb_build_object('account', p_source, 'currency', p_currency,
                                         'delta', -p_amount, 'balance', src_after,
                                         'cause', jsonb_build_object('object', 'payment',
                                                                     'id', p_payment_id)),
                      jsonb_build_object('account', p_destination, 'currency', p_currency,
                                         'delta', p_amount, 'balance', dst_after,
                                         'cause', jsonb_build_object('object', 'payment',
                                                                     'id', p_payment_id))],
                moved_at);
        ELSE
            PERFORM outbox.publish(ARRAY[p_event_ids[1]], ARRAY[p_merchant],
                                   ARRAY['payment.failed'], ARRAY[p_payment_id],
                                   ARRAY[payment_object], moved_at);
        END IF;
        outcome := coalesce(v_failure, 'succeeded');
    END
    $fn$
    """,
    "COMMENT ON FUNCTION ledger_create_payment(text, bigint, integer, text, text, bigint, text, "
    "text, jsonb, text, text[], text[]) IS "
    "'A payment between two customer accounts of a merchant, in the caller''s transaction. "
    "outcome: succeeded; insufficient_funds, risk_amount, risk_velocity (recorded as a failed "
    "payment); or not_found, currency_mismatch, same_account (nothing written).'",
    """
    CREATE FUNCTION api_json_problem(
        p_status integer, p_code text, p_title text, p_detail text, p_param text,
        p_extra text DEFAULT ''
    ) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE AS $$
        SELECT '{"type":' || to_json('https://docs.payments.local/errors#' || p_code)::text
            || ',"title":' || to_json(p_title)::text
            || ',"status":' || p_status
            || ',"detail":' || to_json(p_detail)::text
            || ',"code":' || to_json(p_code)::text
            || coalesce(',"param":' || to_json(p_param)::text, '')
            || p_extra || '}'
    $$
    """,
    "COMMENT ON FUNCTION api_json_problem(integer, text, text, text, text, text) IS "
    "'An RFC 9457 problem body exactly as api.errors.problem renders it (compact, same order).'",
    """
    CREATE FUNCTION api_json_payment(
        p_id text, p_source text, p_destination text, p_amount bigint, p_currency text,
        p_status text, p_failure_code text, p_description text, p_metadata_json text,
        p_created_at timestamptz
    ) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE AS $$
        SELECT '{"id":' || to_json(p_id)::text
            || ',"object":"payment","source":' || to_json(p_source)::text
            || ',"destination":' || to_json(p_destination)::text
            || ',"amount":' || p_amount
            || ',"amount_refunded":0,"currency":' || to_json(p_currency)::text
            || ',"status":' || to_json(p_status)::text
            || ',"failure_code":' || coalesce(to_json(p_failure_code)::text, 'null')
            || ',"description":' || coalesce(to_json(p_description)::text, 'null')
            || ',"metadata":' || p_metadata_json
            || ',"created_at":"' || rfc3339(p_created_at) || '"}'
    $$
    """,
    "COMMENT ON FUNCTION api_json_payment(text, text, text, bigint, text, text, text, text, "
    "text, timestamptz) IS "
    "'A new payment exactly as ledger.objects.payment renders it through orjson.'",
    """
    CREATE FUNCTION api_create_payment(
        p_key_hash bytea, p_idempotency_key text, p_route text, p_request_hash bytea,
        p_source text, p_destination text, p_amount bigint, p_currency text,
        p_description text, p_metadata_json text,
        p_payment_id text, p_entry_ids text[], p_event_ids text[],
        OUT http_status integer, OUT body bytea, OUT replayed boolean, OUT merchant text
    )
    LANGUAGE plpgsql
    SET plan_cache_mode = force_generic_plan
    AS $fn$
    DECLARE
        m record;
        k record;
        res record;
        locked boolean;
        v_payment text;
        v_failure text;
    BEGIN
        replayed := false;
        SELECT mm.id, mm.risk_max_amount, mm.risk_max_payments_per_minute INTO m
        FROM api_keys ak JOIN merchants mm ON mm.id = ak.merchant_id
        WHERE ak.key_hash = p_key_hash AND ak.revoked_at IS NULL;
        IF NOT FOUND THEN
            http_status := 401;
            RETURN;
        END IF;
        merchant := m.id;
        IF p_idempotency_key IS NOT NULL THEN
            -- As api/idempotency.py: the key is in progress while this transaction holds it.
            locked := pg_try_advisory_xact_lock(
                hashtextextended(m.id || ':' || p_idempotency_key, 0));
            SELECT ik.route, ik.request_hash, ik.response_status, ik.response_body INTO k
            FROM idempotency_keys ik
            WHERE ik.merchant_id = m.id AND ik.key = p_idempotency_key;
            IF FOUND THEN
                IF k.route <> p_route OR k.request_hash <> p_request_hash THEN
                    http_status := 422;
                ELSE
                    http_status := k.response_status;
                    body := k.response_body;
                    replayed := true;
                END IF;
                RETURN;
            ELSIF NOT locked THEN
                http_status := 409;
                RETURN;
            END IF;
        END IF;

        SELECT * INTO res FROM ledger_create_payment(
            m.id, m.risk_max_amount, m.risk_max_payments_per_minute, p_source, p_destination,
            p_amount, p_currency, p_description, p_metadata_json::jsonb, p_payment_id,
            p_entry_ids, p_event_ids);

        -- The messages are ledger/service.py's (tests/test_api_payment_sql.py compares them).
        IF res.outcome IN ('succeeded', 'insufficient_funds', 'risk_amount', 'risk_velocity')
        THEN
            v_failure := CASE WHEN res.outcome LIKE 'risk%' THEN 'risk_declined'
                              WHEN res.outcome = 'succeeded' THEN NULL
                              ELSE res.outcome END;
            v_payment := api_json_payment(
                p_payment_id, p_source, p_destination, p_amount, p_currency,
                CASE WHEN v_failure IS NULL THEN 'succeeded' ELSE 'failed' END, v_failure,
                p_description, p_metadata_json, res.moved_at);
        END IF;
        http_status := CASE res.outcome
            WHEN 'succeeded' THEN 201
            WHEN 'not_found' THEN 404
            WHEN 'same_account' THEN 400
            WHEN 'currency_mismatch' THEN 400
            ELSE 402 END;
        body := convert_to(CASE res.outcome
            WHEN 'succeeded' THEN v_payment
            WHEN 'insufficient_funds' THEN api_json_problem(
                402, 'insufficient_funds', 'Insufficient funds',
                format('Account %s has %s, the payment needs %s.',
                       p_source, res.source_balance, p_amount),
                'amount', ',"payment":' || v_payment)
            WHEN 'risk_amount' THEN api_json_problem(
                402, 'risk_declined', 'Declined by a risk rule',
                format('The amount exceeds the merchant''s single-payment limit of %s.',
                       m.risk_max_amount),
                NULL, ',"payment":' || v_payment)
            WHEN 'risk_velocity' THEN api_json_problem(
                402, 'risk_declined', 'Declined by a risk rule',
                format('The source account made %s payments in the last minute, the '
                       'merchant''s limit.', m.risk_max_payments_per_minute),
                NULL, ',"payment":' || v_payment)
            WHEN 'not_found' THEN api_json_problem(
                404, 'not_found', 'Not found',
                'No such account: ' || CASE res.param WHEN 'source' THEN p_source
                                                      ELSE p_destination END,
                res.param)
            WHEN 'currency_mismatch' THEN api_json_problem(
                400, 'currency_mismatch', 'Currency mismatch',
                format('Account %s holds %s, the request is in %s.',
                       CASE res.param WHEN 'source' THEN p_source ELSE p_destination END,
                       res.held_currency, p_currency),
                res.param)
            ELSE api_json_problem(
                400, 'invalid_request', 'Invalid request',
                'source and destination must be different accounts', 'destination')
            END, 'UTF8');
        IF p_idempotency_key IS NOT NULL THEN
            INSERT INTO idempotency_keys (merchant_id, key, route, request_hash,
                                          response_status, response_body)
            VALUES (m.id, p_idempotency_key, p_route, p_request_hash, http_status, body);
        END IF;
    END
    $fn$
    """,
    "COMMENT ON FUNCTION api_create_payment(bytea, text, text, bytea, text, text, bigint, text, "
    "text, text, text, text[], text[]) IS "
    "'POST /v1/payments in one statement: authenticate by key hash, reserve or replay the "
    "idempotency key, run ledger_create_payment, render and store the response. http_status "
    "401, 409 and 422 come without a body (the API renders those).'",
]

SQL_DOWN = [
    "DROP FUNCTION api_create_payment(bytea, text, text, bytea, text, text, bigint, text, text, "
    "text, text, text[], text[])",
    "DROP FUNCTION api_json_payment(text, text, text, bigint, text, text, text, text, text, "
    "timestamptz)",
    "DROP FUNCTION api_json_problem(integer, text, text, text, text, text)",
    "DROP FUNCTION ledger_create_payment(text, bigint, integer, text, text, bigint, text, text, "
    "jsonb, text, text[], text[])",
    "DROP FUNCTION outbox.publish(text[], text[], text[], text[], jsonb[], timestamptz)",
    "DROP FUNCTION rfc3339(timestamptz)",
    "DROP FUNCTION restamp_ids(text[])",
    "DROP FUNCTION id_stamp(bigint)",
]


def _run(statements: list[str]) -> None:
    # Straight to psycopg without parameters: the JSON templates hold ':' and the messages
    # '%s', which SQLAlchemy and psycopg would otherwise take for placeholders.
    dbapi = op.get_bind().connection.dbapi_connection
    assert dbapi is not None
    cur = dbapi.cursor()
    try:
        for statement in statements:
            cur.execute(statement)
    finally:
        cur.close()


def upgrade() -> None:
    _run(SQL_UP)


def downgrade() -> None:
    _run(SQL_DOWN)
