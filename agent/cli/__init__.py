"""Command line: parses arguments and calls the library; holds no logic of its own.

Each module here registers one family of subcommands; ``main`` turns every ``LoaderError``
into one clear line on stderr and a non-zero exit (2 for a bad setting or usage).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from agent import __version__
from agent.cli import completion, crypto, devapi, local, publish
from agent.errors import ConfigError, LoaderError

PROG = "azaion-loader"
EXIT_FAILURE = 1
EXIT_USAGE = 2


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """The whole command line. ``lazy`` (to run one command, as ``main`` does): ``dev-api``
    is a stand-in that imports the development tools only if it runs; every command imports
    what it needs when it runs in any case."""
    parser = argparse.ArgumentParser(prog=PROG, description="Azaion boot-time unlock agent.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (local, crypto, publish, completion):
        module.register(sub)
    devapi.register(sub, lazy=lazy)
    return parser


def fail(message: str, code: int = EXIT_FAILURE) -> int:
    # Under journald (a unit's ExecStart=, ExecStartPre=) the line is filed at priority err,
    # so `journalctl -p err` and `systemctl status` show why the command failed.
    prefix = "<3>" if os.environ.get("JOURNAL_STREAM") else ""
    print(f"{prefix}{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(lazy=True).parse_args(argv)
    try:
        result: int | None = args.func(args)
    except ConfigError as exc:
        return fail(str(exc), EXIT_USAGE)
    except LoaderError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE
    return result or 0
