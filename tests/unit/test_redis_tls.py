"""``rediss://`` with the job's CA (issue #17, finding 2): the operator and the workers verify
the coordinator's Redis against ``spec.coordinator.caConfigMap`` and refuse a server it did not
sign. A real redis-server serves TLS with a certificate from a CA made here.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rlhfspec_operator.progress import ProgressRead
from rlhfspec_operator.redis_progress import ProgressReader, RedisTarget
from rlhfspec_workers.local.redis_server import find_redis_server, free_port
from rlhfspec_workers.runtime import Bus, WorkerEnv

pytestmark = pytest.mark.timeout(60)
PASSWORD = "tls-secret"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
           issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:  # fmt: skip
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return _issue(name, key, None, key, ca=True), key


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, Path]]:
    """(port, the CA that signed the server, another CA) of a TLS-only redis-server."""
    tmp = tmp_path_factory.mktemp("tls")
    ca, ca_key = _ca("job CA")
    other, _ = _ca("someone else's CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue("localhost", server_key, ca, ca_key, ca=False)
    files = {
        "ca.crt": _pem(ca),
        "other.crt": _pem(other),
        "server.crt": _pem(server),
        "server.key": server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    port = free_port()
    process = subprocess.Popen(
        [
            find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(tmp / "server.crt"), "--tls-key-file", str(tmp / "server.key"),
            "--tls-ca-cert-file", str(tmp / "ca.crt"), "--tls-auth-clients", "no",
            "--requirepass", PASSWORD, "--save", "", "--dir", str(tmp),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(
        host="localhost", port=port, password=PASSWORD, ssl=True,
        ssl_ca_certs=str(tmp / "ca.crt"),
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server did not start with TLS")
            time.sleep(0.1)
    client.close()
    yield port, tmp / "ca.crt", tmp / "other.crt"
    process.terminate()
    process.wait(timeout=10)


def _read(url: str, ca: Path | None) -> ProgressRead:
    async def go() -> ProgressRead:
        reader = ProgressReader(timeout=10.0)  # a TLS handshake on a busy machine
        try:
            target = RedisTarget(url, PASSWORD, ca_data=ca.read_text() if ca else None)
            return await reader.read(target, "team-a", "tiny-grpo")
        finally:
            await reader.close()

    return asyncio.run(go())


def test_the_operator_verifies_rediss_against_the_jobs_ca(
    tls_redis: tuple[int, Path, Path],
) -> None:
    port, ca, other = tls_redis
    url = f"rediss://localhost:{port}/0"
    ok = _read(url, ca)
    assert ok.error is None and ok.attempted
    for wrong in (other, None):  # a CA that did not sign it; the system's CAs
        refused = _read(url, wrong)
        assert "certificate verify failed" in (refused.error or "")


def test_workers_verify_rediss_with_the_mounted_ca(tls_redis: tuple[int, Path, Path]) -> None:
    port, ca, other = tls_redis

    def bus(ca_file: Path) -> Bus:
        environ = {
            "RLHFSPEC_JOB": "tiny-grpo",
            "RLHFSPEC_REDIS_URL": f"rediss://localhost:{port}/0",
            "RLHFSPEC_REDIS_PASSWORD": PASSWORD,
            "RLHFSPEC_REDIS_CA_FILE": str(ca_file),
            "RLHFSPEC_JOB_CONFIG": "/nonexistent/job.yaml",
        }
        return Bus(WorkerEnv.from_environ("trainer", environ))

    bus(ca).wait_ready()
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        bus(other).redis.ping()
