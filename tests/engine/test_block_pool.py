"""Block pool: ref counts, the LRU free list, prefix hashes -- and no leaked blocks.

The unit tests drive BlockPool directly. The engine-level tests end every way a request
can end (finish, abort while waiting, mid-prefill, mid-decode or awaiting remote KV,
preemption, n > 1 forks with copy on write, a stop string) and check that every block is
back on the free list with a zero ref count.
"""

from __future__ import annotations

import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine.block_pool import BlockPool, hash_block, prefix_hashes
from engine.errors import CapacityError
from engine.sequence import SequenceStatus
from kv_transfer import make_receiver

VOCAB = 2048


def _chain(*blocks: list[int]) -> list[bytes]:
    hashes, parent = [], None
    for tokens in blocks:
        parent = hash_block(parent, tokens)
        hashes.append(parent)
    return hashes


# -- BlockPool units -------------------------------------------------------------------

def test_allocate_hands_out_distinct_blocks_with_one_reference_and_release_frees_them():
    pool = BlockPool(8, 4)
    got = pool.allocate(3)
    assert len(set(got)) == 3 and pool.num_free == 5
    assert [pool.ref_counts[b] for b in got] == [1, 1, 1]
    pool.release(got)
    assert pool.num_free == 8 and pool.ref_counts == [0] * 8


def test_a_shared_block_is_freed_only_when_its_last_reference_goes():
    pool = BlockPool(4, 4)
    blocks = pool.allocate(2)
    pool.share(blocks)
    pool.share(blocks[:1])
    assert [pool.ref_counts[b] for b in blocks] == [3, 2]
    pool.release(blocks)
    assert pool.num_free == 2 and [pool.ref_counts[b] for b in blocks] == [2, 1]
    pool.release(blocks)
    assert pool.num_free == 3 and pool.ref_counts[blocks[1]] == 0
    pool.release(blocks[:1])
    assert pool.num_free == 4


def test_releasing_a_free_block_is_refused():
    pool = BlockPool(2, 4)
    (b,) = pool.allocate(1)
    pool.release([b])
    with pytest.raises(AssertionError):
        pool.release([b])


def test_allocating_more_than_is_free_raises_capacity_error_and_changes_nothing():
    pool = BlockPool(4, 4)
    held = pool.allocate(3)
    assert not pool.can_allocate(2) and pool.can_allocate(1)
    with pytest.raises(CapacityError, match="need 2 KV blocks, 1 free"):
        pool.allocate(2)
    assert pool.num_free == 1 and [pool.ref_counts[b] for b in held] == [1, 1, 1]


def test_a_pool_needs_at_least_one_block():
    with pytest.raises(ValueError):
        BlockPool(0, 16)


def test_chained_hashes_name_the_whole_prefix_not_just_the_block():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(None, [9, 9, 9, 9]),
                                                     [5, 6, 7, 8])


def test_freed_registered_blocks_stay_reusable_until_evicted():
    pool = BlockPool(4, 2)
    hashes = _chain([1, 2], [3, 4])
    blocks = pool.allocate(2)
    for b, h in zip(blocks, hashes, strict=False):
        pool.register(b, h)
    pool.release(blocks)
    assert pool.num_free == 4
    hit = pool.lookup(hashes)
    assert hit == blocks  # the same blocks, pulled off the free list with a reference each
    assert pool.num_free == 2 and [pool.ref_counts[b] for b in hit] == [1, 1]
    pool.release(hit)


def test_lookup_takes_a_reference_on_blocks_still_in_use():
    pool = BlockPool(4, 2)
    hashes = _chain([1, 2])
    (b,) = pool.allocate(1)
    pool.register(b, hashes[0])
    assert pool.lookup(hashes) == [b]
    assert pool.ref_counts[b] == 2 and pool.num_free == 3


def test_lookup_stops_at_the_first_miss():
    pool = BlockPool(4, 2)
    h = _chain([1, 2], [3, 4], [5, 6])
    blocks = pool.allocate(3)
    pool.register(blocks[0], h[0])
    pool.register(blocks[2], h[2])  # cached, but after a gap: unusable as a prefix
    assert pool.lookup(h) == [blocks[0]]
    assert pool.ref_counts[blocks[2]] == 1


def test_allocation_evicts_the_least_recently_freed_cached_block_first():
    pool = BlockPool(4, 2)
    h = _chain([1, 2], [3, 4], [5, 6])
    never_cached = pool.allocate(1)
    blocks = pool.allocate(3)
    for b, hb in zip(blocks, h, strict=False):
        pool.register(b, hb)
    pool.release(never_cached)  # oldest free entry
    pool.release(blocks)  # released tail first: the tail is evicted before the head
    assert pool.allocate(1) == never_cached
    assert pool.allocate(1) == [blocks[2]]
    assert pool.lookup(h) == blocks[:2]  # the evicted tail block is no longer found
    assert pool.lookup(h[2:]) == []


