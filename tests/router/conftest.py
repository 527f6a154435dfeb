"""Router test fixtures: scripted decode pods (see scripted_decode.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from router_helpers import API_KEY, RouterProcess
from scripted_decode import ScriptedPod, start_scripted_pod


@pytest.fixture(scope="module")
def scripted_pod(tiny_model: Path) -> Iterator[ScriptedPod]:
    from engine.tokenizer import load_tokenizer

    pod = start_scripted_pod(load_tokenizer(tiny_model).eos_token_id)
    yield pod
    pod.stop()


@pytest.fixture()
def http(router: RouterProcess) -> Iterator[httpx.Client]:
    """A client of the module's ``router`` fixture that sends its API key."""
    with httpx.Client(base_url=router.url, timeout=10.0,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client
