"""``dev-api``: ``azaion-loader-dev dev-api`` where the development tools are installed.

The reference Resource API is a development tool (``azaion_loader_dev``), left out of the
device package. Where it is installed (``pip install -e .`` from the sources), this command is
the same as ``azaion-loader-dev dev-api``, flags included; on a device it says in one line that
it is not there. Whether it is installed is looked up when the parser is built, never when
``agent`` is imported; the development command line itself is imported only when ``dev-api``
runs or when the whole command line is described (``--help`` of the full parser, completion):
to run another command, ``register(sub, lazy=True)`` adds a stand-in that hands its arguments
to the real parser.
"""

from __future__ import annotations

import argparse
from types import ModuleType

from agent.errors import LoaderError

COMMAND = "dev-api"
# The development CLI's own summary (azaion_loader_dev.cli), shown by the stand-in; a test
# checks that the two agree.
HELP = "run the reference Resource API and CDN (NOT FOR PRODUCTION)"
NOT_INSTALLED = (
    "dev-api is a development tool, not installed on this device; install the project from "
    "source with pip (pip install .) to get azaion-loader-dev"
)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], *, lazy: bool = False
) -> None:
    if not _installed():
        summary = "the reference Resource API (a development tool, not installed here)"
        _stand_in(sub, summary).set_defaults(func=cmd_not_installed)
    elif lazy:
        _stand_in(sub, HELP).set_defaults(func=cmd_development)
    else:
        _development_cli().register(sub)


def _stand_in(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], summary: str
) -> argparse.ArgumentParser:
    # Takes whatever follows (flags included, "+" is no prefix anyone types), to hand it all to
    # the real parser, or to refuse it all with one line rather than with argparse's complaint
    # about the first flag.
    p = sub.add_parser(COMMAND, help=summary, add_help=False, prefix_chars="+")
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def _installed() -> bool:
    try:
        import azaion_loader_dev  # noqa: F401 (the package alone: a docstring, cheap)
    except ModuleNotFoundError as exc:
        if exc.name != "azaion_loader_dev":
            raise
        return False
    return True


def _development_cli() -> ModuleType:
    from azaion_loader_dev import cli

    return cli


def cmd_development(args: argparse.Namespace) -> int:
    """Parse the arguments again with the real ``dev-api`` parser, then run it."""
    from agent.cli import build_parser  # the whole command line, the real dev-api included

    real = build_parser().parse_args([COMMAND, *args.args])
    result: int = real.func(real)
    return result


def cmd_not_installed(args: argparse.Namespace) -> int:
    raise LoaderError(NOT_INSTALLED)
