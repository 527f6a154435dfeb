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


def hf_greedy_with_logits(model_dir: str | Path, prompts_token_ids: list[list[int]],
                          max_new_tokens: int, dtype: torch.dtype
                          ) -> list[tuple[list[int], torch.Tensor]]:
    """Greedy continuations computed by transformers in ``dtype`` (not fp32), each with the
    logits it chose from at every step ([max_new_tokens, vocab], as float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    model = model.to(dtype).eval()
    pad = model.generation_config.pad_token_id
    results = []
    with torch.no_grad():
        for ids in prompts_token_ids:
            x = torch.tensor([list(ids)], dtype=torch.long)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=pad if pad is not None else 0,
                                 output_logits=True, return_dict_in_generate=True)
            results.append((out.sequences[0, x.shape[1]:].tolist(),
                            torch.cat(out.logits).to(torch.float32)))
    return results


def near_tie_tolerance(logits_row: torch.Tensor, dtype: torch.dtype, ulps: int = 2) -> float:
    """``ulps`` units in the last place of ``dtype`` at the row's largest logit: how far
    apart two logits may be and still be ordered either way by rounding alone."""
    largest = float(logits_row.abs().max())
    return ulps * largest * torch.finfo(dtype).eps


def compare_until_near_tie(ours: list[int], theirs: list[int], logits: torch.Tensor,
                           dtype: torch.dtype) -> int:
    """Steps compared between our greedy tokens and transformers' run in a 16-bit dtype.

    Two correct implementations rounding differently agree until a step where the top two
    logits are within rounding distance of each other; there either may win, and from
    then on they continue different texts. So: at each step ours must be transformers'
    token, except that at a near tie ours may be any of the near-tied tokens, and the
    comparison ends at the first step where they differ. Raises AssertionError with the
    step and the logit gap otherwise.
    """
    for step, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a == b:
            continue
        row = logits[step]
        gap = float(row.max() - row[a])
        tol = near_tie_tolerance(row, dtype)
        assert gap <= tol, (f"step {step}: ours {a}, transformers {b}, whose logit for ours "
                            f"is {gap:.4f} below its best (near-tie tolerance {tol:.4f})")
        return step + 1
    assert len(ours) == len(theirs)
    return len(ours)
