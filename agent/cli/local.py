"""Subcommands that run the agent or talk to the running agent over its socket.

Each command imports what it needs when it runs (the agent for ``serve``, the socket client
for the others), so building the parser, or running another command, does not pay for them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.defaults import DEFAULT_SOCKET_PATH
from agent.errors import ConfigError, LoaderError

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.localclient import AgentClient

UNLOCK_POLL_SECONDS = 0.5
# The unlock states that end a run, as the agent's API names them (GET /unlock/status).
READY, ERROR = "ready", "error"
DONE_STATES = (READY, ERROR)

# ``status`` exits like ``vault status``: scripts and probes branch on the code alone.
STATUS_READY = 0  # the images are unlocked
STATUS_ERROR = 1  # the unlock failed, or the agent cannot be reached (``main``'s failure code)
STATUS_LOCKED = 2  # locked, or the unlock is in progress
STATUS_EPILOG = f"""\
exit status (as `vault status`):
  {STATUS_READY}  the images are ready (unlock state "{READY}")
  {STATUS_ERROR}  error: the unlock failed (state "{ERROR}"), or the agent cannot be reached
  {STATUS_LOCKED}  the images are locked or their unlock is in progress (any other state)
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the agent (what the systemd unit starts)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "status",
        help="print the running agent's status",
        description="Print the running agent's status; with --json the agent's own GET /status "
        "document, unchanged. The exit status tells the state of the images.",
        epilog=STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _socket_options(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("login", help="set credentials on the running agent")
    p.add_argument("--email", required=True)
    _socket_options(p)
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("unlock", help="start the unlock of the Docker images")
    p.add_argument("--wait", action="store_true", help="show progress until ready or error")
    _socket_options(p)
    p.set_defaults(func=cmd_unlock)

    p = sub.add_parser("load", help="fetch and decrypt a resource through the running agent")
    p.add_argument("name")
    p.add_argument("--folder", required=True)
    p.add_argument(
        "-o", "--output", metavar="OUT", help="output file ('-' for stdout; default: ./NAME)"
    )
    _socket_options(p)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("upload", help="encrypt, split and upload a resource")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--folder", required=True)
    p.add_argument("--name", help="resource name (default: the file's name)")
    p.add_argument(
        "--sign-key",
        type=Path,
        metavar="KEY",
        help="sign it with this publisher key (publisher-keygen); needs --release. The CLI "
        "signs; the agent never sees the private key",
    )
    p.add_argument(
        "--release",
        type=_release_number,
        metavar="N",
        help="the release number the signed resource carries",
    )
    _socket_options(p)
    p.set_defaults(func=cmd_upload)


def _socket_options(p: argparse.ArgumentParser) -> None:
    default = os.environ.get("LOADER_SOCKET_PATH") or DEFAULT_SOCKET_PATH
    p.add_argument("--socket", type=Path, default=Path(default), help=f"default: {default}")
    p.add_argument("--json", action="store_true", help="print JSON for machines")


def cmd_serve(args: argparse.Namespace) -> int:
    from agent import startup

    startup.hold_collection()  # until serving: see agent.startup
    with startup.ca_certificates_deferred():
        from agent.logs import setup_logging
        from agent.settings import load_settings

        settings = load_settings()  # a bad setting stops here: one line, exit 2
        setup_logging(settings.loader_log_level)
        from agent.service import run

    return run(settings)


def _print(args: argparse.Namespace, data: dict[str, Any], human: str) -> None:
    print(json.dumps(data, indent=2) if args.json else human)


def _client(args: argparse.Namespace, **options: Any) -> AgentClient:
    from agent.localclient import AgentClient  # http.client: only for the commands that talk

    return AgentClient(args.socket, **options)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        data = _client(args).get_json("/status")
    except ConfigError as exc:  # 2 means "locked" here: a probe must see an error as 1
        raise LoaderError(str(exc)) from exc
    unlock = data.get("unlock")
    if not isinstance(unlock, dict) or not isinstance(unlock.get("state"), str):
        raise LoaderError("the agent's status names no unlock state")
    lines = [
        f"azaion-loader {data.get('version', '?')}: {data.get('status')}",
        f"  authenticated: {'yes' if data.get('authenticated') else 'no'}",
        f"  model cache:   {data.get('modelCacheDir')}{_cache_use(data.get('cache'))}",
        f"  images:        {describe_unlock(unlock)}",
    ]
    _print(args, data, "\n".join(lines))
    return status_exit_code(unlock["state"])


def _cache_use(cache: object) -> str:
    """`` (N MB of M MB, K parts)`` from /status's ``cache``, or nothing if it has none."""
    if not isinstance(cache, dict):
        return ""
    used, limit, parts = cache.get("used_bytes"), cache.get("max_bytes"), cache.get("parts")
    if not (isinstance(used, int) and isinstance(limit, int) and isinstance(parts, int)):
        return ""
    return f" ({used / 1e6:.1f} MB of {limit / 1e6:.1f} MB, {parts} parts)"


def status_exit_code(state: str) -> int:
    if state == READY:
        return STATUS_READY
    if state == ERROR:
        return STATUS_ERROR
    return STATUS_LOCKED


def describe_unlock(snapshot: dict[str, Any]) -> str:
    """One line: the agent's own status line when it sent one (as systemd's STATUS= shows)."""
    state = str(snapshot.get("state", "unknown"))
    if snapshot.get("error"):
        return f"{state}: {snapshot['error']}"
    return str(snapshot.get("message") or state)


def _read_password() -> str:
    password = os.environ.get("AZAION_PASSWORD")
    if password:
        return password
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    line = sys.stdin.readline().rstrip("\n")
    if not line:
        raise LoaderError("no password: set AZAION_PASSWORD or type it at the prompt")
    return line


def cmd_login(args: argparse.Namespace) -> int:
    password = _read_password()
    data = _client(args).post_json("/login", {"email": args.email, "password": password})
    human = (
        "logged in"
        if data.get("verified")
        else "credentials set (Resource API unreachable: not yet verified)"
    )
    _print(args, data, human)
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    from agent.cli.progress import Progress

    client = _client(args)
    snapshot = client.post_json("/unlock")
    if not args.wait:
        _print(args, snapshot, describe_unlock(snapshot))
        return 0 if snapshot.get("state") != ERROR else 1
    progress = Progress("unlock")
    try:
        while snapshot.get("state") not in DONE_STATES:
            bar = snapshot.get("progress") or {}
            progress.update(
                int(bar.get("bytes_done") or 0),
                int(bar.get("bytes_total") or 0),
                label=str(snapshot.get("state")),
            )
            time.sleep(UNLOCK_POLL_SECONDS)
            snapshot = client.get_json("/unlock/status")
    finally:
        progress.close()
    if snapshot.get("state") == ERROR:
        raise LoaderError(f"unlock failed: {snapshot.get('error')}")
    _print(args, snapshot, describe_unlock(snapshot))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from agent.cli.progress import Progress

    client = _client(args, timeout=None)
    output = args.output or args.name
    progress = Progress(f"load {args.name}")
    try:
        if output == "-":
            client.load(args.folder, args.name, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return 0
        target = Path(output)
        # Write beside the target and rename: a failed load leaves no partial file.
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
        try:
            with os.fdopen(fd, "wb") as out:
                size = client.load(args.folder, args.name, out, progress.update)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    finally:
        progress.close()
    if not args.json:
        print(f"{args.name}: {size} bytes -> {target}")
    else:
        print(json.dumps({"name": args.name, "bytes": size, "path": str(target)}))
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        raise LoaderError(f"no such file: {path}")
    if args.sign_key is None:
        if args.release is not None:
            raise ConfigError("--release is for a signed upload: give --sign-key KEY too")
        sign_key = None
    else:
        from agent import signing

        if args.release is None:
            raise ConfigError("--sign-key needs --release N: a signed resource names its release")
        sign_key = signing.read_private_key(args.sign_key)  # before a byte is sent
    from agent.cli.progress import Progress

    name = args.name or path.name
    size = path.stat().st_size
    client = _client(args, timeout=None)
    progress = Progress(f"upload {name}", total=size)
    try:
        if sign_key is None:
            data = client.upload(path, args.folder, name, progress.update)
        else:
            data = _signed_upload(client, sign_key, args, path, name, size, progress.update)
    finally:
        progress.close()
    human = f"{name}: uploaded to {args.folder}"
    if data.get("publisher"):
        human += f", signed by key {data['publisher']} as release {data.get('release')}"
    _print(args, data, human)
    return 0


def _signed_upload(
    client: AgentClient,
    sign_key: Ed25519PrivateKey,
    args: argparse.Namespace,
    path: Path,
    name: str,
    size: int,
    progress: Callable[[int], None],
) -> dict[str, Any]:
    """Upload in two steps: the agent encrypts and answers the statement; this process checks
    that it names this key, this release and this resource (folder, name, the size sent),
    signs it, and sends the signature back. The agent stores the resource only then."""
    import base64
    import hashlib

    from agent import signing

    public = signing.public_key_of(sign_key)
    answer = client.upload(
        path, args.folder, name, progress, statement_for=(public.name, args.release)
    )
    try:
        statement = signing.Statement.decode(bytes.fromhex(str(answer.get("statement"))))
    except ValueError as exc:
        raise LoaderError(f"the agent answered no statement to sign ({exc})") from None
    manifest = signing.resource_manifest(args.folder, name, size, args.release)
    expected = (signing.Kind.RESOURCE, public.key_id, args.release)
    if (statement.kind, statement.key_id, statement.release) != expected or (
        statement.manifest_sha256 != hashlib.sha256(manifest).digest()
    ):
        raise LoaderError(
            f"the agent asked for a signature over something other than {args.folder}/{name} "
            f"({size} bytes) as release {args.release} by key {public.name}; not signed"
        )
    signature = sign_key.sign(statement.encode())
    return client.post_json(
        f"/upload/{name}/signature",
        {
            "folder": args.folder,
            "upload_id": str(answer.get("upload_id")),
            "public_key": base64.b64encode(public.raw).decode("ascii"),
            "signature": signature.hex(),
        },
    )


def _release_number(text: str) -> int:
    from agent.cli.publish import release_number as parse

    return parse(text)
