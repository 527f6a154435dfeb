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


def _concurrent(engine: AsyncEngine, tag: str) -> dict[int, tuple[dict[int, list[int]], bool]]:
    """Five concurrent requests (one with n=2), read fully: request -> (sequence index ->
    tokens, whether the last output said finished)."""
    async def one(i: int) -> tuple[dict[int, list[int]], bool]:
        params = SamplingParams(temperature=0.0, max_tokens=12 + 5 * i, ignore_eos=True,
                                n=2 if i == 3 else 1)
        tokens: dict[int, list[int]] = {}
        last = None
        async for out in engine.generate(f"{tag}{i}", [3 + i, 9, 27, 81 - i], params):
            for d in out.deltas:
                tokens.setdefault(d.index, []).extend(d.token_ids)
            last = out
        return tokens, last is not None and last.finished

    async def run() -> list[tuple[dict[int, list[int]], bool]]:
        return list(await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(5))), 60))
    return dict(enumerate(asyncio.run(run())))


def test_outputs_delivered_at_the_next_launch_are_the_same_and_none_is_held_back(
        engine: AsyncEngine, tiny_model: Path) -> None:
    # What GPU pods do (deliver a step's outputs once the next step is launched), forced
    # on the CPU: every request gets the same tokens as with delivery right after the
    # step, in order, and its end even when no step follows to launch (the engine idles).
    deferred = AsyncEngine(LLMEngine(tiny_model, EngineArgs(num_kv_blocks=64, dtype="float32")),
                           defer_delivery=True)
    try:
        got = _concurrent(deferred, "d")
        assert not deferred._pending
    finally:
        deferred.shutdown()
    want = _concurrent(engine, "i")
    assert got == want
    assert all(done for _, done in got.values())
    assert [len(t[0]) for t, _ in got.values()] == [12, 17, 22, 27, 32]
    assert len(got[3][0]) == 2 and got[3][0][0] == got[3][0][1]  # n=2, greedy


def test_a_tapped_request_hands_all_but_its_last_output_to_the_tap_in_order(
        engine: AsyncEngine) -> None:
    async def run() -> tuple[list[int], list[int], list[RequestOutput], bool]:
        params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
        tapped: list[int] = []
        read: list[RequestOutput] = []
        took = False
        async for out in engine.generate("tapped", [5, 6, 7, 8, 9], params):
            read.append(out)
            if not took:  # after the first output, as a decode pod's shared stream does
                took = engine.tap("tapped", lambda o: tapped.extend(
                    t for d in o.deltas for t in d.token_ids))
        return [t for o in read for d in o.deltas for t in d.token_ids], tapped, read, took

    through_reader, through_tap, read, took = asyncio.run(run())
    alone = [t for o in _read(engine, "untapped", 0.0) for d in o.deltas for t in d.token_ids]
    assert took
    assert len(read) == 2 and read[-1].finished  # the first output, then the last
    assert through_reader[:len(read[0].deltas[0].token_ids)] + through_tap + \
        through_reader[len(read[0].deltas[0].token_ids):] == alone[:30]
    assert len(through_tap) > 20
    assert not engine.tap("gone", lambda o: None)  # no such request: nothing taps


def test_an_abort_while_outputs_are_deferred_ends_only_its_request(tiny_model: Path) -> None:
    # Deferred, a step's outputs are built only at the next launch; an abort (a command)
    # in between must not lose the other requests' tokens or keep the aborted one's blocks.
    deferred = AsyncEngine(LLMEngine(tiny_model, EngineArgs(num_kv_blocks=64, dtype="float32")),
                           defer_delivery=True)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)

    async def read(rid: str, prompt: list[int], abort_after: int | None) -> list[int]:
        tokens: list[int] = []
        async for out in deferred.generate(rid, prompt, params):
            tokens += [t for d in out.deltas for t in d.token_ids]
            if abort_after is not None and len(tokens) >= abort_after:
                await deferred.abort(rid)
                break
        return tokens

    async def run() -> list[list[int]]:
        return list(await asyncio.wait_for(asyncio.gather(
            read("keep0", [4, 8, 15], None), read("gone", [16, 23, 42], 5),
            read("keep1", [1, 2, 3], None)), 60))
    try:
        keep0, gone, keep1 = asyncio.run(run())
        assert len(keep0) == len(keep1) == 30 and 5 <= len(gone) < 30
        alone = AsyncEngine(LLMEngine(tiny_model, EngineArgs(num_kv_blocks=64,
                                                             dtype="float32")))
        try:
            async def ref(prompt: list[int]) -> list[int]:
                return [t async for out in alone.generate("ref", prompt, params)
                        for d in out.deltas for t in d.token_ids]
            assert asyncio.run(ref([4, 8, 15])) == keep0
            assert asyncio.run(ref([1, 2, 3])) == keep1
        finally:
            alone.shutdown()
        pool = deferred.engine.pool
        assert pool.num_free == pool.num_blocks and not deferred.engine.requests
    finally:
        deferred.shutdown()
