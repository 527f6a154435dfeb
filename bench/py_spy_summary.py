"""Summarize a py-spy ``record -f raw`` profile: share of samples per thread, the top
self-time frames, and the top inclusive frames (where a serving process spends its time).

    python bench/py_spy_summary.py decode.txt [--top 25]

The engine thread is recognized by ``AsyncEngine._loop``; other threads by their first
frames; everything else is the main thread (the event loop: gRPC, HTTP).
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def _thread(frames: list[str]) -> str:
    if any(f.startswith("AsyncEngine._loop ") or "_loop (engine/async_engine.py" in f
           for f in frames):
        return "engine"
    if frames and "_bootstrap" in frames[0]:
        return "other thread"
    return "main"


def _name(frame: str) -> str:
    """'func (file.py:12)' -> 'func (file.py)': inclusive time per function, not per line."""
    func, _, where = frame.partition(" (")
    return f"{func} ({where.split(':')[0].rstrip(')')})" if where else frame


def summarize(path: Path, top: int) -> str:
    total = 0
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[tuple[str, str]] = collections.Counter()
    inclusive: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = _thread(frames)
        total += n
        threads[thread] += n
        own[(thread, frames[-1])] += n
        for name in {_name(f) for f in frames}:
            inclusive[(thread, name)] += n
    if not total:
        return f"{path}: no samples"
    lines = [f"{path}: {total} samples"]
    lines += [f"{v / total:6.1%}  {k}" for k, v in threads.most_common()]
    lines.append("-- self")
    lines += [f"{v / total:6.1%}  {t}: {f}" for (t, f), v in own.most_common(top)]
    lines.append("-- inclusive")
    lines += [f"{v / total:6.1%}  {t}: {f}" for (t, f), v in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profiles", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    for path in args.profiles:
        print(summarize(path, args.top))


if __name__ == "__main__":
    main()
