"""Scheduler: continuous batching over the block pool.

Each step it fills a token budget: running sequences first (a decode token each, or their
next prefill chunk), then waiting ones in arrival order while blocks and budget last
(admission by free blocks; chunked prefill). When a running sequence cannot get a block,
the newest running sequence is preempted by recompute: its blocks are freed and it waits
again at the head of the queue, keeping the tokens it already generated.

External KV (engine/external_kv.py) is a state here too: a sequence whose prompt KV is on
its way holds its blocks in ``remote`` with a deadline and is never scheduled until it is
admitted; blocks a transfer may still touch wait in ``draining`` until it is finished.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from engine.block_pool import BlockPool, hash_block, prefix_hashes
from engine.errors import CapacityError
from engine.external_kv import TransferHandle
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

    def one_by_one(self) -> list[ScheduledBatch]:
        """This batch as batches of one sequence each, each with its own copy-on-write
        copies (copying a block again is harmless: a sibling still holds its source)."""
        out = []
        for seq, n in zip(self.seqs, self.num_new_tokens, strict=True):
            mine = set(seq.block_ids)
            out.append(ScheduledBatch([seq], [n], [c for c in self.block_copies
                                                   if c[1] in mine]))
        return out


class BlockHold(Protocol):
    """What keeps a finished sequence's blocks from reuse: a transfer (TransferHandle) or
    launched device work (engine.step_pipeline.StepFence)."""

    def finished(self) -> bool: ...


@dataclass(slots=True)
class RemoteWait:
    """A sequence in WAITING_FOR_REMOTE_KV: its blocks are reserved, its KV on its way."""

    seq: Sequence
    transfer: TransferHandle
    deadline: float  # time.monotonic()


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.remote: dict[str, RemoteWait] = {}  # by request id
        # (hold, blocks): blocks kept from reuse until the hold is finished
        self.draining: list[tuple[BlockHold, list[int]]] = []
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
        self.release_drained()
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
            if seq.num_computed_tokens == 0 and not seq.block_ids \
                    and seq.params.prompt_logprobs is None:  # those need every prompt row
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

    def finish(self, seq: Sequence, hold: BlockHold | None = None) -> None:
        """Take ``seq`` out of every queue and free its blocks -- once ``hold`` (a transfer
        reading or writing them, a forward using them) is finished, if one is given."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        wait = self.remote.pop(seq.request_id, None)
        if wait is not None and wait.seq is seq:
            wait.transfer.cancel()
            hold = wait.transfer  # (no forward used a sequence that was never admitted)
        if hold is not None and not hold.finished() and seq.block_ids:
            self.draining.append((hold, seq.block_ids))
            seq.block_ids, seq.block_hashes = [], []
        self._release_blocks(seq)
        seq.status = SequenceStatus.FINISHED

    # -- external KV -----------------------------------------------------------------

    def reserve_remote(self, seq: Sequence) -> int:
        """Give ``seq`` blocks for its whole prompt: its cached prefix from the pool, new
        blocks for the rest. Returns how many leading blocks were cached (their KV need not
        travel). Raises CapacityError, holding nothing, if the pool is short."""
        self._take_prefix_hits(seq)
        cached = len(seq.block_ids)
        need = num_blocks_for(seq.num_tokens, self.block_size) - cached
        if not self.pool.can_allocate(need):
            free = self.pool.num_free
            self._release_blocks(seq)
            raise CapacityError(f"the prompt needs {need} more KV blocks; {free} free")
        seq.block_ids.extend(self.pool.allocate(need))
        self.pool.count_hit(seq.num_prompt_tokens, cached * self.block_size)
        return cached

    def wait_remote(self, seq: Sequence, transfer: TransferHandle, timeout_s: float) -> None:
        """``seq`` holds its blocks (reserve_remote) until admit_remote or the deadline."""
        seq.status = SequenceStatus.WAITING_FOR_REMOTE_KV
        self.remote[seq.request_id] = RemoteWait(seq, transfer, time.monotonic() + timeout_s)

    def admit_remote(self, request_id: str) -> Sequence | None:
        """The KV arrived: the sequence's prompt is computed; it joins the running batch.
        None if it is no longer waiting (aborted or expired meanwhile)."""
        wait = self.remote.pop(request_id, None)
        if wait is None:
            return None
        if not wait.transfer.finished():  # admitted early (a caller's shortcut): no late write
            wait.transfer.cancel()
        seq = wait.seq
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.admitted = True
        self.register_full_blocks(seq)
        self.add_running(seq)
        return seq

    def expired_remote(self, now: float) -> list[Sequence]:
        """Sequences whose KV did not arrive by their deadline (the caller finishes them)."""
        return [w.seq for w in self.remote.values() if w.deadline <= now]

    def release_drained(self) -> None:
        """Free the blocks of transfers that are finished now."""
        if not self.draining:
            return
        still = []
        for hold, blocks in self.draining:
            if hold.finished():
                self.pool.release(blocks)
            else:
                still.append((hold, blocks))
        self.draining = still

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: name every block that is now full and computed."""
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        for b in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = hash_block(parent, seq.token_ids[b * bs:(b + 1) * bs], seq.hash_seed)
            seq.block_hashes.append(h)
            self.pool.register(seq.block_ids[b], h)

    # -- internals -------------------------------------------------------------------

    def _take_prefix_hits(self, seq: Sequence) -> None:
        bs = self.block_size
        # Leave at least one token to compute: its logits give the next token.
        hashes = prefix_hashes(seq.token_ids, bs, (seq.num_tokens - 1) // bs, seq.hash_seed)
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
