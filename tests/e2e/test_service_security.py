"""Pods behind a shared token and mutual TLS: strangers are refused, the system serves exactly.

``pdserve up`` passes --grpc-token-file, --tls-cert, --tls-key and --tls-ca to every pod and
the router (certificates made here: a CA and one certificate for every service, good for
both ends of a link). A gRPC client without TLS, without a client certificate, or without
the token is refused; the KV port drops a peer that cannot answer its token challenge; and
completions through the whole system still equal HF's greedy tokens (the KV moved over the
authenticated tcp link).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from e2e_helpers import POD_ARGS, Stack, completion_choices, free_port, start_stack
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hf_reference import hf_greedy

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc

TOKEN = "s3cret-service-token"


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


def make_certs(folder: Path) -> Certs:
    """A CA and one certificate it signed for 127.0.0.1/localhost, for servers and clients."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("pdserve test CA"))
          .issuer_name(name("pdserve test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(validity[0]).not_valid_after(validity[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("pdserve service"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0]).not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files = Certs(folder / "ca.pem", folder / "service.pem", folder / "service.key")
    files.ca.write_bytes(ca.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    files.key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


@dataclass(frozen=True)
class SecureStack:
    stack: Stack
    certs: Certs
    kv_port: int


@pytest.fixture(scope="module")
def secure(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[SecureStack]:
    folder = tmp_path_factory.mktemp("service-security")
    certs = make_certs(folder)
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    kv_port = free_port()  # the one decode pod's KV receiver (prefill pods only send)
    with start_stack(default_model_dir, folder, "--prefill", "1", "--decode", "1",
                     "--pod-args", f"{POD_ARGS} --kv-port {kv_port}",
                     "--grpc-token-file", str(token_file), "--tls-cert", str(certs.cert),
                     "--tls-key", str(certs.key), "--tls-ca", str(certs.ca)) as stack:
        yield SecureStack(stack, certs, kv_port)


def _pods(stack: Stack) -> list[tuple[str, type]]:
    stubs = {"decode": pb_grpc.DecodeStub, "prefill": pb_grpc.PrefillStub}
    return [(p["address"], stubs[p["pool"]]) for p in stack.pools()["pods"]]


def _get_load(channel: grpc.Channel, stub: type, metadata: tuple = ()) -> grpc.StatusCode:
    try:
        stub(channel).GetLoad(pb.LoadRequest(), timeout=5, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _tls(certs: Certs, client_cert: bool) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.key.read_bytes() if client_cert else None,
        certificate_chain=certs.cert.read_bytes() if client_cert else None)


def test_the_secured_system_serves_hf_greedy_tokens(secure: SecureStack) -> None:
    stack = secure.stack
    prompt = list(range(5, 45))
    reply = stack.client().completions.create(
        model=stack.model, prompt=prompt, max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    (choice,) = completion_choices(reply)
    assert choice.token_ids == hf_greedy(stack.model_dir, [prompt], 8)[0]
    decode = next(p for p in stack.pools()["pods"] if p["pool"] == "decode")
    moved = stack.pod_metric(decode, "pdserve:kv_transfer_bytes_total", 'role="decode"')
    assert moved > 0  # the prompt's KV came from the prefill pod over the token-checked link


def test_a_pod_refuses_grpc_clients_without_tls_cert_or_token(secure: SecureStack) -> None:
    certs = secure.certs
    pods = _pods(secure.stack)
    assert len(pods) == 2
    for address, stub in pods:
        with grpc.insecure_channel(address) as plain:
            assert _get_load(plain, stub) is grpc.StatusCode.UNAVAILABLE  # no TLS handshake
        with grpc.secure_channel(address, _tls(certs, client_cert=False)) as no_cert:
            assert _get_load(no_cert, stub) is grpc.StatusCode.UNAVAILABLE  # mutual TLS
        with grpc.secure_channel(address, _tls(certs, client_cert=True)) as tls:
            assert _get_load(tls, stub) is grpc.StatusCode.UNAUTHENTICATED  # no token
            wrong = (("authorization", f"Bearer {TOKEN}x"),)
            assert _get_load(tls, stub, wrong) is grpc.StatusCode.UNAUTHENTICATED
            right = (("authorization", f"Bearer {TOKEN}"),)
            assert _get_load(tls, stub, right) is grpc.StatusCode.OK
            # health stays open to probes (over TLS), and says nothing else
            health = health_pb2_grpc.HealthStub(tls).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_kv_port_drops_a_peer_without_the_token(secure: SecureStack) -> None:
    with socket.create_connection(("127.0.0.1", secure.kv_port), timeout=5) as sock:
        sock.settimeout(5)
        challenge = b""
        while len(challenge) < 32:  # the receiver speaks first: a fresh challenge
            chunk = sock.recv(32 - len(challenge))
            assert chunk
            challenge += chunk
        sock.sendall(b"\0" * 32 + b"PDKV" + b"\0" * 200)  # a wrong proof, then frames
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):  # (a reset is a close too)
            assert sock.recv(1) == b""  # closed without reading a frame
        assert time.monotonic() - started < 5
    # and the system still serves
    reply = secure.stack.client().completions.create(
        model=secure.stack.model, prompt="hello", max_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")
