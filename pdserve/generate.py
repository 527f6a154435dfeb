"""``pdserve generate``: stream one completion to the terminal (the offline engine)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from engine.engine_args import EngineArgs
from engine.sampling_params import SamplingParams
from pdserve.flags import add_dataclass_arguments, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--model", required=True, help="HF-format model directory")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--ignore-eos", action="store_true")
    add_dataclass_arguments(parser, EngineArgs, "engine")


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens,
                            ignore_eos=args.ignore_eos)
    engine_args = dataclass_from_args(EngineArgs, args)
    print(f"loading {args.model} ...", file=sys.stderr)
    from engine.llm import LLM  # torch loads here, after the arguments are known to be fine
    from engine.tokenizer import apply_chat_template

    llm = LLM(args.model, show_progress=True, **dataclasses.asdict(engine_args))
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
