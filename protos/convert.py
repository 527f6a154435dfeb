"""The one place where protobuf messages and engine types convert into each other."""

from __future__ import annotations

import grpc

from engine.errors import PdserveError
from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprob
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
    return msg


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
    )


def logprobs_to_proto(lp: TokenLogprob) -> pb.Logprobs:
    return pb.Logprobs(chosen=pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob),
                       top=[pb.TokenLogprob(token_id=t, logprob=v) for t, v in lp.top])


def logprobs_from_proto(msg: pb.Logprobs) -> TokenLogprob:
    return TokenLogprob(token_id=msg.chosen.token_id, logprob=msg.chosen.logprob,
                        top=[(t.token_id, t.logprob) for t in msg.top])


def status_of(exc: Exception) -> grpc.StatusCode:
    """The gRPC status of an error: pdserve errors carry theirs; anything else is a bug."""
    if isinstance(exc, PdserveError):
        return getattr(grpc.StatusCode, exc.grpc_code)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL
