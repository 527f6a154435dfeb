"""The ``ucx`` backend: one-sided WRITEs through NIXL's UCX plugin (the library vLLM's
NixlConnector, SGLang and Dynamo use), from the prefill pod's blocks straight into the
decode pod's, with no copy through this process. DRAM on CPU (shared memory / cma / tcp on
one machine), VRAM on GPU (cuda_ipc, NVLink, RDMA where present).

Each pod registers its KV memory with its agent once; the agents meet once per peer pair
through the gRPC handshake (``Prefill.KVHandshake`` carries each end's ``peer_info``).
"""

from __future__ import annotations

from kv_transfer.backends.ucx.agent import nixl_missing
from kv_transfer.registry import Backend


def _receiver(memory, config):
    from kv_transfer.backends.ucx.receiver import UcxReceiver  # NIXL loads only when used
    return UcxReceiver(memory, config)


def _sender(memory, config):
    from kv_transfer.backends.ucx.sender import UcxSender
    return UcxSender(memory, config)


BACKEND = Backend(name="ucx", summary="one-sided WRITEs over UCX through NIXL",
                  receiver=_receiver, sender=_sender,
                  unavailable=lambda device: nixl_missing())
