"""Helpers for end-to-end tests: a whole ``pdserve up`` system as one subprocess.

``start_stack`` runs ``python -m pdserve.cli up`` exactly as a user would, in its own process
group (``start_new_session``), waits (bounded) for its "pdserve up: ... OpenAI API at URL"
line, and on exit sends SIGTERM to the ``up`` process alone -- stopping every pod is its job,
and the test checks it did: afterwards no process of the group may be left.
Also here: reading ``GET /pools`` and turning the openai client's responses into plain
token ids and text, streamed or not.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from hf_reference import hf_greedy
from ports import free_port

from engine.tokenizer import apply_chat_template

REPO_ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"pdserve up: .*OpenAI API at (http://\S+)/v1")
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
# fp32: the tests compare greedy tokens with transformers run in fp32 (pods default to auto,
# bf16 on CPUs that have it)
POD_ARGS = "--num-kv-blocks 512 --dtype float32"


@dataclass(slots=True)
class Stack:
    """A running ``pdserve up``: its base URL (no /v1) and the served model's name."""

    url: str
    model: str
    model_dir: Path
    proc: subprocess.Popen
    log: Path
    api_key: str = "x"  # what clients send (the stack checks it only if started with one)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0,
                             timeout=60)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key,
                                  max_retries=0, timeout=120)

    def pools(self) -> dict:
        reply = httpx.get(self.url + "/pools", timeout=10,  # needs the key when one is set
                          headers={"Authorization": f"Bearer {self.api_key}"})
        reply.raise_for_status()
        return reply.json()

    def decode_pods(self) -> list[dict]:
        return [p for p in self.pools()["pods"] if p["pool"] == "decode"]

    def decode_free_blocks(self) -> dict[str, int]:
        return {p["address"]: p["free_blocks"] for p in self.decode_pods()}

    def wait_decode_idle(self, timeout: float = 10.0) -> dict[str, int]:
        """Each decode pod's free blocks once nothing runs or waits there."""
        deadline = time.monotonic() + timeout
        while True:
            pods = self.decode_pods()
            if all(p["running"] == 0 and p["waiting"] == 0 for p in pods):
                return {p["address"]: p["free_blocks"] for p in pods}
            assert time.monotonic() < deadline, f"decode pods still busy: {pods}"
            time.sleep(0.1)

    def wait_decode_free(self, expected: dict[str, int], timeout: float) -> dict[str, int]:
        """Poll until every decode pod reports ``expected`` free blocks; the last reading."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.decode_free_blocks()
            if now == expected or time.monotonic() > deadline:
                return now
            time.sleep(0.05)

    def pod_metric(self, pod: dict, name: str, labels: str = "") -> float:
        """One sample of a pod's Prometheus metrics (its /metrics, found via /pools); 0.0
        if the series does not exist yet."""
        host = pod["address"].rsplit(":", 1)[0]
        text = httpx.get(f"http://{host}:{pod['metrics_port']}/metrics", timeout=10).text
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == name + (f"{{{labels}}}" if labels else ""):
                return float(value)
        return 0.0

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _group_members(pgid: int) -> list[str]:
    """'pid command' of every live (non-zombie) process in process group ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # the command name may hold spaces or parentheses: split after its closing one
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(f"{entry.name} {cmd.strip()}")
    return out


def _stop(proc: subprocess.Popen) -> list[str]:
    """SIGTERM ``pdserve up``; return what of its group outlived it (then killed)."""
    pgid = proc.pid  # start_new_session made it the group leader
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            left = _group_members(pgid)
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
            return ["pdserve up ignored SIGTERM", *left]
    deadline = time.monotonic() + 5
    left = _group_members(pgid)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _group_members(pgid)
    if left:
        os.killpg(pgid, signal.SIGKILL)
    return left


@contextmanager
def start_stack(model_dir: Path, log_dir: Path, *args: str, api_key: str | None = None,
                env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Run ``pdserve up --model model_dir --port FREE *args`` (with ``env`` added to this
    process's environment); yield it; stop it, leak-free."""
    port = free_port()
    log = log_dir / f"pdserve-up-{port}.log"
    cmd = [sys.executable, "-m", "pdserve.cli", "up", "--model", str(model_dir),
           "--port", str(port), *args]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                start_new_session=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                     "PYTHONUNBUFFERED": "1", **(env or {})})
    stack = Stack("", "", Path(model_dir), proc, log, api_key or "x")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            match = READY.search(stack.log_tail(1 << 20))
            if match:
                stack.url = match.group(1)
                break
            if proc.poll() is not None:
                raise RuntimeError(f"pdserve up exited with {proc.returncode}:\n"
                                   f"{stack.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pdserve up not ready after {START_TIMEOUT_S:.0f} s:\n"
                                   f"{stack.log_tail()}")
            time.sleep(0.1)
        stack.model = stack.client().models.list().data[0].id
        yield stack
    finally:
        leaked = _stop(proc)
    assert not leaked, f"processes outlived pdserve up's SIGTERM: {leaked}\n{stack.log_tail()}"


