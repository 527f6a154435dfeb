"""Async scheduling (engine/step_pipeline.py): a step launched before the last step's
tokens reach the host gives exactly the tokens of the engine that waits for them.

On a GPU it is the default; here it is switched on for the CPU, where the same code runs
(the forward is only done sooner). Each test compares against HF's greedy tokens or
against the same engine with async scheduling off, through the paths where a token still
on the device could leak or be lost: batches of mixed prompts, preemption by recompute
with chunked prefill, seeded sampling with penalties and min_tokens, n > 1, stop tokens,
grammar-constrained output, an abort while tokens are in flight, and the blocks of a
sequence that ends while a launched forward may still use them.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.step_pipeline import MAX_DEFERRED_CONSTRAINED, PLACEHOLDER, can_defer
from engine.structured_spec import StructuredOutputSpec

VOCAB = 2048
LENGTHS = [1, 3, 15, 16, 17, 40, 129, 250]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10},
                   "n": {"type": "integer", "minimum": 0, "maximum": 999},
                   "kind": {"enum": ["a", "bb", "ccc"]},
                   "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
    "required": ["name", "n", "kind"],
    "additionalProperties": False,
}


def _ids(results) -> list[list[list[int]]]:
    return [[o.token_ids for o in r.outputs] for r in results]


def _both(tiny_model, prompts, params, **engine_kw):
    """The same requests through an engine with async scheduling off and one with it on;
    returns both results and the async engine (for its counters)."""
    sync = LLM(tiny_model, async_scheduling=False, **engine_kw)
    pipelined = LLM(tiny_model, async_scheduling=True, **engine_kw)
    return (_ids(sync.generate(prompts, params)), _ids(pipelined.generate(prompts, params)),
            pipelined)


class _Watch:
    """Counts the forwards launched while an earlier step's tokens were still on the
    device: proof that the async path ran at all."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.overlapped = 0
        self.placeholders_seen = 0
        execute = engine.runner.execute

        def watched(batch, *args, **kw):
            if engine._inflight is not None:
                self.overlapped += 1
                self.placeholders_seen += sum(s.token_ids[-1] == PLACEHOLDER
                                              for s in batch.seqs)
            return execute(batch, *args, **kw)

        engine.runner.execute = watched


