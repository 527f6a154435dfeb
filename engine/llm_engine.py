"""LLMEngine: the single-threaded engine core every role runs.

It owns the requests, the scheduler, the block pool and the model runner. ``step()`` runs
one forward over a continuous batch and returns what each request gained. Colocated serving
and the offline LLM use add_request. The KV seam (engine/external_kv.py):
- a decode pod attaches its connector's receiver once, then ``reserve_remote`` matches the
  prompt against its prefix cache, reserves the rest and registers the transfer; the request
  waits in WAITING_FOR_REMOTE_KV (with a deadline) until ``complete_remote``;
- a prefill pod uses add_request(prefill_only=True, kv_send=...): after each layer's KV
  write the forward tells the request's outbound transfer "layer i written"; the request's
  blocks stay held until that transfer is finished.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path

from engine import prompt_logprobs
from engine.block_pool import BlockPool, prefix_hashes
from engine.config import ModelConfig
from engine.engine_args import EngineArgs
from engine.errors import (
    DuplicateRequestError,
    EngineStepError,
    InvalidRequestError,
    PdserveError,
)
from engine.external_kv import (
    KVReceiverPort,
    KVSend,
    KVTierPort,
    RemotePlan,
    layer_written_hook,
)
from engine.host_gate import HostGate
from engine.kv_layout import KVLayout, KVMemory, num_blocks_for
from engine.mask_fill import FillSetup
from engine.model_runner import ModelRunner
from engine.prefix_hash import chain_seed
from engine.requests import EngineLimits, Request, RequestOutput, SequenceDelta
from engine.sampler import RowSamplingError, draw_rows, sample_rows
from engine.sampling_params import SamplingParams
from engine.scheduler import BlockHold, ScheduledBatch, Scheduler
from engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob
from engine.step_pipeline import PLACEHOLDER, AllOf, InFlight, StepFence, can_defer
from engine.structured_output import StructuredOutputs
from engine.tier_cache import TierCache

__all__ = ["EngineArgs", "EngineLimits", "LLMEngine", "RequestOutput", "SequenceDelta"]

log = logging.getLogger(__name__)


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
            args.gpu_memory_utilization, show_progress, args.max_num_seqs, args.cuda_graphs,
            args.cpu_threads)
        # One sequence must always fit alone, or preemption could never make progress.
        self.max_model_len = min(self.max_model_len, self.runner.num_blocks * args.block_size)
        self.pool = BlockPool(self.runner.num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, args.max_num_seqs, args.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self._seq_ids = count()
        self._rng = random.Random(args.seed)
        self.structured = StructuredOutputs.for_model(
            self.model_dir, self.config.vocab_size, self.eos_token_ids)
        self.structured.set_fill(FillSetup.for_device(self.runner.device))
        self.num_steps = 0
        self.kv_receiver: KVReceiverPort | None = None
        self.failures: list[tuple[str, PdserveError]] = []  # see take_failures
        self.tier: TierCache | None = None  # the shared KV tier, when the pod has one
        # called once a step's forward is launched, before the engine waits for it
        # (AsyncEngine delivers the previous step's outputs then, on a GPU)
        self.after_launch: Callable[[], None] | None = None
        # async scheduling (engine/step_pipeline.py): the step whose tokens are still on
        # the device, and the device work up to the latest forward
        self.async_scheduling = (args.async_scheduling if args.async_scheduling is not None
                                 else self.runner.device.type == "cuda")
        self._inflight: InFlight | None = None
        self._fence = StepFence()
        # plain rows drawn by the Triton sampler on a GPU (False: the torch path, which
        # bench/structured_bench.py's --sampler torch measures against)
        self.plain_sampler_kernel = True
        if self.async_scheduling:  # the device waits for grammar masks, not this thread
            self.structured.gate = HostGate.for_device(self.runner.device)

    @property
    def layout(self) -> KVLayout:
        return self.runner.layout

    @property
    def kv_memory(self) -> KVMemory:
        """The KV cache, for the connector to register once (engine/external_kv.py)."""
        return self.runner.kv_memory

    @property
    def limits(self) -> EngineLimits:
        layout = self.layout
        return EngineLimits(self.max_model_len, self.args.block_size, self.pool.num_blocks,
                            layout.block_bytes_per_layer * layout.num_layers)

    def attach_kv_receiver(self, receiver: KVReceiverPort) -> None:
        """The decode side's connector: remote prefills register their transfers with it."""
        self.kv_receiver = receiver

    def attach_kv_tier(self, port: KVTierPort, timeout_s: float = 10.0,
                       wake: Callable[[], None] | None = None) -> None:
        """Look prompts up in the shared KV tier before computing them and store their new
        chunks (engine/tier_cache.py); ``wake`` nudges the engine loop when a load is done."""
        self.tier = TierCache(port, self.scheduler, timeout_s, wake)

    def tier_stores_queued(self) -> bool:
        """Whether the last step left chunks for ``flush_tier_stores``."""
        return self.tier is not None and self.tier.stores_queued

    def flush_tier_stores(self) -> None:
        """Hand the chunks the last step completed to the tier (after its outputs went out;
        before the next step can reuse their blocks)."""
        if self.tier is not None:
            self.tier.flush()

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
            raise DuplicateRequestError(f"duplicate request id {request_id!r}",
                                        param="request_id")
        params.validate()
        self.structured.check(params)  # compiles (or finds cached) its grammar: 400 if bad
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
            max_tokens=max_tokens, prefill_only=prefill_only,
            hash_seed=chain_seed(self.layout.model_id, params.cache_salt))
        return Request(request_id, params, [parent])

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    *, prefill_only: bool = False, kv_send: KVSend | None = None) -> None:
        """Queue a request. prefill_only: stop after the first token(s) (a prefill pod);
        kv_send then receives every layer's KV of the prompt as it is computed."""
        req = self._new_request(request_id, prompt_token_ids, params, prefill_only)
        if kv_send is not None:
            total = num_blocks_for(len(prompt_token_ids), self.args.block_size)
            if not 0 <= kv_send.first_block < total:
                raise InvalidRequestError(
                    f"the KV target starts at block {kv_send.first_block}; the prompt has "
                    f"{total} blocks of {self.args.block_size} tokens", param="kv_target")
        req.kv_send = kv_send
        self.requests[request_id] = req
        if self.tier is None or not self.tier.begin(req.seqs[0]):
            self.scheduler.add(req.seqs[0])

    def reserve_remote(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, *, timeout_s: float,
                       seed: int | None = None, transfer_id: str | None = None) -> RemotePlan:
        """Reserve blocks for a prompt whose KV a prefill pod will compute and push: the
        prompt's leading blocks this pod already caches are kept (their KV need not
        travel), the rest are reserved and registered with the attached receiver. The
        request waits for its KV until ``complete_remote`` or ``timeout_s``. The transfer
        is registered as ``transfer_id`` (default: the request id).
        Raises CapacityError if the blocks cannot be held now (admission control)."""
        if self.kv_receiver is None:
            raise InvalidRequestError("this engine has no KV receiver attached")
        req = self._new_request(request_id, prompt_token_ids, params, prefill_only=False)
        seq = req.seqs[0]
        if seed is not None:
            seq.seed = seed
        first_block = self.scheduler.reserve_remote(seq)
        blocks = tuple(seq.block_ids[first_block:])
        try:
            transfer = self.kv_receiver.expect(transfer_id or request_id, blocks)
        except BaseException:
            self.scheduler.finish(seq)
            raise
        self.scheduler.wait_remote(seq, transfer, timeout_s)
        self.requests[request_id] = req
        return RemotePlan(blocks, first_block, seq.seed, transfer)

    def complete_remote(self, request_id: str, first_tokens: list[int],
                        first_logprobs: list[TokenLogprob | None],
                        num_cached_tokens: int = 0) -> None:
        """The prefill pod filled the reserved blocks (``num_cached_tokens`` of the prompt
        it found in its caches) and sampled each sequence's first token: the request joins
        the batch."""
        parent = self.scheduler.admit_remote(request_id)
        if parent is None:
            return  # aborted or expired meanwhile; its blocks are already back
        req = self.requests[request_id]
        parent.num_cached_tokens = num_cached_tokens
        self._fork(req)
        for seq, tok, lp in zip(req.seqs, first_tokens, first_logprobs, strict=False):
            self._append(req, seq, tok, lp)

    def cached_prefix_tokens(self, prompt_token_ids: list[int],
                             cache_salt: str | None = None) -> int:
        """Prompt tokens this engine's prefix cache holds now (a peek: nothing reserved).
        0 for a prompt of ids outside the vocabulary: adding it is what refuses it."""
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            return 0
        bs = self.args.block_size
        hashes = prefix_hashes(prompt_token_ids, bs, (len(prompt_token_ids) - 1) // bs,
                               chain_seed(self.layout.model_id, cache_salt))
        return self.pool.peek(hashes) * bs

    def abort(self, request_id: str) -> None:
        """Stop a request and free every block it holds (finished, running or waiting)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(req, seq, FinishReason.ABORT)

    def abort_sequence(self, request_id: str, index: int) -> None:
        """End one of a request's sequences early (a stop string seen in its text)."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if seq.index == index and not seq.is_finished:
                self._finish(req, seq, FinishReason.STOP)
        if req.finished:
            del self.requests[request_id]

    def has_work(self) -> bool:
        """True while a step would compute something or report something."""
        return (self._inflight is not None or self.scheduler.has_work()
                or any(r.pending for r in self.requests.values()))

    def housekeeping(self) -> list[str]:
        """Between steps: free blocks whose transfers are finished, and end requests whose
        external KV missed its deadline (their blocks are freed once the transfer drains).
        Returns the ids of the requests that expired."""
        self.scheduler.release_drained()
        if self.tier is not None:
            self.tier.poll(time.monotonic())
        expired = []
        for seq in self.scheduler.expired_remote(time.monotonic()):
            expired.append(seq.request_id)
            self.abort(seq.request_id)
        return expired

    # -- the step ---------------------------------------------------------------------

    def step(self, collect: bool = True) -> list[RequestOutput]:
        """One forward over the scheduled batch, then one token per sampling row.

        ``collect=False`` leaves the step's outputs pending for a later ``collect_outputs``
        (an AsyncEngine on a GPU builds them while the next step's forward runs).

        A failure is the failing request's alone: a row that cannot be sampled or advanced
        fails its request; a forward that raises is retried one sequence at a time, so the
        sequence that makes it raise fails and the others go on (``take_failures``)."""
        self.flush_tier_stores()  # before schedule() may hand their blocks out again
        if self._inflight is not None and self._inflight.surely_ending():
            self._resolve()  # no row computed only to be thrown away
        batch = self.scheduler.schedule()
        if not batch.seqs:  # e.g. a remote prefill whose first token ended it
            self._resolve()
            return self.collect_outputs() if collect else []
        self.num_steps += 1
        started = time.monotonic()
        for seq in batch.seqs:
            req = self.requests.get(seq.request_id)
            if req is not None and req.queue_seconds is None:
                req.queue_seconds = started - req.arrived_at
        announced: set[tuple[str, int]] = set()
        try:
            self._forward_and_sample(batch, announced)
        except Exception as exc:
            self._resolve()  # the step before, if its tokens were still on the device
            if len(batch.seqs) == 1:
                self._fail(batch.seqs[0].request_id, exc)
            else:
                log.exception("a step of %d sequences failed: retrying them one at a time",
                              len(batch.seqs))
                for single in batch.one_by_one():
                    if single.seqs[0].is_finished:  # its request failed with a sibling
                        continue
                    try:
                        self._forward_and_sample(single, announced, defer=False)
                    except Exception as one:
                        self._fail(single.seqs[0].request_id, one)
        return self.collect_outputs() if collect else []

    def _forward_and_sample(self, batch: ScheduledBatch, announced: set[tuple[str, int]],
                            defer: bool = True) -> None:
        """Raises only before any sequence advanced (the forward); after it, a row's error
        fails that row's request. With async scheduling the step before may still have its
        tokens on the device: they feed this forward and are resolved once it is launched;
        this step's own tokens may stay there in turn (``defer``)."""
        inflight = self._inflight
        early = not self.structured.fill_after_launch and inflight is None
        masks = self.structured.begin(batch.seqs, batch.num_new_tokens) if early else None
        plp = prompt_logprobs.plan(batch.seqs, batch.num_new_tokens, self.runner.model.logits)
        if self.tier is not None:
            for seq in batch.seqs:
                self.tier.note_scheduled(seq)
        logits, row_seq = self.runner.execute(batch, self._kv_hook(batch, announced),
                                              plp.capture if plp is not None else None,
                                              inflight.feed if inflight is not None else None)
        if self.async_scheduling:  # (else every step waits for its forward anyway)
            self._fence = StepFence.now(self.runner.device)  # after this forward's launch
        if self.after_launch is not None:
            self.after_launch()
        self._resolve()  # the last step's tokens, while this forward runs
        if not early:  # the fill starts under the forward just launched
            masks = self.structured.begin(batch.seqs, batch.num_new_tokens)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=False):
            if seq.is_finished:  # ended by the token just resolved: its row is dropped
                continue
            seq.num_computed_tokens += n
            self.scheduler.register_full_blocks(seq)
            if self.tier is not None:
                self.tier.note_computed(seq)
        to_sample: list[Sequence] = []
        rows: list[int] = []
        forked = False
        for row, j in enumerate(row_seq):
            seq = batch.seqs[j]
            if seq.is_finished:
                continue
            req = self.requests[seq.request_id]
            if seq.num_output_tokens == 0 and req.params.n > 1 and len(req.seqs) == 1:
                # n > 1: each sequence samples its own first token from the prompt's logits
                forked = True
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
        if not to_sample:
            return
        if defer and self.async_scheduling and can_defer(
                to_sample, forked, plp is not None, self.structured.gate is not None):
            try:
                drawn = draw_rows(logits, rows, to_sample, self.eos_token_ids, masks,
                                  self.plain_sampler_kernel)
            except Exception:
                log.exception("sampling %d rows failed: sampling them one at a time",
                              len(to_sample))
            else:
                for seq in to_sample:
                    seq.token_ids.append(PLACEHOLDER)
                self._inflight = InFlight(to_sample, drawn)
                return
        self._append_rows(to_sample, sample_rows(logits, rows, to_sample, self.eos_token_ids,
                                                 masks, self.plain_sampler_kernel))
        if masks is not None:
            self.structured.prefetch(to_sample)  # the next step's masks, from now on

    def _resolve(self) -> None:
        """Append the tokens of the step left on the device, if any (waits for them)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        for seq in inflight.seqs:
            if seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
                seq.token_ids.pop()
        drawn: list[tuple[int, TokenLogprob | None] | Exception]
        try:
            drawn = list(inflight.drawn.result())
        except RowSamplingError as exc:  # NaN rows fail alone; the others' tokens stand
            bad = set(exc.rows)
            tokens = exc.tokens or []
            drawn = [exc if i in bad else (tokens[i], None) for i in range(len(tokens))]
        except Exception as exc:
            drawn = [exc] * len(inflight.seqs)
        self._append_rows(inflight.seqs, drawn)

    def _append_rows(self, seqs: list[Sequence],
                     drawn_rows: list[tuple[int, TokenLogprob | None] | Exception]) -> None:
        for seq, drawn in zip(seqs, drawn_rows, strict=True):
            owner = self.requests.get(seq.request_id)
            if owner is None or seq.is_finished:
                continue  # its request failed at an earlier row, or ended meanwhile
            try:
                if isinstance(drawn, Exception):
                    raise drawn
                self._append(owner, seq, *drawn)
            except Exception as exc:
                self._fail(seq.request_id, exc)

    def _fail(self, request_id: str, exc: Exception) -> None:
        """End a request whose computation raised, freeing its blocks; its caller learns why
        through ``take_failures``."""
        if request_id not in self.requests:
            return
        log.error("request %s failed in the engine: %r", request_id, exc)
        self.abort(request_id)
        self.failures.append((request_id, exc if isinstance(exc, PdserveError) else
                              EngineStepError(f"request {request_id} could not be computed "
                                              "(the pod's log says why)")))

    def take_failures(self) -> list[tuple[str, PdserveError]]:
        """Requests the engine failed since the last call, each with its error."""
        failed, self.failures = self.failures, []
        return failed

    def _kv_hook(self, batch: ScheduledBatch, announced: set[tuple[str, int]]
                 ) -> Callable[[int], None] | None:
        """For prefill-only requests whose prompt completes in this step: after each layer's
        KV write, tell the request's outbound transfer which of its blocks hold that layer
        now (the whole prompt's, from the first block the receiver lacks). ``announced``:
        (request, layer) pairs told already this step -- a retried forward tells none twice."""
        sends = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=False):
            send = self.requests[seq.request_id].kv_send
            if send is not None and seq.num_computed_tokens + n == seq.num_tokens:
                last = num_blocks_for(seq.num_tokens, self.args.block_size)
                sends.append((seq.request_id, send, seq.block_ids[send.first_block:last]))
        if not sends:
            return None
        return layer_written_hook(sends, self.runner.device.type == "cuda", announced)

    def _child(self, parent: Sequence, index: int) -> Sequence:
        return Sequence(
            seq_id=next(self._seq_ids), request_id=parent.request_id, index=index,
            params=parent.params, seed=parent.seed, token_ids=list(parent.token_ids),
            num_prompt_tokens=parent.num_prompt_tokens, max_tokens=parent.max_tokens,
            status=parent.status, num_computed_tokens=parent.num_computed_tokens,
            num_cached_tokens=parent.num_cached_tokens, admitted=True,
            hash_seed=parent.hash_seed, tier_stored=parent.tier_stored,
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
        grammar_done = self.structured.advance(seq, token)
        delta = req.pending.setdefault(seq.index, SequenceDelta(seq.index, [], [], None))
        delta.token_ids.append(token)
        if lp is not None:
            seq.logprobs.append(lp)
            delta.logprobs.append(lp)
        p = seq.params
        reason = None
        if grammar_done or (seq.num_output_tokens >= p.min_tokens and (
                token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids))):
            reason = FinishReason.STOP
        elif seq.num_output_tokens >= seq.max_tokens:
            reason = FinishReason.LENGTH
        elif seq.prefill_only:
            reason = FinishReason.LENGTH  # a prefill pod's part ends with the first token
        if reason is not None:
            self._finish(req, seq, reason)
            delta.finish_reason = reason

    def _finish(self, req: Request, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        send = req.kv_send
        if send is not None and reason is FinishReason.ABORT:
            send.transfer.cancel()
        if self.tier is not None:
            self.tier.drop(seq)
        # A prefill pod's blocks stay held while its connector may still read them, and
        # any sequence's while a launched forward may still use them (async scheduling:
        # another stream -- a connector's receive, the KV tier -- must not write them first).
        hold: BlockHold | None = send.transfer if send is not None else None
        if not self._fence.finished():
            hold = self._fence if hold is None else AllOf(hold, self._fence)
        self.scheduler.finish(seq, hold=hold)

    def collect_outputs(self) -> list[RequestOutput]:
        """What requests gained since the last call (step() calls it too)."""
        outputs = []
        for req in list(self.requests.values()):
            if not req.pending:
                continue
            parent = req.seqs[0]
            outputs.append(RequestOutput(
                req.request_id, [req.pending[i] for i in sorted(req.pending)], req.finished,
                parent.num_prompt_tokens, parent.num_cached_tokens,
                prompt_logprobs.take(parent), req.queue_seconds or 0.0))
            req.pending = {}
            if req.finished:
                del self.requests[req.request_id]
        return outputs
