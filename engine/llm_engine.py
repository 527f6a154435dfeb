"""LLMEngine: the single-threaded engine core every role runs.

It owns the requests, the scheduler, the block pool and the model runner. ``step()`` runs
one forward over a continuous batch and returns what each request gained. Colocated serving
and the offline LLM use add_request; a decode pod uses reserve_remote/complete_remote (a
prefill pod fills the reserved blocks); a prefill pod uses add_request(prefill_only=True)
with a KV sink that receives each layer's blocks as soon as that layer is computed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import torch

from engine.block_pool import BlockPool, prefix_hashes
from engine.config import ModelConfig
from engine.errors import CapacityError, InvalidRequestError
from engine.kv_layout import DTYPES, KVLayout, num_blocks_for
from engine.model_runner import ModelRunner
from engine.sampler import sample
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob

log = logging.getLogger(__name__)

# A prefill pod's sink: (layer index, that layer's KV cache tensor, the request's block ids).
KVSink = Callable[[int, torch.Tensor, list[int]], None]


@dataclass(slots=True)
class EngineArgs:
    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: fill kv_cache_memory_bytes (or the GPU)
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # capture decode steps on CUDA
    seed: int = 0  # for requests without a seed of their own


    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise InvalidRequestError(f"engine argument {name}: {why}", param=name)

        if self.dtype not in DTYPES:
            bad("dtype", f"{self.dtype!r} is not one of {sorted(DTYPES)}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            bad("num_kv_blocks", "must be at least 1 (or None to size it from memory)")
        if self.max_model_len is not None and self.max_model_len < 2:
            bad("max_model_len", "must be at least 2")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad("gpu_memory_utilization", "must be in (0, 1]")


@dataclass(slots=True)
class SequenceDelta:
    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None


@dataclass(slots=True)
class RequestOutput:
    """What one step added to a request."""

    request_id: str
    deltas: list[SequenceDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass(slots=True)
class Request:
    request_id: str
    params: SamplingParams
    seqs: list[Sequence]
    kv_sink: KVSink | None = None
    pending: dict[int, SequenceDelta] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, model_dir: str | Path, args: EngineArgs | None = None,
                 show_progress: bool = False) -> None:
        self.args = args = args or EngineArgs()
        args.validate()
        self.model_dir = Path(model_dir)
        self.config = ModelConfig.from_dir(self.model_dir)
        self.max_model_len = self._max_model_len()
        self.runner = ModelRunner(
            self.config, self.model_dir, args.device, args.dtype, args.block_size,
            self.max_model_len, args.num_kv_blocks, args.kv_cache_memory_bytes,
            args.gpu_memory_utilization, show_progress, args.max_num_seqs, args.cuda_graphs)
        # One sequence must always fit alone, or preemption could never make progress.
        self.max_model_len = min(self.max_model_len, self.runner.num_blocks * args.block_size)
        self.pool = BlockPool(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, args.max_num_seqs, args.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._seq_ids = count()
        self._rng = random.Random(args.seed)
        self.num_steps = 0

    @property
    def layout(self) -> KVLayout:
        return self.runner.layout

    @property
    def eos_token_ids(self) -> list[int]:
        return self.config.eos_token_ids

    def _max_model_len(self) -> int:
        limit = self.config.max_position_embeddings
        if self.config.sliding_window:  # sliding-window attention is not implemented:
            limit = min(limit, self.config.sliding_window)  # stay within the window
        if self.args.max_model_len is not None:
            if self.args.max_model_len > limit:
                raise InvalidRequestError(
                    f"max_model_len {self.args.max_model_len} exceeds the model's {limit}")
            limit = self.args.max_model_len
        return limit

    # -- requests ---------------------------------------------------------------------

    def _new_request(self, request_id: str, prompt: list[int], params: SamplingParams,
                     prefill_only: bool) -> Request:
        if request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        params.validate()
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens; this model's context is "
                f"{self.max_model_len} tokens, and at least one must be left to generate",
                param="prompt")
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})",
                                      param="stop_token_ids")
        room = self.max_model_len - len(prompt)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        parent = Sequence(
            seq_id=next(self._seq_ids), request_id=request_id, index=0, params=params,
            seed=seed, token_ids=list(prompt), num_prompt_tokens=len(prompt),
            max_tokens=max_tokens, prefill_only=prefill_only)
        return Request(request_id, params, [parent])

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    *, prefill_only: bool = False, kv_sink: KVSink | None = None) -> None:
        """Queue a request. prefill_only: stop after the first token(s) (a prefill pod);
        kv_sink then receives every layer's KV of the prompt as it is computed."""
        req = self._new_request(request_id, prompt_token_ids, params, prefill_only)
        req.kv_sink = kv_sink
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])

    def reserve_remote(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, seed: int | None = None) -> list[int]:
        """Reserve blocks for a prompt that a prefill pod will fill; returns their ids.
        Raises CapacityError if they cannot be held now (admission control)."""
        req = self._new_request(request_id, prompt_token_ids, params, prefill_only=False)
        seq = req.seqs[0]
        if seed is not None:
            seq.seed = seed
        need = num_blocks_for(len(prompt_token_ids), self.args.block_size)
        if not self.pool.can_allocate(need):
            raise CapacityError(f"the prompt needs {need} KV blocks; {self.pool.num_free} free")
        seq.block_ids = self.pool.allocate(need)
        seq.status = SequenceStatus.AWAITING_KV
        self.requests[request_id] = req
        return list(seq.block_ids)

    def complete_remote(self, request_id: str, first_tokens: list[int],
                        first_logprobs: list[TokenLogprob | None],
                        num_cached_tokens: int = 0) -> None:
        """The prefill pod filled the reserved blocks (``num_cached_tokens`` of them from its
        caches) and sampled each sequence's first token: the request joins the batch."""
        req = self.requests.get(request_id)
        if req is None:
            return  # aborted meanwhile; its blocks are already back
        parent = req.seqs[0]
        parent.num_computed_tokens = parent.num_prompt_tokens
        parent.num_cached_tokens = num_cached_tokens
        parent.admitted = True
        self.scheduler.register_full_blocks(parent)
        self._fork(req)
        for seq, tok, lp in zip(req.seqs, first_tokens, first_logprobs):
            self._append(req, seq, tok, lp)
            if not seq.is_finished:
                self.scheduler.add_running(seq)

    def cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int:
        """Prompt tokens this engine's prefix cache holds now (a peek: nothing reserved)."""
        bs = self.args.block_size
        hashes = prefix_hashes(prompt_token_ids, bs, (len(prompt_token_ids) - 1) // bs)
        return self.pool.peek(hashes) * bs

    def seed_of(self, request_id: str) -> int:
        return self.requests[request_id].seqs[0].seed

    def abort(self, request_id: str) -> None:
        """Stop a request and free every block it holds (finished, running or waiting)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq, FinishReason.ABORT)

    def abort_sequence(self, request_id: str, index: int) -> None:
        """End one of a request's sequences early (a stop string seen in its text)."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if seq.index == index and not seq.is_finished:
                self._finish(seq, FinishReason.STOP)
        if req.finished:
            del self.requests[request_id]

    def has_work(self) -> bool:
        """True while a step would compute something or report something."""
        return self.scheduler.has_work() or any(r.pending for r in self.requests.values())

    # -- the step ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return self.collect_outputs()  # e.g. a remote prefill whose first token ended it
        self.num_steps += 1
        logits, row_seq = self.runner.execute(batch, self._kv_hook(batch))
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.scheduler.register_full_blocks(seq)
        to_sample: list[Sequence] = []
        rows: list[int] = []
        for row, j in enumerate(row_seq):
            seq = batch.seqs[j]
            req = self.requests[seq.request_id]
            if seq.num_output_tokens == 0 and req.params.n > 1 and len(req.seqs) == 1:
                # n > 1: each sequence samples its own first token from the prompt's logits
                if seq.prefill_only:  # nothing decodes here: children need no blocks
                    children = [self._child(seq, i) for i in range(1, req.params.n)]
                    for child in children:
                        child.block_ids, child.block_hashes = [], []
                    req.seqs += children
                else:
                    self._fork(req)
                for s in req.seqs:
                    to_sample.append(s)
                    rows.append(row)
            else:
                to_sample.append(seq)
                rows.append(row)
        if to_sample:
            picked = logits.index_select(0, torch.tensor(rows, device=logits.device))
            for seq, (tok, lp) in zip(to_sample, sample(picked, to_sample, self.eos_token_ids)):
                self._append(self.requests[seq.request_id], seq, tok, lp)
        return self.collect_outputs()

    def _kv_hook(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """For prefill-only requests whose prompt completes in this step: after each layer's
        KV write, hand that layer's blocks of the whole prompt to the request's sink."""
        sinks = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            sink = self.requests[seq.request_id].kv_sink
            if sink is not None and seq.num_computed_tokens + n == seq.num_tokens:
                blocks = seq.block_ids[:num_blocks_for(seq.num_tokens, self.args.block_size)]
                sinks.append((seq.request_id, sink, blocks))
        if not sinks:
            return None

        def hook(layer: int) -> None:
            cache = self.runner.kv_caches[layer]
            for request_id, sink, blocks in sinks:
                try:
                    sink(layer, cache, blocks)
                except Exception:  # the transfer then fails alone; the batch goes on
                    log.exception("KV sink of %s failed at layer %d", request_id, layer)

        return hook

    def _child(self, parent: Sequence, index: int) -> Sequence:
        return Sequence(
            seq_id=next(self._seq_ids), request_id=parent.request_id, index=index,
            params=parent.params, seed=parent.seed, token_ids=list(parent.token_ids),
            num_prompt_tokens=parent.num_prompt_tokens, max_tokens=parent.max_tokens,
            status=parent.status, num_computed_tokens=parent.num_computed_tokens,
            num_cached_tokens=parent.num_cached_tokens, admitted=True,
            block_ids=list(parent.block_ids),
            block_hashes=list(parent.block_hashes), prefill_only=parent.prefill_only)

    def _fork(self, req: Request) -> None:
        """Children share every prompt block (ref counts); the scheduler copies the shared
        last block on the first write (copy on write)."""
        parent = req.seqs[0]
        for i in range(1, req.params.n):
            child = self._child(parent, i)
            self.pool.share(child.block_ids)
            req.seqs.append(child)
            if parent.status is SequenceStatus.RUNNING:
                self.scheduler.add_running(child)

    def _append(self, req: Request, seq: Sequence, token: int, lp: TokenLogprob | None) -> None:
        seq.token_ids.append(token)
        delta = req.pending.setdefault(seq.index, SequenceDelta(seq.index, [], [], None))
        delta.token_ids.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
            delta.logprobs.append(lp)
        p = seq.params
        reason = None
        if seq.num_output_tokens >= p.min_tokens and (
                token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            reason = FinishReason.STOP
        elif seq.num_output_tokens >= seq.max_tokens:
            reason = FinishReason.LENGTH
        elif seq.prefill_only:
            reason = FinishReason.LENGTH  # a prefill pod's part ends with the first token
        if reason is not None:
            self._finish(seq, reason)
            delta.finish_reason = reason

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        if seq.status is SequenceStatus.AWAITING_KV:
            self.pool.release(seq.block_ids)
            seq.block_ids = []
            seq.status = SequenceStatus.FINISHED
        else:
            self.scheduler.finish(seq)

    def collect_outputs(self) -> list[RequestOutput]:
        """What requests gained since the last call (step() calls it too)."""
        outputs = []
        for req in list(self.requests.values()):
            if not req.pending:
                continue
            parent = req.seqs[0]
            outputs.append(RequestOutput(
                req.request_id, [req.pending[i] for i in sorted(req.pending)], req.finished,
                parent.num_prompt_tokens, parent.num_cached_tokens))
            req.pending = {}
            if req.finished:
                del self.requests[req.request_id]
        return outputs
