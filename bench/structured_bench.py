"""Decode tokens/s with a JSON schema against the same decode unconstrained.

Runs the engine in-process (no servers): for each batch size, ``batch`` requests with
random 32-token prompts are decoded for ``--max-tokens`` tokens at temperature 1 (seeded),
once unconstrained (ignore_eos) and once constrained by a JSON schema that cannot be
complete before ``--max-tokens`` (an object holding an array of at least 500 records of
integer, string, enum and number fields), so both runs decode the same number of tokens.
Only pure decode steps are timed (every sequence already has its first token); the
grammar is compiled and the engine warmed up before timing. Grammar masks are filled on a
worker thread while the forward runs (engine.structured_output), so what shows here is
what that overlap does not hide. Runs on the CPU or on CUDA:

    .venv/bin/python bench/structured_bench.py --model models/default [--device cuda]
        [--dtype bfloat16] [--batches 1,32] [--max-tokens 128] [--repeat 2]
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.llm_engine import EngineArgs, LLMEngine
from engine.mask_fill import FillSetup
from engine.sampling_params import SamplingParams
from engine.structured_output import HANDOFF_TIMEOUT_S, StepMasks
from engine.structured_spec import StructuredOutputSpec
from pdserve.pod import GPU_POD_SWITCH_INTERVAL_S

RECORD = {"type": "object",
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 100000},
                         "name": {"type": "string", "maxLength": 8},
                         "kind": {"enum": ["alpha", "beta", "gamma"]},
                         "score": {"type": "number"}},
          "required": ["id", "name", "kind", "score"], "additionalProperties": False}
SCHEMA = {"type": "object",
          "properties": {"records": {"type": "array", "items": RECORD, "minItems": 500}},
          "required": ["records"], "additionalProperties": False}


class Phases:
    """Host milliseconds per engine phase (``--phases``): wrappers on the engine's own
    methods, so what the step does between them shows as the rest; ``forward (GPU)`` is the
    device time of the launched forward and ``sample (GPU)`` the device time from where the
    sampler's work joins the stream to its tokens (CUDA events)."""

    NAMES = ("schedule", "begin", "launch", "mask wait", "sample", "advance", "prefetch",
             "collect")

    def __init__(self, engine: LLMEngine) -> None:
        import engine.llm_engine as llm_engine

        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.on_gpu = engine.runner.device.type == "cuda"
        engine.scheduler.schedule = self._timed(  # type: ignore[method-assign]
            "schedule", engine.scheduler.schedule)
        engine.structured.begin = self._timed(  # type: ignore[method-assign]
            "begin", engine.structured.begin)
        engine.structured.prefetch = self._timed(  # type: ignore[method-assign]
            "prefetch", engine.structured.prefetch)
        engine.collect_outputs = self._timed(  # type: ignore[method-assign]
            "collect", engine.collect_outputs)
        engine.runner.execute = self._timed(  # type: ignore[method-assign]
            "launch", engine.runner.execute, gpu=True)
        llm_engine.sample_rows = self._timed("sample", llm_engine.sample_rows, gpu=True)
        llm_engine.draw_rows = self._timed("sample", llm_engine.draw_rows, gpu=True)
        StepMasks.wait = self._timed("wait", StepMasks.wait)  # type: ignore[method-assign]
        # the step's timeline: when each phase began and ended on the host and on the
        # device, from the step's start (the bench syncs before each step)
        self.step_t0 = 0.0
        self.step_event: torch.cuda.Event | None = None
        self.spans: list[tuple[str, float, float, torch.cuda.Event | None,
                               torch.cuda.Event | None, torch.cuda.Event | None]] = []

    def begin_step(self) -> None:
        self.step_t0 = time.perf_counter()
        if self.on_gpu:
            self.step_event = torch.cuda.Event(enable_timing=True)
            self.step_event.record()

    def mark(self) -> tuple[dict[str, float], int, int]:
        return dict(self.seconds), len(self.events), len(self.spans)

    def drop_since(self, mark: tuple[dict[str, float], int, int]) -> None:
        """Forget what a step that is not timed (a prefill step) added."""
        self.seconds = collections.defaultdict(float, mark[0])
        del self.events[mark[1]:]
        del self.spans[mark[2]:]

    def _timed(self, name: str, fn: collections.abc.Callable, gpu: bool = False
               ) -> collections.abc.Callable:
        def wrapped(*args: object, **kwargs: object) -> object:
            t0 = time.perf_counter()
            start = end = None
            if gpu and self.on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), \
                    torch.cuda.Event(enable_timing=True)
                start.record()
            try:
                return fn(*args, **kwargs)
            finally:
                if start is not None and end is not None:
                    end.record()
                    self.events.append((name, start, end))
                t1 = time.perf_counter()
                self.seconds[name] += t1 - t0
                self.spans.append((name, t0 - self.step_t0, t1 - self.step_t0,
                                   self.step_event, start, end))
        return wrapped

    def take(self, steps: int) -> dict[str, float]:
        """ms per step since the last take, and reset."""
        if self.on_gpu:
            torch.cuda.synchronize()
            for name, a, b in self.events:
                self.seconds[f"{'forward' if name == 'launch' else name} (GPU)"] += \
                    a.elapsed_time(b) / 1e3
        out = {k: 1e3 * v / max(steps, 1) for k, v in self.seconds.items()}
        self.seconds.clear()
        self.events.clear()
        return out

    def take_timeline(self) -> list[str]:
        """Median ms from the step's start at which each phase began and ended, on the
        host and (launch, sample) on the device; then reset."""
        if self.on_gpu:
            torch.cuda.synchronize()
        at: dict[str, list[tuple[float, ...]]] = collections.defaultdict(list)
        for name, h0, h1, base, start, end in self.spans:
            row: tuple[float, ...] = (1e3 * h0, 1e3 * h1)
            if base is not None and start is not None and end is not None:
                row += (base.elapsed_time(start), base.elapsed_time(end))
            at[name].append(row)
        self.spans.clear()
        lines = []
        for name, rows in sorted(at.items(), key=lambda kv: statistics.median(
                r[0] for r in kv[1])):
            cols = [f"{statistics.median(r[k] for r in rows):.3f}"
                    for k in range(len(rows[0]))]
            lines.append(f"| {name} | " + " | ".join(cols + [""] * (4 - len(cols))) + " |")
        return lines


