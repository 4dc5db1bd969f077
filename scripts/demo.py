"""``make demo``: the whole agent, end to end, on this machine, in about a minute.

In a temporary directory, with generated credentials, everything on loopback:

1. a dev-api (the reference Resource API + CDN; never for production);
2. the agent (``azaion-loader serve``) on its own Unix socket and a free loopback port;
3. ``azaion-loader login``, then ``upload`` of a sample resource and ``load`` of it back,
   compared byte for byte, and a look at what each side holds (the cache: ciphertext only);
4. when a Docker engine answers (``DOCKER_HOST``, else the default socket): a tiny image is
   built, packed into an encrypted archive (``pack-images``), removed from the engine, and
   brought back by ``azaion-loader unlock --wait``; without one, how to get one;
5. everything is stopped and removed (``--keep`` keeps the directory and prints where it is).

Nothing outside the temporary directory is touched except, with an engine, the one demo image
(created and removed again). Exit status 0 when every step worked.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import hashlib
import io
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from azaion_loader_dev.harness.agent import AgentProcess, agent_env, free_port
from azaion_loader_dev.harness.devapi import DevApi, new_dev_api
from azaion_loader_dev.harness.process import log_tail

REPO = Path(__file__).resolve().parent.parent
EMAIL = "demo@localhost"
FOLDER = "models"
SAMPLE = "sample-model.bin"
SAMPLE_SIZE = 3 * 1024 * 1024 + 123
DEMO_REPOSITORY = "azaion-loader-demo/hello"
UNLOCK_TIMEOUT = 300.0
TAIL_LINES = 20  # of a log, when a step failed
NO_ENGINE_HELP = """\
   No Docker engine answered, so the unlock part is skipped. To see it:
     - Debian/Ubuntu: sudo apt-get install docker.io && sudo systemctl start docker,
       then run `make demo` as root or as a member of the docker group;
     - or point DOCKER_HOST at an engine you have: DOCKER_HOST=unix:///path/to/docker.sock make demo
       (rootless Docker: DOCKER_HOST=unix://$XDG_RUNTIME_DIR/docker.sock);
     - the tests and benchmarks start a private engine: azaion_loader_dev/harness/dockerd.py."""


class DemoFailed(Exception):
    pass


def say(step: str) -> None:
    print(f"\n== {step}", flush=True)


def note(text: str) -> None:
    print(f"   {text}", flush=True)


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.password = secrets.token_urlsafe(18)
        self.socket_path = root / "loader.sock"
        self.port = free_port()
        self.dev_api: DevApi | None = None
        self.agent: AgentProcess | None = None
        self.agent_log = root / "agent.log"
        self.dev_api_log = root / "dev-api" / "dev-api.log"
        self.docker_host: str | None = None
        self.docker: Any = None
        self.demo_image_id: str | None = None

    # -- running things ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        # State, cache and images.enc in the root; no unlock at start: the demo starts it itself.
        env = agent_env(
            self.root,
            RESOURCE_API_URL=self.api.url,
            LOADER_SOCKET_PATH=str(self.socket_path),
            LOADER_HTTP_PORT=str(self.port),
            LOADER_LOG_LEVEL="INFO",
            LOADER_ALLOWED_GROUPS=grp.getgrgid(os.getgid()).gr_name,  # yours, on this machine
        )
        if self.docker_host:
            env["DOCKER_HOST"] = self.docker_host
        return env

    def cli(
        self, *args: str, show: bool = True, ok: tuple[int, ...] = (0,), **extra_env: str
    ) -> str:
        """Run ``azaion-loader ARGS`` as a user would; print the command and what it printed.
        ``ok``: the exit codes that are not a failure (``status`` exits 2 while locked)."""
        command = [sys.executable, "-m", "agent", *args]
        if args and args[0] in ("status", "login", "unlock", "load", "upload"):
            command += ["--socket", str(self.socket_path)]
        if show:
            print(f"   $ azaion-loader {shlex.join(args)}", flush=True)
        result = subprocess.run(
            command,
            cwd=REPO,
            env={**self.env(), **extra_env},
            capture_output=True,
            text=True,
            timeout=UNLOCK_TIMEOUT,
        )
        for line in result.stdout.strip().splitlines():
            if show:
                print(f"     {line}", flush=True)
        if result.returncode not in ok:
            raise DemoFailed(f"`azaion-loader {args[0]}` failed: {result.stderr.strip()}")
        return result.stdout

    @property
    def api(self) -> DevApi:
        assert self.dev_api is not None
        return self.dev_api

    def start_dev_api(self) -> None:
        try:
            self.dev_api = new_dev_api(self.root / "dev-api", email=EMAIL, password=self.password)
        except RuntimeError as exc:
            raise DemoFailed(
                f"dev-api did not start:\n{log_tail(self.dev_api_log, TAIL_LINES)}"
            ) from exc

    def start_agent(self) -> None:
        self.agent = AgentProcess(self.root, self.env())
        try:
            self.agent.start()
        except AssertionError as exc:
            raise DemoFailed(
                f"the agent did not start:\n{log_tail(self.agent_log, TAIL_LINES)}"
            ) from exc

    def stop(self) -> None:
        if self.agent is not None:
            with contextlib.suppress(AssertionError):  # killed after its time: stopped too
                self.agent.stop()
        if self.dev_api is not None:
            self.dev_api.stop()
        self.agent = self.dev_api = None
        if self.docker is not None:
            if self.demo_image_id is not None:
                with contextlib.suppress(Exception):
                    self.docker.images.remove(self.demo_image_id, force=True)
            self.docker.close()

    # -- the steps -----------------------------------------------------------------------------

    def services(self) -> None:
        say("1. Start a dev-api and the agent (everything on loopback, in a temp directory)")
        self.start_dev_api()
        note(f"dev-api (reference Resource API + CDN, NOT for production) on {self.api.url}")
        note(f"its account: {EMAIL}, with a generated password (never printed)")
        self.start_agent()
        note(f"agent serving on unix:{self.socket_path} and http://127.0.0.1:{self.port}")
        self.cli("status", ok=(0, 2))  # 2: serving, images locked (0 once unlocked)

    def login(self) -> None:
        say("2. Give the agent its credentials (password from AZAION_PASSWORD, not the command)")
        self.cli("login", "--email", EMAIL, AZAION_PASSWORD=self.password)

    def resources(self) -> None:
        say("3. Upload a sample resource, then load it back through the agent")
        sample = self.root / SAMPLE
        data = b"demo model weights " + os.urandom(SAMPLE_SIZE)
        sample.write_bytes(data)
        note(f"{sample.name}: {len(data)} bytes, sha256 {_sha256(data)[:16]}...")
        self.cli("upload", str(sample), "--folder", FOLDER)
        loaded = self.root / "loaded.bin"
        self.cli("load", SAMPLE, "--folder", FOLDER, "-o", str(loaded))
        back = loaded.read_bytes()
        if back != data:
            raise DemoFailed("the loaded resource differs from the uploaded one")
        note(f"loaded back: {len(back)} bytes, byte for byte the same")
        self.show_where_it_lives(data)

    def show_where_it_lives(self, data: bytes) -> None:
        say("   Where the resource lives now")
        small = self.api.data_dir / "small" / FOLDER / SAMPLE
        bigs = list((self.api.data_dir / "cdn" / FOLDER).glob("*"))
        cached = [p for p in (self.root / "cache").rglob("*") if p.is_file()]
        note(
            f"Resource API, small part: {small.stat().st_size} bytes (a key fragment, header, head)"
        )
        for big in bigs:
            note(
                f"CDN, big part {big.name[:16]}...: {big.stat().st_size} bytes "
                "(the other fragment + ciphertext)"
            )
        probe = data[100_000:100_064]
        for path in cached:
            holds = probe in path.read_bytes()
            note(f"agent cache {path.relative_to(self.root)}: {path.stat().st_size} bytes, "
                 f"{'PLAINTEXT!' if holds else 'ciphertext only'}")  # fmt: skip
            if holds:
                raise DemoFailed("plaintext found in the cache")
        note("neither part alone opens anything: the data key needs both fragments")

    def images(self) -> bool:
        say("4. Unlock: Docker images that ship only as an encrypted archive")
        host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self.docker = _docker_client(host)
        if self.docker is None:
            note(f"no Docker engine answers at {host}")
            print(NO_ENGINE_HELP, flush=True)
            return False
        note(f"Docker engine at {host}: {self.docker.version().get('Version', '?')}")
        tag = secrets.token_hex(4)
        ref = f"{DEMO_REPOSITORY}:{tag}"
        marker = f"hello from the azaion-loader demo {tag}\n".encode()
        self.docker.api.import_image_from_data(
            _tiny_rootfs(marker), repository=DEMO_REPOSITORY, tag=tag
        )
        self.demo_image_id = str(self.docker.images.get(ref).id)
        note(f"built a tiny image {ref} ({self.demo_image_id[:19]})")
        archive = self.root / "images.enc"
        fragment = self.api.key_fragment_path
        # The dev-api serves this fragment: restart it with the new one after packing.
        self.docker_host = host
        self.cli(
            "pack-images", "--out", str(archive), "--fragment-out", str(fragment), "--force", ref
        )
        self.docker.images.remove(self.demo_image_id, force=True)
        note(f"removed {ref} from the engine: the device now has only {archive.name}")
        self.api.restart()
        note(f"dev-api restarted to serve the archive's key fragment, on {self.api.url}")
        if self.agent is not None:
            self.agent.stop()
        self.start_agent()
        note("agent restarted with DOCKER_HOST pointing at the engine")
        self.cli("login", "--email", EMAIL, AZAION_PASSWORD=self.password)
        self.cli("unlock", "--wait")
        image = self.docker.images.get(self.demo_image_id)
        note(f"the engine has it again: {', '.join(image.tags)}")
        if list(self.root.rglob("*.tar")):
            raise DemoFailed("a tar file appeared: the images touched the disk in plaintext")
        note("no tar file was written: the archive was decrypted straight into the engine")
        self.cli("status")
        return True


def _docker_client(host: str) -> Any:
    """A client of the engine at ``host`` if it answers, else None (never raises)."""
    if host.startswith("unix://"):
        path = host.removeprefix("unix://")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
            except OSError:
                return None
    try:
        import docker

        client = docker.DockerClient(base_url=host, timeout=60)
        client.ping()
        return client
    except Exception:
        return None


def _tiny_rootfs(marker: bytes) -> bytes:
    """A one-file root file system: enough for an image the engine can save and load."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(marker)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(marker))
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    # Short, under /tmp: a Unix socket path must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="azaion-demo-", dir="/tmp"))
    try:
        yield root
    finally:
        if keep:
            print(f"\nkept {root} (logs: agent.log, dev-api/dev-api.log)")
        else:
            shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    with workspace(args.keep) as root:
        demo = Demo(root)
        try:
            demo.services()
            demo.login()
            demo.resources()
            unlocked = demo.images()
        except DemoFailed as exc:
            print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
            print(
                f"agent log (last lines):\n{log_tail(demo.agent_log, TAIL_LINES)}", file=sys.stderr
            )
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        finally:
            say("5. Stop everything")
            demo.stop()
            note("agent and dev-api stopped" + ("; demo image removed" if demo.docker else ""))
    print(
        "\nDone: login, upload, load"
        + (", pack and unlock" if unlocked else " (unlock skipped: no Docker engine)")
        + " all worked."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
