"""``pdserve``: one console script, one sub-command per job.

Each sub-command lives in the package that owns it and exposes ``add_arguments(parser)``
and ``run(args) -> int``; this file only wires them up and turns pdserve's errors into a
clear message and exit status instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.errors import PdserveError

# sub-command -> (module, help). Imported lazily so `pdserve make-model` does not load the
# gRPC or HTTP stacks.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-model": ("pdserve.make_model", "write a small HF-format model directory offline"),
    "generate": ("pdserve.generate", "stream a completion of one prompt to the terminal"),
    "prefill": ("pdserve.prefill_pod", "run one prefill pod (gRPC)"),
    "decode": ("pdserve.decode_pod", "run one decode pod (gRPC)"),
    "router": ("pdserve.router_pod", "run the OpenAI-compatible HTTP router"),
    "up": ("pdserve.up", "start a router and prefill/decode pods on this machine"),
    "bench": ("pdserve.bench.cli", "benchmark a running OpenAI-compatible server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="pdserve: disaggregated (prefill/decode) LLM serving")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        if name in sys.argv[1:2]:  # only import the module whose options are needed
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args()
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except PdserveError as exc:
        print(f"pdserve {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