def _run(engine: LLMEngine, batch: int, max_tokens: int, constrained: bool, tag: str,
         phases: Phases | None = None) -> tuple[float, int, int]:
    """Decode ``batch`` requests; returns (seconds in pure decode steps, tokens they made,
    steps)."""
    rng = random.Random(batch)
    spec = StructuredOutputSpec.json_schema(SCHEMA) if constrained else None
    vocab = engine.config.vocab_size
    for i in range(batch):
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens,
                                ignore_eos=not constrained, structured_outputs=spec)
        engine.add_request(f"{tag}-{i}", [rng.randrange(vocab) for _ in range(32)], params)
    seconds, tokens, steps = 0.0, 0, 0
    seen: dict[tuple[str, int], int] = collections.Counter()
    was_decoding = False
    while engine.has_work():
        decoding = all(s.num_output_tokens > 0 for s in engine.scheduler.running) \
            and not engine.scheduler.waiting and len(engine.scheduler.running) == batch
        # A sync before each step makes the phases' timeline start from an idle device;
        # without --phases only before the first decode step (async scheduling would let
        # the prefill's tail run into it), so steps may overlap as they do when served.
        if engine.runner.device.type == "cuda" and (phases is not None or not was_decoding):
            torch.cuda.synchronize()
        was_decoding = decoding
        mark = phases.mark() if phases is not None else None
        if phases is not None:
            phases.begin_step()
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        if phases is not None and mark is not None and not decoding:
            phases.drop_since(mark)
        new = 0  # every token but each sequence's first (the prefill's, with or without
        for out in outputs:  # async scheduling, which hands it over a step later)
            for d in out.deltas:
                key = (out.request_id, d.index)
                new += len(d.token_ids) - (seen[key] == 0 and len(d.token_ids) > 0)
                seen[key] += len(d.token_ids)
        if decoding:
            seconds += elapsed
            steps += 1
            tokens += new
    return seconds, tokens, steps


