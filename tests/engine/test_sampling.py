"""Sampling: seeded randomness is reproducible, logprobs are transformers' log_softmax,
penalties and stop conditions do what SamplingParams says.

Penalties are checked against a reference written from their definition (vLLM's: the
repetition penalty divides positive and multiplies negative logits of every token seen in
prompt or output; frequency subtracts count * penalty, presence subtracts the penalty once,
both over output tokens only) applied to transformers' logits, step by step.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from hf_reference import hf_logits

from engine import LLM, SamplingParams
from engine.logits_processors import apply_penalties
from engine.sequence import Sequence

VOCAB = 2048
PROMPT = "def main():\n    "


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(tiny_model)


@pytest.fixture(scope="module")
def prompts(make_prompts) -> list[list[int]]:
    return make_prompts([3, 17, 40, 90], VOCAB, 41)


def _ids(result) -> list[list[int]]:
    return [o.token_ids for o in result.outputs]


def _sampled(seed: int | None, n: int = 1, max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens,
                          ignore_eos=True)


# -- seeds ------------------------------------------------------------------------------

def test_a_seeded_request_repeats_across_runs_and_llm_instances(llm, tiny_model, prompts):
    first = [_ids(r) for r in llm.generate(prompts, _sampled(7))]
    again = [_ids(r) for r in llm.generate(prompts, _sampled(7))]
    other = [_ids(r) for r in LLM(tiny_model).generate(prompts, _sampled(7))]
    assert first == again == other
    assert len({tuple(ids[0]) for ids in first}) == len(prompts)


def test_a_seeded_request_does_not_depend_on_what_else_is_in_the_batch(llm, prompts):
    target = prompts[2]
    alone = _ids(llm.generate([target], _sampled(11))[0])
    crowd_params = [_sampled(None), _sampled(3), _sampled(11), _sampled(None, n=2)]
    in_crowd = llm.generate([prompts[1], prompts[0], target, prompts[3]], crowd_params)
    last = llm.generate([prompts[3], target], [_sampled(1), _sampled(11)])
    assert alone == _ids(in_crowd[2]) == _ids(last[1])


def test_a_seeded_request_repeats_through_preemption_and_chunked_prefill(
        llm, tiny_model, prompts):
    params = _sampled(13, max_tokens=48)
    roomy = [_ids(r) for r in llm.generate(prompts, params)]
    tight = LLM(tiny_model, num_kv_blocks=14, max_num_batched_tokens=32)
    squeezed = [_ids(r) for r in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert squeezed == roomy


@pytest.mark.parametrize("seed", [21, None])
def test_a_sampled_request_split_across_prefill_and_decode_engines_matches_colocated(
        llm, tiny_model, prompts, run_disaggregated, seed):
    prefill, decode = LLM(tiny_model), LLM(tiny_model)
    split, used_seed = run_disaggregated(prefill.engine, decode.engine, "r", prompts[3],
                                         _sampled(seed, n=2))
    assert seed is None or used_seed == seed
    colocated = _ids(llm.generate([prompts[3]], _sampled(used_seed, n=2))[0])
    assert split == colocated and split[0] != split[1]


def test_different_seeds_give_different_samples(llm, prompts):
    a = _ids(llm.generate([prompts[1]], _sampled(1))[0])
    b = _ids(llm.generate([prompts[1]], _sampled(2))[0])
    assert a != b


def test_n_seeded_samples_differ_from_each_other_and_repeat(llm, prompts):
    first = _ids(llm.generate([prompts[1]], _sampled(5, n=4))[0])
    again = _ids(llm.generate([prompts[1]], _sampled(5, n=4))[0])
    assert first == again
    assert len({tuple(ids) for ids in first}) == 4


def test_top_k_1_tiny_top_p_and_full_min_p_all_equal_greedy(llm, prompts):
    greedy = [_ids(r) for r in llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))]
    for narrow in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        params = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True,
                                **narrow)
        assert [_ids(r) for r in llm.generate(prompts, params)] == greedy, narrow


# -- logprobs ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_logprobs_equal_log_softmax_of_transformers_logits(llm, tiny_model, prompts,
                                                           temperature):
    prompt = prompts[2]
    params = SamplingParams(temperature=temperature, seed=9, max_tokens=12, logprobs=5,
                            ignore_eos=True)
    out = llm.generate([prompt], params)[0].outputs[0]
    ref = torch.log_softmax(hf_logits(tiny_model, prompt + out.token_ids[:-1]), dim=-1)
    assert len(out.logprobs) == len(out.token_ids) == 12
    for t, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=False)):
        row = ref[len(prompt) - 1 + t]
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(row[token].item(), abs=1e-4)
        values, ids = torch.topk(row, 5)
        assert [i for i, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_logprobs_zero_gives_only_the_chosen_token(llm, prompts):
    out = llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=4,
                                                    logprobs=0))[0].outputs[0]
    assert [lp.top for lp in out.logprobs] == [[]] * 4
    assert llm.generate([prompts[0]], SamplingParams(max_tokens=4))[0].outputs[0].logprobs \
        is None


# -- penalties --------------------------------------------------------------------------

def _reference_penalties(row: torch.Tensor, prompt: list[int], out: list[int],
                         rep: float, freq: float, pres: float) -> torch.Tensor:
    row = row.clone()
    for tok in set(prompt) | set(out):
        row[tok] = row[tok] / rep if row[tok] > 0 else row[tok] * rep
    for tok, count in Counter(out).items():
        row[tok] -= freq * count + pres
    return row


def test_penalties_transform_logits_as_defined():
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5,
                            presence_penalty=0.25)
    seq = Sequence(seq_id=0, request_id="r", index=0, params=params, seed=0,
                   token_ids=[1, 2, 3, 3, 5], num_prompt_tokens=2, max_tokens=10)
    row = torch.tensor([1.0, 4.0, -2.0, 3.0, 1.0, -1.0, 0.5])
    out = row.clone().unsqueeze(0)
    apply_penalties(out, [seq], eos_ids=[])
    out = out.squeeze(0)
    expected = _reference_penalties(row, [1, 2], [3, 3, 5], 2.0, 0.5, 0.25)
    assert torch.allclose(out, expected)
    assert out.tolist() == pytest.approx([1.0, 2.0, -4.0, 0.25, 1.0, -2.75, 0.5])


@pytest.mark.parametrize("rep,freq,pres", [(1.3, 0.0, 0.0), (1.0, 1.5, 0.0),
                                           (1.0, 0.0, 1.5), (1.2, 0.7, 0.4)])
def test_greedy_with_penalties_follows_the_definition_step_by_step(
        llm, tiny_model, prompts, rep, freq, pres):
    prompt = prompts[1]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                            repetition_penalty=rep, frequency_penalty=freq,
                            presence_penalty=pres)
    out = llm.generate([prompt], params)[0].outputs[0].token_ids
    logits = hf_logits(tiny_model, prompt + out[:-1])
    for t, token in enumerate(out):
        row = _reference_penalties(logits[len(prompt) - 1 + t], prompt, out[:t], rep, freq,
                                   pres)
        assert token == int(torch.argmax(row)), f"step {t}"


def test_a_huge_repetition_penalty_avoids_every_repeat(llm, prompts):
    prompt = prompts[1]
    plain = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40,
                                                  ignore_eos=True))[0].outputs[0].token_ids
    assert len(set(plain)) < len(plain)  # without a penalty this model repeats itself
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                            repetition_penalty=1e9)
    out = llm.generate([prompt], params)[0].outputs[0].token_ids
    assert len(set(out)) == len(out) and not set(out) & set(prompt)


# -- stopping ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def greedy_run(llm) -> tuple[list[int], str, int]:
    """A greedy continuation of PROMPT and the index of a token that first appears there."""
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=32,
                                              ignore_eos=True))[0].outputs[0]
    ids = out.token_ids
    eos = llm.engine.eos_token_ids
    idx = next(i for i in range(4, len(ids))
               if ids[i] not in ids[:i] and not set(ids[:i + 1]) & set(eos))
    return ids, out.text, idx


def test_max_tokens_finishes_with_length(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=7,
                                              ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_the_context_limit_finishes_with_length(tiny_model):
    llm = LLM(tiny_model, max_model_len=64)
    out = llm.generate([list(range(60))], SamplingParams(temperature=0.0, max_tokens=100,
                                                         ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_a_stop_token_id_ends_the_sequence_with_stop(llm, greedy_run):
    ids, _, idx = greedy_run
    params = SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[ids[idx]])
    out = llm.generate(PROMPT, params)[0].outputs[0]
    assert out.token_ids == ids[:idx + 1] and out.finish_reason == "stop"


def test_min_tokens_holds_back_a_stop_token_id(llm, greedy_run):
    ids, _, idx = greedy_run
    params = SamplingParams(temperature=0.0, max_tokens=32, stop_token_ids=[ids[idx]],
                            min_tokens=idx + 3)
    out = llm.generate(PROMPT, params)[0].outputs[0]
    assert out.token_ids[:idx] == ids[:idx]
    assert ids[idx] not in out.token_ids[:idx + 3]
    assert len(out.token_ids) >= idx + 3


@pytest.fixture(scope="module")
def eos_model(tiny_model, greedy_run, tmp_path_factory) -> Path:
    """The tiny model with the greedy run's token at ``idx`` declared an eos token."""
    ids, _, idx = greedy_run
    model_dir = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(tiny_model, model_dir)
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    old = gen["eos_token_id"]
    gen["eos_token_id"] = (old if isinstance(old, list) else [old]) + [ids[idx]]
    gen_path.write_text(json.dumps(gen))
    return model_dir