def test_a_cache_hit_moves_a_block_out_of_the_eviction_order():
    pool = BlockPool(3, 2)
    (h_a,), (h_b,) = _chain([1, 2]), _chain([7, 7])
    a, b, c = pool.allocate(3)
    pool.register(a, h_a)
    pool.register(b, h_b)
    for block in (a, b, c):
        pool.release([block])
    pool.release(pool.lookup([h_a]))  # a was used again: now the most recently freed
    assert pool.allocate(2) == [b, c]
    assert pool.lookup([h_a]) == [a] and pool.lookup([h_b]) == []


def test_register_ignores_a_hash_already_cached_in_another_block():
    pool = BlockPool(4, 2)
    (h,) = _chain([1, 2])
    first, second = pool.allocate(2)
    pool.register(first, h)
    pool.register(second, h)
    assert pool.lookup([h]) == [first]
    assert pool.block_hash[second] is None


def test_register_keeps_the_first_name_of_a_block():
    pool = BlockPool(2, 2)
    h1, h2 = _chain([1, 2])[0], _chain([3, 4])[0]
    (b,) = pool.allocate(1)
    pool.register(b, h1)
    pool.register(b, h2)
    assert pool.lookup([h2]) == []
    assert pool.lookup([h1]) == [b]


def test_prefix_hashes_chain_the_full_blocks_up_to_a_limit():
    tokens = list(range(10))
    assert prefix_hashes(tokens, 4, 5) == _chain([0, 1, 2, 3], [4, 5, 6, 7])  # 2 full blocks
    assert prefix_hashes(tokens, 4, 1) == _chain([0, 1, 2, 3])


def test_peek_counts_cached_leading_blocks_without_taking_references():
    pool = BlockPool(4, 2)
    h = _chain([1, 2], [3, 4], [5, 6])
    blocks = pool.allocate(2)
    for b, hb in zip(blocks, h, strict=False):
        pool.register(b, hb)
    pool.release(blocks)
    assert pool.peek(h) == 2 and pool.peek(h[1:]) == 1 and pool.peek(h[2:]) == 0
    assert pool.num_free == 4 and pool.ref_counts == [0] * 4


def test_without_prefix_caching_nothing_is_ever_found():
    pool = BlockPool(2, 2, enable_prefix_caching=False)
    (h,) = _chain([1, 2])
    (b,) = pool.allocate(1)
    pool.register(b, h)
    assert pool.lookup([h]) == []


def test_hit_counters_add_up():
    pool = BlockPool(2, 2)
    pool.count_hit(100, 96)
    pool.count_hit(10, 0)
    assert (pool.stats.queried_tokens, pool.stats.hit_tokens) == (110, 96)


# -- engine level: every way a request ends gives every block back ---------------------

@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    # 48 blocks of 16 and a 64-token budget: prefills are chunked and preemption is near.
    return LLM(tiny_model, num_kv_blocks=48, max_num_batched_tokens=64)


@pytest.fixture
def engine(llm, assert_idle):
    eng = llm.engine
    assert_idle(eng)  # every test starts from an idle engine...
    yield eng
    for rid in list(eng.requests):  # ...and a failed one does not spoil the next
        eng.abort(rid)


def _run(engine, limit: int = 1000) -> None:
    for _ in range(limit):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("the engine did not finish in time")


def _seq(engine, rid: str, index: int = 0):
    return engine.requests[rid].seqs[index]


def test_blocks_come_back_after_requests_finish(llm, engine, assert_idle, make_prompts):
    prompts = make_prompts([5, 16, 40, 100], VOCAB, 21)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    assert_idle(engine)


def test_blocks_come_back_after_abort_before_any_step(engine, assert_idle, make_prompts):
    (p,) = make_prompts([40], VOCAB, 22)
    engine.add_request("w", p, SamplingParams(max_tokens=8))
    engine.abort("w")
    assert_idle(engine)


def test_blocks_come_back_after_abort_mid_prefill(engine, assert_idle, make_prompts):
    (p,) = make_prompts([300], VOCAB, 23)
    engine.add_request("p", p, SamplingParams(max_tokens=8))
    engine.step()
    seq = _seq(engine, "p")
    assert 0 < seq.num_computed_tokens < 300 and seq.num_output_tokens == 0
    assert engine.pool.num_free < engine.pool.num_blocks
    engine.abort("p")
    assert_idle(engine)


def test_blocks_come_back_after_abort_mid_decode(engine, assert_idle, make_prompts):
    (p,) = make_prompts([50], VOCAB, 24)
    engine.add_request("d", p, SamplingParams(max_tokens=50, ignore_eos=True))
    while _seq(engine, "d").num_output_tokens < 5:
        engine.step()
    engine.abort("d")
    assert_idle(engine)


