"""ModelRunner: owns the model weights and the KV cache tensors on the device, turns a
ScheduledBatch into flat model inputs and returns the logits of the rows to sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.config import ModelConfig
from engine.cuda_graphs import DecodeGraphs
from engine.device import resolve_dtype, set_cpu_threads, to_device
from engine.kv_layout import DTYPES, KVLayout, KVMemory, num_blocks_for
from engine.model import AttentionMetadata, LlamaModel, rope_cos_sin_cache
from engine.scheduler import ScheduledBatch
from engine.step_pipeline import TokenFeed
from kernels import cpu_native

_GPU_HEADROOM_BYTES = 2 << 30


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    sample_rows: torch.Tensor  # index in the flat batch of each token whose logits we need
    sample_seq_idx: list[int]  # which batch entry each sampled row belongs to


class ModelRunner:
    def __init__(self, cfg: ModelConfig, model_dir: Path, device: str, dtype: str,
                 block_size: int, max_model_len: int, num_blocks: int | None,
                 kv_cache_memory_bytes: int | None, gpu_memory_utilization: float,
                 show_progress: bool = False, max_num_seqs: int = 256,
                 cuda_graphs: bool = True, cpu_threads: int | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # Kernels launch on the current device: make it this pod's GPU (cuda:N).
            # A bare "cuda" means the device that is current now (set_device refuses it).
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
            # One CPU thread unless told otherwise, as vLLM's GPU workers: a pod's host-side
            # torch ops are small, and a team of every core spinning after each of them took
            # the cores that the grammar's mask workers (llguidance) run on.
            set_cpu_threads(cpu_threads or 1)
        else:
            set_cpu_threads(cpu_threads)
        dtype = resolve_dtype(dtype, device)  # "auto" -> a concrete name for the layout
        self.dtype = DTYPES[dtype]
        self.block_size = block_size
        with torch.device("meta"):  # no memory until the checkpoint's tensors arrive
            model = LlamaModel(cfg, max_model_len)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.load_weights(model_dir, show_progress)
        model.pack_linear_weights()  # CPU bf16: once here instead of at every call
        self.model = model
        # RoPE tables stay float32, computed as HF computes them (after the dtype cast).
        self.model.cos_sin = rope_cos_sin_cache(cfg.rope, cfg.head_dim, max_model_len).to(
            self.device)
        self.layout = KVLayout(
            model_id=cfg.model_id, dtype=dtype, block_size=block_size,
            num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)
        self.num_blocks = num_blocks or self._blocks_that_fit(kv_cache_memory_bytes,
                                                              gpu_memory_utilization)
        shape = self.layout.layer_shape(self.num_blocks)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(cfg.num_layers)]
        # Described once; the pod's connector registers it at start-up (external_kv.py).
        self.kv_memory = KVMemory(self.layout, tuple(self.kv_caches))
        if self.device.type == "cpu":
            cpu_native.serves(self.kv_caches[0])  # builds the C attention now, not at a request
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs,
                                       num_blocks_for(max_model_len, block_size))
            self.graphs.capture()

    def _blocks_that_fit(self, budget: int | None, utilization: float) -> int:
        per_block = self.layout.block_bytes_per_layer * self.cfg.num_layers
        if budget is None:
            if self.device.type == "cuda":
                # This process's share of the GPU (pods sharing a GPU each get a fraction),
                # less what it holds already (weights), less room for activations, logits
                # and CUDA graphs; never more than is free now.
                free, total = torch.cuda.mem_get_info(self.device)
                mine = torch.cuda.memory_reserved(self.device)
                budget = min(int(utilization * total) - mine - _GPU_HEADROOM_BYTES,
                             free - _GPU_HEADROOM_BYTES)
            else:
                budget = 256 << 20  # CPU default: 256 MiB of KV
        return max(budget // per_block, 1)

    def prepare(self, batch: ScheduledBatch, feed: TokenFeed | None = None) -> StepInputs:
        """The step's inputs on the device; ``feed``: input ids still on the device (async
        scheduling), written over their placeholders there."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        ctx: list[int] = []
        cu = [0]
        rows: list[int] = []
        row_seq: list[int] = []
        fed: list[int] = []  # flat indices of placeholders, then their rows of feed.tokens
        fed_rows: list[int] = []
        for j, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=False)):
            start = seq.num_computed_tokens
            if feed is not None and seq.seq_id in feed.rows \
                    and start <= seq.num_tokens - 1 < start + n:
                fed.append(cu[-1] + seq.num_tokens - 1 - start)
                fed_rows.append(feed.rows[seq.seq_id])
            if n == 1:  # a decode token: the common case, without the loop's overhead
                ids.append(seq.token_ids[start])
                pos.append(start)
                slots.append(seq.block_ids[start // bs] * bs + start % bs)
            else:
                ids.extend(seq.token_ids[start:start + n])
                for p in range(start, start + n):
                    pos.append(p)
                    slots.append(seq.block_ids[p // bs] * bs + p % bs)
            ctx.append(start + n)
            cu.append(cu[-1] + n)
            if start + n == seq.num_tokens:  # all known tokens computed: sample the next
                rows.append(cu[-1] - 1)
                row_seq.append(j)
        # Two host-to-device copies, not seven: one array of the int64 inputs and one of the
        # int32 ones, each split into views on the device. Through pinned memory
        # (engine.device.to_device): a copy from pageable memory waits for everything queued
        # on the stream, which with async scheduling is the last step's sampler, and with a
        # host gate its grammar masks' fill. The block tables are filled row by row
        # (torch.tensor on nested lists took 110 us at 64 sequences, this 32 us).
        b, t = len(batch.seqs), len(ids)
        width = max(len(s.block_ids) for s in batch.seqs)
        small = np.zeros(2 * b + 1 + b * width, dtype=np.int32)
        small[:2 * b + 1] = ctx + cu
        tables = small[2 * b + 1:].reshape(b, width)
        for row, s in zip(tables, batch.seqs, strict=True):
            row[:len(s.block_ids)] = s.block_ids
        i64 = to_device(torch.from_numpy(np.array(ids + pos + slots + rows + fed + fed_rows,
                                                  dtype=np.int64)), self.device)
        i32 = to_device(torch.from_numpy(small), self.device)
        if fed:
            assert feed is not None
            at, k = 3 * t + len(rows), len(fed)
            i64[:t].index_copy_(0, i64[at:at + k], feed.tokens.index_select(0, i64[at + k:]))
        attn = AttentionMetadata(
            slot_mapping=i64[2 * t:3 * t], block_tables=i32[2 * b + 1:].view(b, width),
            context_lens=i32[:b], cu_seqlens_q=i32[b:2 * b + 1],
            is_decode=all(n == 1 for n in batch.num_new_tokens),
            max_q_len=max(batch.num_new_tokens))
        return StepInputs(i64[:t], i64[t:2 * t], attn, i64[3 * t:3 * t + len(rows)], row_seq)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch,
                layer_hook: Callable[[int], None] | None = None,
                hidden_hook: Callable[[torch.Tensor], None] | None = None,
                feed: TokenFeed | None = None) -> tuple[torch.Tensor, list[int]]:
        """Runs one step; returns (logits [rows, vocab] float32, batch index of each row).
        hidden_hook gets the final hidden states of every row (prompt logprobs); feed: the
        input ids still on the device (``prepare``)."""
        for src, dst in batch.block_copies:
            self.copy_block(src, dst)
        inputs = self.prepare(batch, feed)
        if (self.graphs is not None and layer_hook is None and hidden_hook is None
                and inputs.attn.is_decode
                and self.graphs.padded_size(len(batch.seqs)) is not None):
            # a decode batch samples every row, in order: the graph's logits are the answer
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.attn)
            return logits, inputs.sample_seq_idx
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn, self.kv_caches,
                            layer_hook)
        if hidden_hook is not None:
            hidden_hook(hidden)
        logits = self.model.logits(hidden.index_select(0, inputs.sample_rows))
        return logits, inputs.sample_seq_idx

    def copy_block(self, src: int, dst: int) -> None:
        for cache in self.kv_caches:
            cache[:, dst].copy_(cache[:, src])
