"""How long a thread coming back from a GIL-free call waits for the GIL when another
thread is running Python, by switch interval (issue 14: the mask worker returns from
llguidance's fill and must take the GIL to open the host gate while the engine thread
prepares the next step).

Times ``time.sleep(1 ms)`` (which drops the GIL) 200 times, with the other thread idle and
then spinning in Python; prints the median and p90 of the time past the 1 ms.

    .venv/bin/python bench/gil_handoff.py [--intervals 0.005,0.0005,0.0001]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time


def extra_wake_ms(interval: float, busy: bool, samples: int = 200) -> tuple[float, float]:
    sys.setswitchinterval(interval)
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    other = threading.Thread(target=spin) if busy else None
    if other is not None:
        other.start()
    extra = []
    for _ in range(samples):
        t0 = time.perf_counter()
        time.sleep(0.001)
        extra.append((time.perf_counter() - t0 - 0.001) * 1e3)
    stop.set()
    if other is not None:
        other.join()
    extra.sort()
    return statistics.median(extra), extra[int(0.9 * len(extra))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--intervals", default="0.005,0.0005,0.0001")
    args = ap.parse_args()
    print("| switch interval ms | other thread | extra wake-up ms, median | p90 |")
    print("| --- | --- | --- | --- |")
    for interval in (float(v) for v in args.intervals.split(",")):
        for busy in (False, True):
            median, p90 = extra_wake_ms(interval, busy)
            print(f"| {interval * 1e3:.1f} | {'running Python' if busy else 'idle'} | "
                  f"{median:.3f} | {p90:.3f} |", flush=True)


if __name__ == "__main__":
    main()
