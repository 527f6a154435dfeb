"""The model runtime shared by every role: ``from engine import LLM, SamplingParams``.

Names are resolved lazily so that light users (the router needs only the tokenizer and
SamplingParams) do not import torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "EngineArgs", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from engine.sampling_params import SamplingParams
        return SamplingParams
    if name == "EngineArgs":
        from engine.llm_engine import EngineArgs
        return EngineArgs
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