def test_greedy_tokens_equal_transformers_with_async_scheduling(
        tiny_model, hf_greedy_cached, make_prompts, assert_idle):
    prompts = make_prompts(LENGTHS, VOCAB, 1234)
    llm = LLM(tiny_model, async_scheduling=True)
    watch = _Watch(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    out = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert out == hf_greedy_cached(tiny_model, prompts, 40)
    assert watch.overlapped >= 35  # nearly every decode step launched ahead
    assert watch.placeholders_seen >= 35 * len(prompts) // 2
    assert_idle(llm.engine)
    assert llm.engine._inflight is None


def test_greedy_through_preemption_and_chunked_prefill(tiny_model, hf_greedy_cached,
                                                       make_prompts, assert_idle):
    prompts = make_prompts([30, 45, 60, 70, 90], VOCAB, 5)
    llm = LLM(tiny_model, async_scheduling=True, num_kv_blocks=16, max_num_batched_tokens=32)
    watch = _Watch(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    out = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    assert llm.engine.scheduler.num_preemptions > 0
    assert watch.overlapped > 0
    assert out == hf_greedy_cached(tiny_model, prompts, 48)
    assert_idle(llm.engine)


def test_seeded_sampling_with_penalties_min_tokens_and_n_is_unchanged(tiny_model,
                                                                      make_prompts):
    prompts = make_prompts([3, 17, 40, 90], VOCAB, 41)
    params = [
        SamplingParams(temperature=1.0, seed=7, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=8, max_tokens=30, top_k=20, top_p=0.9,
                       repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4),
        SamplingParams(temperature=1.0, seed=9, n=3, max_tokens=25, min_tokens=10,
                       stop_token_ids=[5, 6, 7, 8, 9, 10, 11, 12]),
        SamplingParams(temperature=1.0, seed=10, max_tokens=30, min_p=0.05),
    ]
    sync, pipelined, _ = _both(tiny_model, prompts, params)
    assert sync == pipelined
    assert len({tuple(t) for t in sync[2]}) == 3


def test_seeded_sampling_through_preemption_is_unchanged(tiny_model, make_prompts):
    prompts = make_prompts([30, 45, 60, 70], VOCAB, 9)
    params = SamplingParams(temperature=1.0, seed=13, n=2, max_tokens=40, ignore_eos=True)
    sync, pipelined, llm = _both(tiny_model, prompts, params, num_kv_blocks=14,
                                 max_num_batched_tokens=32)
    assert llm.engine.scheduler.num_preemptions > 0
    assert sync == pipelined


def test_stop_tokens_end_sequences_at_the_same_token(tiny_model, make_prompts):
    # greedy first, to pick stop tokens the sequences do reach mid-way
    prompts = make_prompts([5, 25, 50], VOCAB, 3)
    free = LLM(tiny_model, async_scheduling=False).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    stops = [r.outputs[0].token_ids[k] for r, k in zip(free, (4, 9, 14), strict=True)]
    params = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=stops)
    sync, pipelined, _ = _both(tiny_model, prompts, params)
    assert sync == pipelined
    assert any(len(t[0]) < 30 for t in sync)


def test_constrained_output_is_unchanged_and_valid(tiny_model, make_prompts):
    prompts = make_prompts([6, 11, 20], VOCAB, 4)
    spec = StructuredOutputSpec.json_schema(SCHEMA)
    # four constrained rows: at most MAX_DEFERRED_CONSTRAINED are left on the device
    params = [SamplingParams(temperature=1.0, seed=s, n=n, max_tokens=120,
                             structured_outputs=spec) for s, n in ((1, 1), (2, 2), (3, 1))]
    sync = LLM(tiny_model, async_scheduling=False).generate(prompts, params)
    llm = LLM(tiny_model, async_scheduling=True)
    watch = _Watch(llm.engine)
    pipelined = llm.generate(prompts, params)
    assert _ids(sync) == _ids(pipelined)
    assert watch.overlapped > 10
    for r in pipelined:
        for o in r.outputs:
            jsonschema.validate(json.loads(o.text), SCHEMA)


def test_an_abort_while_tokens_are_in_flight_frees_everything(tiny_model, make_prompts,
                                                              assert_idle):
    prompts = make_prompts([20, 33], VOCAB, 8)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    reference = LLM(tiny_model, async_scheduling=False).generate([prompts[1]], params)
    engine = LLM(tiny_model, async_scheduling=True).engine
    engine.add_request("gone", prompts[0], params)
    engine.add_request("kept", prompts[1], params)
    kept: list[int] = []
    aborted = False
    while engine.has_work():
        for out in engine.step():
            assert out.request_id != "gone" or not aborted  # nothing after the abort
            if out.request_id == "kept":
                kept += out.deltas[0].token_ids
        if not aborted and len(kept) >= 5:
            assert engine._inflight is not None  # its last token is still on the device
            engine.abort("gone")
            aborted = True
    assert aborted and kept == reference[0].outputs[0].token_ids
    assert PLACEHOLDER not in kept
    assert_idle(engine)


class _Pending:
    """A launched forward that has not finished (a GPU's CUDA event, not yet reached)."""

    def __init__(self) -> None:
        self.done = False

    def finished(self) -> bool:
        return self.done


def test_blocks_of_a_sequence_ended_under_a_running_forward_wait_for_it(
        tiny_model, make_prompts, assert_idle):
    engine = LLM(tiny_model, async_scheduling=True).engine
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.add_request("r", make_prompts([40], VOCAB, 2)[0], params)
    engine.step()
    engine.step()
    held = engine.pool.num_blocks - engine.pool.num_free
    assert held >= 3
    fence = _Pending()
    engine._fence = fence  # as if the forward just launched were still running
    engine.abort("r")
    engine.scheduler.release_drained()
    assert engine.pool.num_blocks - engine.pool.num_free == held  # not reusable yet
    fence.done = True
    engine.scheduler.release_drained()
    while engine.has_work():  # resolves the tokens left on the device
        engine.step()
    assert_idle(engine)


def test_rows_that_need_more_than_their_token_are_resolved_in_their_step():
    seq = SamplingParams(logprobs=2)
    assert not can_defer([_seq(seq)], forked=False, prompt_logprobs=False)
    assert not can_defer([_seq(SamplingParams(), prefill_only=True)], False, False)
    assert not can_defer([_seq(SamplingParams())], forked=True, prompt_logprobs=False)
    assert not can_defer([_seq(SamplingParams())], forked=False, prompt_logprobs=True)
    assert can_defer([_seq(SamplingParams(temperature=1.0, repetition_penalty=1.2))],
                     False, False)
    # many constrained rows: their next fill would land on the host's launch chain
    spec = StructuredOutputSpec.json_schema(SCHEMA)
    few = [_seq(SamplingParams(structured_outputs=spec))] * MAX_DEFERRED_CONSTRAINED
    assert can_defer(few + [_seq(SamplingParams())] * 20, False, False)
    assert not can_defer([*few, _seq(SamplingParams(structured_outputs=spec))], False, False)
    # ... unless the device waits for the masks (engine.host_gate)
    assert can_defer([*few, _seq(SamplingParams(structured_outputs=spec))], False, False,
                     gated_masks=True)
    assert not can_defer([_seq(seq)], False, False, gated_masks=True)


def _seq(params: SamplingParams, prefill_only: bool = False):
    from engine.sequence import Sequence

    return Sequence(seq_id=0, request_id="r", index=0, params=params, seed=1,
                    token_ids=[1, 2, 3], num_prompt_tokens=3, max_tokens=4,
                    prefill_only=prefill_only)


@pytest.mark.parametrize("logprobs", [None, 3])
def test_logprobs_requests_and_others_share_a_batch(tiny_model, make_prompts, logprobs):
    prompts = make_prompts([9, 30], VOCAB, 12)
    params = [SamplingParams(temperature=1.0, seed=4, max_tokens=20, logprobs=logprobs),
              SamplingParams(temperature=1.0, seed=5, max_tokens=20)]
    sync = LLM(tiny_model, async_scheduling=False).generate(prompts, params)
    pipelined = LLM(tiny_model, async_scheduling=True).generate(prompts, params)
    assert _ids(sync) == _ids(pipelined)
    if logprobs:
        a, b = sync[0].outputs[0].logprobs, pipelined[0].outputs[0].logprobs
        assert len(a) == len(b) == 20
        assert [x.token_id for x in a] == [x.token_id for x in b]


def _drive(engine, plan, aborts) -> dict[str, list[list[int]]]:
    """Add ``plan``'s requests at their steps, abort ``aborts`` at theirs, run to the end;
    every request's tokens per sequence."""
    tokens: dict[str, dict[int, list[int]]] = {}
    step = 0
    while step < 2000 and (engine.has_work() or any(at >= step for at, *_ in plan)):
        for at, rid, prompt, params in plan:
            if at == step:
                engine.add_request(rid, prompt, params)
        for at, rid in aborts:
            if at == step:
                engine.abort(rid)
        for out in engine.step() if engine.has_work() else []:
            for d in out.deltas:
                tokens.setdefault(out.request_id, {}).setdefault(d.index, []).extend(
                    d.token_ids)
        step += 1
    return {rid: [seqs[i] for i in sorted(seqs)] for rid, seqs in tokens.items()}


def test_a_random_workload_gives_the_same_tokens_with_and_without(tiny_model, assert_idle):
    # requests arriving at random steps, some aborted, a pool small enough to preempt:
    # seeded tokens do not depend on the batch, so every request that was not aborted
    # must end with the same tokens either way, and both engines must end idle
    rng = random.Random(2024)
    spec = StructuredOutputSpec.json_schema(SCHEMA)
    plan, aborts = [], []
    for i in range(30):
        kind = rng.choice(["greedy", "sampled", "n2", "penalised", "stops", "json"])
        params = SamplingParams(
            temperature=0.0 if kind == "greedy" else 1.0, seed=i,
            max_tokens=rng.randrange(4, 40), n=2 if kind == "n2" else 1,
            repetition_penalty=1.3 if kind == "penalised" else 1.0,
            stop_token_ids=[rng.randrange(VOCAB) for _ in range(40)] if kind == "stops" else [],
            structured_outputs=spec if kind == "json" else None,
            ignore_eos=kind != "stops")
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 120))]
        plan.append((rng.randrange(0, 60), f"r{i}", prompt, params))
        if rng.random() < 0.2:
            aborts.append((rng.randrange(0, 80), f"r{i}"))
    aborted = {rid for _, rid in aborts}
    results = []
    for overlap in (False, True):
        engine = LLM(tiny_model, async_scheduling=overlap, num_kv_blocks=24,
                     max_num_batched_tokens=64).engine
        got = _drive(engine, plan, aborts)
        assert_idle(engine)
        assert engine._inflight is None
        results.append({rid: t for rid, t in got.items() if rid not in aborted})
        assert engine.scheduler.num_preemptions > 0
    assert results[0] == results[1]
    assert len(results[0]) >= 20


