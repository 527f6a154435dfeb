"""Session-wide fixtures: small models made offline by ``pdserve.make_model``, once each.

``model_factory(arch="llama", **kwargs)`` makes (and caches for the session) a model with
make_model's arguments; ``tiny_model`` is its default (llama); ``default_model_dir`` is the
Makefile's ``models/default`` when ``make model`` has made it, otherwise the same defaults
made into the session's temporary directory. Kernel tests set TRITON_INTERPRET in their own
conftest, not here, so that other suites run the plain-torch paths.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Tokenizers forks a thread pool on first use; tests that later fork server processes
# would otherwise get its "disabling parallelism" warning and risk a deadlock.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "default"

ModelFactory = Callable[..., Path]

# Kernel tests need TRITON_INTERPRET=1 from the start of the process, and under it the kernel
# dispatcher would send every engine test through Triton's (slow) interpreter. So the kernel
# suite runs in its own pytest process: `make test` runs `TRITON_INTERPRET=1 pytest tests/kernels`.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["kernels"]


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    from pdserve.make_model import make_model

    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def factory(arch: str = "llama", **kwargs: Any) -> Path:
        spec = json.dumps({"arch": arch, **kwargs}, sort_keys=True)
        if spec not in made:
            digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
            made[spec] = make_model(root / f"{arch}-{digest}", arch=arch, **kwargs)
        return made[spec]

    return factory


@pytest.fixture(scope="session")
def tiny_model(model_factory: ModelFactory) -> Path:
    return model_factory()


@pytest.fixture(scope="session")
def default_model_dir(model_factory: ModelFactory) -> Path:
    # `make test` runs `make model` first, so the suite uses the very model `make run`
    # serves; a bare `pytest` still works by making one with the same defaults.
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL
    return model_factory()
