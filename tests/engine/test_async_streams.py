"""A request's stream from the engine thread (AsyncEngine): outputs that queue up while the
consumer is busy go out merged, as one message, with every token and logprob in order;
a prompt's stream is the same tokens however it is read."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.llm_engine import LLMEngine
from engine.requests import RequestOutput, SequenceDelta, merge_outputs
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, TokenLogprob


def _out(tokens: dict[int, list[int]], finished: bool = False,
         reason: FinishReason | None = None) -> RequestOutput:
    return RequestOutput("r", [SequenceDelta(i, list(t), [TokenLogprob(x, -1.0, []) for x in t],
                                             reason if finished else None)
                               for i, t in tokens.items()], finished, 5, 0)


def test_merging_keeps_each_sequences_tokens_logprobs_and_end() -> None:
    merged = merge_outputs(_out({0: [1], 1: [7]}), _out({0: [2, 3]}))
    merged = merge_outputs(merged, _out({1: [8], 0: [4]}, finished=True,
                                        reason=FinishReason.LENGTH))
    got = {d.index: d for d in merged.deltas}
    assert got[0].token_ids == [1, 2, 3, 4] and got[1].token_ids == [7, 8]
    assert [lp.token_id for lp in got[0].logprobs] == [1, 2, 3, 4]
    assert got[0].finish_reason is FinishReason.LENGTH and merged.finished
    assert merged.num_prompt_tokens == 5


@pytest.fixture(scope="module")
def engine(tiny_model: Path):
    e = AsyncEngine(LLMEngine(tiny_model, EngineArgs(num_kv_blocks=64, dtype="float32")))
    yield e
    e.shutdown()


def _read(engine: AsyncEngine, rid: str, slow_s: float) -> list[RequestOutput]:
    async def run() -> list[RequestOutput]:
        outs = []
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1)
        async for out in engine.generate(rid, [5, 6, 7, 8, 9], params):
            outs.append(out)
            await asyncio.sleep(slow_s)  # a consumer that falls behind the engine
        return outs
    return asyncio.run(run())


def test_a_slow_reader_gets_fewer_messages_with_the_same_tokens(engine: AsyncEngine) -> None:
    fast = _read(engine, "fast", 0.0)
    slow = _read(engine, "slow", 0.05)

    def tokens(outs: list[RequestOutput]) -> list[int]:
        return [t for o in outs for d in o.deltas for t in d.token_ids]

    def logprob_ids(outs: list[RequestOutput]) -> list[int]:
        return [lp.token_id for o in outs for d in o.deltas for lp in d.logprobs]

    assert len(tokens(fast)) == len(tokens(slow)) == 40
    assert tokens(slow) == tokens(fast) == logprob_ids(slow)
    assert len(slow) < len(fast) // 2  # merged while the reader slept
    assert slow[-1].finished and not any(o.finished for o in slow[:-1])
