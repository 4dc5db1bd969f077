"""``azaion-loader-dev``: the development tools' command line (NOT FOR PRODUCTION).

``dev-api`` runs the reference Resource API and CDN. ``azaion-loader dev-api`` is the same
command where this package is installed (``agent/cli/devapi.py`` registers it from here).
Errors are one line on stderr; exit 2 for bad usage or a setting, 1 for another failure.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import keys
from agent.defaults import DEFAULT_MAX_BIG_BYTES, DEFAULT_MAX_SMALL_BYTES
from agent.errors import ConfigError, LoaderError

PROG = "azaion-loader-dev"
EXIT_FAILURE = 1
EXIT_USAGE = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dev-api",
        help="run the reference Resource API and CDN (NOT FOR PRODUCTION)",
        description="The reference Resource API and CDN of docs/resource-api.md, keeping its "
        "data in a directory. For development, tests and the demo: NOT FOR PRODUCTION.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free one; default 8080)")
    p.add_argument(
        "--data-dir", type=Path, required=True, metavar="DIR", help="where parts are kept"
    )
    p.add_argument(
        "--user",
        action="append",
        required=True,
        metavar="EMAIL:PASSWORD",
        help="an account that may log in (repeatable)",
    )
    p.add_argument(
        "--key-fragment", type=Path, help="images key fragment file (as written by keygen)"
    )
    p.add_argument("--token-ttl", type=float, default=3600.0, help="token lifetime, seconds")
    p.add_argument("--max-small-bytes", type=int, default=DEFAULT_MAX_SMALL_BYTES)
    p.add_argument("--max-big-bytes", type=int, default=DEFAULT_MAX_BIG_BYTES)
    p.add_argument(
        "--rate-limit",
        type=float,
        metavar="N",
        help="at most N Resource API requests a second (not the CDN); beyond, 429 with "
        "Retry-After (default: no limit)",
    )
    p.add_argument(
        "--cdn-rate",
        type=float,
        metavar="BYTES",
        help="send each big part (CDN GET) at most BYTES a second, a field-like link "
        "(default: as fast as it can)",
    )
    p.set_defaults(func=cmd_dev_api)


def parse_users(specs: list[str]) -> dict[str, str]:
    users: dict[str, str] = {}
    for spec in specs:
        email, sep, password = spec.partition(":")
        if not (sep and email and password):
            raise ConfigError("--user must be EMAIL:PASSWORD with both parts non-empty")
        users[email] = password
    return users


def cmd_dev_api(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError("--port must be between 0 and 65535")
    if args.token_ttl <= 0:
        raise ConfigError("--token-ttl must be positive")
    if args.rate_limit is not None and not args.rate_limit > 0:
        raise ConfigError("--rate-limit must be positive")
    if args.cdn_rate is not None and not args.cdn_rate > 0:
        raise ConfigError("--cdn-rate must be positive")
    fragment_text = None
    if args.key_fragment is not None:
        fragment_text = keys.encode_fragment(keys.read_fragment_file(args.key_fragment))
    from azaion_loader_dev import devapi  # aiohttp: only for this command, not every CLI call

    config = devapi.DevApiConfig(
        data_dir=args.data_dir,
        users=parse_users(args.user),
        key_fragment_text=fragment_text,
        host=args.host,
        port=args.port,
        token_ttl=args.token_ttl,
        max_small_bytes=args.max_small_bytes,
        max_big_bytes=args.max_big_bytes,
        rate_limit=args.rate_limit,
        cdn_rate=args.cdn_rate,
    )
    asyncio.run(devapi.serve(config, ready=_announce))
    return 0


def _announce(url: str) -> None:
    print(f"dev-api listening on {url}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="azaion-loader's development tools (NOT FOR PRODUCTION)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LoaderError as exc:  # as azaion-loader's: one line, 2 for a bad setting
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
