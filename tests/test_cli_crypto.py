"""``azaion-loader keygen / encrypt / decrypt``, run as real subprocesses."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import keys, stream

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *map(str, args)],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        timeout=120,
        check=False,
    )


def assert_failed_with_one_line(result: subprocess.CompletedProcess[bytes], code: int) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("azaion-loader: error: "), lines
    return lines[0]


@pytest.fixture
def fragment_files(tmp_path: Path) -> tuple[Path, Path]:
    """Two fragment files, written by the library (keygen itself is tested below)."""
    first, second = tmp_path / "api.key", tmp_path / "device.key"
    for path in (first, second):
        keys.write_fragment_file(path, keys.generate_fragment())
    return first, second


@pytest.fixture
def plaintext_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain.bin"
    path.write_bytes(os.urandom(3 * stream.CHUNK_SIZE + 4321))
    return path


def test_keygen_writes_a_private_one_line_fragment(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    assert cli("keygen", "--out", path).returncode == 0
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    assert len(base64.b64decode(text.strip(), validate=True)) == 32
    printed = cli("keygen", "--out", "-")
    assert printed.returncode == 0
    assert keys.decode_fragment(printed.stdout.decode()) != keys.read_fragment_file(path)


def test_keygen_never_overwrites_without_force(fragment_files: tuple[Path, Path]) -> None:
    path = fragment_files[0]
    before = path.read_text()
    line = assert_failed_with_one_line(cli("keygen", "--out", path), 1)
    assert "already exists" in line and "--force" in line
    assert path.read_text() == before
    assert cli("keygen", "--out", path, "--force").returncode == 0
    assert path.read_text() != before
    assert path.stat().st_mode & 0o777 == 0o600


def test_encrypt_then_decrypt_round_trips_with_two_fragments(
    tmp_path: Path, fragment_files: tuple[Path, Path], plaintext_file: Path
) -> None:
    api, device = fragment_files
    encrypted, decrypted = tmp_path / "data.enc", tmp_path / "data.out"
    encrypt = cli("encrypt", "--key-fragment", api, "--key-fragment", device, plaintext_file,
                  encrypted)  # fmt: skip
    assert encrypt.returncode == 0, encrypt.stderr
    assert encrypted.stat().st_size == stream.ciphertext_size(plaintext_file.stat().st_size)
    decrypt = cli("decrypt", "--key-fragment", device, "--key-fragment", api, encrypted,
                  decrypted)  # fmt: skip
    assert decrypt.returncode == 0, decrypt.stderr
    assert decrypted.read_bytes() == plaintext_file.read_bytes()
    assert decrypted.stat().st_mode & 0o777 == 0o600


def test_dash_means_stdin_and_stdout(fragment_files: tuple[Path, Path]) -> None:
    key = fragment_files[0]
    plaintext = os.urandom(100_000)
    encrypted = cli("encrypt", "--key-fragment", key, "-", "-", stdin=plaintext)
    assert encrypted.returncode == 0 and encrypted.stdout.startswith(stream.MAGIC)
    decrypted = cli("decrypt", "--key-fragment", key, "-", "-", stdin=encrypted.stdout)
    assert decrypted.returncode == 0 and decrypted.stdout == plaintext


def encrypt_with_library(plaintext_file: Path, key_file: Path) -> bytes:
    fragment = keys.read_fragment_file(key_file)
    return b"".join(stream.encrypt_iter([plaintext_file.read_bytes()], [fragment]))


def corrupt(data: bytes, kind: str) -> bytes:
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "tampered":
        return data[:200] + bytes([data[200] ^ 1]) + data[201:]
    if kind == "trailing":
        return data + b"\x00"
    return b"#!/bin/sh\necho this is not an encrypted stream\n"


@pytest.mark.parametrize(
    ("kind", "wording"),
    [
        ("truncated", "truncated"),
        ("tampered", "chunk 0 failed authentication"),
        ("trailing", "failed authentication"),
        ("foreign", "not an azaion-loader encrypted stream"),
        ("wrong_key", "wrong key"),
    ],
)
def test_failed_decrypt_says_one_line_and_leaves_no_output(
    tmp_path: Path, fragment_files: tuple[Path, Path], plaintext_file: Path, kind: str,
    wording: str,
) -> None:  # fmt: skip
    api, device = fragment_files
    bad = tmp_path / "bad.enc"
    data = encrypt_with_library(plaintext_file, api)
    bad.write_bytes(data if kind == "wrong_key" else corrupt(data, kind))
    key = device if kind == "wrong_key" else api
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = cli("decrypt", "--key-fragment", key, bad, out_dir / "plain")
    line = assert_failed_with_one_line(result, 1)
    assert wording in line and str(bad) in line
    assert list(out_dir.iterdir()) == []  # neither OUT nor a temporary file
    for secret in (api.read_text().strip(), device.read_text().strip()):
        assert secret not in line


def test_failed_decrypt_keeps_an_existing_output_file(
    tmp_path: Path, fragment_files: tuple[Path, Path], plaintext_file: Path
) -> None:
    api, device = fragment_files
    encrypted, output = tmp_path / "data.enc", tmp_path / "existing"
    encrypted.write_bytes(encrypt_with_library(plaintext_file, api))
    output.write_bytes(b"keep me")
    assert_failed_with_one_line(cli("decrypt", "--key-fragment", device, encrypted, output), 1)
    assert output.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["api.key", "device.key", "plain.bin", "data.enc", "existing"]
    )


def test_missing_key_fragment_or_input_is_one_clear_line(
    tmp_path: Path, fragment_files: tuple[Path, Path]
) -> None:
    missing_key = cli("encrypt", "--key-fragment", tmp_path / "nope.key", "-", tmp_path / "x")
    assert "key fragment file" in assert_failed_with_one_line(missing_key, 2)
    missing_input = cli("encrypt", "--key-fragment", fragment_files[0], tmp_path / "nope", "-")
    assert "does not exist" in assert_failed_with_one_line(missing_input, 1)
    assert not (tmp_path / "x").exists()
