"""The registry of KV connector backends, by name.

A backend is one module (or package) that defines ``BACKEND = Backend(...)``: every module
of ``kv_transfer.backends`` is one, and so is every module named in the environment
variable ``PDSERVE_KV_BACKENDS`` (comma-separated import paths: out-of-tree and test-only
backends). The CLIs' ``--kv-connector`` choices, ``pdserve up --connector``, the factories
and the connector test suite's parametrisation all read ``all_backends()``; adding a backend
touches its own module and its tests, nothing else.

The registry is computed on each call from those two sources rather than kept in a
module-level dict, so there is no global state to register into or to leak between tests.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.kv_layout import KVMemory
from kv_transfer.connector import ConnectorConfig, KVReceiver, KVSender

PLUGINS_ENV = "PDSERVE_KV_BACKENDS"
_BUILTIN = "kv_transfer.backends"


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    summary: str  # one line for --help
    receiver: Callable[[KVMemory, ConnectorConfig], KVReceiver]
    sender: Callable[[KVMemory, ConnectorConfig], KVSender]
    # Why this backend cannot run for KV on ``device`` here (a missing library, a device
    # it does not serve), or None if it can.
    unavailable: Callable[[str], str | None] = lambda device: None


def _modules() -> list[str]:
    package = importlib.import_module(_BUILTIN)
    names = [f"{_BUILTIN}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    extra = os.environ.get(PLUGINS_ENV, "")
    return sorted(names) + [m.strip() for m in extra.split(",") if m.strip()]


def all_backends() -> dict[str, Backend]:
    """Every registered backend, by name (built-in ones first, then plugins)."""
    found: dict[str, Backend] = {}
    for module_name in _modules():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InvalidRequestError(
                f"KV backend module {module_name!r} (from {PLUGINS_ENV} or "
                f"{_BUILTIN}) cannot be imported: {exc}") from None
        backend = getattr(module, "BACKEND", None)
        if not isinstance(backend, Backend):
            raise InvalidRequestError(f"KV backend module {module_name!r} defines no BACKEND")
        if backend.name in found:
            raise InvalidRequestError(f"two KV backends are named {backend.name!r}")
        found[backend.name] = backend
    return found


def backend_names() -> list[str]:
    return list(all_backends())


def get_backend(name: str, device: str = "cpu") -> Backend:
    """The backend called ``name``, usable for KV on ``device``; a clear error otherwise."""
    found = all_backends()
    backend = found.get(name)
    if backend is None:
        raise InvalidRequestError(f"unknown KV connector {name!r} (available: "
                                  f"{', '.join(found)})", param="kv_connector")
    why = backend.unavailable(device)
    if why is not None:
        raise InvalidRequestError(f"the {name} KV connector cannot run here: {why}",
                                  param="kv_connector")
    return backend


def make_receiver(name: str, memory: KVMemory,
                  config: ConnectorConfig | None = None) -> KVReceiver:
    backend = get_backend(name, memory.device.type)
    return backend.receiver(memory, config or ConnectorConfig())


def make_sender(name: str, memory: KVMemory, config: ConnectorConfig | None = None) -> KVSender:
    backend = get_backend(name, memory.device.type)
    return backend.sender(memory, config or ConnectorConfig())
