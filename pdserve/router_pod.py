"""``pdserve router``: run the OpenAI-compatible HTTP router (one pod's command).

    pdserve router --model DIR --host 127.0.0.1 --port 8000 --decode ENDPOINT[,...]
                   [--prefill ENDPOINT[,...]] [--api-key K | --api-key-file PATH]
                   [--served-model-name NAME] [--max-model-len N]

An ENDPOINT is one pod, ``host:port``, or ``dns:NAME:PORT``: every A/AAAA address of NAME
(a Kubernetes headless Service), re-resolved every --discovery-interval seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.errors import InvalidRequestError
from pdserve.flags import add_dataclass_arguments, dataclass_from_args
from protos.security import add_security_arguments, security_from_args
from router.limits import RequestLimits
from router.tool_parsers import PARSERS


def _endpoints(value: str) -> list[str]:
    from router.discovery import parse_endpoints

    try:
        return [str(e) for e in parse_endpoints(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


def _read_api_key(args: argparse.Namespace) -> str | None:
    """--api-key, or the first line of --api-key-file (a mounted Secret), never both."""
    if args.api_key_file is None:
        return args.api_key
    if args.api_key is not None:
        raise InvalidRequestError("give --api-key or --api-key-file, not both", "api_key")
    try:
        key = Path(args.api_key_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read --api-key-file: {exc}", "api_key_file") from None
    if not key or "\n" in key:
        raise InvalidRequestError(f"--api-key-file {args.api_key_file} must hold one non-empty "
                                  "line", "api_key_file")
    return key


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model directory (its tokenizer, chat template and config.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--decode", type=_endpoints, required=True,
                        help="decode pods: host:port or dns:NAME:PORT, comma-separated")
    parser.add_argument("--prefill", type=_endpoints, default=[],
                        help="prefill pods, as --decode (none: decode pods prefill)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--api-key-file", default=None,
                        help="as --api-key, read from this file (e.g. a mounted Secret)")
    parser.add_argument("--dns-server", type=_host_port, default=None,
                        help="host:port of the DNS server for dns: endpoints (default: the "
                             "system's, /etc/resolv.conf)")
    parser.add_argument("--discovery-interval", type=float, default=2.0,
                        help="seconds between look-ups of dns: endpoints")
    parser.add_argument("--drain-timeout", type=float, default=25.0,
                        help="on SIGTERM: seconds running requests may take to finish")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the model dir's name)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: config.json max_position_embeddings)")
    parser.add_argument("--poll-interval", type=float, default=0.5,
                        help="seconds between load polls of each pod")
    parser.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                        help="how tool calls are read from the model's text (tool_choice auto)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="allow tool_choice 'auto' (needs --tool-call-parser), as in vLLM")
    parser.add_argument("--otlp-endpoint", default=None,
                        help="HOST:PORT of an OTLP/gRPC collector: a trace per request, its "
                             "context passed to the pods in gRPC metadata (default: off)")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="one line per request on stderr: outcome, token counts and the "
                             "milliseconds of each phase (router, decode and prefill pods)")
    parser.add_argument("--routing", default="prefix", choices=["prefix", "least-loaded"],
                        help="prefix: the pod most likely caching the prompt's prefix, bounded "
                             "by load (SGLang's rule); least-loaded: the least loaded pod")
    parser.add_argument("--prepare-threads", type=int, default=2,
                        help="threads that tokenize and detokenize requests off the event "
                             "loop")
    parser.add_argument("--tokenize-processes", type=int, default=2,
                        help="processes that tokenize texts over 64 KiB, so the event loop "
                             "never waits on them (0: tokenize them in the threads)")
    add_security_arguments(parser)
    add_dataclass_arguments(parser, RequestLimits, "request limits (each breach is a 400)")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])


def _setup_access_log(enabled: bool) -> None:
    import logging

    access = logging.getLogger("pdserve.access")
    access.propagate = False  # its own format, whatever uvicorn does to the root logger
    if enabled:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s access %(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    else:
        access.setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    # Imported here so `pdserve --help` stays fast.
    import uvicorn

    from engine.tokenizer import load_tokenizer
    from router.app import RouterConfig, build_app
    from router.preprocess import read_model_info
    from router.tools import ToolConfig

    if not args.decode:
        raise InvalidRequestError("--decode needs at least one host:port", "decode")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise InvalidRequestError("--max-model-len must be at least 2", "max_model_len")
    tokenizer = load_tokenizer(args.model)
    info = read_model_info(args.model, tokenizer, args.served_model_name, args.max_model_len)
    if args.discovery_interval <= 0:
        raise InvalidRequestError("--discovery-interval must be positive", "discovery_interval")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise InvalidRequestError("--enable-auto-tool-choice needs --tool-call-parser",
                                  "tool_call_parser")
    if args.prepare_threads < 1:
        raise InvalidRequestError("--prepare-threads must be at least 1", "prepare_threads")
    if args.tokenize_processes < 0:
        raise InvalidRequestError("--tokenize-processes must be at least 0",
                                  "tokenize_processes")
    try:
        limits = dataclass_from_args(RequestLimits, args)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), "limits") from None
    config = RouterConfig(decode=args.decode, prefill=args.prefill, api_key=_read_api_key(args),
                          poll_interval=args.poll_interval, dns_server=args.dns_server,
                          discovery_interval=args.discovery_interval,
                          tools=ToolConfig(args.tool_call_parser, args.enable_auto_tool_choice),
                          routing=args.routing,
                          limits=limits, prepare_threads=args.prepare_threads,
                          tokenize_processes=args.tokenize_processes,
                          security=security_from_args(args),
                          otlp_endpoint=args.otlp_endpoint)
    app = build_app(info, config)
    _setup_access_log(args.access_log)
    print(f"pdserve router: serving {info.name!r} (context {info.max_model_len}) on "
          f"http://{args.host}:{args.port}/v1 with decode {','.join(args.decode)}"
          + (f" and prefill {','.join(args.prefill)}" if args.prefill else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.log_level == "debug",
                timeout_graceful_shutdown=max(1, round(args.drain_timeout)))
    return 0
