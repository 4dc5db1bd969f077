"""``make run``: the agent on local defaults, no root and no Azaion account needed.

Everything lives under one folder (default ``.run/``): the socket, state, cache, and a local
dev-api (the reference Resource API, never for production) with generated credentials and key
fragment in ``dev-api/``, serving as the agent's Resource API. Both log here, on the terminal.
Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import grp
import os
import secrets
from pathlib import Path

from azaion_loader_dev.harness.agent import AgentProcess
from azaion_loader_dev.harness.devapi import new_dev_api

EMAIL = "dev@localhost"


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

    dev_api = new_dev_api(root / "dev-api", email=EMAIL, password=password, log_to_stderr=True)
    socket_path = root / "loader.sock"
    env = {
        **os.environ,
        "RESOURCE_API_URL": dev_api.url,
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
        f"dev-api (reference Resource API, not for production) on {dev_api.url}\n"
        f"agent socket: {socket_path}\n"
        f"try:  curl --unix-socket {socket_path} http://localhost/status\n"
        f"      .venv/bin/azaion-loader status --socket {socket_path}\n"
        "Ctrl-C stops both.",
        flush=True,
    )
    agent = AgentProcess(root, env).start(wait=False, stdout=None, stderr=None)
    assert agent.proc is not None
    try:
        return agent.proc.wait()
    except KeyboardInterrupt:
        return agent.stop()
    finally:
        dev_api.stop()


if __name__ == "__main__":
    raise SystemExit(main())
