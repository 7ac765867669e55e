"""An example receiver built with the library: it keeps each account's balance from the
`account.balance_changed` events, checking the balance chain on every event (which only holds
when events are applied once each and in order), and logs every event it applies.

    RECEIVER_DATABASE_URL=postgresql:///shop RECEIVER_WEBHOOK_SECRETS=whsec_… \\
    RECEIVER_EVENTS_URL=https://payments.example.com RECEIVER_API_KEY=sk_… \\
        python -m receiver.example --port 8001

`receiver.example.effects` holds its tables and handlers, `receiver.example.__main__` the process.
"""
