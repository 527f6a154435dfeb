"""The ``nccl`` backend: KV pushed GPU to GPU over NCCL point-to-point (nccl4py).

One 2-rank communicator per (prefill GPU, decode GPU) pair, created lazily when the pods
first meet (the decode pod offers a fresh NCCL unique id in the gRPC handshake), kept for
the pair's life, created non-blocking and aborted when a peer dies or a send stalls.
Receiver-posted receives land in the reserved blocks through a staging buffer (one gather
on the sender, one scatter on the receiver, each on the link's own stream). GPU only.
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
