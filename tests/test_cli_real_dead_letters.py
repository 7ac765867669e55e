"""paymentsctl against dead letters that a real relay made: a receiver that always answers 500,
the retry schedule runs out, then the operator looks (status, dead) and redrives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

from tests.relayhelpers import (
    RelayProcess,
    add_endpoint,
    delivery_counts,
    make_traffic,
    new_merchant,
    wait_until_delivered,
)
from tests.support.receiver import Receiver


def _ctl(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "paymentsctl"), *args],
        env={**os.environ, "DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_status_dead_and_redrive_on_dead_letters_from_a_failing_receiver(
    db_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    merchant = new_merchant(db_url)
    failing = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    receiver.set_default(failing.path, 500)
    relay = RelayProcess(db_url, tmp_path).start().wait_ready()
    try:
        await make_traffic(db_url, [merchant], 3, clients=1)
        await wait_until_delivered(db_url)  # delivered or dead: nothing left pending

        status = _ctl(db_url, "outbox", "status", "--json")
        assert status.returncode == 0, status.stderr
        rows = {r["consumer"]: r for r in json.loads(status.stdout)}
        assert rows[failing.id]["dead"] == 3
        assert rows[failing.id]["pending"] == 0

        dead = _ctl(db_url, "outbox", "dead", "--consumer", failing.id, "--json")
        assert dead.returncode == 0, dead.stderr
        letters = json.loads(dead.stdout)
        assert len(letters) == 3
        for letter in letters:
            assert set(letter) == {
                "consumer", "event", "type", "attempts", "last_status_code", "last_error",
                "dead_since",
            }
            assert letter["consumer"] == failing.id
            assert letter["type"] == "payment.succeeded"
            assert letter["last_status_code"] == 500
            assert letter["attempts"] == 3  # the test schedule has three entries
        table = _ctl(db_url, "outbox", "dead")
        assert table.returncode == 0 and failing.id in table.stdout

        # The receiver recovers; the operator redrives; the relay delivers.
        receiver.set_default(failing.path, 204)
        redrive = _ctl(db_url, "outbox", "redrive", "--consumer", failing.id)
        assert redrive.returncode == 0, redrive.stderr
        assert "3" in redrive.stdout
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("NOTIFY outbox_wakeup")
        await wait_until_delivered(db_url)
        assert delivery_counts(db_url).get("dead") is None
        assert {r.webhook_id for r in receiver.accepted(failing.path)} == {
            letter["event"] for letter in letters
        }
        again = _ctl(db_url, "outbox", "dead", "--json")
        assert json.loads(again.stdout) == []
    finally:
        assert relay.stop() == 0
        relay.close()
