"""``pdserve router``: run the OpenAI-compatible HTTP router (one pod's command).

    pdserve router --model DIR --host 127.0.0.1 --port 8000 --decode host:port[,...]
                   [--prefill host:port[,...]] [--api-key K] [--served-model-name NAME]
                   [--max-model-len N]
"""

from __future__ import annotations

import argparse

from engine.errors import InvalidRequestError


def _endpoints(value: str) -> list[str]:
    out = [v.strip() for v in value.split(",") if v.strip()]
    for endpoint in out:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"expected host:port, got {endpoint!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory (its tokenizer, chat template and config.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--decode", type=_endpoints, required=True,
                        help="decode pods, host:port[,host:port...]")
    parser.add_argument("--prefill", type=_endpoints, default=[],
                        help="prefill pods, host:port[,...] (none: decode pods prefill)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the model dir's name)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: config.json max_position_embeddings)")
    parser.add_argument("--poll-interval", type=float, default=0.5,
                        help="seconds between load polls of each pod")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    # Imported here so `pdserve --help` stays fast.
    import uvicorn

    from engine.tokenizer import load_tokenizer
    from router.app import RouterConfig, build_app
    from router.preprocess import read_model_info

    if not args.decode:
        raise InvalidRequestError("--decode needs at least one host:port", "decode")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise InvalidRequestError("--max-model-len must be at least 2", "max_model_len")
    tokenizer = load_tokenizer(args.model)
    info = read_model_info(args.model, tokenizer, args.served_model_name, args.max_model_len)
    config = RouterConfig(decode=args.decode, prefill=args.prefill, api_key=args.api_key,
                          poll_interval=args.poll_interval)
    app = build_app(info, config)
    print(f"pdserve router: serving {info.name!r} (context {info.max_model_len}) on "
          f"http://{args.host}:{args.port}/v1 with decode {','.join(args.decode)}"
          + (f" and prefill {','.join(args.prefill)}" if args.prefill else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.log_level == "debug", timeout_graceful_shutdown=5)
    return 0
