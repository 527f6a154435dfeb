"""What guards the links between services: a shared token, and TLS (mutual, with a user CA).

One ``LinkSecurity`` per process, made from the same flags on every pod and the router
(``--grpc-token-file``, ``--tls-cert``, ``--tls-key``, ``--tls-ca``):

- the token: every gRPC call carries ``authorization: Bearer <token>`` (a client
  interceptor); servers refuse calls without it with UNAUTHENTICATED (a server interceptor,
  constant-time compare). The standard health service is exempt, so that probes (kubelet's
  gRPC probes cannot send metadata) still work; it tells nothing but SERVING. The same
  token keys the tcp KV backend's challenge (kv_transfer/backends/tcp), and ucx peers meet
  through the gRPC KVHandshake, which the token guards.
- TLS: servers listen with their certificate and, given a CA, require client certificates
  signed by it (mutual TLS); clients verify the server against the CA and present their own
  certificate. ``--tls-server-name`` overrides the name checked, for certificates that do
  not name each pod's address.
"""

from __future__ import annotations

import argparse
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from engine.errors import InvalidRequestError

HEALTH_PREFIX = "/grpc.health.v1.Health/"


@dataclass(frozen=True, slots=True)
class LinkSecurity:
    token: str | None = None
    cert: bytes | None = None  # PEM: this process's certificate (chain)
    key: bytes | None = None  # PEM: its private key
    ca: bytes | None = None  # PEM: the CA that signs every service's certificate
    server_name: str | None = None  # the name clients check instead of the address's host

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        assert self.cert is not None and self.key is not None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenCheck(self.token)] if self.token else []

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        if not self.token:
            return []
        header = ("authorization", f"Bearer {self.token}")
        return [_UnaryUnaryToken(header), _UnaryStreamToken(header), _StreamStreamToken(header)]

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.tls and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


class TokenCheck(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for a call without ``authorization: Bearer <token>`` (health exempt)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if details.method.startswith(HEALTH_PREFIX) or handler is None:
            return handler
        given = next((v for k, v in details.invocation_metadata or ()
                      if k == "authorization"), "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""
    message = "missing or wrong service token (authorization metadata)"

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # an async generator, as the wrapped streaming handler is

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.unary_unary_rpc_method_handler(abort)


def _with_header(details: grpc.aio.ClientCallDetails, header: tuple[str, str]
                 ) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*header)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                      details.credentials, details.wait_for_ready)


class _Token:
    """Adds the token header to each call; one subclass per call shape, as grpc.aio files
    a client interceptor under the first interceptor type it is an instance of."""

    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header


class _UnaryUnaryToken(_Token, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_header(details, self._header), request)


class _UnaryStreamToken(_Token, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any,
                                     request: Any) -> Any:
        return await continuation(_with_header(details, self._header), request)


class _StreamStreamToken(_Token, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(_with_header(details, self._header), request_iterator)


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "service security (the same on every pod and the router)")
    group.add_argument("--grpc-token-file", default=None,
                       help="file whose first line is the token every gRPC call between "
                            "services must carry (and the tcp KV backend's handshake key)")
    group.add_argument("--tls-cert", default=None, help="PEM certificate for gRPC TLS")
    group.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    group.add_argument("--tls-ca", default=None,
                       help="PEM CA certificate: servers require client certificates it "
                            "signed (mutual TLS) and clients verify servers against it")
    group.add_argument("--tls-server-name", default=None,
                       help="the name clients check in servers' certificates (default: "
                            "the host they dial)")


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {flag} {path}: {exc.strerror}",
                                  flag.lstrip("-").replace("-", "_")) from None


def security_from_args(args: argparse.Namespace) -> LinkSecurity:
    token = None
    raw = _read(args.grpc_token_file, "--grpc-token-file")
    if raw is not None:
        token = raw.decode("utf-8", "replace").strip()
        if not token or "\n" in token:
            raise InvalidRequestError("--grpc-token-file must hold one non-empty line",
                                      "grpc_token_file")
    cert, key = _read(args.tls_cert, "--tls-cert"), _read(args.tls_key, "--tls-key")
    if (cert is None) != (key is None):
        raise InvalidRequestError("give --tls-cert and --tls-key together", "tls_cert")
    ca = _read(args.tls_ca, "--tls-ca")
    if ca is not None and cert is None:
        raise InvalidRequestError("--tls-ca needs --tls-cert and --tls-key", "tls_ca")
    return LinkSecurity(token, cert, key, ca, args.tls_server_name)


def security_argv(args: argparse.Namespace) -> list[str]:
    """The flags above as given, to pass on to child processes (``pdserve up``)."""
    argv: list[str] = []
    for flag in ("--grpc-token-file", "--tls-cert", "--tls-key", "--tls-ca",
                 "--tls-server-name"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    return argv
