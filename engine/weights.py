"""Loading HF safetensors checkpoints (one file or shards with an index) into a model.

Names follow HF's Llama layout (model.layers.N.self_attn.q_proj.weight, ...). The engine
fuses q/k/v and gate/up into single matrices, so loading concatenates them here, once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ModelLoadError


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelLoadError(f"{index} is malformed (no weight_map)") from None
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{str(model_dir)!r} has no .safetensors weights")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{str(model_dir)!r} lacks shard(s) {missing}")
    return files


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 -- safe_open is not iterable
                    yield name, f.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises these
            raise ModelLoadError(f"cannot read {path.name}: {exc}") from None


def load_state(model_dir: Path, show_progress: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint by HF name (still on CPU, checkpoint dtype)."""
    tensors: Iterable[tuple[str, torch.Tensor]] = iter_tensors(model_dir)
    if show_progress:
        from tqdm import tqdm
        tensors = tqdm(tensors, desc="loading weights", unit=" tensors", leave=False)
    return dict(tensors)


def take(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return state.pop(name)
    except KeyError:
        raise ModelLoadError(f"checkpoint lacks tensor {name!r}") from None