def test_a_placeholder_inside_a_recomputed_chunk_is_fed_from_the_device(tiny_model):
    # a sequence preempted while its token was in flight and admitted again at once (its
    # shared prompt blocks still cached by a sibling) recomputes several tokens, the
    # placeholder among them: its input id must still come from the device
    import torch

    from engine.scheduler import ScheduledBatch
    from engine.sequence import Sequence
    from engine.step_pipeline import TokenFeed

    runner = LLM(tiny_model, async_scheduling=True).engine.runner
    tokens = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, PLACEHOLDER]
    seq = Sequence(seq_id=41, request_id="r", index=1, params=SamplingParams(), seed=1,
                   token_ids=tokens, num_prompt_tokens=16, max_tokens=8,
                   num_computed_tokens=16, block_ids=[3, 4])
    other = Sequence(seq_id=7, request_id="o", index=0, params=SamplingParams(), seed=2,
                     token_ids=[30, 31, PLACEHOLDER], num_prompt_tokens=2, max_tokens=8,
                     num_computed_tokens=2, block_ids=[9])
    feed = TokenFeed(torch.tensor([1234, 777]), {7: 0, 41: 1})
    inputs = runner.prepare(ScheduledBatch([other, seq], [1, 3]), feed)
    assert inputs.input_ids.tolist() == [1234, 21, 22, 777]
    assert inputs.positions.tolist() == [2, 16, 17, 18]
