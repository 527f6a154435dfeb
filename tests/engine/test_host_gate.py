"""engine.host_gate on a real GPU: work queued behind a gate waits for the host's word."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.host_gate import HostGate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _still_waiting(event: torch.cuda.Event, seconds: float = 0.05) -> bool:
    time.sleep(seconds)
    return not event.query()


def test_a_copy_behind_the_gate_reads_what_the_host_wrote_before_opening() -> None:
    gate = HostGate()
    src = torch.zeros(1 << 16, dtype=torch.int32, pin_memory=True)
    dst = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
    ticket = gate.arm()
    dst.copy_(src, non_blocking=True)  # queued now, run when the gate opens
    done = torch.cuda.Event()
    done.record()
    assert _still_waiting(done)
    values = torch.randint(-(1 << 31), (1 << 31) - 1, src.shape, dtype=torch.int32)
    src.copy_(values)
    assert ticket.open()
    done.synchronize()
    assert torch.equal(dst.cpu(), values)


def test_each_ticket_opens_once_and_gates_pass_in_stream_order() -> None:
    gate = HostGate()
    x = torch.zeros(4, device="cuda")
    first = gate.arm()
    # (kernels only behind a closed gate: a copy from pageable memory, as ``x[0] = 1.0``
    # makes, waits for the stream, so this thread would never reach its open())
    x[0].fill_(1.0)
    e1 = torch.cuda.Event()
    e1.record()
    second = gate.arm()
    x[1].fill_(2.0)
    e2 = torch.cuda.Event()
    e2.record()
    assert first.open() and not first.open()  # a second open of one ticket posts nothing
    e1.synchronize()
    assert _still_waiting(e2)  # the second wait still holds
    # opened from another thread, as the mask worker does
    opener = threading.Thread(target=second.open)
    opener.start()
    opener.join(5)
    e2.synchronize()
    assert x.tolist() == [1.0, 2.0, 0.0, 0.0]


def test_close_opens_every_armed_ticket() -> None:
    gate = HostGate()
    gate.arm()
    gate.arm()
    done = torch.cuda.Event()
    done.record()
    assert _still_waiting(done)
    gate.close()
    deadline = time.monotonic() + 5
    while not done.query():
        assert time.monotonic() < deadline, "a closed gate still holds the stream"
        time.sleep(0.001)


def test_for_device_is_none_off_cuda() -> None:
    assert HostGate.for_device(torch.device("cpu")) is None
    assert isinstance(HostGate.for_device(torch.device("cuda")), HostGate)
