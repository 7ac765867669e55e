"""What the three commands say about themselves: every option has help text, and every
environment variable the code reads is listed in the `--help` of each command that reads it, and
in the README (with the ones deploy/run-local reads)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from admin.cli import build_parser as paymentsctl_parser
from api.__main__ import build_parser as api_parser
from relay.__main__ import _parser as relay_parser

ROOT = Path(__file__).resolve().parent.parent

# Where each command's code lives (what it imports of the shared packages included).
SOURCES = {
    "payments-api": ["api", "db/settings.py", "db/pool.py", "outbox", "ledger"],
    "outbox-relay": ["relay", "db/settings.py", "db/pool.py", "outbox", "ledger",
                     "admin/retention.py"],
    "paymentsctl": ["admin", "db", "outbox", "ledger"],
}
PARSERS = {
    "payments-api": api_parser,
    "outbox-relay": relay_parser,
    "paymentsctl": paymentsctl_parser,
}
# The name in os.environ.get("X"), env.get("X"), os.environ["X"], _seconds(env, "X", ...).
_ENV_READ = re.compile(
    r"""\b(?:environ|env)\s*(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]{2,})["']"""
    r"""|\(\s*(?:environ|env)\s*,\s*["']([A-Z][A-Z0-9_]{2,})["']"""
)
_SHELL_READ = re.compile(r"\$\{?([A-Z][A-Z0-9_]{2,})")


def _files(command: str) -> Iterator[Path]:
    for place in SOURCES[command]:
        path = ROOT / place
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def environment_read_by(command: str) -> set[str]:
    names: set[str] = set()
    for path in _files(command):
        for read, passed in _ENV_READ.findall(path.read_text()):
            names.add(read or passed)
    return names


def _help(command: str) -> str:
    script = Path(sys.executable).parent / command
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    return " ".join(out.stdout.split())


def test_the_grep_finds_what_each_command_reads() -> None:
    assert {"DATABASE_URL", "OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "PROMETHEUS_MULTIPROC_DIR"} <= (
        environment_read_by("payments-api"))
    assert {"DATABASE_URL", "OUTBOX_RETRY_SCHEDULE", "OUTBOX_HTTP_TIMEOUT",
            "OUTBOX_LEASE_SECONDS", "OUTBOX_PURGE_INTERVAL", "OUTBOX_RETENTION",
            "OUTBOX_SHUTDOWN_GRACE", "NOTIFY_SOCKET", "WATCHDOG_USEC"} <= (
        environment_read_by("outbox-relay"))
    assert {"DATABASE_URL", "PGDATABASE", "USER", "PAYMENTS_API_KEY"} <= (
        environment_read_by("paymentsctl"))


@pytest.mark.parametrize("command", sorted(SOURCES))
def test_help_lists_every_environment_variable_the_command_reads(command: str) -> None:
    text = _help(command)
    missing = sorted(name for name in environment_read_by(command) if name not in text)
    assert not missing, f"{command} --help does not mention {missing}"


def test_the_readme_lists_every_environment_variable_read_anywhere() -> None:
    readme = (ROOT / "README.md").read_text()
    names = set().union(*(environment_read_by(c) for c in SOURCES))
    names |= set(_SHELL_READ.findall((ROOT / "deploy" / "run-local").read_text()))
    missing = sorted(name for name in names if f"`{name}`" not in readme)
    assert not missing, f"README.md does not list {missing}"


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_has_help(command: str) -> None:
    missing = [
        f"{prog} {'/'.join(action.option_strings)}"
        for prog, parser in _parsers(PARSERS[command]())
        for action in parser._actions
        if action.option_strings and not (action.help and action.help.strip())
    ]
    assert not missing, f"options without help: {missing}"
