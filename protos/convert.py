"""The one place where protobuf messages and engine types convert into each other."""

from __future__ import annotations

import grpc

from engine.errors import InvalidRequestError, PdserveError
from engine.llm_engine import EngineLimits
from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprob
from engine.structured_spec import GuideKind, StructuredOutputSpec
from kv_transfer.connector import KVTargetSpec
from kv_transfer.wire import MAX_TRANSFER_ID_BYTES as MAX_TRANSFER_ID_CHARS
from protos import pdserve_pb2 as pb


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty, min_tokens=p.min_tokens,
        stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.max_tokens is not None:
        msg.max_tokens = p.max_tokens
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    if p.prompt_logprobs is not None:
        msg.prompt_logprobs = p.prompt_logprobs
    if p.cache_salt is not None:
        msg.cache_salt = p.cache_salt
    if p.structured_outputs is not None:
        msg.structured_outputs.kind = p.structured_outputs.kind.value
        msg.structured_outputs.value = p.structured_outputs.value
    return msg


def _structured_from_proto(msg: pb.SamplingParams) -> StructuredOutputSpec | None:
    if not msg.HasField("structured_outputs"):
        return None
    try:
        kind = GuideKind(msg.structured_outputs.kind)
    except ValueError:
        raise InvalidRequestError(f"unknown structured output kind "
                                  f"{msg.structured_outputs.kind!r}",
                                  param="structured_outputs") from None
    return StructuredOutputSpec(kind, msg.structured_outputs.value)


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises engine.errors.InvalidRequestError for out-of-range values."""
    return SamplingParams(
        n=msg.n, temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k,
        min_p=msg.min_p, seed=msg.seed if msg.HasField("seed") else None,
        repetition_penalty=msg.repetition_penalty, frequency_penalty=msg.frequency_penalty,
        presence_penalty=msg.presence_penalty,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        min_tokens=msg.min_tokens, stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos, logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        structured_outputs=_structured_from_proto(msg),
        cache_salt=msg.cache_salt if msg.HasField("cache_salt") else None,
    )


def logprobs_to_proto(lp: TokenLogprob) -> pb.Logprobs:
    return pb.Logprobs(chosen=pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob),
                       top=[pb.TokenLogprob(token_id=t, logprob=v) for t, v in lp.top],
                       rank=lp.rank or 0)


def logprobs_from_proto(msg: pb.Logprobs) -> TokenLogprob:
    return TokenLogprob(token_id=msg.chosen.token_id, logprob=msg.chosen.logprob,
                        top=[(t.token_id, t.logprob) for t in msg.top], rank=msg.rank or None)


def prompt_logprobs_to_proto(lps: list[TokenLogprob] | None) -> list[pb.Logprobs]:
    """A RequestOutput's prompt logprobs for GenerateResponse.prompt_logprobs."""
    return [logprobs_to_proto(lp) for lp in lps or []]


def status_of(exc: Exception) -> grpc.StatusCode:
    """The gRPC status of an error: pdserve errors carry theirs; anything else is a bug."""
    if isinstance(exc, PdserveError):
        return getattr(grpc.StatusCode, exc.grpc_code)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def kv_target_to_proto(spec: KVTargetSpec) -> pb.KVTarget:
    return pb.KVTarget(connector=spec.connector, address=spec.address,
                       transfer_id=spec.transfer_id, block_ids=list(spec.block_ids),
                       layout_fingerprint=spec.layout_fingerprint, first_block=spec.first_block)


def check_id(text: str, what: str, param: str) -> None:
    """Request and transfer ids: 1..64 printable ASCII characters, no spaces (the KV wire
    carries a transfer id in 64 bytes; request ids travel between pods and into logs)."""
    if not (0 < len(text) <= MAX_TRANSFER_ID_CHARS and text.isascii() and text.isprintable()
            and " " not in text):
        raise InvalidRequestError(f"{what} must be 1..{MAX_TRANSFER_ID_CHARS} printable ASCII "
                                  "characters without spaces", param=param)


def kv_target_from_proto(msg: pb.KVTarget) -> KVTargetSpec:
    """Raises InvalidRequestError for a target no sender could use (checked before any
    transfer starts, so a bad target fails at once)."""
    if not msg.block_ids:
        raise InvalidRequestError("the KV target names no blocks", param="kv_target")
    if any(b < 0 for b in msg.block_ids) or msg.first_block < 0:
        raise InvalidRequestError("KV target block indices must be non-negative",
                                  param="kv_target")
    tid = msg.transfer_id
    check_id(tid, "the KV transfer id", "kv_target")
    return KVTargetSpec(connector=msg.connector, address=msg.address, transfer_id=tid,
                        block_ids=tuple(msg.block_ids),
                        layout_fingerprint=msg.layout_fingerprint, first_block=msg.first_block)


def limits_to_report(limits: EngineLimits, report: pb.LoadReport) -> None:
    report.max_model_len = limits.max_model_len
    report.block_size = limits.block_size
    report.max_prompt_tokens = limits.max_prompt_tokens
    report.kv_block_bytes = limits.block_bytes
