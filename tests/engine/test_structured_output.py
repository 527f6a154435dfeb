"""Grammar-constrained decoding in the engine, on a random-weight model (whose free output
is gibberish, which makes the constraint visible).

Every constrained output must match its spec; a seeded constrained request must give the
same tokens colocated, split over a prefill and a decode engine (the first token sampled
on the prefill side), through preemption, and with its matcher rebuilt from the tokens;
bad specs are refused before anything is reserved.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.errors import InvalidRequestError
from engine.grammar import GrammarCompiler
from engine.structured_spec import GuideKind, StructuredOutputSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                 "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 10},
                                   "zip": {"type": "integer", "minimum": 0,
                                           "maximum": 99999}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}


def _json(schema: dict = SCHEMA) -> StructuredOutputSpec:
    return StructuredOutputSpec.json_schema(schema)


def _params(spec: StructuredOutputSpec, seed: int | None = 5, n: int = 1,
            max_tokens: int = 160, **kw) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=max_tokens,
                          structured_outputs=spec, **kw)


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(tiny_model)


def _texts(results) -> list[str]:
    return [o.text for r in results for o in r.outputs]


def test_json_schema_outputs_parse_and_validate(llm, make_prompts) -> None:
    prompts = make_prompts([5, 9, 14, 20], 2048, 3)
    results = llm.generate(prompts, [_params(_json(), seed=s, n=3) for s in range(4)])
    outputs = [o for r in results for o in r.outputs]
    assert len(outputs) == 12
    for out in outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outputs}) > 6  # sampled, not one forced answer


def test_unconstrained_output_of_this_model_is_not_json(llm) -> None:
    out = llm.generate(["{"], SamplingParams(temperature=1.0, seed=5, max_tokens=40))
    with pytest.raises(ValueError):
        json.loads("{" + out[0].outputs[0].text)


def test_json_object_choice_regex_and_grammars(llm) -> None:
    choice = llm.generate(["a", "b", "c", "d"], _params(
        StructuredOutputSpec.choice(["red", "green", "blue jeans"])))
    assert set(_texts(choice)) <= {"red", "green", "blue jeans"}
    regex = llm.generate(["a", "b", "c"], _params(
        StructuredOutputSpec(GuideKind.REGEX, r"[0-9]{3}-[a-z]{2,4}")))
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t) for t in _texts(regex))
    lark = llm.generate(["a", "b"], _params(StructuredOutputSpec(
        GuideKind.GRAMMAR, 'start: "x=" NUM (";" "x=" NUM)*\nNUM: /[1-9][0-9]?/')))
    assert all(re.fullmatch(r"x=[1-9][0-9]?(;x=[1-9][0-9]?)*", t) for t in _texts(lark))
    gbnf = llm.generate(["a", "b"], _params(StructuredOutputSpec(
        GuideKind.GRAMMAR, 'root ::= "yes" | "no"')))
    assert set(_texts(gbnf)) <= {"yes", "no"}
    # a seed whose object closes within 400 tokens (random weights: many never do)
    obj = llm.generate(["a"], _params(StructuredOutputSpec(GuideKind.JSON_OBJECT), seed=17,
                                      max_tokens=400))
    assert obj[0].outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(obj[0].outputs[0].text), dict)


def test_a_finished_grammar_stops_even_with_ignore_eos(llm) -> None:
    out = llm.generate(["a"], _params(StructuredOutputSpec.choice(["done"]), ignore_eos=True,
                                      max_tokens=50))[0].outputs[0]
    assert out.text == "done" and out.finish_reason == "stop"


@pytest.mark.parametrize("spec", [
    StructuredOutputSpec(GuideKind.JSON, '{"type": "objectx"}'),
    StructuredOutputSpec(GuideKind.JSON, '{"$ref": "#/nowhere"}'),
    StructuredOutputSpec(GuideKind.REGEX, "(("),
    StructuredOutputSpec(GuideKind.GRAMMAR, "start: x"),
    StructuredOutputSpec(GuideKind.GRAMMAR, "root ::= ("),
], ids=["bad-type", "bad-ref", "bad-regex", "undefined-rule", "bad-gbnf"])
def test_an_invalid_spec_is_refused_before_anything_is_reserved(llm, assert_idle, spec) -> None:
    with pytest.raises(InvalidRequestError) as err:
        llm.engine.add_request("bad", [1, 2, 3], _params(spec))
    assert err.value.http_status == 400 and err.value.message
    assert_idle(llm.engine)


def test_specs_that_are_not_even_well_formed_are_refused_on_construction() -> None:
    for kind, value in [(GuideKind.JSON, "{nope"), (GuideKind.JSON, "[1]"),
                        (GuideKind.CHOICE, "[]"), (GuideKind.CHOICE, '["a", 2]'),
                        (GuideKind.REGEX, "  ")]:
        with pytest.raises(InvalidRequestError):
            StructuredOutputSpec(kind, value)


def test_a_grammar_compiles_once_and_its_compile_time_is_bounded(llm) -> None:
    compiler = llm.engine.structured.compiler
    spec = _json({**SCHEMA, "title": "compile-once"})
    before = compiler.compiles
    llm.generate(["a", "b"], _params(spec, max_tokens=8))
    llm.generate(["c"], _params(spec, max_tokens=8))
    assert compiler.compiles == before + 1
    slow = GrammarCompiler(lambda: compiler.tokenizer, timeout_s=1e-9)
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"a{i}+b"}
                                            for i in range(300)}}
    with pytest.raises(InvalidRequestError, match="to compile"):
        slow.compile(_json(big))
    slow.close()


def test_seeded_constrained_output_is_the_same_split_over_prefill_and_decode(
        llm, tiny_model, run_disaggregated) -> None:
    prompt = [7, 8, 9, 10, 11]
    for spec in (_json(), StructuredOutputSpec(GuideKind.REGEX, r"[a-z]{2}[0-9]{2,5}!")):
        params = _params(spec, seed=77, n=3)
        split, _ = run_disaggregated(LLM(tiny_model).engine, LLM(tiny_model).engine, "r",
                                     prompt, params)
        colocated = [o.token_ids for o in llm.generate([prompt], params)[0].outputs]
        assert split == colocated
        assert len({tuple(t) for t in split}) > 1  # n sequences, each its own matcher


def test_seeded_constrained_output_repeats_through_preemption_and_chunked_prefill(
        llm, tiny_model, make_prompts) -> None:
    prompts = make_prompts([30, 45, 60, 70], 2048, 9)
    params = _params(_json(), seed=3, n=2)
    roomy = [[o.token_ids for o in r.outputs] for r in llm.generate(prompts, params)]
    tight = LLM(tiny_model, num_kv_blocks=16, max_num_batched_tokens=32)
    squeezed = [[o.token_ids for o in r.outputs] for r in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert squeezed == roomy


def test_a_matcher_rebuilt_from_the_generated_tokens_continues_identically(llm) -> None:
    params = _params(_json(), seed=21, n=2)
    reference = [o.token_ids for o in llm.generate([[4, 5, 6]], params)[0].outputs]
    engine = llm.engine
    engine.add_request("rebuild", [4, 5, 6], params)
    tokens: dict[int, list[int]] = {0: [], 1: []}
    steps = 0
    while engine.has_work():
        for out in engine.step():
            for d in out.deltas:
                tokens[d.index] += d.token_ids
        steps += 1
        if steps in (3, 9):  # forget every matcher: each must come back from its tokens
            for seq in engine.scheduler.running + list(engine.scheduler.waiting):
                seq.guide = None
    assert [tokens[0], tokens[1]] == reference


def test_masks_filled_inline_or_after_launch_give_the_worker_s_outputs(
        tiny_model, make_prompts) -> None:
    # Engines fill masks on a worker thread, begun at the previous step's end (prefetch);
    # fill_inline fills them on the engine thread when sampling needs them, and
    # fill_after_launch begins them on the worker once the forward is launched: the tokens
    # must not differ
    prompts = make_prompts([6, 11], 2048, 4)
    params = [_params(_json(), seed=s, n=2) for s in (1, 2)]
    texts = {}
    for mode in ("worker", "inline", "after_launch"):
        llm = LLM(tiny_model)
        structured = llm.engine.structured
        structured.fill_inline = mode == "inline"
        structured.fill_after_launch = mode == "after_launch"
        texts[mode] = _texts(llm.generate(prompts, params))
        if mode == "inline":
            assert structured._pool is None  # no worker was ever started
        if mode == "worker":  # begun at the previous step's end, nearly every step
            assert structured.times.prefetched >= 8
        else:
            assert structured.times.prefetched == 0
        if mode == "after_launch":
            assert structured._pool is not None and structured.times.fill > 0
    assert texts["inline"] == texts["worker"] == texts["after_launch"]
    for text in texts["worker"]:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_fill_that_never_ends_fails_the_step_once_not_once_per_row(monkeypatch) -> None:
    # The sampler retries a failed batch one row at a time; a fill past its timeout must
    # then fail each row at once instead of waiting the timeout again per row
    import time
    from concurrent.futures import Future

    import torch

    from engine import structured_output as so

    monkeypatch.setattr(so, "MASK_TIMEOUT_S", 0.2)
    owner = so.StructuredOutputs(GrammarCompiler(lambda: None))
    masks = so.StepMasks(owner, {}, {}, torch.zeros((1, 1), dtype=torch.int32), Future(), {})
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="longer than"):
        masks.wait()
    first = time.monotonic() - t0
    t0 = time.monotonic()
    for _ in range(3):
        with pytest.raises(RuntimeError, match="longer than"):
            masks.wait()
    assert first >= 0.2 and time.monotonic() - t0 < 0.05
    assert owner.times.waited >= 0.2


def test_a_fill_starts_before_its_step_goes_on(tiny_model, make_prompts, monkeypatch
                                              ) -> None:
    # Starting a fill hands the GIL to the mask worker until llguidance has it: by the time
    # _start returns, the fill must be under way or done, not waiting for the engine
    # thread's next blocking call (the hand-off's bound raised so a loaded machine's
    # scheduling cannot fail the test)
    from engine import structured_output as so

    monkeypatch.setattr(so, "HANDOFF_TIMEOUT_S", 5.0)
    llm = LLM(tiny_model)
    structured = llm.engine.structured
    llm.generate(make_prompts([5], 2048, 1), [_params(_json(), seed=3)])  # compiles, warms
    llm.engine.add_request("r", make_prompts([7], 2048, 1)[0], _params(_json(), seed=4))
    while not llm.engine.scheduler.running or \
            llm.engine.scheduler.running[0].num_output_tokens == 0:
        llm.engine.step()
    seq = llm.engine.scheduler.running[0]
    started = []
    real = structured._timed_fill

    def spy(*args, **kwargs):
        started.append(True)
        return real(*args, **kwargs)

    structured._timed_fill = spy  # type: ignore[method-assign]
    masks = structured._start([seq])
    assert masks is not None and started == [True]  # no busy loop ran in between
    masks.wait()
