"""The test suite's own promises (tests/conftest.py), checked with pytest subprocesses against a
private cluster:

- a blip of the server (every session terminated, as a restart does) costs the session nothing:
  the tests after it pass, instead of each failing on a dead admin connection;
- a run stopped by Ctrl-C (SIGINT) or SIGTERM in the middle of a test drops its databases itself;
- a run that dies without cleaning up (a crash) leaves its databases to the next session, which
  drops them before it starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.support.pgcluster import PgCluster

ROOT = Path(__file__).resolve().parent.parent

INNER = '''
import os, time, psycopg

def _use(url):
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM merchants").fetchone() == (0,)

def test_before(db_url):
    _use(db_url)

def test_blip(db_url, pg_server_url):
    _use(db_url)
    if os.environ.get("INNER_BLIP"):
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")

def test_wait(db_url):
    _use(db_url)
    marker = os.environ.get("INNER_MARKER")
    if marker:
        open(marker, "w").close()
        time.sleep(120)
    if os.environ.get("INNER_CRASH"):
        os._exit(3)

''' + "".join(f'''
def test_after_{i}(db_url):
    _use(db_url)
''' for i in range(20))


def _inner(cluster: PgCluster, tmp: Path, **env: str) -> subprocess.Popen[bytes]:
    test_file = tmp / "test_inner.py"
    test_file.write_text(INNER)
    with open(tmp / "inner.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
             "tests.conftest", "--rootdir", str(tmp), str(test_file)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "TEST_DATABASE_URL": cluster.server_url, **env},
        )


def _test_databases(cluster: PgCluster) -> list[str]:
    with psycopg.connect(cluster.server_url) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'payments\\_test\\_%'"
        ).fetchall()
    return [name for (name,) in rows]


def test_a_blip_of_the_server_costs_no_test(pg_cluster: PgCluster, tmp_path: Path) -> None:
    inner = _inner(pg_cluster, tmp_path, INNER_BLIP="1")
    code = inner.wait(300)
    log = (tmp_path / "inner.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "23 passed" in log, log[-3000:]
    assert _test_databases(pg_cluster) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_drops_its_databases(
    pg_cluster: PgCluster, tmp_path: Path, sig: signal.Signals
) -> None:
    marker = tmp_path / "waiting"
    inner = _inner(pg_cluster, tmp_path, INNER_MARKER=str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert inner.poll() is None, (tmp_path / "inner.log").read_text(errors="replace")
        assert time.monotonic() < deadline, "the inner run never reached its waiting test"
        time.sleep(0.05)
    assert len(_test_databases(pg_cluster)) == 2  # the template and the waiting test's
    inner.send_signal(sig)
    code = inner.wait(60)
    log = (tmp_path / "inner.log").read_text(errors="replace")
    assert code != 0, log[-3000:]
    assert _test_databases(pg_cluster) == [], log[-3000:]


def test_the_next_session_drops_what_a_crashed_run_left(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    crashed = _inner(pg_cluster, tmp_path, INNER_CRASH="1")
    assert crashed.wait(300) == 3
    left = _test_databases(pg_cluster)
    assert len(left) == 2, left  # no cleanup ran: the template and the crashed test's
    again = _inner(pg_cluster, tmp_path)
    code = again.wait(300)
    assert code == 0, (tmp_path / "inner.log").read_text(errors="replace")[-3000:]
    assert _test_databases(pg_cluster) == []
