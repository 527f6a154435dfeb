"""End-to-end fixtures: real ``pdserve up`` systems on free ports, stopped leak-free.

``stack`` is one 1 prefill + 1 decode system shared by the whole session (starting one
costs tens of seconds on 2 cores); modules that need another shape (2P+2D, colocated) start
their own with ``start_stack``. ``tokenizer`` is the served model's tokenizer, for the
token counts a test expects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import POD_ARGS, Stack, start_stack


@pytest.fixture(scope="session")
def stack(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with start_stack(default_model_dir, tmp_path_factory.mktemp("e2e-1p1d"),
                     "--prefill", "1", "--decode", "1", "--pod-args", POD_ARGS) as s:
        yield s


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path) -> Any:
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(default_model_dir)
