"""``glimpse bench``: benchmarks against a running server (subcommands: ``serve``).

Contract: ``add_arguments(parser)`` declares the subcommands and their flags (defaults from
``ServeBenchConfig``); ``run(args) -> int`` runs the chosen one. ``glimpse bench serve`` drives any
OpenAI-compatible ``/v1/chat/completions`` with streamed requests on a Poisson (or gamma)
schedule, prints a result table and optionally writes it, with per-request arrays, as JSON. It
exits 0 when at least one request succeeded, 1 when none did or the server could not be reached,
2 on bad flags.

Not here: the request set, the HTTP client, pacing, statistics (the sibling modules).
"""

from __future__ import annotations

import argparse
import sys

from glimpse.bench.config import DATASETS, ServeBenchConfig

_D = ServeBenchConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)
    serve = sub.add_parser(
        "serve",
        help="online serving benchmark over /v1/chat/completions (streamed)",
        description="Online serving benchmark: streamed chat completions at a request rate.",
    )
    _add_serve_arguments(serve)


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=_D.base_url, help="server root (without /v1)")
    p.add_argument("--model", default=_D.model, help="model id (default: first of /v1/models)")
    p.add_argument("--api-key", default=_D.api_key, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--num-prompts", type=int, default=_D.num_prompts)
    p.add_argument(
        "--request-rate",
        type=float,
        default=_D.request_rate,
        help="mean requests per second; inf sends all at once (default: inf)",
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=_D.burstiness,
        help="gamma shape of inter-arrival times: 1 = Poisson, <1 burstier, >1 more even",
    )
    p.add_argument(
        "--max-concurrency", type=int, default=_D.max_concurrency, help="cap on requests in flight"
    )
    p.add_argument("--seed", type=int, default=_D.seed)
    p.add_argument("--output-len", type=int, default=_D.output_len, help="max_tokens per request")
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="let requests stop at end-of-sequence (default sends ignore_eos: true)",
    )
    p.add_argument("--dataset", choices=DATASETS, default=_D.dataset)
    p.add_argument("--input-len", type=int, default=_D.input_len, help="words of question text")
    p.add_argument(
        "--image-variants",
        type=int,
        default=_D.image_variants,
        help="distinct images per image size (repeats may hit the server's media cache)",
    )
    p.add_argument("--result-json", default=_D.result_json, help="write the results here")
    p.add_argument("--disable-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--timeout-s", type=float, default=_D.timeout_s, help="limit per request (seconds)"
    )


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        return _run_serve(args)
    print(f"glimpse bench: unknown subcommand {args.bench_command!r}", file=sys.stderr)
    return 2


def _run_serve(args: argparse.Namespace) -> int:
    import httpx

    from glimpse.bench.report import (
        compute_metrics,
        format_errors,
        format_table,
        result_record,
        write_json,
    )
    from glimpse.bench.runner import run_serve

    fields = ServeBenchConfig.__dataclass_fields__
    try:
        config = ServeBenchConfig(**{k: v for k, v in vars(args).items() if k in fields})
    except ValueError as exc:
        print(f"glimpse bench serve: {exc}", file=sys.stderr)
        return 2
    try:
        bench = run_serve(config)
    except (httpx.HTTPError, RuntimeError) as exc:
        print(f"glimpse bench serve: cannot use {config.base_url}: {exc}", file=sys.stderr)
        return 1
    metrics = compute_metrics(bench)
    print(format_table(metrics, config.max_concurrency))
    errors = format_errors(bench)
    if errors:
        print(f"errors (most frequent first):\n{errors}")
    if config.result_json:
        args_record = {k: v for k, v in vars(args).items() if k != "api_key"}
        write_json(config.result_json, result_record(bench, metrics, config.base_url, args_record))
        print(f"results written to {config.result_json}")
    return 0 if metrics.completed else 1
