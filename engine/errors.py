"""Error types shared by the engine, the services and the CLI.

Each error knows its HTTP status and OpenAI error ``type`` so that the router and the CLI
can report it without a traceback. gRPC services map them to status codes in one place
(``grpc_code``).
"""

from __future__ import annotations


class PdserveError(Exception):
    """Base class: a message meant for the user, never a traceback."""

    http_status = 500
    error_type = "internal_error"
    grpc_code = "INTERNAL"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(PdserveError):
    """The request (prompt, sampling parameters) cannot be served as asked."""

    http_status = 400
    error_type = "invalid_request_error"
    grpc_code = "INVALID_ARGUMENT"


class EngineStepError(PdserveError):
    """Computing or sampling one request failed (a bug or bad numerics); the request ends,
    the rest of its batch goes on."""

    http_status = 500
    error_type = "internal_error"
    grpc_code = "INTERNAL"


class DuplicateRequestError(InvalidRequestError):
    """A request id that is already running here: refused, the running one untouched."""

    grpc_code = "ALREADY_EXISTS"


class ModelLoadError(PdserveError):
    """A model directory is missing, malformed or of an unsupported architecture."""

    http_status = 500
    error_type = "model_load_error"
    grpc_code = "FAILED_PRECONDITION"


class CapacityError(PdserveError):
    """Not enough KV blocks (or slots) to admit the request now."""

    http_status = 503
    error_type = "server_overloaded"
    grpc_code = "RESOURCE_EXHAUSTED"


class KVTransferError(PdserveError):
    """Moving KV between pods failed (timeout, peer gone, layout mismatch)."""

    http_status = 502
    error_type = "kv_transfer_error"
    grpc_code = "UNAVAILABLE"


class KVPeerError(KVTransferError):
    """Two pods' connector ends cannot work together as they are set up (another connector,
    another KV layout, no handshake yet): a deployment problem, not the request's."""

    grpc_code = "FAILED_PRECONDITION"


class LayoutMismatchError(KVPeerError):
    pass


class UnknownPeerError(KVPeerError):
    """A connector end has not met the peer a transfer names (a handshake is due)."""
