"""CUDA graphs for decode steps (the forward and the LM head): one graph per captured batch
size, replayed with the batch padded up to the next captured size.

A decode step of a small batch is dozens of short kernel launches whose launch cost exceeds
their run time; a graph replays them all with one launch. Inputs live in static buffers the
graphs were captured on; padding rows write nowhere (slot -1) and attend to nothing
(context 0). The block table is as wide as max_model_len allows, so the attention kernel's
launch shape is fixed at capture.
"""

from __future__ import annotations

import torch

from engine.model import AttentionMetadata, LlamaModel

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_caches: list[torch.Tensor], max_batch: int,
                 max_blocks_per_seq: int, batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
                 ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(b for b in batch_sizes if b <= max_batch) or [1]
        device = kv_caches[0].device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, b: int) -> torch.Tensor:
        """Logits [b, vocab] of one decode step: in a decode batch every row is sampled, so
        the LM head belongs in the graph too."""
        attn = AttentionMetadata(self.slots[:b], self.tables[:b], self.context_lens[:b],
                                 self.cu[:b + 1], is_decode=True)
        hidden = self.model(self.input_ids[:b], self.positions[:b], attn, self.kv_caches)
        return self.model.logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        self.context_lens.fill_(1)  # capture on valid (if meaningless) inputs
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            self._forward(b)  # warm-up: compiles kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        self.context_lens.zero_()
        torch.cuda.synchronize()

    def padded_size(self, b: int) -> int | None:
        return next((s for s in self.sizes if s >= b), None)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata
            ) -> torch.Tensor:
        b = input_ids.shape[0]
        size = self.padded_size(b)
        assert size is not None and size in self.graphs
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slots[:b].copy_(attn.slot_mapping)
        self.slots[b:size].fill_(-1)
        width = attn.block_tables.shape[1]
        self.tables[:b, :width].copy_(attn.block_tables)
        self.context_lens[:b].copy_(attn.context_lens)
        self.context_lens[b:size].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:b]
