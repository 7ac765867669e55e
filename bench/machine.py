"""What the figures were measured on, and how busy the machine was while they were.

The machine is shared, so each phase records the load average and the CPU time spent by the
whole machine and by our own processes: a figure taken while something else ate a core says so.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def describe(server: dict[str, str]) -> dict[str, object]:
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": server.get("server_version", ""),
        "postgresql_settings": {k: v for k, v in server.items() if k != "version"},
        "loadavg_at_start": os.getloadavg()[0],
    }


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_commit(cwd: Path) -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'-dirty' if dirty else ''}" if head else "unknown"


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]
    idle = values[3] + values[4]
    total = sum(values)
    return total - idle, total


def group_cpu_seconds(pgids: list[int], system_only: bool = False) -> dict[int, float]:
    """CPU seconds (user + system, or system only) of every live process in each group."""
    wanted = set(pgids)
    out = dict.fromkeys(pgids, 0.0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        pgrp = int(rest[2])
        if pgrp in wanted:
            out[pgrp] += ((0 if system_only else int(rest[11])) + int(rest[12])) / _TICKS
    return out


def server_cpu_seconds(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL server: the postmaster, its live children, and (through the
    postmaster's cutime/cstime) every child that has exited, such as pgbench's backends."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        pid, ppid = int(entry.name), int(rest[1])
        if pid == postmaster:
            total += sum(int(v) for v in rest[11:15]) / _TICKS
        elif ppid == postmaster:
            total += (int(rest[11]) + int(rest[12])) / _TICKS
    return total


def parent_of(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return int(raw[raw.rfind(")") + 2 :].split()[1])


@dataclass
class Usage:
    """CPU use over one phase: the machine's busy share and our children's seconds."""

    wall: float
    machine_busy_cores: float
    children_cores: dict[str, float]
    loadavg: float
    children_system_share: dict[str, float]

    def as_dict(self) -> dict[str, object]:
        return {
            "wall_s": round(self.wall, 2),
            "machine_busy_cores": round(self.machine_busy_cores, 2),
            "children_cores": {k: round(v, 2) for k, v in self.children_cores.items()},
            "loadavg_1m": round(self.loadavg, 2),
            "children_system_share": {k: round(v, 2)
                                      for k, v in self.children_system_share.items()},
        }


class Meter:
    """Start at the beginning of a phase, `stop()` at its end."""

    def __init__(self, children: dict[str, int], postmaster: int = 0) -> None:
        self.children = dict(children)
        self.postmaster = postmaster
        self.t0 = time.monotonic()
        self.busy0, self.total0 = _machine_ticks()
        self.cpu0 = group_cpu_seconds(list(self.children.values()))
        self.sys0 = group_cpu_seconds(list(self.children.values()), system_only=True)
        self.pg0 = server_cpu_seconds(postmaster) if postmaster else 0.0

    def stop(self) -> Usage:
        wall = time.monotonic() - self.t0
        busy1, total1 = _machine_ticks()
        cpu1 = group_cpu_seconds(list(self.children.values()))
        sys1 = group_cpu_seconds(list(self.children.values()), system_only=True)
        system_share = {}
        for name, pg in self.children.items():
            used = cpu1.get(pg, 0.0) - self.cpu0.get(pg, 0.0)
            if used > 0:
                system_share[name] = (sys1.get(pg, 0.0) - self.sys0.get(pg, 0.0)) / used
        ncpu = os.cpu_count() or 1
        total = max(total1 - self.total0, 1)
        busy_cores = (busy1 - self.busy0) / total * ncpu
        per_child = {
            name: (cpu1.get(pg, 0.0) - self.cpu0.get(pg, 0.0)) / max(wall, 1e-9)
            for name, pg in self.children.items()
        }
        if self.postmaster:
            per_child["postgresql_server"] = (
                server_cpu_seconds(self.postmaster) - self.pg0) / max(wall, 1e-9)
        return Usage(wall, busy_cores, per_child, os.getloadavg()[0], system_share)


def _pids_cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        out[pid] = (int(rest[11]) + int(rest[12])) / _TICKS
    return out


async def database_cores(url: str, start_after: float, window: float) -> float | None:
    """Cores used by the server processes connected to `url`'s database over a window that
    starts `start_after` seconds from now (backends alive at both ends; others' databases on a
    shared server are not in it)."""
    import asyncio

    import psycopg

    query = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
             " AND pid <> pg_backend_pid()")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await asyncio.sleep(start_after)
        cur = await conn.execute(query)
        first = _pids_cpu([r[0] for r in await cur.fetchall()])
        t0 = time.monotonic()
        await asyncio.sleep(window)
        cur = await conn.execute(query)
        last = _pids_cpu([r[0] for r in await cur.fetchall()])
        elapsed = time.monotonic() - t0
    both = set(first) & set(last)
    if not both or elapsed <= 0:
        return None
    return sum(last[p] - first[p] for p in both) / elapsed
