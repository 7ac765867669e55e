"""A private, throw-away PostgreSQL cluster for tests that stop, crash or restart the server.

The shared test server cannot be restarted under other tests' feet, so fault tests get their own
cluster: initdb into a temporary directory (tmpfs when there is room), trust authentication,
127.0.0.1 on a free port, the unix socket in the same directory, `fsync=off`. initdb refuses to run
as root, so when we are root every server binary runs as the `postgres` OS user.

    with PgCluster() as cluster:
        db.migrate.migrate(cluster.url)
        cluster.restart()
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal

import psycopg
from psycopg import sql

from tests.support import free_port

StopMode = Literal["smart", "fast", "immediate"]

SERVER_USER = "postgres"
_TMPFS = Path("/dev/shm")
_TMPFS_MIN_FREE = 1 << 30

# fsync=off only matters when the machine crashes; a server crash (stop("immediate")) keeps every
# acknowledged commit, which fault tests rely on. synchronous_commit stays on for the same reason.
DEFAULT_SETTINGS: Mapping[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] '",
}


class ClusterError(RuntimeError):
    pass


def find_bindir() -> Path:
    """The newest installed PostgreSQL's bin directory (`PG_BINDIR` overrides)."""
    if env := os.environ.get("PG_BINDIR"):
        return Path(env)

    def version(path: str) -> tuple[int, ...]:
        match = re.search(r"/postgresql/([\d.]+)/bin", path)
        return tuple(int(p) for p in match.group(1).split(".") if p) if match else ()

    candidates = [c for c in glob.glob("/usr/lib/postgresql/*/bin") if version(c)]
    for candidate in sorted(candidates, key=version, reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
        if (Path(out.stdout.strip()) / "initdb").exists():
            return Path(out.stdout.strip())
    if initdb := shutil.which("initdb"):
        return Path(initdb).parent
    raise ClusterError("no PostgreSQL server binaries found (set PG_BINDIR)")


def _scratch_root() -> str:
    try:
        stat = os.statvfs(_TMPFS)
        if stat.f_bavail * stat.f_frsize >= _TMPFS_MIN_FREE and os.access(_TMPFS, os.W_OK):
            return str(_TMPFS)
    except OSError:
        pass
    return tempfile.gettempdir()


class PgCluster:
    """One PostgreSQL server. The port stays the same across restarts, so URLs remain valid."""

    def __init__(
        self,
        *,
        dbname: str = "payments",
        settings: Mapping[str, str] | None = None,
        bindir: Path | None = None,
    ) -> None:
        self.dbname = dbname
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.bindir = bindir or find_bindir()
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.base: Path | None = None
        self._as_root = os.geteuid() == 0
        self._running = False

    # --- addresses ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """URL of the database `dbname` (create it with db.migrate.migrate(url))."""
        return self.url_for(self.dbname)

    @property
    def server_url(self) -> str:
        """URL of the `postgres` maintenance database."""
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{SERVER_USER}@{self.host}:{self.port}/{dbname}"

    @property
    def socket_dir(self) -> Path:
        return self._base()

    @property
    def datadir(self) -> Path:
        return self._base() / "data"

    @property
    def logfile(self) -> Path:
        return self._base() / "server.log"

    @property
    def running(self) -> bool:
        return self._running

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        first = self.base is None
        if first:
            self._initdb()
        for attempt in range(3):
            try:
                self._pg_ctl("start", "-l", str(self.logfile), "-t", "60")
                break
            except ClusterError:
                # Another process may have taken the port between free_port() and bind(); only
                # the first start may move to another port, later ones must keep URLs valid.
                if not first or attempt == 2 or "could not bind" not in self.log():
                    raise
                self.port = free_port(self.host)
                self._write_settings()
        self._running = True
        if first:
            self._create_login_role()

    def stop(self, mode: StopMode = "fast") -> None:
        """`fast` disconnects clients cleanly; `immediate` is a crash (recovery on next start)."""
        if not self._running:
            return
        self._pg_ctl("stop", "-m", mode, "-t", "60")
        self._running = False

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    def migrate(self) -> str:
        """Create the `dbname` database and bring it to the newest migration; returns its URL."""
        from db.migrate import migrate

        migrate(self.url)
        return self.url

    def cleanup(self) -> None:
        """Stop the server (as a crash: nothing to keep) and delete its directory."""
        try:
            if self._running:
                try:
                    self.stop("immediate")
                except ClusterError:
                    self._running = False
        finally:
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def __enter__(self) -> PgCluster:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # --- internals ------------------------------------------------------------------------------

    def _base(self) -> Path:
        if self.base is None:
            raise ClusterError("the cluster has not been created yet (call start())")
        return self.base

    def _initdb(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="pgcluster-", dir=_scratch_root()))
        if self._as_root:
            owner = pwd.getpwnam(SERVER_USER)
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            SERVER_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        self._write_settings()

    def _write_settings(self) -> None:
        lines = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            **self.settings,
        }
        # postgresql.auto.conf is read last, so these win over anything initdb wrote.
        text = "".join(f"{key} = {value}\n" for key, value in lines.items())
        (self.datadir / "postgresql.auto.conf").write_text(text)
        if self._as_root:
            owner = pwd.getpwnam(SERVER_USER)
            os.chown(self.datadir / "postgresql.auto.conf", owner.pw_uid, owner.pw_gid)

    def _create_login_role(self) -> None:
        # Lets people and tools that default to the OS user name (root) connect as well.
        me = pwd.getpwuid(os.geteuid()).pw_name
        if me == SERVER_USER:
            return
        with psycopg.connect(self.server_url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (me,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE ROLE {} SUPERUSER LOGIN").format(sql.Identifier(me)))

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-w", *args)

    def _run(self, binary: str, *args: str) -> None:
        command = [str(self.bindir / binary), *args]
        if self._as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        result = subprocess.run(
            command,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
        )
        if result.returncode != 0:
            raise ClusterError(
                f"{binary} {' '.join(args[:1])} failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}\n{self.log()[-3000:]}"
            )
