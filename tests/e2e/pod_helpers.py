"""Pods as bare processes (`pdserve prefill` / `pdserve decode`), driven over gRPC: start
one on a free port, stop it (with any signal), generate through a decode pod, read its
free blocks."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from engine.sampling_params import SamplingParams
from protos import pdserve_pb2 as pb
from protos import pdserve_pb2_grpc as pb_grpc
from protos.convert import sampling_to_proto

READY = re.compile(r"ready on (\S+:\d+)")


@dataclass(slots=True)
class Pod:
    proc: subprocess.Popen
    address: str

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_pod(role: str, model_dir: Path, *args: str) -> Pod:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdserve.cli", role, "--model", str(model_dir), "--port", "0",
         "--num-kv-blocks", "256", "--dtype", "float32", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        match = READY.search(line)
        if match:
            return Pod(proc, match.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{role} pod did not start")


def generate_on(decode: Pod, prefill_endpoint: str, prompt: list[int], new_tokens: int,
                timeout: float = 60) -> tuple[list[int], bool]:
    """Greedy Decode.Generate straight to a pod: (tokens, whether it prefilled remotely)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    with grpc.insecure_channel(decode.address) as channel:
        stub = pb_grpc.DecodeStub(channel)
        tokens: list[int] = []
        remote = None
        for msg in stub.Generate(pb.GenerateRequest(
                prompt_token_ids=prompt, sampling=sampling_to_proto(params),
                prefill_endpoint=prefill_endpoint), timeout=timeout):
            if remote is None:
                remote = msg.remote_prefill
            for out in msg.outputs:
                tokens += out.token_ids
    return tokens, bool(remote)


def free_blocks(pod: Pod) -> int:
    with grpc.insecure_channel(pod.address) as channel:
        report = pb_grpc.DecodeStub(channel).GetLoad(pb.LoadRequest(), timeout=5)
    return report.free_blocks