def test_blocks_come_back_after_aborting_a_waiting_request_while_others_run(
        engine, assert_idle, make_prompts):
    long, short = make_prompts([300, 20], VOCAB, 25)
    engine.add_request("long", long, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("short", short, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # the long prompt's first chunk takes the whole 64-token budget
    assert _seq(engine, "short").status is SequenceStatus.WAITING
    engine.abort("short")
    assert _seq(engine, "long").status is SequenceStatus.RUNNING
    _run(engine)
    assert_idle(engine)


@pytest.fixture
def remote(engine):
    """The engine with a real tcp receiver attached, as a decode pod has."""
    receiver = make_receiver("tcp", engine.kv_memory)
    engine.attach_kv_receiver(receiver)
    yield engine
    receiver.close()


def test_blocks_come_back_after_aborting_a_request_awaiting_remote_kv(
        remote, assert_idle, make_prompts):
    engine = remote
    (p,) = make_prompts([100], VOCAB, 26)
    plan = engine.reserve_remote("remote", p, SamplingParams(max_tokens=8), timeout_s=30)
    assert len(plan.block_ids) == 7 and engine.pool.num_free == engine.pool.num_blocks - 7
    assert _seq(engine, "remote").status is SequenceStatus.WAITING_FOR_REMOTE_KV
    engine.abort("remote")
    assert plan.transfer.finished()  # cancelled: nothing can land in the blocks any more
    assert_idle(engine)
    engine.complete_remote("remote", [1], [None])  # a late prefill result is ignored
    assert_idle(engine)


def test_a_remote_request_whose_kv_misses_its_deadline_is_ended_and_freed(
        remote, assert_idle, make_prompts):
    engine = remote
    (p,) = make_prompts([40], VOCAB, 33)
    plan = engine.reserve_remote("late", p, SamplingParams(max_tokens=8), timeout_s=0.05)
    assert not engine.has_work()  # waiting for KV is not work a step could do
    assert engine.housekeeping() == []
    time.sleep(0.1)
    assert engine.housekeeping() == ["late"]
    assert plan.transfer.finished() and "late" not in engine.requests
    assert_idle(engine)


def test_reserving_more_blocks_than_are_free_is_refused_without_holding_any(
        remote, assert_idle, make_prompts):
    engine = remote
    (p,) = make_prompts([700], VOCAB, 27)  # 44 blocks; two of these do not fit in 48
    engine.reserve_remote("one", p, SamplingParams(max_tokens=1), timeout_s=30)
    with pytest.raises(CapacityError):
        engine.reserve_remote("two", [*p, 1], SamplingParams(max_tokens=1), timeout_s=30)
    assert "two" not in engine.requests
    engine.abort("one")
    assert_idle(engine)


def test_a_remote_prompt_reserves_only_what_its_prefix_cache_lacks(
        remote, assert_idle, make_prompts):
    engine = remote
    (p,) = make_prompts([100], VOCAB, 34)
    engine.add_request("local", p, SamplingParams(max_tokens=1))
    _run(engine)  # the prompt's 6 full blocks are now in the prefix cache
    turn2 = p + make_prompts([50], VOCAB, 35)[0]
    plan = engine.reserve_remote("turn2", turn2, SamplingParams(max_tokens=4), timeout_s=30)
    # 150 tokens = 10 blocks; the first 6 are cached here and are not asked for
    assert plan.first_block == 6 and len(plan.block_ids) == 4
    seq = _seq(engine, "turn2")
    assert seq.block_ids[6:] == list(plan.block_ids)
    engine.abort("turn2")
    assert_idle(engine)


def test_blocks_come_back_after_a_remote_request_finishes(remote, assert_idle, make_prompts):
    engine = remote
    (p,) = make_prompts([33], VOCAB, 28)
    engine.reserve_remote("remote", p, SamplingParams(n=2, max_tokens=6, ignore_eos=True),
                          timeout_s=30)
    engine.complete_remote("remote", [5, 6], [None, None])
    _run(engine)
    assert_idle(engine)


def test_blocks_come_back_after_preemption(tiny_model, assert_idle, make_prompts):
    llm = LLM(tiny_model, num_kv_blocks=12, max_num_batched_tokens=64)
    prompts = make_prompts([60, 70, 80, 90], VOCAB, 29)
    out = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    assert all(len(r.outputs[0].token_ids) == 40 for r in out)
    assert_idle(llm.engine)


def test_blocks_come_back_after_aborting_a_preempted_request(tiny_model, assert_idle,
                                                             make_prompts):
    llm = LLM(tiny_model, num_kv_blocks=12, max_num_batched_tokens=256)
    engine = llm.engine
    prompts = make_prompts([60, 70, 80], VOCAB, 30)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(200):
        engine.step()
        victims = [s for s in engine.scheduler.waiting if s.num_output_tokens > 0]
        if victims:
            break
    else:
        pytest.fail("no request was preempted")
    engine.abort(victims[0].request_id)
    for rid in list(engine.requests):
        engine.abort(rid)
    assert_idle(engine)


def test_n_forks_share_prompt_blocks_and_copy_the_partial_one_on_write(
        engine, assert_idle, make_prompts):
    (p,) = make_prompts([20], VOCAB, 31)  # block 0 full, block 1 holds 4 prompt tokens
    engine.add_request("fork", p, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8,
                                                  ignore_eos=True))
    engine.step()  # prefill; three first tokens sampled from the same logits
    seqs = engine.requests["fork"].seqs
    assert len(seqs) == 3 and all(s.block_ids == seqs[0].block_ids for s in seqs)
    full, partial = seqs[0].block_ids
    assert engine.pool.ref_counts[full] == engine.pool.ref_counts[partial] == 3

    engine.step()  # each writes its first token into block 1: copy on write
    lasts = [s.block_ids[1] for s in seqs]
    assert all(s.block_ids[0] == full for s in seqs) and engine.pool.ref_counts[full] == 3
    assert len(set(lasts)) == 3 and all(engine.pool.ref_counts[b] == 1 for b in lasts)
    for cache in engine.runner.kv_caches:  # the copies carry the prompt's 4 tokens of KV
        for b in lasts:
            assert torch.equal(cache[:, b, :4], cache[:, lasts[0], :4])
    _run(engine)
    assert_idle(engine)


def test_blocks_come_back_after_aborting_forked_sequences_mid_decode(
        engine, assert_idle, make_prompts):
    (p,) = make_prompts([40], VOCAB, 32)
    engine.add_request("fork", p, SamplingParams(n=4, temperature=1.0, max_tokens=30,
                                                  ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert len(engine.requests["fork"].seqs) == 4
    engine.abort("fork")
    assert_idle(engine)


def test_blocks_come_back_after_forks_are_preempted(tiny_model, assert_idle, make_prompts):
    llm = LLM(tiny_model, num_kv_blocks=10, max_num_batched_tokens=64)
    (p,) = make_prompts([40], VOCAB, 33)
    out = llm.generate([p], SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=60,
                                           ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [len(o.token_ids) for o in out[0].outputs] == [60] * 4
    assert_idle(llm.engine)


def test_blocks_come_back_when_a_stop_string_ends_sequences_early(
        llm, engine, assert_idle, make_prompts):
    (p,) = make_prompts([30], VOCAB, 34)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    text = llm.generate([p], greedy)[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    params = SamplingParams(n=2, temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop])
    outs = llm.generate([p], params)[0].outputs
    assert [o.finish_reason for o in outs] == ["stop", "stop"]
    assert_idle(engine)


def test_cached_prefix_blocks_are_reused_after_being_freed_and_freed_again(
        llm, engine, assert_idle, make_prompts):
    (p,) = make_prompts([64], VOCAB, 35)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    first = llm.generate([p], params)[0]
    assert_idle(engine)
    assert engine.cached_prefix_tokens(p) == 48  # a peek: nothing is held
    assert_idle(engine)
    second = llm.generate([p], params)[0]
    assert second.num_cached_tokens == 48
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert_idle(engine)


def test_prefix_counters_count_each_prompt_once_even_when_preempted_mid_prefill(
        tiny_model, make_prompts):
    # A tight pool and a small budget preempt prompts before their first token; their
    # re-admission must not count them again, nor their own freed blocks as prefix hits.
    llm = LLM(tiny_model, num_kv_blocks=30, max_num_batched_tokens=32)
    prompts = make_prompts([1, 3, 15, 16, 17, 40, 64, 129, 250, 310], VOCAB, 36)
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64,
                                                   ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    stats = llm.engine.pool.stats
    cached = [r.num_cached_tokens for r in results]
    # the prompts share no prefix: nothing was served from the cache
    assert (stats.queried_tokens, stats.hit_tokens, cached) == (
        sum(len(p) for p in prompts), 0, [0] * len(prompts))


def test_a_freed_sequence_comes_back_as_one_ascending_run():
    """Released tail first (for eviction), its blocks still go out in ascending order, so
    the next prompt of that size holds one run of consecutive ids (one KV descriptor)."""
    pool = BlockPool(16, 2)
    pool.allocate(3)  # 0..2 stay in use
    seq = pool.allocate(5)
    assert seq == [3, 4, 5, 6, 7]
    pool.release(seq)  # the free list now ends ..., 7, 6, 5, 4, 3
    pool.allocate(8)  # the never-used blocks 8..15 go first (least recently freed)
    assert pool.allocate(5) == [3, 4, 5, 6, 7]