def extra(obj: Any, name: str) -> Any:
    """A field the openai client does not model (vLLM's token_ids, prompt_token_ids)."""
    return (getattr(obj, "model_extra", None) or {}).get(name)


async def stream_greedy_ids(stack: Stack, client: Any, prompt: list[int], max_tokens: int
                            ) -> tuple[list[int], str | None]:
    """Stream one greedy completion of exactly ``max_tokens`` (ignore_eos); its token ids
    (from ``return_token_ids``) and its finish reason."""
    ids: list[int] = []
    finish = None
    stream = await client.completions.create(
        model=stack.model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    async for chunk in stream:
        for choice in chunk.choices:
            ids += extra(choice, "token_ids") or []
            finish = choice.finish_reason or finish
    return ids, finish


@dataclass(slots=True)
class Choice:
    """One choice of a response, the same shape whether it was streamed or not."""

    text: str
    token_ids: list[int]
    finish_reason: str | None


def completion_choices(response: Any) -> list[Choice]:
    return [Choice(c.text, extra(c, "token_ids"), c.finish_reason)
            for c in sorted(response.choices, key=lambda c: c.index)]


def chat_choices(response: Any) -> list[Choice]:
    return [Choice(c.message.content or "", extra(c, "token_ids"), c.finish_reason)
            for c in sorted(response.choices, key=lambda c: c.index)]


def collect_stream(stream: Any, chat: bool) -> tuple[list[Choice], list[Any]]:
    """Read a stream to its end: its choices joined, and every chunk as received."""
    choices: dict[int, Choice] = {}
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        for c in chunk.choices:
            got = choices.setdefault(c.index, Choice("", [], None))
            got.text += (c.delta.content or "") if chat else c.text
            got.token_ids += extra(c, "token_ids") or []
            if c.finish_reason is not None:
                assert got.finish_reason is None, "two finish reasons for one choice"
                got.finish_reason = c.finish_reason
    return [choices[i] for i in sorted(choices)], chunks


# -- the KV seam's multi-turn check, shared by every connector's suite -----------------

def decode_pod(stack: Stack) -> dict:
    (pod,) = stack.decode_pods()
    return pod


def transfer_counters(stack: Stack, pod: dict) -> tuple[float, float, float]:
    """(bytes, blocks, prefix-cache hit tokens) the decode pod has counted so far."""
    return (stack.pod_metric(pod, "pdserve:kv_transfer_bytes_total", 'role="decode"'),
            stack.pod_metric(pod, "pdserve:kv_transfer_blocks_total", 'role="decode"'),
            stack.pod_metric(pod, "vllm:prefix_cache_hits_total"))


def chat_ids(stack: Stack, tokenizer: Any, messages: list[dict]) -> tuple[list[int], str]:
    reply = stack.client().chat.completions.create(
        model=stack.model, messages=messages, max_tokens=8, temperature=0,  # type: ignore
        extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = reply.choices[0]
    prompt = apply_chat_template(tokenizer, messages)
    want = hf_greedy(stack.model_dir, [prompt], 8)[0]
    assert extra(choice, "token_ids") == want  # exact through every path
    assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt)
    return prompt, choice.message.content or ""


def check_second_turn_moves_only_missing_blocks(stack: Stack, tokenizer: Any) -> None:
    """A chat's second turn repeats the first (600+ tokens) and adds ~50: the decode pod
    keeps what it caches and only the missing blocks travel, exactly (its metrics)."""
    pod = decode_pod(stack)
    block_bytes = pod["kv_block_bytes"]
    history = ("Here is a long story about a lighthouse keeper named Ada. " * 40
               + f"(turn marker {time.time_ns()})")
    turn1 = [{"role": "user", "content": history}]
    bytes0, blocks0, _hits0 = transfer_counters(stack, pod)
    prompt1, answer = chat_ids(stack, tokenizer, turn1)
    assert len(prompt1) >= 600
    bytes1, blocks1, hits1 = transfer_counters(stack, pod)
    whole1 = -(-len(prompt1) // 16)
    assert blocks1 - blocks0 == whole1  # nothing cached yet: every block travelled
    assert bytes1 - bytes0 == whole1 * block_bytes

    turn2 = [*turn1, {"role": "assistant", "content": answer},
             {"role": "user", "content": "Now tell it again in fifty words or so, "
                                         "but this time from the lighthouse's view."}]
    prompt2, _ = chat_ids(stack, tokenizer, turn2)
    assert prompt2[:len(prompt1)] == prompt1 and len(prompt2) - len(prompt1) >= 40
    bytes2, blocks2, hits2 = transfer_counters(stack, pod)
    cached_blocks = (hits2 - hits1) / 16  # what the decode pod found in its own cache
    assert cached_blocks >= len(prompt1) // 16  # at least turn 1's full blocks
    sent = blocks2 - blocks1
    assert sent == -(-len(prompt2) // 16) - cached_blocks  # only the missing blocks moved
    assert sent <= -(-(len(prompt2) - len(prompt1)) // 16) + 1
    assert bytes2 - bytes1 == sent * block_bytes  # bytes = blocks actually sent x block size
