"""A scripted decode pod: a real gRPC ``Decode`` server whose "model" echoes the prompt.

It speaks protos/pdserve.proto exactly as a decode pod must (first message carries
prompt_tokens and cached_tokens, one delta per sequence per step, finish_reason on each
sequence's last delta, cancellation aborts), so the router's serving path can be tested
before, and independently of, the real engine. The script: sequence i's j-th token is the
prompt's token (i + j) mod len(prompt); it stops on max_tokens, a stop_token_id or eos.
Logprobs are made up but shaped as the contract says.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc

TOTAL_BLOCKS = 100


@dataclass
class Script:
    """Knobs tests turn (on the live server) and what the pod saw."""

    eos_token_id: int
    delay: float = 0.0  # seconds between steps
    load_delay: float = 0.0  # seconds GetLoad takes to answer
    tokens_per_step: int = 1
    fail: grpc.StatusCode | None = None  # refuse Generate with this code
    requests: list[pb.GenerateRequest] = field(default_factory=list)
    cancelled: dict[str, float] = field(default_factory=dict)  # request id -> time.monotonic()
    finished: set[str] = field(default_factory=set)
    running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def token(prompt: list[int], seq: int, j: int) -> int:
    return prompt[(seq + j) % len(prompt)]


def logprobs(prompt: list[int], seq: int, j: int, k: int) -> pb.Logprobs:
    chosen = pb.TokenLogprob(token_id=token(prompt, seq, j), logprob=-0.25 * (seq + 1))
    top = [pb.TokenLogprob(token_id=(chosen.token_id + r) % 256 + 3,
                           logprob=chosen.logprob - r) for r in range(k)]
    return pb.Logprobs(chosen=chosen, top=top)


class ScriptedDecode(pb_grpc.DecodeServicer):
    def __init__(self, script: Script) -> None:
        self.s = script

    def GetLoad(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadReport:
        time.sleep(self.s.load_delay)
        return pb.LoadReport(role="decode", model="scripted", running=self.s.running,
                             free_blocks=TOTAL_BLOCKS - 4 * self.s.running,
                             total_blocks=TOTAL_BLOCKS)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        s = self.s
        with s.lock:
            s.requests.append(request)
            s.running += 1
        done = threading.Event()

        def on_end() -> None:
            with s.lock:
                s.running -= 1
                if not done.is_set():
                    s.cancelled[request.request_id] = time.monotonic()

        context.add_callback(on_end)
        if s.fail is not None:
            done.set()
            context.abort(s.fail, f"scripted failure {s.fail.name}")
        prompt = list(request.prompt_token_ids)
        sp = request.sampling
        n = max(1, sp.n)
        limit = sp.max_tokens if sp.HasField("max_tokens") else 64
        k = sp.logprobs if sp.HasField("logprobs") else None
        made = [0] * n
        finished = [False] * n
        first = True
        while not all(finished):
            outputs = []
            for i in range(n):
                if finished[i]:
                    continue
                delta = pb.SequenceDelta(index=i)
                for _ in range(s.tokens_per_step):
                    tok = token(prompt, i, made[i])
                    delta.token_ids.append(tok)
                    if k is not None:
                        delta.logprobs.append(logprobs(prompt, i, made[i], k))
                    made[i] += 1
                    if tok in sp.stop_token_ids or (tok == s.eos_token_id and not sp.ignore_eos):
                        delta.finish_reason = "stop"
                    elif made[i] >= limit:
                        delta.finish_reason = "length"
                    if delta.finish_reason:
                        finished[i] = True
                        break
                outputs.append(delta)
            msg = pb.GenerateResponse(outputs=outputs)
            if first:
                msg.prompt_tokens, msg.cached_tokens = len(prompt), len(prompt) // 2
                first = False
            if all(finished):
                done.set()  # the stream ends normally with this message
            yield msg
            if not done.is_set() and s.delay:
                time.sleep(s.delay)
            if not context.is_active():
                return
        s.finished.add(request.request_id)


@dataclass
class ScriptedPod:
    address: str
    script: Script
    server: grpc.Server

    def stop(self) -> None:
        self.server.stop(grace=None)


def start_scripted_pod(eos_token_id: int) -> ScriptedPod:
    script = Script(eos_token_id=eos_token_id)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_DecodeServicer_to_server(ScriptedDecode(script), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return ScriptedPod(f"127.0.0.1:{port}", script, server)


class LoadOnlyPrefill(pb_grpc.PrefillServicer):
    """A prefill pod that only reports load (the router never calls Prefill itself)."""

    def __init__(self, outstanding_tokens: int) -> None:
        self.outstanding_tokens = outstanding_tokens

    def GetLoad(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadReport:
        return pb.LoadReport(role="prefill", model="scripted",
                             outstanding_prefill_tokens=self.outstanding_tokens)


def start_load_only_prefill(outstanding_tokens: int = 0) -> tuple[str, grpc.Server]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_PrefillServicer_to_server(LoadOnlyPrefill(outstanding_tokens), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return f"127.0.0.1:{port}", server
