"""``make run``: the agent on local defaults, no root and no Azaion account needed.

Everything lives under one folder (default ``.run/``): the socket, state, cache, a generated
key fragment and generated dev-api credentials. A local dev-api (the reference Resource API,
never for production) serves as the agent's Resource API. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import grp
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

from agent.keys import generate_fragment, write_fragment_file

EMAIL = "dev@localhost"


def start_dev_api(
    root: Path, password: str, *, email: str = EMAIL, log: IO[str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start dev-api on a free loopback port (its key fragment: ``root/api-fragment.key``,
    made if missing); returns the process and its URL. Its log goes to ``log`` (default: ours)."""
    fragment = root / "api-fragment.key"
    if not fragment.exists():
        write_fragment_file(fragment, generate_fragment())
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "agent", "dev-api",
            "--host", "127.0.0.1", "--port", "0",
            "--data-dir", str(root / "dev-api"),
            "--user", f"{email}:{password}",
            "--key-fragment", str(fragment),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on " in line:
            return proc, line.rsplit("listening on ", 1)[1].split()[0]
    raise SystemExit("dev-api did not start; see the lines above")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(".run"))
    parser.add_argument("--port", default="8765", help="loopback HTTP port (0 disables)")
    args = parser.parse_args()
    root: Path = args.dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    password_file = root / "dev-password"
    if not password_file.exists():
        password_file.write_text(secrets.token_urlsafe(18))
        password_file.chmod(0o600)
    password = password_file.read_text().strip()

    dev_api, url = start_dev_api(root, password)
    socket_path = root / "loader.sock"
    env = {
        **os.environ,
        "RESOURCE_API_URL": url,
        "LOADER_SOCKET_PATH": str(socket_path),
        "LOADER_HTTP_PORT": args.port,
        "LOADER_STATE_DIR": str(root / "state"),
        "MODEL_CACHE_DIR": str(root / "cache"),
        "IMAGES_PATH": os.environ.get("IMAGES_PATH", str(root / "images.enc")),
        "AZAION_EMAIL": EMAIL,
        "AZAION_PASSWORD": password,
        # Your own group may use every endpoint (the package's group does not exist here).
        "LOADER_ALLOWED_GROUPS": os.environ.get(
            "LOADER_ALLOWED_GROUPS", grp.getgrgid(os.getgid()).gr_name
        ),
    }
    print(
        f"dev-api (reference Resource API, not for production) on {url}\n"
        f"agent socket: {socket_path}\n"
        f"try:  curl --unix-socket {socket_path} http://localhost/status\n"
        f"      .venv/bin/azaion-loader status --socket {socket_path}\n"
        "Ctrl-C stops both.",
        flush=True,
    )
    agent = subprocess.Popen([sys.executable, "-m", "agent", "serve"], env=env)
    try:
        return agent.wait()
    except KeyboardInterrupt:
        agent.send_signal(signal.SIGTERM)
        return agent.wait()
    finally:
        dev_api.terminate()
        dev_api.wait()


if __name__ == "__main__":
    raise SystemExit(main())
