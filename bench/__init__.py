"""Benchmarks side by side (issue 5): the payment API against pgbench running the same SQL
transaction, the relay against pgqueuer, and end-to-end webhook latency, on one machine in one run.

`python -m bench [--quick] [--json PATH]` creates its own databases on the local PostgreSQL,
starts the API (uvicorn), relays, a webhook receiver and the peers as subprocesses, and removes
all of it on exit, Ctrl-C included. docs/benchmarks.md says what each figure means.
"""
