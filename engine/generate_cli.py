"""``pdserve generate``: stream one completion to the terminal (the offline engine)."""

from __future__ import annotations

import argparse
import sys

from engine.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--model", required=True, help="HF-format model directory")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens,
                            ignore_eos=args.ignore_eos)
    print(f"loading {args.model} ...", file=sys.stderr)
    from engine.llm import LLM  # torch loads here, after the arguments are known to be fine
    from engine.tokenizer import apply_chat_template

    llm = LLM(args.model, device=args.device, dtype=args.dtype, show_progress=True)
    prompt = args.prompt
    if args.chat:
        prompt = apply_chat_template(llm.tokenizer, [{"role": "user", "content": prompt}])

    def show(_i: int, _k: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    out = llm.generate(prompt, params, on_delta=show)[0].outputs[0]
    sys.stdout.write("\n")
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)
    return 0
