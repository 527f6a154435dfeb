"""The mask fill's GPU setup (engine.mask_fill), run on the CPU: sequences spread over
replicated grammar templates with several llguidance threads must give exactly the tokens
of one template on one thread, with each fill's rows grouped by template."""

from __future__ import annotations

import json

import jsonschema

from engine import LLM, SamplingParams
from engine import structured_output as so
from engine.mask_fill import FillSetup
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


def test_a_fill_hands_llguidance_the_rows_grouped_by_template(
        tiny_model, make_prompts, monkeypatch) -> None:
    # llguidance's threads split the rows into runs of neighbours: rows of one template
    # (one lock) must be neighbours, whatever order the batch holds them in
    seen: list[list[int]] = []
    real = so.fill_rows

    def spy(executor, pairs, out) -> None:
        seen.append([replica_of[id(m)] for m, _ in pairs])
        real(executor, pairs, out)

    replica_of: dict[int, int] = {}
    real_matcher = so.StructuredOutputs.matcher

    def matcher(self, seq):
        guide = real_matcher(self, seq)
        replica_of[id(guide)] = seq.guide_replica
        return guide

    monkeypatch.setattr(so, "fill_rows", spy)
    monkeypatch.setattr(so.StructuredOutputs, "matcher", matcher)
    llm = LLM(tiny_model)
    llm.engine.structured.set_fill(FillSetup(replicas=3, threads=2))
    llm.generate(make_prompts([6, 8, 9], 2048, 7), [_params(s) for s in (4, 5, 6)])
    many = [order for order in seen if len(set(order)) > 1]
    assert many, "no fill mixed templates"
    for order in many:
        assert order == sorted(order)


def test_the_gpu_setup_spreads_fills_and_the_cpu_one_changes_nothing() -> None:
    import torch

    gpu, cpu = FillSetup.for_device(torch.device("cuda")), FillSetup.for_device(
        torch.device("cpu"))
    assert gpu.replicas > 1 and gpu.threads > 1
    assert cpu == FillSetup(1, 1)
