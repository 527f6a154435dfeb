"""Routing policies: which decode pod and which prefill pod serve a request.

A policy sees the request (its prompt's token ids, and the decode pods already tried) and
the pools' current members; prefix-aware routing is a policy that also looks at the
prompt. ``LeastLoaded`` is the default (DESIGN.md, "One request, end to end"):
- decode: fewest requests (running + waiting), then most free KV blocks;
- prefill: fewest outstanding prefill tokens.
A report is up to one poll old, so the pools add what the router sent to a pod since that
poll began; equal scores rotate, so a burst between two polls spreads over the pool.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from engine.prefix_hash import chain_seed, chunk_hashes
from router.errors import APIError
from router.pools import Pod, Pools
from router.prefix_policy import PodView, PrefixPolicy, PrefixPolicyConfig


@dataclass(slots=True, frozen=True)
class RouteRequest:
    """What a routing decision sees of one request (one prompt of it)."""

    prompt_token_ids: Sequence[int] = ()
    exclude: frozenset[str] = frozenset()  # decode pods already tried for this request
    cache_salt: str | None = None  # the request's tenant salt: part of its prefix hashes


def no_decode_pod() -> APIError:
    return APIError(503, "no healthy decode pod is available", "server_overloaded",
                    code="no_decode_pod")


class RoutingPolicy(ABC):
    def __init__(self, pools: Pools) -> None:
        self.pools = pools

    @abstractmethod
    def pick_decode(self, request: RouteRequest) -> Pod:
        """A usable decode pod not in ``request.exclude``; APIError 503 if there is none."""

    @abstractmethod
    def pick_prefill(self, request: RouteRequest) -> Pod | None:
        """A usable prefill pod, or None: the decode pod then prefills locally."""


class LeastLoaded(RoutingPolicy):
    def __init__(self, pools: Pools) -> None:
        super().__init__(pools)
        # rotate ties between equally loaded pods, one turn per pool (one shared counter
        # advanced twice per request always landed on the same pod of a pair)
        self._turns = {"decode": 0, "prefill": 0}

    def _rotated(self, pods: list[Pod], pool: str) -> list[Pod]:
        self._turns[pool] += 1
        k = self._turns[pool] % len(pods) if pods else 0
        return pods[k:] + pods[:k]

    def pick_decode(self, request: RouteRequest) -> Pod:
        candidates = [p for p in self.pools.decode
                      if p.usable and p.address not in request.exclude]
        if not candidates:
            raise no_decode_pod()
        return min(self._rotated(candidates, "decode"), key=Pod.decode_score)

    def pick_prefill(self, request: RouteRequest) -> Pod | None:
        candidates = [p for p in self.pools.prefill if p.usable]
        if not candidates:
            return None
        return min(self._rotated(candidates, "prefill"), key=Pod.prefill_score)


ROUTINGS = ("prefix", "least-loaded")
# Prefill pods are ranked by outstanding prompt tokens, not requests: SGLang's 64-request
# imbalance bound becomes about 8 long prompts' worth of tokens.
PREFILL_BALANCE_ABS_TOKENS = 16384.0


class PrefixAware(LeastLoaded):
    """Prefix-aware routing (router/prefix_policy.py's rule) for prefill pods, and for decode
    pods too (they cache the prompts they decode, and prefill the short ones themselves).

    The router hashes each prompt's 256-token chunks exactly as the pods and the KV tier do
    (engine/prefix_hash.py: token ids, cache_salt, the model id, the pods' block size) and
    learns from its own decisions which pod was sent which chunks."""

    def __init__(self, pools: Pools, model_id: str, default_block_size: int = 16) -> None:
        super().__init__(pools)
        self.model_id = model_id
        self.default_block_size = default_block_size
        self.prefill = PrefixPolicy(PrefixPolicyConfig(balance_abs=PREFILL_BALANCE_ABS_TOKENS))
        self.decode = PrefixPolicy()
        pools.on_leave.append(self._forget)

    def _forget(self, pod: Pod) -> None:
        self.prefill.forget(pod.address)
        self.decode.forget(pod.address)

    def _block_size(self) -> int:
        for p in self.pools.members:
            if p.report is not None and p.report.block_size > 0:
                return int(p.report.block_size)
        return self.default_block_size

    def _chunks(self, request: RouteRequest) -> list[bytes]:
        try:
            return chunk_hashes(request.prompt_token_ids, self._block_size(),
                                chain_seed(self.model_id, request.cache_salt))
        except ValueError:  # a block size that does not divide a chunk: no prefix routing
            return []

    def pick_decode(self, request: RouteRequest) -> Pod:
        candidates = [p for p in self.pools.decode
                      if p.usable and p.address not in request.exclude]
        if not candidates:
            raise no_decode_pod()
        hashes = self._chunks(request)
        if not hashes:  # shorter than a chunk: nothing to find anywhere, spread the load
            return super().pick_decode(request)
        views = [PodView(p.address, float(p.decode_score()[0])) for p in candidates]
        chosen = self.decode.choose(views, hashes)
        self.decode.record(chosen, hashes)
        return next(p for p in candidates if p.address == chosen.key)

    def pick_prefill(self, request: RouteRequest) -> Pod | None:
        candidates = [p for p in self.pools.prefill if p.usable]
        if not candidates:
            return None
        hashes = self._chunks(request)
        if not hashes:
            return super().pick_prefill(request)
        views = [PodView(p.address, float(p.prefill_score())) for p in candidates]
        chosen = self.prefill.choose(views, hashes)
        self.prefill.record(chosen, hashes)
        return next(p for p in candidates if p.address == chosen.key)


def make_policy(name: str, pools: Pools, model_id: str) -> RoutingPolicy:
    if name == "least-loaded":
        return LeastLoaded(pools)
    if name == "prefix":
        return PrefixAware(pools, model_id)
    raise ValueError(f"unknown routing policy {name!r}; choose from {', '.join(ROUTINGS)}")
