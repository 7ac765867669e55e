"""Every table and column of `public` has a comment, and problem `type` URIs are `/problems/<code>`.

Comments: operators read the ledger from psql as they read the outbox, where every table and
column was documented from the start; these are the tables and columns of `public` that had none
(db/schema.py holds the same texts), and Alembic's own `alembic_version`.

`api_json_problem`, the SQL renderer of problem bodies for `POST /v1/payments`, writes the `type`
as the API does (api/errors.py PROBLEM_TYPE): the relative reference `/problems/<code>`, served
by the API, instead of a placeholder domain. Stored idempotent responses keep the bytes they were
first answered with.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

TABLE_COMMENTS = {
    'deposits': "Money entering a customer account from the merchant's funding system account.",
    'payments': 'Payments between two customer accounts of one merchant; failed ones are kept.',
    'payouts': "Money leaving a customer account to the merchant's settlement system account.",
    'refunds': 'Refunds of payments: money back from the destination to the source.',
    'webhook_endpoints': "Merchants' webhook endpoints; each is an outbox consumer of the same name.",
}

COLUMN_COMMENTS = {
    'merchants': {
        'id': 'mer_ id.',
        'name': 'Display name, as given to paymentsctl merchant create.',
        'risk_max_amount': 'Risk rule: the largest single payment in minor units.',
        'risk_max_payments_per_minute': 'Risk rule: payments per source account per minute.',
        'created_at': 'When the merchant was created.',
    },
    'api_keys': {
        'id': 'key_ id; paymentsctl key revoke takes it.',
        'merchant_id': 'The merchant the key acts for.',
        'created_at': 'When the key was created.',
        'revoked_at': 'When it was revoked; NULL while it works.',
    },
    'accounts': {
        'id': 'acct_ id.',
        'merchant_id': 'Owner.',
        'currency': 'ISO 4217 code; every entry of the account is in it.',
        'balance': "Sum of the account's ledger entries, in minor units.",
        'metadata': "The merchant's key-value strings.",
        'created_at': 'When the account was created.',
    },
    'ledger_entries': {
        'id': "ent_ id; an account's entries sort in the order they were applied.",
        'account_id': 'The account whose balance the entry changed.',
        'balance_after': "The account's balance after this entry.",
        'currency': "The account's currency.",
        'created_at': 'When the entry was written (transaction time).',
    },
    'deposits': {
        'id': 'dep_ id.',
        'merchant_id': 'Owner.',
        'account_id': 'The customer account credited.',
        'amount': 'Minor units, 1 to 10^15.',
        'currency': 'ISO 4217 code.',
        'status': 'Always succeeded.',
        'created_at': 'When the deposit was made.',
    },
    'payments': {
        'id': 'pay_ id.',
        'merchant_id': 'Owner.',
        'source_id': 'The account debited.',
        'destination_id': 'The account credited.',
        'amount': 'Minor units, 1 to 10^15.',
        'amount_refunded': "Sum of the payment's refunds.",
        'currency': 'ISO 4217 code.',
        'status': 'succeeded or failed.',
        'failure_code': 'insufficient_funds or risk_declined when failed, else NULL.',
        'description': "The merchant's free text.",
        'metadata': "The merchant's key-value strings.",
        'created_at': 'When the payment was made.',
    },
    'refunds': {
        'id': 're_ id.',
        'merchant_id': 'Owner.',
        'payment_id': 'The payment refunded.',
        'amount': 'Minor units.',
        'currency': "The payment's currency.",
        'status': 'Always succeeded.',
        'created_at': 'When the refund was made.',
    },
    'payouts': {
        'id': 'po_ id.',
        'merchant_id': 'Owner.',
        'account_id': 'The customer account debited.',
        'amount': 'Minor units, 1 to 10^15.',
        'currency': 'ISO 4217 code.',
        'status': 'Always paid.',
        'created_at': 'When the payout was made.',
    },
    'idempotency_keys': {
        'merchant_id': 'The merchant the key is scoped to.',
        'key': 'The Idempotency-Key header as sent.',
        'request_hash': 'SHA-256 of the route and the canonical body of the first request.',
        'response_status': 'HTTP status of the first response, replayed with it.',
        'response_body': 'Body of the first response, replayed byte for byte.',
        'created_at': 'When the key was first used; kept at least 24 hours.',
    },
    'webhook_endpoints': {
        'id': 'we_ id; also its consumer name in outbox.consumers.',
        'merchant_id': "Owner; the endpoint receives only this merchant's events.",
        'url': 'Where the events are POSTed.',
        'event_types': 'Patterns: *, prefix.*, or an exact type.',
        'description': "The merchant's free text.",
        'status': 'enabled or disabled (by the merchant, or by a 410 from the endpoint).',
        'previous_secret_expires_at': 'When previous_secret stops signing.',
        'disabled_reason': 'Why it was disabled, e.g. the endpoint answered 410 Gone.',
        'created_at': 'When the endpoint was created.',
    },
    'daily_reports': {
        'merchant_id': 'The merchant the totals belong to.',
        'day': 'UTC day.',
        'currency': 'ISO 4217 code.',
        'payments_count': 'Succeeded payments.',
        'payments_amount': 'Sum of succeeded payments, minor units.',
        'refunds_amount': 'Sum of refunds, minor units.',
        'deposits_amount': 'Sum of deposits, minor units.',
        'payouts_amount': 'Sum of payouts, minor units.',
    },
}

ALEMBIC_VERSION = (
    "The schema's migration revision, kept by Alembic (paymentsctl migrate).",
    "Revision id of the newest migration applied.",
)

_PROBLEM = """
CREATE OR REPLACE FUNCTION api_json_problem(
    p_status integer, p_code text, p_title text, p_detail text, p_param text,
    p_extra text DEFAULT ''
) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT '{"type":' || to_json('{prefix}' || p_code)::text
        || ',"title":' || to_json(p_title)::text
        || ',"status":' || p_status
        || ',"detail":' || to_json(p_detail)::text
        || ',"code":' || to_json(p_code)::text
        || coalesce(',"param":' || to_json(p_param)::text, '')
        || p_extra || '}'