@pytest.fixture(scope="module")
def eos_llm(eos_model) -> LLM:
    return LLM(eos_model)


def test_eos_ends_the_sequence_with_stop_unless_ignored(eos_llm, greedy_run):
    ids, _, idx = greedy_run
    assert ids[idx] in eos_llm.engine.eos_token_ids
    out = eos_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=32))[0]
    assert out.outputs[0].token_ids == ids[:idx + 1]
    assert out.outputs[0].finish_reason == "stop"
    ignored = eos_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=32,
                                                      ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == ids and ignored.finish_reason == "length"


def test_min_tokens_blocks_an_early_eos(eos_llm, greedy_run):
    ids, _, idx = greedy_run
    eos = set(eos_llm.engine.eos_token_ids)
    params = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=idx + 3)
    out = eos_llm.generate(PROMPT, params)[0].outputs[0]
    assert out.token_ids[:idx] == ids[:idx]
    assert not eos & set(out.token_ids[:idx + 3])
    assert len(out.token_ids) >= idx + 3
    assert out.finish_reason == ("stop" if out.token_ids[-1] in eos else "length")


def _a_stop_string(text: str) -> tuple[str, int]:
    """A 4-character, printable-ASCII piece of ``text`` (after its first quarter) and where
    it first occurs."""
    for start in range(len(text) // 4, len(text) - 4):
        piece = text[start:start + 4]
        if piece.isascii() and piece.isprintable() and text.find(piece) == start:
            return piece, start
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_cuts_the_text(llm, greedy_run, include):
    ids, text, _ = greedy_run
    stop, pos = _a_stop_string(text)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    out = llm.generate(PROMPT, params)[0].outputs[0]
    assert out.text == (text[:pos + len(stop)] if include else text[:pos])
    assert out.finish_reason == "stop"
    assert out.token_ids == ids[:len(out.token_ids)] and len(out.token_ids) < len(ids)
    decode = llm.tokenizer.decode
    # the last token kept is the one that completed the stop string
    assert stop in decode(out.token_ids, skip_special_tokens=True)
    assert stop not in decode(out.token_ids[:-1], skip_special_tokens=True)
