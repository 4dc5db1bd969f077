"""Signed resources: ``upload --sign-key`` (the CLI signs, the agent never holds the key) and
loads that refuse what is unsigned, untrusted, replayed or altered, before a byte is handed
out. Against the real dev-api over loopback; the end-to-end cases run the real agent and CLI."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from loguru import logger

from agent import releases, resources, signing
from agent.api_client import ResourceApiClient
from agent.errors import (
    ConflictError,
    NotFoundError,
    RequestError,
    RollbackRefused,
    SignatureError,
    UpstreamNotFound,
)
from agent.resources import ResourceStore, SmallPart
from agent.retry import RetryPolicy
from tests.fixtures.agent import AgentProcess, login
from tests.fixtures.devapi import DevApi

FAST = RetryPolicy(base_delay=0.0, max_delay=0.0, max_attempts=5, max_total=60.0)
SIZE = 3 * 1024 * 1024 + 123  # a few blocks, and a big part beyond the small part's head

MakeAgent = Callable[..., AgentProcess]


class Publisher:
    """A publisher key pair in ``directory``: ``key`` (private) and ``key.pub``."""

    def __init__(self, directory: Path, name: str = "publisher") -> None:
        self.path = directory / f"{name}.key"
        self.public = signing.write_key_pair(self.path, name)
        self.private = signing.read_private_key(self.path)

    @property
    def pub_path(self) -> Path:
        return self.path.with_name(self.path.name + ".pub")

    def trust_in(self, publishers: Path) -> None:
        publishers.mkdir(exist_ok=True)
        (publishers / self.pub_path.name).write_bytes(self.pub_path.read_bytes())


class Rig:
    """One dev-api, stores that act as devices (each its own cache), a trusted publisher."""

    def __init__(self, dev_api: DevApi, root: Path) -> None:
        self.dev_api = dev_api
        self.root = root
        self.publishers = root / "publishers.d"
        self.publisher = Publisher(root)
        self.publisher.trust_in(self.publishers)
        self.made: list[ResourceApiClient | ResourceStore] = []

    def client(self) -> ResourceApiClient:
        client = ResourceApiClient(self.dev_api.url, policy=FAST)
        client.set_credentials(self.dev_api.email, self.dev_api.password)
        self.made.append(client)
        return client

    def store(
        self,
        publishers: Path | None = None,
        state: Path | None = None,
        allow_downgrade: bool = False,
    ) -> ResourceStore:
        """A device trusting ``publishers`` (by default the rig's publisher), keeping its
        record of resource releases in ``state`` (by default in memory)."""
        cache = self.root / f"cache-{len(self.made)}"
        store = ResourceStore(
            self.client(),
            cache,
            publishers_dir=publishers or self.publishers,
            state_dir=state,
            allow_downgrade=allow_downgrade,
        )
        self.made.append(store)
        return store

    async def close(self) -> None:
        for thing in reversed(self.made):
            await thing.close()


@pytest.fixture
async def rig(shared_dev_api: DevApi, tmp_path: Path) -> AsyncIterator[Rig]:
    made = Rig(shared_dev_api, tmp_path)
    yield made
    await made.close()


@pytest.fixture
def journal() -> Iterator[list[str]]:
    """What the agent's code logs meanwhile, a line each: level, then message."""
    lines: list[str] = []
    sink = logger.add(lines.append, format="{level} {message}", level="DEBUG")
    yield lines
    logger.remove(sink)


def data_of(size: int, seed: int) -> bytes:
    return hashlib.sha256(seed.to_bytes(8, "big")).digest() * (size // 32) + bytes(size % 32)


async def pieces(data: bytes, size: int = 65521) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


async def signed_upload(
    store: ResourceStore,
    key: Ed25519PrivateKey,
    folder: str,
    name: str,
    data: bytes,
    release: int = 5,
) -> None:
    public = signing.public_key_of(key)
    pending = await store.upload_for_signing(folder, name, pieces(data), public.key_id, release)
    signature = key.sign(pending.statement.encode())
    result = await store.commit_signature(pending.upload_id, folder, name, public.raw, signature)
    assert (result.publisher, result.release, result.size) == (public.name, release, len(data))


async def load(store: ResourceStore, folder: str, name: str) -> bytes:
    resource = await store.open(folder, name)
    out = bytearray()
    async for block in resource:
        out += block
    return bytes(out)


def cached_files(store: ResourceStore) -> list[Path]:
    root = store.cache.root
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def test_a_signed_upload_loads_on_a_device_that_trusts_its_key(rig: Rig) -> None:
    uploader, device = rig.store(), rig.store()
    data = data_of(SIZE, 1)
    await signed_upload(uploader, rig.publisher.private, "models", "signed.bin", data, release=9)
    raw = await rig.client().get_small_part("models", "signed.bin")
    small = SmallPart.unpack(raw)
    assert raw[4] == resources.SMALL_VERSION_SIGNED and small.signature is not None
    statement = small.signature.statement
    assert statement.kind is signing.Kind.RESOURCE and statement.release == 9
    assert statement.key_id == rig.publisher.public.key_id
    manifest = signing.resource_manifest("models", "signed.bin", len(data), 9)
    assert statement.manifest_sha256 == hashlib.sha256(manifest).digest()
    assert (statement.ciphertext_size, statement.ciphertext_sha256) == small.ciphertext()
    assert await load(device, "models", "signed.bin") == data  # cold: follows the download
    assert await load(device, "models", "signed.bin") == data  # warm: from the cache


async def test_an_unsigned_resource_is_refused_before_anything_is_downloaded(rig: Rig) -> None:
    uploader, device = rig.store(), rig.store()
    await uploader.upload("models", "plain.bin", pieces(data_of(SIZE, 2)))
    with pytest.raises(SignatureError, match="not signed") as refused:
        await device.open("models", "plain.bin")
    assert "resource models/plain.bin" in str(refused.value)
    assert cached_files(device) == []  # not a byte of the big part was fetched
    # A device with no key installed loads it as before.
    assert await load(rig.store(rig.root / "none"), "models", "plain.bin") == data_of(SIZE, 2)


async def test_a_resource_signed_by_an_untrusted_key_is_refused(rig: Rig) -> None:
    stranger = Publisher(rig.root, "stranger")
    uploader, device = rig.store(), rig.store()
    await signed_upload(uploader, stranger.private, "models", "stranger.bin", data_of(4096, 3))
    with pytest.raises(SignatureError, match=f"key {stranger.public.name}.*does not trust"):
        await device.open("models", "stranger.bin")
    assert cached_files(device) == []
    # Rotation: once the operator installs that key too, the same resource loads.
    stranger.trust_in(rig.publishers)
    assert await load(device, "models", "stranger.bin") == data_of(4096, 3)


async def test_a_signed_small_part_replayed_under_another_name_is_refused(rig: Rig) -> None:
    uploader, device = rig.store(), rig.store()
    await signed_upload(uploader, rig.publisher.private, "models", "old.bin", data_of(SIZE, 4))
    api = rig.client()
    await api.put_small_part("models", "new.bin", await api.get_small_part("models", "old.bin"))
    with pytest.raises(SignatureError, match="manifest other than the one signed") as refused:
        await device.open("models", "new.bin")
    assert "models/new.bin" in str(refused.value)


async def test_a_resource_the_api_encrypted_anew_under_an_old_signature_is_refused(
    rig: Rig,
) -> None:
    """Whoever holds both parts' storage (API and CDN) can encrypt anything; a signature it
    carries over from a genuine upload does not cover the new parts."""
    uploader, device = rig.store(), rig.store()
    await signed_upload(uploader, rig.publisher.private, "models", "model.bin", data_of(SIZE, 5))
    api = rig.client()
    genuine = SmallPart.unpack(await api.get_small_part("models", "model.bin"))
    await uploader.upload("models", "evil.bin", pieces(data_of(SIZE, 6)))  # same size, other data
    evil = SmallPart.unpack(await api.get_small_part("models", "evil.bin"))
    forged = SmallPart(
        evil.fragment, evil.big_name, evil.big_size, evil.big_sha256, evil.head, genuine.signature
    )
    await api.put_small_part("models", "model.bin", forged.pack())
    with pytest.raises(SignatureError, match="altered after signing"):
        await device.open("models", "model.bin")
    # The same with the genuine big part but another head: also not what was signed.
    head = bytearray(genuine.head)
    head[-1] ^= 1
    other_head = SmallPart(
        genuine.fragment,
        genuine.big_name,
        genuine.big_size,
        genuine.big_sha256,
        bytes(head),
        genuine.signature,
    )
    await api.put_small_part("models", "model.bin", other_head.pack())
    with pytest.raises(SignatureError, match="altered after signing"):
        await device.open("models", "model.bin")


async def test_a_truncated_or_extended_record_is_refused(rig: Rig) -> None:
    uploader, device = rig.store(), rig.store()
    await signed_upload(uploader, rig.publisher.private, "models", "sized.bin", data_of(SIZE, 7))
    api = rig.client()
    genuine = SmallPart.unpack(await api.get_small_part("models", "sized.bin"))
    shorter = SmallPart(
        genuine.fragment,
        genuine.big_name,
        genuine.big_size,
        genuine.big_sha256,
        genuine.head[:-1],
        genuine.signature,
    )
    await api.put_small_part("models", "sized.bin", shorter.pack())
    with pytest.raises(SignatureError, match="truncated or extended"):
        await device.open("models", "sized.bin")


async def test_the_signature_step_checks_the_key_and_the_signature_before_storing(
    rig: Rig,
) -> None:
    store = rig.store()
    key = rig.publisher.private
    public = rig.publisher.public
    data = data_of(70000, 8)
    pending = await store.upload_for_signing("models", "step.bin", pieces(data), public.key_id, 2)
    api = rig.client()
    other = signing.public_key_of(Ed25519PrivateKey.generate())
    signature = key.sign(pending.statement.encode())
    with pytest.raises(RequestError, match="not key"):
        await store.commit_signature(pending.upload_id, "models", "step.bin", other.raw, signature)
    damaged = bytes([signature[0] ^ 1]) + signature[1:]
    with pytest.raises(RequestError, match="does not verify"):
        await store.commit_signature(pending.upload_id, "models", "step.bin", public.raw, damaged)
    with pytest.raises(NotFoundError):  # the id is for that folder and name only
        await store.commit_signature(
            pending.upload_id, "models", "other.bin", public.raw, signature
        )
    with pytest.raises(UpstreamNotFound):
        await api.get_small_part("models", "step.bin")  # nothing stored meanwhile
    await store.commit_signature(pending.upload_id, "models", "step.bin", public.raw, signature)
    with pytest.raises(NotFoundError):  # once only
        await store.commit_signature(pending.upload_id, "models", "step.bin", public.raw, signature)
    assert await load(rig.store(), "models", "step.bin") == data


async def test_uploads_waiting_for_a_signature_are_bounded_and_expire(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = rig.store()
    key_id = rig.publisher.public.key_id
    waiting = [
        await store.upload_for_signing("models", f"w{i}.bin", pieces(b"x" * 5000), key_id, 1)
        for i in range(resources.MAX_PENDING_SIGNATURES)
    ]
    assert len(spools_of(store)) == resources.MAX_PENDING_SIGNATURES
    sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        sent.append(1)
        yield b"y"

    with pytest.raises(ConflictError, match="wait for their signature"):
        await store.upload_for_signing("models", "more.bin", body(), key_id, 1)
    assert sent == []  # refused before the body was read
    first = waiting[0]
    public = rig.publisher.public
    signature = rig.publisher.private.sign(first.statement.encode())
    await store.commit_signature(first.upload_id, "models", "w0.bin", public.raw, signature)
    # One slot is free again; an upload nobody signs in time is dropped, spool and all.
    monkeypatch.setattr(resources, "PENDING_SIGNATURE_SECONDS", 0.05)
    late = await store.upload_for_signing("models", "late.bin", pieces(b"z" * 5000), key_id, 1)
    assert late.expires_in == 0.05
    deadline = asyncio.get_running_loop().time() + 10
    while len(spools_of(store)) > resources.MAX_PENDING_SIGNATURES - 1:
        assert asyncio.get_running_loop().time() < deadline, "the unsigned upload never expired"
        await asyncio.sleep(0.01)  # polling what the expiry timer changes, with a deadline
    signature = rig.publisher.private.sign(late.statement.encode())
    with pytest.raises(NotFoundError, match="expired"):
        await store.commit_signature(late.upload_id, "models", "late.bin", public.raw, signature)
    await store.close()  # the agent stopping drops every spool
    assert spools_of(store) == []


def spools_of(store: ResourceStore) -> list[Path]:
    return [p for p in cached_files(store) if p.name.startswith(".upload-")]


async def test_an_older_signed_release_of_a_resource_is_refused_after_a_newer_one(
    rig: Rig, journal: list[str]
) -> None:
    uploader, state = rig.store(), rig.root / "state"
    device = rig.store(state=state)
    key = rig.publisher.private
    await signed_upload(uploader, key, "models", "m.bin", data_of(SIZE, 10), release=5)
    assert await load(device, "models", "m.bin") == data_of(SIZE, 10)
    record = json.loads((state / releases.FILE_NAME).read_text())
    assert record == {"version": 1, "releases": {"models/m.bin": 5}}
    # The API puts back an older signed release under the same name.
    await signed_upload(uploader, key, "models", "m.bin", data_of(SIZE, 11), release=3)
    with pytest.raises(RollbackRefused, match="release 3, older than release 5") as refused:
        await device.open("models", "m.bin")
    assert "models/m.bin" in str(refused.value) and "LOADER_ALLOW_DOWNGRADE" in str(refused.value)
    restarted = rig.store(state=state)  # the record survives a restart
    with pytest.raises(RollbackRefused):
        await restarted.open("models", "m.bin")
    # The operator allows it for one boot: it loads, said at warning, and the record follows.
    allowed = rig.store(state=state, allow_downgrade=True)
    assert await load(allowed, "models", "m.bin") == data_of(SIZE, 11)
    assert any("WARNING" in line and "LOADER_ALLOW_DOWNGRADE" in line for line in journal)
    assert json.loads((state / releases.FILE_NAME).read_text())["releases"] == {"models/m.bin": 3}
    # A newer release always loads, and is recorded.
    await signed_upload(uploader, key, "models", "m.bin", data_of(SIZE, 12), release=6)
    assert await load(rig.store(state=state), "models", "m.bin") == data_of(SIZE, 12)
    assert json.loads((state / releases.FILE_NAME).read_text())["releases"] == {"models/m.bin": 6}


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": 2, "releases": {}}', b'{"version": 1, "releases": {"x": 1}}',
     b'{"version": 1, "releases": {"a/b": -1}}', b"[" * 100_000],
    ids=["not-json", "version", "name", "release", "deep"],
)  # fmt: skip
def test_a_release_record_that_cannot_be_read_is_set_aside(
    tmp_path: Path, content: bytes, journal: list[str]
) -> None:
    (tmp_path / releases.FILE_NAME).write_bytes(content)
    record = releases.ResourceReleases(tmp_path)
    assert record.check("a", "b", 1)  # afresh: nothing known
    assert (tmp_path / (releases.FILE_NAME + ".corrupt")).read_bytes() == content
    assert not (tmp_path / releases.FILE_NAME).exists()
    assert any("WARNING" in line and "cannot be read" in line for line in journal)


# -- the real agent and CLI ---------------------------------------------------------------------


def test_cli_signs_uploads_and_the_agent_refuses_what_is_unsigned(
    make_agent: MakeAgent, dev_api: DevApi, agent_root: Path
) -> None:
    publishers = agent_root / "publishers.d"
    agent = make_agent(RESOURCE_API_URL=dev_api.url, LOADER_PUBLISHERS_DIR=str(publishers))
    login(agent, dev_api)
    keygen = subprocess.run(
        [sys.executable, "-m", "agent", "publisher-keygen", "--out", str(agent_root / "pub.key")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert keygen.returncode == 0, keygen.stderr
    publisher = Publisher.__new__(Publisher)
    publisher.path = agent_root / "pub.key"
    publisher.trust_in(publishers)
    key_id = signing.read_public_key(publisher.pub_path).name
    data = os.urandom(2 * 1024 * 1024 + 5)
    source = agent_root / "model.bin"
    source.write_bytes(data)

    up = agent.cli(
        "upload", str(source), "--folder", "models", "--sign-key", str(publisher.path),
        "--release", "12",
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert f"signed by key {key_id} as release 12" in up.stdout
    out = agent_root / "loaded.bin"
    down = agent.cli("load", "model.bin", "--folder", "models", "-o", str(out))
    assert down.returncode == 0, down.stderr
    assert out.read_bytes() == data
    assert "PRIVATE KEY" not in agent.log()

    plain = agent.cli("upload", str(source), "--folder", "models", "--name", "plain.bin")
    assert plain.returncode == 0, plain.stderr
    refused = agent.cli("load", "plain.bin", "--folder", "models", "-o", str(agent_root / "p"))
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert "resource models/plain.bin is not signed" in line
    assert not (agent_root / "p").exists()
    reply = agent.request("POST", "/load/plain.bin", {"folder": "models"})
    assert reply.status == 502 and reply.json()["error"] == "bad_signature"


def test_cli_signed_upload_refuses_bad_arguments_before_sending(
    make_agent: MakeAgent, dev_api: DevApi, agent_root: Path
) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    login(agent, dev_api)
    source = agent_root / "m.bin"
    source.write_bytes(b"m" * 1000)
    key = agent_root / "k.key"
    signing.write_key_pair(key)
    for args, reason in (
        (["--sign-key", str(key)], "needs --release"),
        (["--release", "3"], "give --sign-key"),
        (["--sign-key", str(agent_root / "absent.key"), "--release", "3"], "does not exist"),
    ):
        result = agent.cli("upload", str(source), "--folder", "models", *args)
        assert result.returncode != 0
        [line] = result.stderr.strip().splitlines()
        assert reason in line
    key.chmod(0o644)
    result = agent.cli("upload", str(source), "--folder", "models", "--sign-key", str(key),
                       "--release", "3")  # fmt: skip
    assert result.returncode != 0 and "readable by others" in result.stderr


def test_http_signed_upload_steps_validate_their_input(
    make_agent: MakeAgent, dev_api: DevApi
) -> None:
    agent = make_agent(RESOURCE_API_URL=dev_api.url)
    login(agent, dev_api)
    for query in ("", "?key_id=zz&release=1", "?key_id=0011223344556677&release=-1"):
        reply = agent.request("POST", f"/upload/x.bin/statement{query}", None)
        assert reply.status == 400, reply.body
        assert reply.json()["error"] == "bad_request"
    body = {
        "folder": "models",
        "upload_id": "ab" * 16,
        "public_key": base64.b64encode(bytes(32)).decode(),
        "signature": "00" * 64,
    }
    reply = agent.request("POST", "/upload/x.bin/signature", body)
    assert reply.status == 404 and reply.json()["error"] == "not_found"
    reply = agent.request("POST", "/upload/x.bin/signature", {**body, "signature": "zz"})
    assert reply.status == 400 and "signature" in reply.json()["message"]
