"""Helpers for router tests: a real ``pdserve router`` process on a free port.

``start_router`` runs the console script exactly as a pod would, waits (bounded) until
/health answers, and ``RouterProcess.stop`` ends it; its log is shown if it dies early.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from ports import free_port

MODEL_NAME = "tiny"
API_KEY = "sk-router-test"
STARTUP_TIMEOUT = 60.0


@dataclass
class RouterProcess:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def pdserve_command() -> list[str]:
    script = Path(sys.executable).parent / "pdserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pdserve.cli"]


def start_router(model_dir: Path, decode: list[str], log_dir: Path, *extra: str
                 ) -> RouterProcess:
    port = free_port()
    log = log_dir / f"router-{port}.log"
    cmd = [*pdserve_command(), "router", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--decode", ",".join(decode),
           "--served-model-name", MODEL_NAME, "--poll-interval", "0.2", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    router = RouterProcess(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{router.url}/health", timeout=1.0).status_code == 200:
                return router
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    router.stop()
    raise RuntimeError(f"router did not answer /health in {STARTUP_TIMEOUT} s:\n"
                       f"{log.read_text()}")
