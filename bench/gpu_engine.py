"""GPU checks and timings of the whole engine (issue 3), in one run:

1. Greedy tokens on the GPU (fp32 small models, Triton kernels, CUDA graphs on and off)
   equal the CPU reference path's, for each architecture.
2. A decode step of a Llama-3-8B-shaped model (random bf16 weights made on the GPU) at
   batch 1/16/64 with context 2048: tokens/s, eager vs CUDA graphs, and the ratio to the
   memory roofline (weights + KV bytes read per step over the device-to-device copy
   bandwidth measured in this run). With ``--gemv`` (the JSON bench/gpu_gemv.py wrote) the
   Triton GEMV takes the batch-1 projections it won there, for the greedy checks and for a
   second timing of the batch-1 step beside cuBLAS's.

    python bench/gpu_engine.py [--out results.md] [--gemv gemv.json] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.config import ModelConfig, RopeConfig
from engine.cuda_graphs import DecodeGraphs
from engine.model import AttentionMetadata, LlamaModel, rope_cos_sin_cache
from pdserve.make_model import make_model


def check_greedy(tmp: Path) -> list[str]:
    rows = []
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 2000, (n,), generator=g).tolist()
               for n in (1, 7, 16, 40, 100, 130, 300, 33)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for arch in ("llama", "qwen2", "mistral"):
        d = make_model(tmp / arch, arch=arch)
        cpu = [o.outputs[0].token_ids for o in LLM(d).generate(prompts, params)]
        for graphs, overlap in ((True, True), (True, False), (False, True)):
            llm = LLM(d, device="cuda", max_num_batched_tokens=64, cuda_graphs=graphs,
                      num_kv_blocks=1024, async_scheduling=overlap)
            gpu = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            same = sum(a == b for a, b in zip(cpu, gpu, strict=False))
            rows.append(f"| {arch} | graphs={graphs} async={overlap} | {same}/{len(prompts)} "
                        "prompts x 64 tokens equal the CPU path |")
            print(rows[-1], flush=True)
            assert same == len(prompts), f"{arch} graphs={graphs}: GPU tokens differ from CPU"
    rows += check_async_sampled(tmp / "llama", prompts)
    rows.append(check_triton_sampler())
    return rows


def check_triton_sampler(rows: int = 256, vocab: int = 128256) -> str:
    """kernels.triton_sampler on the GPU against a float64 reference of the same draw
    (masked softmax, CDF, u x total): every row equal but those whose u x total lies within
    1e-5 of a CDF step (of the total), where fp32 sums may land on either side."""
    from kernels import reference, triton_sampler

    g = torch.Generator(device="cuda").manual_seed(7)
    logits = (torch.randn(rows, vocab, generator=g, device="cuda") * 3).bfloat16().float()
    bitmask = torch.randint(-2**31, 2**31, (rows, (vocab + 31) // 32), generator=g,
                            device="cuda", dtype=torch.int64).to(torch.int32)
    bitmask[::4] = -1  # unconstrained rows
    bitmask[1::16] = 0  # rows that allow nothing: drawn unmasked
    temperature = torch.where(torch.arange(rows, device="cuda") % 5 == 0, 0.0,
                              torch.rand(rows, generator=g, device="cuda") + 0.3)
    uniform = torch.rand(rows, generator=g, device="cuda").clamp(1e-6, 1 - 1e-6)
    out = triton_sampler.sample_plain(logits, bitmask, temperature, uniform)
    expected = reference.sample_plain(logits, bitmask, temperature, uniform)[0]
    near = reference.distance_to_cdf_step(logits, bitmask, temperature, uniform) < 1e-5
    differ = out[0] != expected
    bad = int((differ & ~(near & (temperature > 0))).sum())
    line = (f"| Triton sampler | {rows} rows x {vocab} tokens, masked and not | "
            f"{rows - int(differ.sum())}/{rows} equal a float64 reference, "
            f"{int(differ.sum()) - bad} within 1e-5 of a CDF step, {bad} otherwise |")
    print(line, flush=True)
    assert bad == 0 and not out[1].any(), "the Triton sampler differs from its reference"
    return line


def check_async_sampled(model: Path, prompts: list[list[int]]) -> list[str]:
    """Seeded sampling (penalties, n = 3, a JSON schema) on the GPU: async scheduling on
    gives the tokens of async scheduling off."""
    from engine.structured_spec import StructuredOutputSpec

    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10}, "n": {"type": "integer"},
        "kind": {"enum": ["a", "bb", "ccc"]}}, "required": ["name", "n", "kind"],
        "additionalProperties": False}
    spec = StructuredOutputSpec.json_schema(schema)
    mixed = [SamplingParams(temperature=1.0, seed=i, max_tokens=48, n=3 if i % 3 == 0 else 1,
                            repetition_penalty=1.2 if i % 2 else 1.0,
                            structured_outputs=spec if i % 4 == 1 else None)
             for i in range(len(prompts))]
    # every row constrained (more than four: the device waits for their masks, host gate)
    json_only = [SamplingParams(temperature=1.0, seed=i, max_tokens=48, structured_outputs=spec,
                                n=3 if i % 3 == 0 else 1) for i in range(len(prompts))]
    rows = []
    for what, params in (("seeded sampling, penalties, n=3, JSON schema", mixed),
                         ("seeded sampling, every request JSON, n=3", json_only)):
        runs = []
        for overlap in (False, True):
            llm = LLM(model, device="cuda", num_kv_blocks=1024, async_scheduling=overlap)
            runs.append([[o.token_ids for o in r.outputs]
                         for r in llm.generate(prompts, params)])
        same = sum(a == b for a, b in zip(*runs, strict=True))
        rows.append(f"| llama | {what} | {same}/{len(prompts)} requests: async scheduling "
                    "on = off |")
        print(rows[-1], flush=True)
        assert same == len(prompts), "async scheduling changed seeded tokens on the GPU"
    return rows


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times[2:])


def llama3_8b() -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=8192, tie_word_embeddings=False, attention_bias=False,
        rope=RopeConfig(theta=500000.0), model_id="llama3-8b-shape", torch_dtype="bfloat16")


def build_8b(ctx: int, block: int, max_batch: int):
    """The 8B-shaped model with random bf16 weights, its KV cache and decode graphs."""
    cfg = llama3_8b()
    max_len = ctx + 64
    with torch.device("meta"):
        model = LlamaModel(cfg, max_len)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for layer in model.layers:
            layer.input_norm.fill_(1.0)
            layer.post_attn_norm.fill_(1.0)
        model.norm.fill_(1.0)
    model.cos_sin = rope_cos_sin_cache(cfg.rope, cfg.head_dim, max_len).cuda()
    blocks_per_seq = (max_len + block - 1) // block
    num_blocks = max_batch * blocks_per_seq
    kv = [torch.randn((2, num_blocks, block, cfg.num_kv_heads, cfg.head_dim),
                      dtype=torch.bfloat16, device="cuda") for _ in range(cfg.num_layers)]
    return cfg, model, kv, blocks_per_seq


def decode_inputs(b: int, ctx: int, block: int, blocks_per_seq: int, vocab: int):
    tables = torch.arange(b * blocks_per_seq, dtype=torch.int32,
                          device="cuda").view(b, blocks_per_seq)
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    pos = torch.full((b,), ctx - 1, dtype=torch.int64, device="cuda")
    slots = (tables[:, (ctx - 1) // block].long() * block + (ctx - 1) % block)
    ids = torch.randint(0, vocab, (b,), device="cuda")
    attn = AttentionMetadata(slots, tables, lens,
                             torch.arange(b + 1, dtype=torch.int32, device="cuda"), True)
    return ids, pos, attn


def profile_step(ctx: int = 2048, block: int = 16) -> str:
    """Per-kernel GPU time of one batch-1 decode step (eager, so each kernel is named)."""
    cfg, model, kv, blocks_per_seq = build_8b(ctx, block, 1)
    ids, pos, attn = decode_inputs(1, ctx, block, blocks_per_seq, cfg.vocab_size)
    with torch.inference_mode():
        for _ in range(3):
            model.logits(model(ids, pos, attn, kv)).argmax(-1)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model.logits(model(ids, pos, attn, kv)).argmax(-1)
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                     max_name_column_width=60)


def time_decode_step(bw: float, label: str, batches: tuple[int, ...] = (1, 16, 64)
                     ) -> list[str]:
    ctx, block, max_batch = 2048, 16, 64
    cfg, model, kv, blocks_per_seq = build_8b(ctx, block, max_batch)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weight_bytes -= (cfg.vocab_size - 64) * cfg.hidden_size * 2  # embedding: only B rows read
    graphs = DecodeGraphs(model, kv, max_batch, blocks_per_seq, batch_sizes=(1, 16, 64))
    graphs.capture()
    rows = []
    for b in batches:
        ids, pos, attn = decode_inputs(b, ctx, block, blocks_per_seq, cfg.vocab_size)

        def eager(ids: torch.Tensor = ids, pos: torch.Tensor = pos,
                  attn: object = attn) -> torch.Tensor:
            h = model(ids, pos, attn, kv)
            return model.logits(h).argmax(-1)

        def graphed(ids: torch.Tensor = ids, pos: torch.Tensor = pos,
                    attn: object = attn) -> torch.Tensor:
            return graphs.run(ids, pos, attn).argmax(-1)  # the graph ends with the LM head

        kv_bytes = b * ctx * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
        floor = (weight_bytes + kv_bytes) / bw
        result = {}
        with torch.inference_mode():
            for name, fn in (("eager", eager), ("graphs", graphed)):
                for _ in range(3):
                    fn()
                times = []
                for _ in range(20):
                    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                        enable_timing=True)
                    a.record()
                    fn()
                    e.record()
                    e.synchronize()
                    times.append(a.elapsed_time(e) / 1e3)
                result[name] = statistics.median(times)
        row = (f"| {label} | {b} | {ctx} | {result['eager'] * 1e3:.2f} | "
               f"{result['graphs'] * 1e3:.2f} | "
               f"{b / result['graphs']:.0f} | {floor * 1e3:.2f} | "
               f"{floor / result['graphs'] * 100:.0f}% |")
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="only print the per-kernel time of a batch-1 decode step")
    ap.add_argument("--gemv", default=None, help="bench/gpu_gemv.py's JSON: use its choice")
    ap.add_argument("--checks-only", action="store_true",
                    help="only the token checks (CPU path, graphs, async scheduling)")
    args = ap.parse_args()
    from kernels import triton_gemv
    if args.gemv:
        choice = json.loads(Path(args.gemv).read_text())
        triton_gemv.DEFAULT_CONFIG = triton_gemv.GemvConfig(**choice["config"])
        triton_gemv.MAX_WEIGHT_ELEMENTS = int(choice["max_weight_elements"])
        print(f"GEMV: {triton_gemv.DEFAULT_CONFIG}, weights up to "
              f"{triton_gemv.MAX_WEIGHT_ELEMENTS} elements", flush=True)
    if args.profile:
        table = profile_step()
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return 0
    name = torch.cuda.get_device_name()
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        greedy = check_greedy(Path(tmp))
    if args.checks_only:
        return 0
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    limit = triton_gemv.MAX_WEIGHT_ELEMENTS
    triton_gemv.MAX_WEIGHT_ELEMENTS = 0
    step = time_decode_step(bw, "cuBLAS")
    if limit:  # the GEMV only serves batch 1: time that beside cuBLAS, in the same run
        torch.cuda.empty_cache()
        triton_gemv.MAX_WEIGHT_ELEMENTS = limit
        cfg = triton_gemv.DEFAULT_CONFIG
        step += time_decode_step(
            bw, f"Triton GEMV at batch 1 for weights <= {limit / 2 ** 20:.0f} Mi elements "
            f"({cfg.block_n}, {cfg.block_k}, {cfg.num_warps} warps, {cfg.num_stages} stages)",
            batches=(1,))
    text = "\n".join([
        f"Card: {name}; copy bandwidth measured in the same run: {bw / 1e12:.2f} TB/s.", "",
        "| arch | path | result |", "| --- | --- | --- |", *greedy, "",
        "Llama-3-8B-shaped decode step (random bf16 weights, 32 layers, hidden 4096, 32/8 "
        "heads, vocab 128256), median of 20:", "",
        "| projections | batch | context | eager ms | CUDA graphs ms | tokens/s (graphs) | "
        "roofline ms | % of roofline |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *step])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
