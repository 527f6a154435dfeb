"""Grammar-constrained decoding: one matcher per sequence and the per-step token bitmasks.

Built on llguidance (Microsoft's grammar engine, also a vLLM backend): a spec compiles
once into a *template* matcher (engine.grammar: cached, LRU, bounded in time), and every
constrained sequence owns a copy of it advanced by its output tokens (``Sequence.guide``).
The matcher is made lazily from the tokens a sequence already has, which is what keeps
constrained output exact wherever a token was sampled:
- a prefill pod compiles the grammar and masks the first token like any engine;
- a decode pod's sequence receives that first token through ``LLMEngine._append``; its
  matcher is then built and advanced by it, so the second token is masked from the state
  after the first (n > 1: each forked sequence builds its own from its own first token);
- preemption by recompute keeps a sequence's output tokens, and with them its matcher
  (were it dropped, it would be rebuilt from them).

Per step, ``begin`` plans the bitmask rows of the sequences that will sample and has them
filled by a worker thread (llguidance computes without the GIL) while the forward runs;
the sampler waits for them and applies them (engine.sampler.apply_bitmask). After a
token is appended, ``advance`` moves the matcher on and says whether the grammar is
complete (the sequence then stops). A step's decoding sequences need the next masks from
the state their new tokens left, so ``prefetch`` starts those fills at once, at the end of
the step, and the next ``begin`` takes them: they then run during the output handling,
scheduling and preparation of the next step as well as its forward (a fill of 32 rows of
a JSON schema takes ~1 ms on an H200's host, half a 1B model's decode step). The sampler
waits for them only once its mask-free work is queued.
(``fill_inline``: on the engine thread when sampling first needs them instead.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.device import to_device
from engine.grammar import COMPILE_TIMEOUT_S, GrammarCompiler, first_line, tokenizer_factory_for
from engine.host_gate import GateTicket, HostGate
from engine.mask_fill import FillSetup, fill_rows
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

log = logging.getLogger(__name__)

MASK_TIMEOUT_S = 60.0
SMALL_FILL_ROWS = 32  # fills of at most this many rows run on one mask thread (measured at 32)
# How long the engine thread waits for the mask worker to get going (GIL hand-off below).
HANDOFF_TIMEOUT_S = 0.005


@dataclass(slots=True)
class MaskTimes:
    """Where constrained decoding spends its time (seconds, cumulative): what
    bench/structured_bench.py reports, to tell an exposed fill from a slow advance."""

    fill: float = 0.0  # llguidance computing mask rows (on the worker thread)
    waited: float = 0.0  # the engine thread blocked on a fill the forward did not hide
    advance: float = 0.0  # matchers consuming the sampled tokens (engine thread)
    prefetched: int = 0  # steps whose masks a prefetch (at the last step's end) had begun


class _Deferred:
    """A fill run on the first ``result()`` by the thread that asks (the engine's), with
    the part of ``Future`` that StepMasks uses."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn
        self._error: BaseException | None = None

    def result(self, timeout: float | None = None) -> None:
        if self._fn is not None:
            fn, self._fn = self._fn, None
            try:
                fn()
            except BaseException as exc:
                self._error = exc
        if self._error is not None:
            raise self._error

    def cancel(self) -> bool:
        cancelled, self._fn = self._fn is not None, None
        return cancelled


@dataclass(slots=True)
class StepMasks:
    """Bitmask rows of one step's constrained sequences, being filled on a worker thread.

    Implements engine.sampler.TokenMasks."""

    owner: StructuredOutputs
    rows: dict[int, int]  # seq_id -> row of ``filled``
    fresh: dict[str, int]  # request_id -> row of a sequence with no output yet (its forks)
    filled: torch.Tensor  # [rows, words] int32, host
    job: Future | _Deferred
    lengths: dict[int, int]  # seq_id -> its num_tokens when the fill began
    timed_out: bool = False
    # When the device waits for the rows (a host gate), the sampler's rows that took them,
    # to fail if the fill did (``settle``), and the armed wait, opened when the fill ends.
    gated_rows: list[int] | None = None
    ticket: GateTicket | None = None

    def covers(self, seqs: Seq[Sequence]) -> bool:
        """Whether these rows are the masks of ``seqs`` as they stand now."""
        return all(self.lengths.get(s.seq_id) == s.num_tokens for s in seqs)

    def wait(self) -> None:
        """Until the rows are filled; raises what the fill raised (a timeout once: the
        sampler's retry of each row alone must not wait for it again)."""
        if not self.timed_out:
            t0 = time.perf_counter()
            try:
                self.job.result(timeout=MASK_TIMEOUT_S)
            except FutureTimeout:
                self.timed_out = True
            finally:
                self.owner.times.waited += time.perf_counter() - t0
        if self.timed_out:
            raise RuntimeError(f"grammar masks took longer than {MASK_TIMEOUT_S} s")

    def bitmask(self, seqs: Seq[Sequence], device: torch.device) -> torch.Tensor | None:
        gate = self.owner.gate if isinstance(self.job, Future) else None
        if gate is None or device.type != "cuda":
            gate = None
            self.wait()
        dst: list[int] = []
        src: list[int] = []
        late: list[tuple[int, Sequence]] = []
        for i, seq in enumerate(seqs):
            if seq.params.structured_outputs is None:
                continue
            row = self.rows.get(seq.seq_id)
            if row is None and seq.num_output_tokens == 0:
                row = self.fresh.get(seq.request_id)
            if row is None:
                late.append((i, seq))  # not planned by begin(): fill it now
            else:
                dst.append(i)
                src.append(row)
        if not dst and not late:
            return None
        if gate is not None and not late:
            return self._gated(gate, dst, src, len(seqs), device)
        if gate is not None:  # rows not planned: filled here, after the planned ones
            self.wait()
        if not late and dst == src and len(dst) == len(seqs) == self.filled.shape[0]:
            # every row sampled is constrained and planned in this order (the common
            # case): the pinned rows go to the device as they are, asynchronously
            return self.filled.to(device, non_blocking=True)
        words = self.filled.shape[1]
        out = torch.full((len(seqs), words), -1, dtype=torch.int32,
                         pin_memory=self.filled.is_pinned())
        if dst:
            out[torch.tensor(dst)] = self.filled[torch.tensor(src)]
        if late:
            extra = self.owner.fill([s for _, s in late], words)
            out[torch.tensor([i for i, _ in late])] = extra
        return out.to(device, non_blocking=True)

    def _gated(self, gate: HostGate, dst: list[int], src: list[int], rows: int,
               device: torch.device) -> torch.Tensor:
        """The rows' copy queued behind a wait the fill's end opens: the engine thread
        goes on without waiting (the copy reads the pinned rows when the device runs it)."""
        assert isinstance(self.job, Future)
        self.ticket = ticket = gate.arm()
        self.gated_rows = dst
        self.job.add_done_callback(lambda _: ticket.open())  # however the fill ends
        filled = self.filled.to(device, non_blocking=True)
        if dst == src and len(dst) == rows == self.filled.shape[0]:
            return filled
        out = torch.full((rows, self.filled.shape[1]), -1, dtype=torch.int32, device=device)
        out[to_device(torch.tensor(dst), device)] = filled[to_device(torch.tensor(src), device)]
        return out

    def settle(self) -> list[int]:
        """Before the draw's tokens are read: the rows whose masks the device used
        without their fill having succeeded (their tokens must not be used). Waits for a
        gated fill (bounded) and opens its gate in any case, so the device never waits on
        a fill that will not end."""
        if self.ticket is None:
            return []
        try:
            self.wait()
        except Exception:
            log.exception("a bitmask fill failed: its rows fail")
            return list(self.gated_rows or [])
        finally:
            self.ticket.open()
        return []


class StructuredOutputs:
    """The engine's side of constrained decoding: check specs, mask steps, advance."""

    def __init__(self, compiler: GrammarCompiler, fill_inline: bool = False) -> None:
        self.compiler = compiler
        # fill_inline: the masks are filled on the engine thread when sampling first needs
        # them, not by the worker (no prefetch then). On an H200 the two measured level
        # (constrained decode at batch 32: 0.52x inline, 0.48x worker), both bound by a
        # fill longer than the step; the worker is the default as it also overlaps a CPU
        # forward, the engine thread's own work.
        self.fill_inline = fill_inline
        # fill_after_launch (measured, not the default): no prefetch, and the engine calls
        # ``begin`` right after launching the forward instead. It spares the GPU the
        # prefetch's 0.16-0.19 ms of host work before the launch, but on an H200's host
        # the fill (1.0-1.3 ms) then overruns the 1.45 ms forward: 0.68-0.74 of the
        # unconstrained rate at batch 32 against the prefetch's 0.76-0.77 (bench/RESULTS.md,
        # 2026-12-01 morning). On a CPU, whose forward runs on the engine thread itself, a
        # fill begun after it could hide under nothing.
        self.fill_after_launch = False
        self._pool: ThreadPoolExecutor | None = None
        self._executor: Any = None  # llguidance.LLExecutor, made on first use
        self._executor_one: Any = None  # the same with few threads (small fills)
        self.setup = FillSetup()  # engine.mask_fill; LLMEngine sets a GPU's
        self._next_replica = 0
        # one llguidance call per row (measured: bench/structured_bench.py's -rows modes)
        self.fill_row_by_row = False
        self.handoff_timeout_s = HANDOFF_TIMEOUT_S  # 0: hand nothing over (the bench's -nowait)
        self._last: StepMasks | None = None
        self._buffers: list[torch.Tensor] = []  # two host row buffers, used in turn
        self.times = MaskTimes()
        # Set by the engine on a GPU (engine.host_gate): the device, not the engine
        # thread, waits for a step's masks.
        self.gate: HostGate | None = None

    @classmethod
    def for_model(cls, model_dir: str | Path, vocab_size: int, eos_ids: Seq[int],
                  timeout_s: float = COMPILE_TIMEOUT_S, fill_inline: bool = False
                  ) -> StructuredOutputs:
        """Nothing is loaded until the first constrained request arrives."""
        return cls(GrammarCompiler(tokenizer_factory_for(model_dir, vocab_size, eos_ids),
                                   timeout_s), fill_inline)

    def check(self, params: SamplingParams) -> None:
        """Compile (or find cached) the request's grammar; InvalidRequestError if bad."""
        if params.structured_outputs is not None:
            self.compiler.compile(params.structured_outputs)

    def set_fill(self, setup: FillSetup) -> None:
        """Fill with ``setup`` from now on (sequences keep the template they copied)."""
        if setup.threads != self.setup.threads:
            self._executor_one = None  # made again with that many threads
        self.setup = setup

    def matcher(self, seq: Sequence) -> Any:
        """The sequence's matcher, built from its output tokens if it has none yet (a copy
        of the next of the grammar's replicated templates: engine.mask_fill)."""
        if seq.guide is None:
            spec = seq.params.structured_outputs
            assert spec is not None
            seq.guide_replica = self._next_replica % self.setup.replicas
            self._next_replica += 1
            guide = self.compiler.compile(spec, seq.guide_replica).deep_copy()
            if seq.num_output_tokens:
                guide.consume_tokens(seq.output_token_ids)
            seq.guide = guide
        return seq.guide

    def fill(self, seqs: Seq[Sequence], words: int | None = None) -> torch.Tensor:
        """Bitmask rows for ``seqs`` now, on this thread ([len(seqs), words] int32)."""
        words = words or (self.compiler.vocab_size + 31) // 32
        out = torch.full((len(seqs), words), -1, dtype=torch.int32)
        if seqs:
            fill_rows(self._ll_executor(len(seqs)),
                      [(self.matcher(s), i) for i, s in enumerate(seqs)], out)
        return out

    def _ll_executor(self, rows: int) -> Any:
        """``setup.threads`` up to SMALL_FILL_ROWS rows, llguidance's pool (80% of the
        cores) beyond. (Rows of one template fill one at a time whatever the threads:
        engine.mask_fill.)"""
        if rows <= SMALL_FILL_ROWS:
            if self._executor_one is None:
                from llguidance import LLExecutor

                self._executor_one = LLExecutor(self.setup.threads)
            return self._executor_one
        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor()
        return self._executor

    def begin(self, seqs: Seq[Sequence], num_new_tokens: Seq[int]) -> StepMasks | None:
        """Start filling the masks of the constrained sequences that sample this step
        (those whose known tokens all get computed); None when there are none."""
        planned = [s for s, n in zip(seqs, num_new_tokens, strict=True)
                   if s.params.structured_outputs is not None and not s.is_finished
                   and s.num_computed_tokens + n == s.num_tokens]
        if planned and self._last is not None and self._last.covers(planned):
            self.times.prefetched += 1
            return self._last  # prefetched at the end of the last step
        return self._start(planned)

    def prefetch(self, seqs: Seq[Sequence]) -> None:
        """After a step appended its tokens: start filling the masks its constrained
        sequences that go on need next (the next ``begin`` takes them if they are still
        what it needs)."""
        if self.fill_inline or self.fill_after_launch:
            return
        planned = [s for s in seqs if s.params.structured_outputs is not None
                   and s.guide is not None and not s.is_finished]
        if planned:
            self._start(planned)

    def _start(self, planned: list[Sequence]) -> StepMasks | None:
        if self._last is not None:  # never two fills over the same matchers at once
            self._last.job.cancel()
            try:
                self._last.job.result(timeout=MASK_TIMEOUT_S)
            except Exception:  # the step that used it reported the error
                log.debug("an earlier bitmask fill failed", exc_info=True)
            self._last = None
        if not planned:
            return None
        for seq in planned:
            self.matcher(seq)  # built here, on the engine thread
        filled = self._rows(len(planned))
        # rows of one template together: llguidance's threads then take different locks
        order = sorted(range(len(planned)), key=lambda i: planned[i].guide_replica)
        pairs = [(planned[i].guide, i) for i in order]
        job: Future | _Deferred
        if self.fill_inline:
            job = _Deferred(lambda: self._timed_fill(pairs, filled))
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitmask")
            started = threading.Event()
            job = self._pool.submit(self._timed_fill, pairs, filled, started)
            # Hand the GIL over now: the worker needs it only to enter llguidance (which
            # computes without it), but the engine thread would otherwise keep it through
            # the next launch -- Python switches threads every 5 ms -- so the fill began
            # only when the engine first blocked (0.3-0.6 ms of a 2.6 ms step exposed at
            # batch 32 on an H200).
            if self.handoff_timeout_s > 0:
                started.wait(self.handoff_timeout_s)
        fresh = {s.request_id: i for i, s in enumerate(planned) if s.num_output_tokens == 0}
        self._last = StepMasks(self, {s.seq_id: i for i, s in enumerate(planned)}, fresh,
                               filled, job, {s.seq_id: s.num_tokens for s in planned})
        return self._last

    def _rows(self, rows: int) -> torch.Tensor:
        """Host rows for one fill (llguidance writes every word of each row), from two
        buffers used in turn: a step's rows are copied to the device before its sampler's
        sync, so the buffer is free again by the fill after next. Pinned where a GPU is."""
        words = (self.compiler.vocab_size + 31) // 32
        if not self._buffers or self._buffers[0].shape[0] < rows:
            pin = torch.cuda.is_available()
            self._buffers = [torch.empty((max(rows, 64), words), dtype=torch.int32,
                                         pin_memory=pin) for _ in range(2)]
        self._buffers.reverse()
        return self._buffers[0][:rows]

    def _timed_fill(self, pairs: list[tuple[Any, int]], out: torch.Tensor,
                    started: threading.Event | None = None) -> None:
        t0 = time.perf_counter()
        executor = self._ll_executor(len(pairs))
        if started is not None:
            started.set()
        if self.fill_row_by_row:
            for pair in pairs:
                fill_rows(executor, [pair], out)
        else:
            fill_rows(executor, pairs, out)
        self.times.fill += time.perf_counter() - t0

    def advance(self, seq: Sequence, token: int) -> bool:
        """After ``token`` was appended to a sequence: move its matcher on. True when the
        grammar is complete (or broken), i.e. the sequence must stop here."""
        if seq.params.structured_outputs is None:
            return False
        t0 = time.perf_counter()
        try:
            return self._advance(seq, token)
        finally:
            self.times.advance += time.perf_counter() - t0

    def _advance(self, seq: Sequence, token: int) -> bool:
        if seq.guide is None:
            guide = self.matcher(seq)  # consumed every output token, this one included
        else:
            guide = seq.guide
            guide.consume_token(token)
        if guide.is_error():
            log.warning("request %s sequence %d left its grammar: %s", seq.request_id,
                        seq.index, first_line(guide.get_error()))
            return True
        return bool(guide.is_stopped())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.gate is not None:
            self.gate.close()
        self.compiler.close()
