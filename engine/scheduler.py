"""Scheduler: continuous batching over the block pool.

Each step it fills a token budget: running sequences first (a decode token each, or their
next prefill chunk), then waiting ones in arrival order while blocks and budget last
(admission by free blocks; chunked prefill). When a running sequence cannot get a block,
the newest running sequence is preempted by recompute: its blocks are freed and it waits
again at the head of the queue, keeping the tokens it already generated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_pool import BlockPool, hash_block, prefix_hashes
from engine.kv_layout import num_blocks_for
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # (src, dst) block copies to run before the forward: copy-on-write of a shared last block
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose blocks are already filled (remote prefill, or a fork)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._ensure_blocks(seq, n, batch):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            # seq itself was preempted: it is no longer in running[i]
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_computed_tokens == 0 and not seq.block_ids:
                self._take_prefix_hits(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._ensure_blocks(seq, n, batch):
                self._release_blocks(seq)
                break
            self.waiting.popleft()
            if not seq.admitted:  # first admission: count the prompt's hits once
                seq.admitted = True
                seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
                self.pool.count_hit(seq.num_prompt_tokens, seq.num_cached_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release_blocks(seq)
        seq.status = SequenceStatus.FINISHED

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: name every block that is now full and computed."""
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        for b in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = hash_block(parent, seq.token_ids[b * bs:(b + 1) * bs])
            seq.block_hashes.append(h)
            self.pool.register(seq.block_ids[b], h)

    # -- internals -------------------------------------------------------------------

    def _take_prefix_hits(self, seq: Sequence) -> None:
        bs = self.block_size
        # Leave at least one token to compute: its logits give the next token.
        hashes = prefix_hashes(seq.token_ids, bs, (seq.num_tokens - 1) // bs)
        hit = self.pool.lookup(hashes)
        seq.block_ids = hit
        seq.block_hashes = hashes[: len(hit)]
        seq.num_computed_tokens = len(hit) * bs

    def _ensure_blocks(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Give ``seq`` blocks for ``n`` more tokens; False if the pool is short."""
        bs = self.block_size
        need = num_blocks_for(seq.num_computed_tokens + n, bs) - len(seq.block_ids)
        cow = (seq.num_computed_tokens % bs != 0
               and self.pool.ref_counts[seq.block_ids[seq.num_computed_tokens // bs]] > 1)
        if not self.pool.can_allocate(need + int(cow)):
            return False
        if cow:  # the partly filled block is shared with a sibling: copy it before writing
            idx = seq.num_computed_tokens // bs
            old = seq.block_ids[idx]
            new = self.pool.allocate(1)[0]
            batch.block_copies.append((old, new))
            self.pool.release([old])
            seq.block_ids[idx] = new
        if need > 0:
            seq.block_ids.extend(self.pool.allocate(need))
        return True

    def _release_blocks(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.pool.release(seq.block_ids)
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self._release_blocks(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1
