"""EngineArgs: every option of the engine, in one place.

The pods' command-line flags are generated from these fields (pdserve/flags.py): a field
``max_num_seqs`` is the flag ``--max-num-seqs``, its ``help`` metadata the flag's help, so
an option is never restated by hand. Names follow vLLM's where it has the same option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.kv_layout import DTYPES


def _doc(help: str, **extra: object) -> dict[str, object]:
    return {"help": help, **extra}


@dataclass(slots=True)
class EngineArgs:
    device: str = field(default="cpu", metadata=_doc("cpu or cuda[:N]"))
    dtype: str = field(default="auto", metadata=_doc(
        "model and KV cache dtype; auto: bf16 where the device computes it natively, else "
        "fp32 on CPU / fp16 on CUDA (engine/device.py)", choices=("auto", *DTYPES)))
    block_size: int = field(default=16, metadata=_doc("tokens per KV cache block"))
    num_kv_blocks: int | None = field(default=None, metadata=_doc(
        "KV cache blocks (default: fill --kv-cache-memory-bytes, or the GPU)"))
    kv_cache_memory_bytes: int | None = field(default=None, metadata=_doc(
        "bytes of KV cache (default: 256 MiB on CPU, --gpu-memory-utilization on GPU)"))
    gpu_memory_utilization: float = field(default=0.85, metadata=_doc(
        "fraction of the GPU's memory this pod may use (weights and KV cache)"))
    max_num_seqs: int = field(default=256, metadata=_doc("sequences in one batch at most"))
    max_num_batched_tokens: int = field(default=2048, metadata=_doc(
        "tokens computed in one step at most (longer prompts are chunked)"))
    max_model_len: int | None = field(default=None, metadata=_doc(
        "context length (default: the model's max_position_embeddings)"))
    enable_prefix_caching: bool = field(default=True, metadata=_doc(
        "reuse the KV of prompt prefixes computed before"))
    cuda_graphs: bool = field(default=True, metadata=_doc("capture decode steps in CUDA graphs"))
    async_scheduling: bool | None = field(default=None, metadata=_doc(
        "launch each step before the last step's tokens reach the host "
        "(engine/step_pipeline.py; default: on a GPU, not on a CPU)"))
    seed: int = field(default=0, metadata=_doc("seed of requests that have none of their own"))
    cpu_threads: int | None = field(default=None, metadata=_doc(
        "CPU intra-op threads of this process (default: on CPU torch's, every core, and "
        "`pdserve up` gives each pod its share; on a GPU one)"))

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise InvalidRequestError(f"engine argument {name}: {why}", param=name)

        if self.dtype not in DTYPES and self.dtype != "auto":
            bad("dtype", f"{self.dtype!r} is not one of {['auto', *sorted(DTYPES)]}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            bad("cpu_threads", "must be at least 1 (or None for torch's default)")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            bad("num_kv_blocks", "must be at least 1 (or None to size it from memory)")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            bad("kv_cache_memory_bytes", "must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            bad("max_model_len", "must be at least 2")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad("gpu_memory_utilization", "must be in (0, 1]")