$$
"""
PROBLEM_TYPE = "/problems/"
PREVIOUS_PROBLEM_TYPE = "https://docs.payments.local/errors#"


def _problem_renderer(prefix: str) -> None:
    # Straight to psycopg: the JSON template holds ':', which SQLAlchemy takes for a parameter.
    dbapi = op.get_bind().connection.dbapi_connection
    assert dbapi is not None
    cur = dbapi.cursor()
    try:
        cur.execute(_PROBLEM.replace("{prefix}", prefix))
    finally:
        cur.close()


def upgrade() -> None:
    for table, comment in TABLE_COMMENTS.items():
        op.create_table_comment(table, comment)
    for table, columns in COLUMN_COMMENTS.items():
        for column, comment in columns.items():
            op.alter_column(table, column, comment=comment)
    op.create_table_comment("alembic_version", ALEMBIC_VERSION[0])
    op.alter_column("alembic_version", "version_num", comment=ALEMBIC_VERSION[1])
    _problem_renderer(PROBLEM_TYPE)


def downgrade() -> None:
    _problem_renderer(PREVIOUS_PROBLEM_TYPE)
    op.alter_column("alembic_version", "version_num", comment=None,
                    existing_comment=ALEMBIC_VERSION[1])
    op.drop_table_comment("alembic_version", existing_comment=ALEMBIC_VERSION[0])
    for table, columns in COLUMN_COMMENTS.items():
        for column, comment in columns.items():
            op.alter_column(table, column, comment=None, existing_comment=comment)
    for table, comment in TABLE_COMMENTS.items():
        op.drop_table_comment(table, existing_comment=comment)
