"""engine.stream_gate on this card: does work queued behind a gate wait for the host's
``open``, and how long after it does the stream go on (median of 50)?

    python bench/gpu_gate.py    (bench/gpu_steps.sh gate runs it under a timeout: a gate
                                 the GPU never sees would stall the stream)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.stream_gate import StreamGate


def main() -> int:
    gate = StreamGate.create(torch.device("cuda"))
    if gate is None:
        print("stream gate: not available on this card (see the warning above)")
        return 1
    x = torch.ones(1 << 20, device="cuda")
    waited, after = 0, []
    for _ in range(50):
        torch.cuda.synchronize()
        ticket = gate.ticket()
        gate.hold(ticket)
        x.mul_(1.0)
        done = torch.cuda.Event()
        done.record()
        time.sleep(0.001)
        waited += not done.query()
        t0 = time.perf_counter()
        gate.open(ticket)
        done.synchronize()
        after.append(time.perf_counter() - t0)
    expired = int(gate.expired.item())
    print(f"stream gate on {torch.cuda.get_device_name()}: work waited for the host in "
          f"{waited}/50 holds; it went on {1e6 * statistics.median(after):.1f} us (median) "
          f"after open; expired: {expired}")
    return 0 if waited == 50 and not expired else 1


if __name__ == "__main__":
    sys.exit(main())
