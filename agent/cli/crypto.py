"""``keygen``, ``encrypt`` and ``decrypt``: the stream format (docs/format.md) on files.

``-`` means stdin or stdout. A file OUT is written under a temporary name next to it and renamed
into place only when the whole stream has been processed, so a failed decrypt leaves no partial
OUT behind (an existing OUT is left untouched). On stdout, only authenticated plaintext is
written, but a failure part-way leaves a prefix there: check the exit status.

The format (``agent.keys``, ``agent.stream`` and ``cryptography``) is imported when one of these
commands runs, so building the parser for another command does not pay for it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from agent.errors import ConflictError, LoaderError, NotFoundError, StreamError

FileTransform = Callable[[BinaryIO, BinaryIO, Sequence[bytes]], int]
STDIO = "-"
PLAINTEXT_MODE = 0o600


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keygen``, ``encrypt`` and ``decrypt``."""
    keygen = sub.add_parser(
        "keygen",
        help="write a new random key fragment",
        description="Write a new random key fragment (one line of base64) with mode 0600.",
    )
    keygen.add_argument("--out", required=True, metavar="FILE", help="the file, or - for stdout")
    keygen.add_argument("--force", action="store_true", help="replace FILE if it exists")
    keygen.set_defaults(func=run_keygen)

    for name, func, summary, description in (
        (
            "encrypt",
            run_encrypt,
            "encrypt a file in the stream format",
            "Encrypt IN to OUT in the stream format (docs/format.md) under the key fragments.",
        ),
        (
            "decrypt",
            run_decrypt,
            "decrypt a file in the stream format",
            "Decrypt IN to OUT (mode 0600). A wrong key or altered, truncated or foreign input "
            "fails with one line and exit status 1, leaving no OUT file.",
        ),
    ):
        command = sub.add_parser(name, help=summary, description=description)
        command.add_argument(
            "--key-fragment",
            dest="key_fragments",
            action="append",
            required=True,
            metavar="FILE",
            help="a key fragment file; repeat for each fragment (order does not matter)",
        )
        command.add_argument("input", metavar="IN", help="input file, or - for stdin")
        command.add_argument("output", metavar="OUT", help="output file, or - for stdout")
        command.set_defaults(func=func)


def run_keygen(args: argparse.Namespace) -> int:
    from agent import keys

    fragment = keys.generate_fragment()
    if args.out == STDIO:
        sys.stdout.write(keys.encode_fragment(fragment) + "\n")
        return 0
    try:
        keys.write_fragment_file(args.out, fragment, force=args.force)
    except ConflictError as exc:
        raise ConflictError(f"{exc}; use --force to replace it") from exc
    return 0


def run_encrypt(args: argparse.Namespace) -> int:
    from agent import stream

    return _run_stream_command(args, "encrypt", stream.encrypt_file, mode=None)


def run_decrypt(args: argparse.Namespace) -> int:
    from agent import stream

    return _run_stream_command(args, "decrypt", stream.decrypt_file, mode=PLAINTEXT_MODE)


def _run_stream_command(
    args: argparse.Namespace, verb: str, transform: FileTransform, *, mode: int | None
) -> int:
    from agent import keys

    fragments = [keys.read_fragment_file(path) for path in args.key_fragments]
    with (
        open_input(args.input) as fin,
        atomic_output(args.output, mode=mode) as fout,
        _translate_os_errors(f"cannot {verb} {args.input} to {args.output}"),
    ):
        try:
            transform(fin, fout, fragments)
        except StreamError as exc:  # name the file: the error only knows the stream
            raise type(exc)(f"{args.input}: {exc}") from exc
    return 0


@contextlib.contextmanager
def open_input(name: str) -> Iterator[BinaryIO]:
    if name == STDIO:
        yield sys.stdin.buffer
        return
    try:
        file = open(name, "rb")  # noqa: SIM115 (a context manager right below)
    except FileNotFoundError as exc:
        raise NotFoundError(f"input file {name} does not exist") from exc
    except OSError as exc:
        raise LoaderError(f"cannot read {name}: {exc.strerror}") from exc
    with file:
        yield file


@contextlib.contextmanager
def atomic_output(name: str, *, mode: int | None) -> Iterator[BinaryIO]:
    """A file that appears at ``name`` only if the block succeeds.

    ``mode`` None means the usual mode for a new file (0666 less the umask). Stdout, devices
    and FIFOs are written directly: they cannot be replaced by a rename.
    """
    if name == STDIO:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(name)
    failure = f"cannot write {name}"
    if _is_special_file(target):
        with _translate_os_errors(failure):
            special = open(target, "wb")  # noqa: SIM115 (a context manager right below)
        with special:
            yield special
        return
    with _translate_os_errors(failure):
        descriptor, temp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
        )
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
            with _translate_os_errors(failure):
                file.flush()
                os.fsync(file.fileno())
        with _translate_os_errors(failure):
            os.chmod(temp_name, _new_file_mode() if mode is None else mode)
            os.replace(temp_name, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)


def _is_special_file(path: Path) -> bool:
    try:
        return not stat.S_ISREG(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _translate_os_errors(message: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        raise LoaderError(f"{message}: {exc.strerror or exc}") from exc
