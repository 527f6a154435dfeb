"""Greedy tokens from the engine equal transformers' generate() token for token.

Every test compares ``LLM.generate`` (fp32, CPU, ignore_eos) with ``hf_greedy`` on models
made by make-model, through the paths that could make them drift apart: batching of
prompts from 1 to 300+ tokens, prefix-cache hits, preemption by recompute, chunked
prefill, copy-on-write forks for n > 1, another block size, a KV cache filled by a
different engine (the decode pod's path), llama3 RoPE scaling, sharded and tied
checkpoints, and the transformers-4 form of config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine import LLM, SamplingParams

VOCAB = 2048  # make-model's default vocabulary
NEW_TOKENS = 64
# Block boundaries (16), one-token and 300+-token prompts, all in one batch.
LENGTHS = [1, 3, 15, 16, 17, 40, 64, 129, 250, 310]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _tokens(results) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in results]


@pytest.fixture(scope="module")
def prompts(make_prompts) -> list[list[int]]:
    return make_prompts(LENGTHS, VOCAB, 1234)


@pytest.fixture(scope="module")
def llama(tiny_model) -> LLM:
    return LLM(tiny_model)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_batch_of_prompts_matches_transformers_for_each_arch(
        model_factory, hf_greedy_cached, prompts, assert_idle, arch):
    model_dir = model_factory(arch)
    llm = LLM(model_dir)
    out = _tokens(llm.generate(prompts, GREEDY))
    assert out == hf_greedy_cached(model_dir, prompts, NEW_TOKENS)
    assert all(len(t) == NEW_TOKENS for t in out)
    assert_idle(llm.engine)


def test_second_prompt_reuses_the_first_prompts_cached_prefix_blocks(
        tiny_model, hf_greedy_cached, make_prompts):
    shared, tail_a, tail_b = make_prompts([100, 20, 37], VOCAB, 7)
    a, b = shared + tail_a, shared + tail_b
    llm = LLM(tiny_model)
    stats = llm.engine.pool.stats

    first = llm.generate([a], GREEDY)[0]
    hits_before = stats.hit_tokens
    second = llm.generate([b], GREEDY)[0]

    assert first.num_cached_tokens == 0
    assert stats.hit_tokens - hits_before >= 96  # the 6 full blocks of the shared prefix
    assert second.num_cached_tokens == 96
    assert _tokens([first, second]) == hf_greedy_cached(tiny_model, [a, b], NEW_TOKENS)


def test_a_fully_cached_prompt_recomputes_only_its_last_token_and_matches(
        tiny_model, hf_greedy_cached, make_prompts):
    # 96 tokens = 6 full blocks: the last one must be recomputed for its logits.
    (prompt,) = make_prompts([96], VOCAB, 8)
    llm = LLM(tiny_model)
    first, again = llm.generate([prompt], GREEDY)[0], llm.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens == 80
    assert _tokens([first, again]) == hf_greedy_cached(tiny_model, [prompt] * 2, NEW_TOKENS)


def test_preemption_by_recompute_keeps_tokens_exact(
        tiny_model, hf_greedy_cached, prompts, assert_idle):
    # 40 blocks of 16 hold the longest sequence (310 + 64 tokens) but not the whole batch.
    llm = LLM(tiny_model, num_kv_blocks=40)
    out = _tokens(llm.generate(prompts, GREEDY))
    assert llm.engine.scheduler.num_preemptions > 0
    assert out == hf_greedy_cached(tiny_model, prompts, NEW_TOKENS)
    assert_idle(llm.engine)


def test_preemption_without_prefix_caching_keeps_tokens_exact(
        tiny_model, hf_greedy_cached, prompts):
    llm = LLM(tiny_model, num_kv_blocks=40, enable_prefix_caching=False)
    out = _tokens(llm.generate(prompts, GREEDY))
    assert llm.engine.scheduler.num_preemptions > 0
    assert out == hf_greedy_cached(tiny_model, prompts, NEW_TOKENS)


def test_chunked_prefill_of_a_300_token_prompt_with_a_64_token_budget_is_exact(
        tiny_model, hf_greedy_cached, make_prompts, monkeypatch):
    (prompt,) = make_prompts([300], VOCAB, 9)
    llm = LLM(tiny_model, max_num_batched_tokens=64)
    sched = llm.engine.scheduler
    schedule, sizes = sched.schedule, []

    def recording_schedule():
        batch = schedule()
        sizes.append(batch.num_tokens)
        return batch

    monkeypatch.setattr(sched, "schedule", recording_schedule)
    out = _tokens(llm.generate([prompt], GREEDY))
    assert sizes == [64, 64, 64, 64, 44] + [1] * (NEW_TOKENS - 1)
    assert out == hf_greedy_cached(tiny_model, [prompt], NEW_TOKENS)


def test_chunked_prefill_mixed_with_decodes_in_one_batch_is_exact(
        tiny_model, hf_greedy_cached, prompts):
    llm = LLM(tiny_model, max_num_batched_tokens=64)
    assert _tokens(llm.generate(prompts, GREEDY)) == hf_greedy_cached(
        tiny_model, prompts, NEW_TOKENS)


def test_block_size_32_is_exact(tiny_model, hf_greedy_cached, prompts):
    llm = LLM(tiny_model, block_size=32)
    assert _tokens(llm.generate(prompts, GREEDY)) == hf_greedy_cached(
        tiny_model, prompts, NEW_TOKENS)


def test_n_greedy_copies_are_identical_and_equal_transformers(
        llama, tiny_model, hf_greedy_cached, make_prompts, assert_idle):
    # 20 and 33 tokens: the last prompt block is partly filled, shared, then copied on write.
    ps = make_prompts([20, 33], VOCAB, 10)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = llama.generate(ps, params)
    for result, ref in zip(results, hf_greedy_cached(tiny_model, ps, NEW_TOKENS), strict=False):
        assert [o.token_ids for o in result.outputs] == [ref] * 3
    assert_idle(llama.engine)


@pytest.mark.parametrize("n,length,budget", [(1, 100, 2048), (2, 100, 2048), (1, 300, 64)])
def test_kv_prefilled_by_another_engine_decodes_exactly(
        tiny_model, hf_greedy_cached, make_prompts, assert_idle, run_disaggregated,
        n, length, budget):
    """The decode pod's path: reserve blocks, copy a prefill engine's KV into them, go on
    (the prefill engine may compute the prompt in chunks)."""
    (prompt,) = make_prompts([length], VOCAB, 11)
    params = SamplingParams(n=n, temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prefill, decode = LLM(tiny_model, max_num_batched_tokens=budget), LLM(tiny_model)
    tokens, _ = run_disaggregated(prefill.engine, decode.engine, "r", prompt, params)
    (ref,) = hf_greedy_cached(tiny_model, [prompt], NEW_TOKENS)
    assert tokens == [ref] * n
    assert_idle(prefill.engine)
    assert_idle(decode.engine)
    # The remotely filled prompt blocks are registered: a local request reuses them.
    local = decode.generate([prompt], GREEDY)[0]
    assert local.num_cached_tokens == (length - 1) // 16 * 16
    assert local.outputs[0].token_ids == ref


@pytest.mark.parametrize("block_size,num_kv_blocks,budget,max_num_seqs", [
    (8, 24, 32, 4), (16, 16, 64, 256)])
def test_a_mixed_workload_on_a_tight_engine_is_exact(
        tiny_model, hf_greedy_cached, make_prompts, assert_idle,
        block_size, num_kv_blocks, budget, max_num_seqs):
    """Shared prefixes, n > 1 forks, chunked prefill and preemption all at once, in two
    waves so that the second also reuses blocks cached by the first."""
    bases = make_prompts([16, 40, 100], VOCAB, 13)
    tails = make_prompts([5, 30, 1, 44, 17, 9, 60, 23, 2, 38], VOCAB, 14)
    ps = [bases[i % 3] + tail if i % 4 else tail for i, tail in enumerate(tails)]
    ns = [1, 2, 1, 3, 1, 1, 2, 1, 3, 1]
    llm = LLM(tiny_model, block_size=block_size, num_kv_blocks=num_kv_blocks,
              max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
    refs = hf_greedy_cached(tiny_model, ps, 24)
    for wave in (range(0, 10, 2), range(1, 10, 2)):
        params = [SamplingParams(n=ns[i], temperature=0.0, max_tokens=24, ignore_eos=True)
                  for i in wave]
        results = llm.generate([ps[i] for i in wave], params)
        for i, result in zip(wave, results, strict=False):
            assert [o.token_ids for o in result.outputs] == [refs[i]] * ns[i], i
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.pool.stats.hit_tokens > 0
    assert_idle(llm.engine)


def _rewrite_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _to_transformers4(cfg: dict) -> None:
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None


@pytest.fixture(scope="module")
def llama3_model(model_factory) -> Path:
    # original_max_position_embeddings = 512 // 4 = 128: the long prompts go well past it.
    return model_factory("llama", rope_scaling="llama3", max_position_embeddings=512)


def test_llama3_rope_scaling_is_exact_past_the_original_context(
        llama3_model, hf_greedy_cached, make_prompts, tmp_path):
    ps = make_prompts([10, 200, 300], VOCAB, 12)
    cfg = json.loads((llama3_model / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "llama3"
    assert cfg["rope_parameters"]["original_max_position_embeddings"] < 300
    ref = hf_greedy_cached(llama3_model, ps, NEW_TOKENS)
    assert _tokens(LLM(llama3_model).generate(ps, GREEDY)) == ref

    # The test has teeth: the same weights without the scaling give other tokens.
    def unscaled(c: dict) -> None:
        c["rope_parameters"] = {"rope_type": "default",
                                "rope_theta": c["rope_parameters"]["rope_theta"]}

    plain = _rewrite_config(llama3_model, tmp_path / "unscaled", unscaled)
    assert _tokens(LLM(plain).generate(ps, GREEDY))[1:] != ref[1:]


@pytest.mark.parametrize("which", ["llama3", "qwen2"])
def test_transformers4_config_form_loads_and_gives_the_same_tokens(
        which, llama3_model, model_factory, hf_greedy_cached, prompts, make_prompts, tmp_path):
    src = llama3_model if which == "llama3" else model_factory("qwen2")
    ps = make_prompts([10, 200, 300], VOCAB, 12) if which == "llama3" else prompts
    old = _rewrite_config(src, tmp_path / "tf4", _to_transformers4)
    cfg = json.loads((old / "config.json").read_text())
    assert "rope_parameters" not in cfg and "rope_theta" in cfg
    llm = LLM(old)
    rope = llm.engine.config.rope
    assert rope.theta == cfg["rope_theta"]
    if which == "llama3":
        assert rope.rope_type == "llama3" and rope.original_max_position_embeddings == 128
    assert _tokens(llm.generate(ps, GREEDY)) == hf_greedy_cached(src, ps, NEW_TOKENS)


def test_sharded_checkpoint_is_exact(model_factory, hf_greedy_cached, prompts):
    model_dir = model_factory("llama", max_shard_bytes=300_000)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    out = _tokens(LLM(model_dir).generate(prompts, GREEDY))
    assert out == hf_greedy_cached(model_dir, prompts, NEW_TOKENS)


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("qwen2", False),
                                       ("llama", True), ("llama", False)])
def test_tied_and_untied_embeddings_are_exact(
        model_factory, hf_greedy_cached, prompts, arch, tied):
    model_dir = (model_factory(arch) if tied == (arch == "qwen2")
                 else model_factory(arch, tie_embeddings=tied))
    assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is tied
    llm = LLM(model_dir)
    assert (llm.engine.runner.model.lm_head is None) is tied
    out = _tokens(llm.generate(prompts[:6], GREEDY))
    assert out == hf_greedy_cached(model_dir, prompts[:6], NEW_TOKENS)
