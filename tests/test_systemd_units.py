"""The systemd units in deploy/systemd: what they promise, and `systemd-analyze verify` on them.

`verify` checks every ExecStart= binary exists and is executable, and newer systemd releases may
also resolve User=/Group= while loading a unit. The test machine has neither /opt/payments nor a
`payments` account (both are made at install time, docs/operations.md), so the test verifies a
copy in which only those two things are replaced: ExecStart= points at stub executables with the
same names (arguments kept), and User=/Group= name the account running the test, which exists
wherever the test runs. Everything else is verified as committed, and the committed values of
those two are asserted separately.

`verify` exits 0 on a mere warning (an unknown or misspelt key is "ignoring"), so the test also
requires that it says nothing about the unit files.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
VENV_BIN = "/opt/payments/venv/bin/"
RELAY = "outbox-relay.service"
API = "payments-api.service"

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "User": "payments",
    "Group": "payments",
    "EnvironmentFile": "/etc/payments/payments.env",
    "Restart": "on-failure",
}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value given (systemd allows repeating a key)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {raw!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(name: str) -> dict[str, str]:
    """The [Service] section, last value of each key (as systemd reads single-valued keys)."""
    return {k: v[-1] for k, v in parse_unit(UNITS / name)["Service"].items()}


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: apt-get update && apt-get install -y systemd")
    return found


def test_relay_unit_promises() -> None:
    unit = service(RELAY)
    for key, value in HARDENING.items():
        assert unit[key] == value, key
    assert unit["Type"] == "notify"
    assert unit["NotifyAccess"] == "main"
    assert unit["WatchdogSec"] == "30"
    assert unit["TimeoutStopSec"] == "35"
    assert unit["KillSignal"] == "SIGTERM"
    assert unit["ExecStart"].startswith(VENV_BIN + "outbox-relay")


def test_api_unit_promises() -> None:
    unit = service(API)
    for key, value in HARDENING.items():
        assert unit[key] == value, key
    assert unit["Type"] == "exec"
    assert unit["ExecStart"] == (VENV_BIN + "payments-api --host 127.0.0.1 --port 8000 --workers 2")


def test_both_units_install_into_multi_user() -> None:
    for name in (RELAY, API):
        assert parse_unit(UNITS / name)["Install"]["WantedBy"] == ["multi-user.target"]


def _verifiable_copy(name: str, into: Path, stubs: Path) -> Path:
    text = (UNITS / name).read_text()
    assert VENV_BIN in text
    for binary in re.findall(re.escape(VENV_BIN) + r"([\w.-]+)", text):
        stub = stubs / binary
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    text = text.replace(VENV_BIN, f"{stubs}/")
    text = re.sub(r"(?m)^User=payments$", f"User={user}", text)
    text = re.sub(r"(?m)^Group=payments$", f"Group={group}", text)
    copy = into / name
    copy.write_text(text)
    return copy


def _verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _complaints(result: subprocess.CompletedProcess[str], paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if any(n in line for n in names)]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    copies = [_verifiable_copy(name, tmp_path, stubs) for name in (RELAY, API)]
    result = _verify(copies)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _complaints(result, copies) == []


def test_verify_would_notice_a_broken_unit(tmp_path: Path) -> None:
    """The check above is only worth something if a typo in a unit makes it fail."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    copy = _verifiable_copy(RELAY, tmp_path, stubs)
    copy.write_text(copy.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    result = _verify([copy])
    assert result.returncode != 0 or _complaints(result, [copy]) != []
