"""Encrypted transport: `payments-api --ssl-certfile/--ssl-keyfile` serves HTTPS, and the database
connection honours `sslmode` (and `sslrootcert`) in DATABASE_URL.

Certificates are made here (the `cryptography` package when installed, else `openssl req`), for
127.0.0.1 and localhost, valid two days. The database side runs on a private cluster whose SSL
is switched on and off with ALTER SYSTEM and a reload.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from ledger.merchants import NewKey, create_merchant
from tests.support.pgcluster import SERVER_USER, PgCluster
from tests.test_request_limits import serve_api


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def make_cert(directory: Path, name: str = "server") -> Cert:
    """A self-signed certificate (its own CA) for 127.0.0.1 and localhost."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    try:
        _make_with_cryptography(cert, key)
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.fail("neither the cryptography package nor openssl is installed")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True, stdin=subprocess.DEVNULL,
        )
    key.chmod(0o600)
    return Cert(cert, key)


def _make_with_cryptography(cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        ), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))


# --- HTTPS --------------------------------------------------------------------------------------


def test_payments_api_serves_https_with_the_given_certificate(
    db_url: str, merchant: NewKey, tmp_path: Path
) -> None:
    tls = make_cert(tmp_path)
    args = ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    ctx = tls.client_context()
    with serve_api(db_url, args, scheme="https", verify=ctx) as api:
        auth = {"Authorization": f"Bearer {merchant.api_key}"}
        with httpx.Client(base_url=api.url, verify=ctx, timeout=10, headers=auth) as client:
            assert client.get("/healthz").status_code == 200
            account = client.post("/v1/accounts", json={"currency": "USD"})
            assert account.status_code == 201, account.text
            got = client.get(f"/v1/accounts/{account.json()['id']}")
            assert got.status_code == 200

        with socket.create_connection(("127.0.0.1", api.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls_sock:
            assert tls_sock.version() in ("TLSv1.2", "TLSv1.3"), tls_sock.version()
            peer = tls_sock.getpeercert()
            assert peer and ("IP Address", "127.0.0.1") in peer["subjectAltName"]

        # The port speaks TLS only: a plain-HTTP request gets no HTTP answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{api.port}/healthz", timeout=5).raise_for_status()
        # A client that does not trust the certificate refuses the connection.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{api.url}/healthz", timeout=5)


def _run_api(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "payments-api"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def test_certificate_without_key_is_a_usage_error(tmp_path: Path) -> None:
    tls = make_cert(tmp_path)
    for args in (["--ssl-certfile", str(tls.cert)], ["--ssl-keyfile", str(tls.key)]):
        result = _run_api(*args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_unreadable_certificate_is_one_readable_line_and_exit_1(tmp_path: Path) -> None:
    """docs/operations.md: runtime failures exit 1 with one readable line on stderr."""
    tls = make_cert(tmp_path)
    missing = tmp_path / "missing.crt"
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate\n")
    for cert, key in ((missing, tls.key), (garbage, tls.key), (tls.cert, garbage)):
        result = _run_api("--port", "1", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, (result.returncode, result.stderr[-500:])
        assert len(lines) == 1 and "Traceback" not in result.stderr, (
            f"--ssl-certfile {cert.name} --ssl-keyfile {key.name}: {len(lines)} lines on stderr:"
            f"\n{result.stderr[-1500:]}"
        )


# --- the database connection --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PgCluster, Cert]]:
    """A private cluster, migrated, with a certificate ready (SSL off until a test turns it on)."""
    with PgCluster() as cluster:
        cluster.migrate()
        assert cluster.base is not None
        tls = make_cert(cluster.base, "pg")
        if os.geteuid() == 0:
            owner = pwd.getpwnam(SERVER_USER)
            for path in (tls.cert, tls.key):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        yield cluster, tls


def _set_ssl(cluster: PgCluster, tls: Cert, on: bool) -> None:
    with psycopg.connect(cluster.server_url, autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET ssl_cert_file = '{tls.cert}'")
        conn.execute(f"ALTER SYSTEM SET ssl_key_file = '{tls.key}'")
        conn.execute(f"ALTER SYSTEM SET ssl = {'on' if on else 'off'}")
        conn.execute("SELECT pg_reload_conf()")
    with psycopg.connect(cluster.server_url, autocommit=True) as conn:
        shown = conn.execute("SHOW ssl").fetchone()
        assert shown == ("on" if on else "off",), shown


def _merchant(url: str) -> NewKey:
    with psycopg.connect(url) as conn:
        return create_merchant(conn, "TLS merchant")


def _paymentsctl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "paymentsctl"), *args],
        env={**os.environ, "DATABASE_URL": url}, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_sslmode_require_against_a_server_without_ssl_fails_clearly(
    tls_cluster: tuple[PgCluster, Cert],
) -> None:
    cluster, tls = tls_cluster
    _set_ssl(cluster, tls, on=False)
    url = cluster.url + "?sslmode=require"
    key = _merchant(cluster.url)

    result = _paymentsctl(url, "outbox", "status")
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "SSL" in result.stderr, result.stderr

    with serve_api(url) as api:
        ready = httpx.get(f"{api.url}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["code"] == "unavailable"
        resp = httpx.get(f"{api.url}/v1/accounts", timeout=15,
                         headers={"Authorization": f"Bearer {key.api_key}"})
        assert resp.status_code == 503, resp.text
        assert resp.json()["code"] == "unavailable" and resp.headers.get("retry-after")
        assert "SSL" in api.log(), "the log should say why the database is unreachable"


def test_sslmode_require_and_verify_full_encrypt_the_api_connections(
    tls_cluster: tuple[PgCluster, Cert], tmp_path: Path,
) -> None:
    cluster, tls = tls_cluster
    _set_ssl(cluster, tls, on=True)
    key = _merchant(cluster.url)
    good = f"{cluster.url}?sslmode=verify-full&sslrootcert={tls.cert}"
    for url in (cluster.url + "?sslmode=require", good):
        with serve_api(url) as api:
            resp = httpx.post(f"{api.url}/v1/accounts", json={"currency": "USD"}, timeout=10,
                              headers={"Authorization": f"Bearer {key.api_key}"})
            assert resp.status_code == 201, (url, resp.text, api.log()[-1000:])
            with psycopg.connect(cluster.server_url, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
                    " WHERE a.application_name = 'payments-api'"
                ).fetchall()
            assert rows and all(r[0] for r in rows), f"{url}: unencrypted connections {rows}"

    stranger = make_cert(tmp_path, "stranger")
    bad = f"{cluster.url}?sslmode=verify-full&sslrootcert={stranger.cert}"
    with serve_api(bad) as api:
        ready = httpx.get(f"{api.url}/readyz", timeout=10)
        assert ready.status_code == 503, "a server whose certificate is not trusted is refused"
        assert "certificate verify failed" in api.log(), api.log()[-1000:]
