"""Child processes: started in their own process group, always stopped.

Every process the benchmark starts is registered here; `stop_all()` (run from `finally` blocks and
at exit) sends SIGTERM to each group, waits a bound, then SIGKILLs what is left. Ctrl-C reaches
the children only through us, because they run in their own sessions.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_running: list[Child] = []


class Child:
    """One subprocess with a name, its output in a log file, stopped by process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = (log_dir / f"{name}.log") if log_dir else None
        out: Any = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(
            self.argv,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if out is not subprocess.DEVNULL:
            out.close()
        _running.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.alive():
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        else:
            # The leader is gone; make sure nothing it forked (uvicorn workers) outlives it.
            _signal_group(self.proc.pid, signal.SIGKILL)
        if self in _running:
            _running.remove(self)
        return self.proc.returncode


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all() -> None:
    for child in reversed(list(_running)):
        try:
            child.stop(timeout=8.0)
        except Exception as exc:  # cleanup goes on whatever one child does
            print(f"bench: could not stop {child.name}: {exc}", file=sys.stderr)


def terminate_all() -> None:
    """SIGTERM every child group without waiting (safe inside a signal callback): a child that
    a worker thread waits on (pgbench, the pgqueuer peer) ends, and so does the wait."""
    for child in list(_running):
        if child.alive():
            _signal_group(child.proc.pid, signal.SIGTERM)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_handlers() -> None:
    """Outside the event loop, SIGINT, SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally`
    and `stop_all` runs (SIGINT explicitly: a shell starts background jobs with it ignored).
    Inside the loop, `run.run_all` replaces them with a handler that cancels the run."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _sigterm_as_interrupt)
    atexit.register(stop_all)


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll a zero-argument callable until it returns true."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
