"""``dev-api``: ``azaion-loader-dev dev-api`` where the development tools are installed.

The reference Resource API is a development tool (``azaion_loader_dev``), left out of the
device package. Where it is installed (``pip install -e .`` from the sources), this command is
the same as ``azaion-loader-dev dev-api``, flags included; on a device it says in one line that
it is not there. The lookup happens when the parser is built, never when ``agent`` is imported.
"""

from __future__ import annotations

import argparse
from types import ModuleType

from agent.errors import LoaderError

NOT_INSTALLED = (
    "dev-api is a development tool, not installed on this device; install the project from "
    "source with pip (pip install .) to get azaion-loader-dev"
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev_cli = _development_cli()
    if dev_cli is not None:
        dev_cli.register(sub)
        return
    # Takes whatever follows (flags included, "+" is no prefix anyone types) to refuse it all
    # with the one line below rather than with argparse's complaint about the first flag.
    p = sub.add_parser(
        "dev-api",
        help="the reference Resource API (a development tool, not installed here)",
        add_help=False,
        prefix_chars="+",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_not_installed)


def _development_cli() -> ModuleType | None:
    try:
        from azaion_loader_dev import cli
    except ModuleNotFoundError as exc:
        if exc.name != "azaion_loader_dev":
            raise
        return None
    return cli


def cmd_not_installed(args: argparse.Namespace) -> int:
    raise LoaderError(NOT_INSTALLED)
