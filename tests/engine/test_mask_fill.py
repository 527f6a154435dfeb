"""The mask fill's GPU setup (engine.mask_fill), run on the CPU: sequences spread over
replicated grammar templates with several llguidance threads must give exactly the tokens
of one template on one thread, and the GIL switch interval is lowered only while a fill
runs."""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine import structured_output as so
from engine.mask_fill import FillSetup, FillWindow
from engine.structured_spec import StructuredOutputSpec

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10},
                   "n": {"type": "integer", "minimum": 0, "maximum": 999},
                   "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]},
                            "maxItems": 4}},
    "required": ["name", "n", "tags"],
    "additionalProperties": False,
}


def _params(seed: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, n=2, max_tokens=96,
                          structured_outputs=StructuredOutputSpec.json_schema(SCHEMA))


def test_replicated_templates_and_threads_give_one_template_s_tokens(
        tiny_model, make_prompts) -> None:
    prompts = make_prompts([5, 9, 13], 2048, 5)
    params = [_params(seed) for seed in (1, 2, 3)]
    texts = {}
    for setup in (FillSetup(), FillSetup(replicas=3, threads=2)):
        llm = LLM(tiny_model)
        llm.engine.structured.set_fill(setup)
        texts[setup.replicas] = [o.text for r in llm.generate(prompts, params)
                                 for o in r.outputs]
        # one compile per template the sequences copied
        assert llm.engine.structured.compiler.compiles == setup.replicas
    assert texts[3] == texts[1]
    for text in texts[3]:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_fill_lowers_the_switch_interval_until_its_worker_is_back(
        tiny_model, make_prompts, monkeypatch) -> None:
    before = sys.getswitchinterval()
    during: list[float] = []
    real = so.fill_rows

    def spy(*args, **kwargs) -> None:
        during.append(sys.getswitchinterval())
        real(*args, **kwargs)

    monkeypatch.setattr(so, "fill_rows", spy)
    llm = LLM(tiny_model)
    llm.engine.structured.set_fill(FillSetup(replicas=2, threads=1, switch_interval_s=1e-4))
    llm.generate(make_prompts([6, 8], 2048, 7), [_params(4), _params(5)])
    assert during and all(v == pytest.approx(1e-4) for v in during)
    assert sys.getswitchinterval() == pytest.approx(before)
    llm.engine.structured.set_fill(FillSetup())  # and without one, nothing changes
    during.clear()
    llm.generate(make_prompts([7], 2048, 8), [_params(6)])
    assert during and all(v == pytest.approx(before) for v in during)


def test_a_window_left_open_by_a_cancelled_fill_restores_the_first_interval() -> None:
    before = sys.getswitchinterval()
    window = FillWindow()
    try:
        window.open(2e-4)
        window.open(3e-4)  # a fill whose predecessor never ran (cancelled): no close between
        assert sys.getswitchinterval() == pytest.approx(3e-4)
    finally:
        window.close()
    assert sys.getswitchinterval() == pytest.approx(before)
    window.close()  # idempotent
    assert sys.getswitchinterval() == pytest.approx(before)


def test_the_gpu_setup_spreads_fills_and_the_cpu_one_changes_nothing() -> None:
    import torch

    gpu, cpu = FillSetup.for_device(torch.device("cuda")), FillSetup.for_device(
        torch.device("cpu"))
    assert gpu.replicas > 1 and gpu.threads > 1 and gpu.switch_interval_s is not None
    assert cpu == FillSetup(1, 1, None)
