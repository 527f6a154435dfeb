"""The correctness reference: what HF transformers itself computes for a model directory.

DESIGN.md defines correctness as "the same greedy tokens as transformers' generate()". These
helpers run transformers in fp32 on the CPU, one prompt at a time (no padding, so no
attention-mask path can differ), and return plain token ids or logits to compare against.
Import them as ``from hf_reference import hf_greedy, hf_logits`` (tests/ is on sys.path
through the root conftest).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _load(model_dir: str | Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    return model.to(torch.float32).eval()


def hf_greedy(model_dir: str | Path, prompts_token_ids: list[list[int]],
              max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of each prompt, exactly ``max_new_tokens`` new ids each.

    EOS does not stop generation and is never suppressed (like vLLM's ``ignore_eos``): an
    eos token that wins the argmax is emitted like any other. ``min_new_tokens`` would
    instead mask eos and change the argmax, so eos_token_id=None is passed instead.
    """
    model = _load(model_dir)
    pad = model.generation_config.pad_token_id
    results: list[list[int]] = []
    with torch.no_grad():
        for ids in prompts_token_ids:
            x = torch.tensor([list(ids)], dtype=torch.long)
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=pad if pad is not None else 0,
            )
            new = out[0, x.shape[1]:].tolist()
            # A stop on eos here would silently shorten the reference; fail loudly instead.
            assert len(new) == max_new_tokens, (
                f"transformers stopped after {len(new)} of {max_new_tokens} tokens")
            results.append(new)
    return results


def hf_logits(model_dir: str | Path, token_ids: list[int]) -> torch.Tensor:
    """Logits for every position of ``token_ids``: a float32 tensor [len(token_ids), vocab]."""
    model = _load(model_dir)
    with torch.no_grad():
        x = torch.tensor([list(token_ids)], dtype=torch.long)
        return model(input_ids=x).logits[0].to(torch.float32)
