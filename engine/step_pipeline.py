"""Async scheduling: the pieces that let step N+1 launch before step N's tokens are known.

A GPU engine thread that waits for each step's tokens before it schedules the next leaves
the device idle for all of its host work between steps: appending tokens, advancing grammar
matchers, filling their masks, scheduling and preparing the next batch (0.3-0.6 ms a step
on an H200's host, a fifth of a 1B model's step at batch 32). So, as vLLM's async
scheduling and SGLang's overlap scheduler do, a step may leave its drawn tokens *in flight*:

- each sampled sequence gets a placeholder as its last token, so the scheduler sees one
  token to compute and gives it a slot as usual;
- the next step's inputs take those tokens from the device (``TokenFeed``: the model runner
  overwrites the placeholders' input ids with the drawn tokens, on the device);
- once that next forward is launched, the engine resolves the tokens (``InFlight``): it
  waits for them, replaces each placeholder with its token and handles it as before (stop
  checks, the matcher's advance, outputs); the new step's masks are filled from there, while
  its forward runs;
- blocks of a sequence that ends while a launched forward may still use them are held until
  that forward is done (``StepFence``), so no other stream (a connector's receive, the KV
  tier) can write them first.

Only rows whose token needs nothing but its id later are left in flight (``can_defer``):
not logprobs, not a prefill pod's first tokens, not a request's first draw that forks n
sequences, and not a step with many grammar-constrained rows (their next masks would be
filled on the launch chain). Anything else is resolved in the step that drew it, as
without async scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.sampler import DrawnTokens
from engine.scheduler import BlockHold
from engine.sequence import Sequence

PLACEHOLDER = -1  # the last token of a sequence whose drawn token is still on the device


@dataclass(slots=True)
class TokenFeed:
    """Input ids that are still on the device: ``tokens[rows[seq_id]]`` is the last token
    of each in-flight sequence (its placeholder on the host)."""

    tokens: torch.Tensor  # [rows] int64, on the model's device
    rows: dict[int, int]  # seq_id -> row of tokens


@dataclass(slots=True)
class InFlight:
    """A step whose tokens were drawn on the device and not yet appended."""

    seqs: list[Sequence]  # the sampled sequences, in the order of drawn's rows
    drawn: DrawnTokens

    @property
    def feed(self) -> TokenFeed:
        return TokenFeed(self.drawn.tokens, {s.seq_id: i for i, s in enumerate(self.seqs)})

    def surely_ending(self) -> bool:
        """Whether some sequence ends with its in-flight token whatever it is (max_tokens):
        launching another step for it would only compute a row to throw away."""
        return any(s.num_output_tokens >= s.max_tokens for s in self.seqs)


class StepFence:
    """The device work queued up to a point (a CUDA event; nothing on a CPU, whose forward
    is done when it returns); ``finished()`` as a TransferHandle's, so that the scheduler
    can hold blocks on it."""

    def __init__(self, event: torch.cuda.Event | None = None) -> None:
        self._event = event

    @classmethod
    def now(cls, device: torch.device) -> StepFence:
        if device.type != "cuda":
            return cls()
        event = torch.cuda.Event()
        event.record()
        return cls(event)

    def finished(self) -> bool:
        return self._event is None or self._event.query()


class AllOf:
    """Finished when every one of ``holds`` is (blocks held for two reasons at once)."""

    def __init__(self, *holds: BlockHold) -> None:
        self.holds = holds

    def finished(self) -> bool:
        return all(h.finished() for h in self.holds)


# Constrained rows whose tokens may stay on the device when the engine thread itself must
# wait for their next masks (no host gate: engine.host_gate). Their masks can only be
# filled once the tokens are known, and the engine thread then waits for that fill before
# it can queue the sampler and the next forward, so the fill lands on the host's launch
# chain. On an H200 (a 1B model, a JSON schema, bench/RESULTS.md 2026-12-01): at batch 32
# (a 1.1 ms fill) that gave 10.9-11.5k tok/s against 11.8-13.0k waiting for the tokens,
# whose fill, begun at the step's end (prefetch), hides under the next forward instead. With
# a gate the device waits for the fill and the engine thread goes on: no limit.
MAX_DEFERRED_CONSTRAINED = 4


def can_defer(seqs: Seq[Sequence], forked: bool, prompt_logprobs: bool,
              gated_masks: bool = False) -> bool:
    """Whether a step's drawn tokens may stay on the device until the next step: each must
    need nothing from the draw but its id, and, unless the device waits for grammar masks
    (``gated_masks``), few enough may need them."""
    constrained = sum(s.params.structured_outputs is not None for s in seqs)
    few = gated_masks or constrained <= MAX_DEFERRED_CONSTRAINED
    return not forked and not prompt_logprobs and few \
        and all(s.params.logprobs is None and not s.prefill_only for s in seqs)