def _setup(text: str) -> FillSetup:
    """'4x2' -> 4 templates per grammar, 2 llguidance threads."""
    replicas, _, threads = text.partition("x")
    return FillSetup(int(replicas), int(threads))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--fill", default="worker",
                    help="comma-separated: worker (a worker thread, prefetched at each step's "
                    "end: the engine's default), after-launch (a worker thread, begun just "
                    "after the forward's launch, no prefetch), inline (the engine thread, "
                    "when sampling needs them); -nowait after worker or after-launch: the "
                    "engine thread does not wait for the worker to take the GIL; -rows: "
                    "one llguidance call per row")
    ap.add_argument("--torch-profile", type=Path, default=None,
                    help="write torch.profiler's kernel table of one free and one JSON run "
                    "at the largest batch here")
    ap.add_argument("--cprofile", type=Path, default=None,
                    help="write cProfile's table (the engine thread's host time by function) "
                    "of one free and one JSON run at the largest batch here")
    ap.add_argument("--fill-threads", default="",
                    help="comma-separated llguidance thread counts for fills of up to 32 "
                    "rows (default: the engine's)")
    ap.add_argument("--setups", default="engine",
                    help="comma-separated fill setups (engine.mask_fill.FillSetup): engine "
                    "(the device's default), or RxT: R templates per grammar, T threads; "
                    "e.g. 1x1,4x4")
    ap.add_argument("--slices", choices=["general", "json"], default="json",
                    help="llguidance's slicer optimisation: its JSON slices (the engine's) "
                    "or its general ones")
    ap.add_argument("--phases", action="store_true",
                    help="also print host ms per engine phase and the forward's GPU ms")
    ap.add_argument("--async-scheduling", default="on,off",
                    help="comma-separated: on (launch each step before the last step's "
                    "tokens reach the host, the device waiting for grammar masks: the GPU "
                    "default), off; on-nogate (the engine thread waits for the masks), "
                    "off-gate (the device does, in synchronous steps)")
    ap.add_argument("--sampler", default="kernel",
                    help="comma-separated: kernel (plain rows drawn by the Triton sampler on "
                    "a GPU: the default), torch (by the torch path)")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="Python's GIL switch interval in seconds (default: a GPU pod's, "
                    f"{GPU_POD_SWITCH_INTERVAL_S}, on CUDA; Python's own on a CPU)")
    args = ap.parse_args()
    if args.switch_interval is not None or args.device.startswith("cuda"):
        sys.setswitchinterval(args.switch_interval or GPU_POD_SWITCH_INTERVAL_S)
    engine = LLMEngine(args.model, EngineArgs(device=args.device, dtype=args.dtype,
                                              num_kv_blocks=4096, max_num_seqs=256,
                                              cpu_threads=args.threads or None))
    if args.slices != "json":  # llguidance's general slices instead of the engine's JSON ones
        from engine.grammar import GrammarCompiler, tokenizer_factory_for

        engine.structured.compiler = GrammarCompiler(tokenizer_factory_for(
            args.model, engine.config.vocab_size, engine.eos_token_ids, args.slices))
    where = (torch.cuda.get_device_name() if args.device == "cuda" else "cpu") + \
        f" ({torch.get_num_threads()} torch CPU threads)"
    print(f"decode tokens/s, {args.model} on {where}, {args.dtype}, {args.max_tokens} tokens "
          f"per sequence, median of {args.repeat}")
    _run(engine, 2, 16, True, "warm-json")  # compiles the grammar, warms every path
    _run(engine, 2, 16, False, "warm-free")
    print("| masks filled | batch | unconstrained tok/s | JSON schema tok/s "
          "| constrained / unconstrained | step ms free / JSON | mask fill ms/step "
          "| engine waited ms/step | advance ms/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    times = engine.structured.times
    phases = Phases(engine) if args.phases else None
    breakdown: list[tuple[str, int, str, dict[str, float]]] = []
    timelines: list[tuple[str, list[str]]] = []
    gate = engine.structured.gate
    default_setup = engine.structured.setup
    for sampler, mode, fill, setup, batch in (
            (k, a, f"{f}/{t}" if "," in args.fill_threads else f, u, int(b))
            for k in args.sampler.split(",")
            for a in args.async_scheduling.split(",") for f in args.fill.split(",")
            for t in args.fill_threads.split(",") for u in args.setups.split(",")
            for b in args.batches.split(",")):
        engine.plain_sampler_kernel = sampler == "kernel"
        engine.async_scheduling = overlap = mode.startswith("on")
        gated = (overlap and mode != "on-nogate") or mode == "off-gate"
        engine.structured.gate = gate if gated else None
        fill_mode, fill = fill, f"{fill}, async {mode}" + (
            f", {sampler} sampler" if "," in args.sampler else "") + (
            f", {setup}" if "," in args.setups else "")
        engine.structured.fill_inline = fill_mode.startswith("inline")
        engine.structured.fill_row_by_row = "-rows" in fill_mode
        engine.structured.fill_after_launch = fill_mode.startswith("after-launch")
        engine.structured.handoff_timeout_s = (0.0 if "-nowait" in fill_mode
                                               else HANDOFF_TIMEOUT_S)
        chosen = default_setup if setup == "engine" else _setup(setup)
        threads = fill_mode.partition("/")[2] or args.fill_threads
        if threads:
            chosen = replace(chosen, threads=int(threads))
        if chosen != engine.structured.setup:  # new templates' lexer caches start cold
            engine.structured.set_fill(chosen)
            _run(engine, 2 * chosen.replicas, args.max_tokens, True, f"warm-{setup}")
        rates: dict[bool, list[float]] = {False: [], True: []}
        step_ms: dict[bool, list[float]] = {False: [], True: []}
        spent = [0.0, 0.0, 0.0]  # fill, waited, advance over the constrained runs
        json_steps = 0
        for r in range(args.repeat):
            for constrained in (False, True):
                before = (times.fill, times.waited, times.advance)
                if phases is not None:
                    phases.take(1)
                seconds, tokens, steps = _run(engine, batch, args.max_tokens, constrained,
                                              f"b{batch}-{r}-{constrained}", phases)
                if phases is not None:
                    waited = (times.waited - before[1]) if constrained else 0.0
                    advance = (times.advance - before[2]) if constrained else 0.0
                    breakdown.append((fill, batch, "JSON" if constrained else "free", {
                        **phases.take(steps), "whole step": 1e3 * seconds / max(steps, 1),
                        "mask wait": 1e3 * waited / max(steps, 1),
                        "advance": 1e3 * advance / max(steps, 1)}))
                    if r == 0:
                        timelines.append((f"{fill}, batch {batch}, "
                                          f"{'JSON' if constrained else 'free'}",
                                          phases.take_timeline()))
                rates[constrained].append(tokens / seconds)
                step_ms[constrained].append(1e3 * seconds / max(steps, 1))
                if constrained:  # (includes the few prefill steps: an upper bound)
                    now = (times.fill, times.waited, times.advance)
                    spent = [s + b - a for s, a, b in zip(spent, before, now, strict=True)]
                    json_steps += steps
        free, json_ = statistics.median(rates[False]), statistics.median(rates[True])
        per = [1e3 * x / max(json_steps, 1) for x in spent]
        print(f"| {fill} | {batch} | {free:.0f} | {json_:.0f} | {json_ / free:.2f} "
              f"| {statistics.median(step_ms[False]):.2f} / "
              f"{statistics.median(step_ms[True]):.2f} "
              f"| {per[0]:.2f} | {per[1]:.2f} | {per[2]:.2f} |", flush=True)
    if breakdown:
        names = ["whole step", *Phases.NAMES] + (["forward (GPU)", "sample (GPU)"]
                                                 if phases and phases.on_gpu else [])
        print("\nhost ms per decode step by phase (forward (GPU): the launched forward's "
              "device time)")
        print("| masks filled | batch | run | " + " | ".join(names) + " |")
        print("| --- " * (len(names) + 3) + "|")
        for fill, batch, run, ms in breakdown:
            print(f"| {fill} | {batch} | {run} | "
                  + " | ".join(f"{ms.get(n, 0.0):.3f}" for n in names) + " |", flush=True)
        print(f"steps whose masks a prefetch had begun: {times.prefetched}")
        print("\nstep timeline, median ms from the step's start (the bench syncs before "
              "each step): host begin / end, device begin / end")
        for title, lines in timelines:
            print(f"\n{title}\n| phase | host begin | host end | device begin | device end |"
                  "\n| --- | --- | --- | --- | --- |")
            print("\n".join(lines))
    if args.torch_profile is not None:
        _profile(engine, max(int(b) for b in args.batches.split(",")), args.max_tokens,
                 args.torch_profile)
    if args.cprofile is not None:
        _host_profile(engine, max(int(b) for b in args.batches.split(",")), args.max_tokens,
                      args.cprofile)


def _host_profile(engine: LLMEngine, batch: int, max_tokens: int, path: Path) -> None:
    """Where the engine thread's host time goes in a free and a JSON run (cProfile slows
    Python down, so read the two against each other, not as step times)."""
    import cProfile
    import pstats

    with path.open("w") as out:
        for constrained in (False, True):
            profiler = cProfile.Profile()
            profiler.enable()
            seconds, _, steps = _run(engine, batch, max_tokens, constrained,
                                     f"cprofile-{constrained}")
            profiler.disable()
            stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
            rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:60]
            out.write(f"== {'JSON' if constrained else 'free'}, batch {batch}: {steps} steps, "
                      f"{1e3 * seconds / max(steps, 1):.2f} ms per step under cProfile\n"
                      "| function | calls per step | own us per step | with callees us |\n"
                      "| --- | --- | --- | --- |\n")
            per = 1 / max(steps, 1)
            for (file, line, name), (_, calls, own, total, _) in rows:
                where = f"{Path(file).name}:{line}({name})" if line else name
                out.write(f"| {where} | {calls * per:.1f} | {1e6 * own * per:.1f} | "
                          f"{1e6 * total * per:.1f} |\n")


def _profile(engine: LLMEngine, batch: int, max_tokens: int, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if engine.runner.device.type == "cuda" else [])
    tables = []
    for constrained in (False, True):
        with profile(activities=activities) as prof:
            _run(engine, batch, max_tokens, constrained, f"profile-{constrained}")
        key = "cuda_time_total" if len(activities) > 1 else "cpu_time_total"
        tables.append(f"== {'JSON schema' if constrained else 'unconstrained'}, batch "
                      f"{batch}, {max_tokens} tokens\n"
                      + prof.key_averages().table(sort_by=key, row_limit=40))
    path.write_text("\n\n".join(tables))


if __name__ == "__main__":
    main()
