"""Synthetic workloads: token-id prompts of chosen lengths, shared prefixes, multi-turn sessions.

Prompts are token ids drawn from the model's tokenizer (ordinary tokens only, never its
special ones), sent as token-id prompts so every prompt length is exact; outputs are made
exact with ``ignore_eos``.

Lengths (``--input-len`` / ``--output-len``) take one of three forms:
- ``N``: every request N tokens.
- ``LO-HI``: uniform over LO..HI (inclusive).
- ``lognormal:MEDIAN,SIGMA[,LO-HI]``: exp(Normal(ln MEDIAN, SIGMA)), rounded, clipped to
  LO..HI (default 1..16 * MEDIAN). Conversation traces are heavy-tailed and close to
  lognormal; the preset ``sharegpt`` is ``lognormal:180,1.1,4-4096`` for inputs and
  ``lognormal:160,0.9,4-2048`` for outputs -- parameters chosen to give means near the
  commonly quoted ShareGPT figures (about 300 tokens in, 200 out), not fitted here.

``shared_prefix_ratio`` R: the first round(R * length) tokens of every prompt come from one
common sequence, so a prefix cache can reuse them (R = 0: independent prompts).
``turns`` T > 1: sessions of T turns; turn k+1 is sent after turn k finished, with turn k's
prompt, its answer and ``turn_len`` new tokens (the client builds the history).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

PRESETS = {"sharegpt-input": "lognormal:180,1.1,4-4096",
           "sharegpt-output": "lognormal:160,0.9,4-2048"}


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A distribution of token counts; ``kind`` is fixed, uniform or lognormal."""

    kind: str
    lo: int
    hi: int
    median: float = 0.0
    sigma: float = 0.0

    def sample(self, rng: random.Random) -> int:
        if self.kind == "lognormal":
            x = round(math.exp(rng.gauss(math.log(self.median), self.sigma)))
            return min(max(x, self.lo), self.hi)
        return rng.randint(self.lo, self.hi)

    def describe(self) -> str:
        if self.kind == "lognormal":
            return f"lognormal(median {self.median:g}, sigma {self.sigma:g}, {self.lo}-{self.hi})"
        return str(self.lo) if self.lo == self.hi else f"uniform {self.lo}-{self.hi}"


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise ValueError(f"bad range {text!r} (want N or LO-HI, 1 <= LO <= HI)")
    return lo_i, hi_i


def parse_length(text: str, kind: str = "input") -> LengthDist:
    """``N``, ``LO-HI``, ``lognormal:MEDIAN,SIGMA[,LO-HI]`` or ``sharegpt``; ValueError if bad."""
    text = text.strip()
    if text == "sharegpt":
        text = PRESETS[f"sharegpt-{kind}"]
    if text.startswith("lognormal:"):
        parts = text.split(":", 1)[1].split(",")
        if len(parts) not in (2, 3):
            raise ValueError(f"bad length {text!r} (want lognormal:MEDIAN,SIGMA[,LO-HI])")
        median, sigma = float(parts[0]), float(parts[1])
        if median < 1 or sigma < 0:
            raise ValueError(f"bad length {text!r}: MEDIAN >= 1 and SIGMA >= 0")
        lo, hi = _range(parts[2]) if len(parts) == 3 else (1, max(1, round(16 * median)))
        return LengthDist("lognormal", lo, hi, median, sigma)
    lo, hi = _range(text)
    return LengthDist("fixed" if lo == hi else "uniform", lo, hi)


@dataclass(slots=True)
class WorkItem:
    prompt: list[int]  # in a session: the new tokens of this turn only
    max_tokens: int
    send_at: float = 0.0  # seconds after the run's start (arrivals fill it in)
    session: int | None = None  # multi-turn: which conversation; turns go in order


@dataclass(frozen=True, slots=True)
class Vocab:
    """The token ids prompts may use: the tokenizer's ids less its special tokens."""

    size: int
    special: frozenset[int] = frozenset()

    def draw(self, rng: random.Random, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            t = rng.randrange(self.size)
            if t not in self.special:
                out.append(t)
        return out


def vocab_of(tokenizer_dir: str | Path) -> Vocab:
    """The vocabulary of a model directory's tokenizer (transformers' AutoTokenizer)."""
    from transformers import AutoTokenizer  # heavy; only the bench client needs it

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    special = set(tok.all_special_ids)
    special.update(getattr(tok, "added_tokens_decoder", {}) or {})
    return Vocab(len(tok), frozenset(special))


def build_workload(seed: int, n: int, vocab: Vocab, input_len: LengthDist,
                   output_len: LengthDist, shared_prefix_ratio: float = 0.0, turns: int = 1,
                   turn_len: LengthDist | None = None) -> list[WorkItem]:
    """``n`` requests (``turns`` > 1: n // turns sessions of ``turns`` turns), send times 0."""
    rng = random.Random(seed)
    common = vocab.draw(random.Random(seed + 7919), input_len.hi) if shared_prefix_ratio else []
    later = turn_len or LengthDist("fixed", 64, 64)
    items = []
    sessions = n // turns if turns > 1 else n
    for s in range(sessions):
        for k in range(turns):
            length = (input_len if k == 0 else later).sample(rng)
            shared = round(shared_prefix_ratio * length) if k == 0 else 0
            prompt = common[:shared] + vocab.draw(rng, length - shared)
            items.append(WorkItem(prompt, output_len.sample(rng),
                                  session=s if turns > 1 else None))
    return items
