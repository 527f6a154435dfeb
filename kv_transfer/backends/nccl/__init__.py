"""The ``nccl`` backend: KV pushed GPU to GPU over NCCL point-to-point (nccl4py).

One 2-rank communicator per (prefill GPU, decode GPU) pair, created when the pods first
meet (the decode pod offers a fresh NCCL unique id in the gRPC handshake), kept for the
pair's life, created non-blocking and aborted when a peer dies or a send stalls; beside it
a TCP control connection that announces each batch of layers (control.py says why).
Receiver-posted receives land straight in the reserved blocks when they are one run, else
through a packed buffer (a gather on the sender, a scatter on the receiver, each on a
stream of its own so it overlaps the wire). GPU only.
"""

from __future__ import annotations

from kv_transfer.backends.nccl.link import nccl_missing
from kv_transfer.registry import Backend


def _receiver(memory, config):
    from kv_transfer.backends.nccl.receiver import NcclReceiver  # nccl4py loads when used
    return NcclReceiver(memory, config)


def _sender(memory, config):
    from kv_transfer.backends.nccl.sender import NcclSender
    return NcclSender(memory, config)


BACKEND = Backend(name="nccl", summary="GPU to GPU over NCCL point-to-point (nccl4py)",
                  receiver=_receiver, sender=_sender, unavailable=nccl_missing)
