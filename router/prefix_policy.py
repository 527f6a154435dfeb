"""Prefix-aware routing: send a prompt to the pod that most likely holds its prefix's KV,
unless that would overload it. (A policy core, not yet wired into router/pools.py.)

The router computes the prompt's chunk hashes itself (``engine.prefix_hash.chunk_hashes``:
token ids, ``cache_salt``, model id, block size -- the very keys the pods and the KV tier
use) and asks ``choose``; once it has sent the request, ``record`` notes that the chosen pod
now holds those chunks.

The rule follows SGLang's cache-aware router:
1. If the load is imbalanced -- ``max - min > balance_abs`` and ``max > balance_rel * min``
   (64 and 1.5 there) -- take the least loaded pod, whatever it caches.
2. Otherwise take the pod with the longest known prefix (ties: the less loaded) if that
   prefix covers more than ``cache_threshold`` (0.3) of the prompt's chunks.
3. Otherwise the prompt is new to every pod: give it to the pod that knows the fewest
   chunks (ties: the less loaded), so that distinct prefixes spread evenly and each pod's
   cache holds its share of them.

What the router knows comes from its own decisions, not from cache events the pods report:
a decision is known the moment it is made (an event stream lags, so a burst of the same new
prompt would scatter over the pods before the first event arrives), it costs no protocol,
no per-block message stream and no state that can drift out of sync after a reconnect, and
SGLang's router works this way. Its blind spot is eviction: a pod may have dropped a prefix
the router still credits to it. The per-pod memory is therefore bounded (LRU, sized to about
what a pod's caches hold), a miss on such a pod costs a reload from the shared KV tier
rather than a recompute, and ``forget`` clears a pod that restarted. Pod-reported events
(as in Dynamo's KV router) can later correct this table through the same ``record`` and
``forget`` without changing the rule.

``load`` is whatever the caller ranks pods by (requests for decode pods; for prefill pods
outstanding prompt tokens, with ``balance_abs`` scaled to match).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PodView:
    key: str  # the pod's identity, e.g. its address
    load: float


@dataclass(frozen=True, slots=True)
class PrefixPolicyConfig:
    balance_abs: float = 64
    balance_rel: float = 1.5
    cache_threshold: float = 0.3
    max_chunks_per_pod: int = 65536  # 16M tokens; about 7 MB of hashes and index per pod

    def __post_init__(self) -> None:
        if self.max_chunks_per_pod < 1 or not 0 <= self.cache_threshold <= 1:
            raise ValueError("max_chunks_per_pod must be positive and cache_threshold in 0..1")


class PrefixPolicy:
    def __init__(self, config: PrefixPolicyConfig | None = None) -> None:
        self.config = config or PrefixPolicyConfig()
        self._known: dict[str, OrderedDict[bytes, None]] = {}

    def known_chunks(self, pod_key: str) -> int:
        return len(self._known.get(pod_key, ()))

    def matched_chunks(self, pod_key: str, chunk_hashes: Sequence[bytes]) -> int:
        """Leading chunks of the prompt the pod is believed to hold."""
        known = self._known.get(pod_key)
        n = 0
        if known:
            while n < len(chunk_hashes) and chunk_hashes[n] in known:
                n += 1
        return n

    def choose(self, pods: Sequence[PodView], chunk_hashes: Sequence[bytes]) -> PodView:
        if not pods:
            raise ValueError("no pod to choose from")
        c = self.config
        loads = [p.load for p in pods]
        lo, hi = min(loads), max(loads)
        if hi - lo > c.balance_abs and hi > c.balance_rel * lo:
            return min(pods, key=lambda p: (p.load, self.known_chunks(p.key)))
        if chunk_hashes:
            matches = {p.key: self.matched_chunks(p.key, chunk_hashes) for p in pods}
            best = max(pods, key=lambda p: (matches[p.key], -p.load))
            if matches[best.key] / len(chunk_hashes) > c.cache_threshold:
                return best
        return min(pods, key=lambda p: (self.known_chunks(p.key), p.load))

    def record(self, pod: PodView | str, chunk_hashes: Sequence[bytes]) -> None:
        """The pod was sent (and will hold) these chunks: remember them, most recent last."""
        key = pod if isinstance(pod, str) else pod.key
        known = self._known.setdefault(key, OrderedDict())
        for h in chunk_hashes:
            known[h] = None
            known.move_to_end(h)
        while len(known) > self.config.max_chunks_per_pod:
            known.popitem(last=False)

    def forget(self, pod: PodView | str) -> None:
        """The pod restarted or left: it holds nothing the router knows of."""
        self._known.pop(pod if isinstance(pod, str) else pod.key, None)
