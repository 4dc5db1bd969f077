"""agent.images (the Docker SDK, for ``pack-images``) against a real, private dockerd (see
tests/fixtures/dockerd.py); the unlock's engine client is tests/test_engine.py's."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import DockerUnavailable, NotFoundError
from agent.images import ImageEngine, Reference, parse_reference
from tests.fixtures.dockerd import Dockerd, DockerDaemon, import_image


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("azaion/app:1.2", Reference("azaion/app", "1.2")),
        ("azaion/app", Reference("azaion/app", None)),
        ("registry:5000/team/app", Reference("registry:5000/team/app", None)),
        ("registry:5000/team/app:v3", Reference("registry:5000/team/app", "v3")),
        ("app@sha256:" + "a" * 64, Reference("app", None)),
        ("sha256:" + "b" * 64, Reference(None, None)),
        ("0123456789ab", Reference(None, None)),
    ],
)
def test_parse_reference(ref: str, expected: Reference) -> None:
    assert parse_reference(ref) == expected


@pytest.fixture
def engine(dockerd: Dockerd) -> Iterator[ImageEngine]:
    with ImageEngine.connect(dockerd.host) as connected:
        yield connected


@pytest.mark.docker
def test_engine_not_up_is_unavailable(late_dockerd: DockerDaemon) -> None:
    with pytest.raises(DockerUnavailable, match="is dockerd running"):
        ImageEngine.connect(late_dockerd.host)


@pytest.mark.docker
def test_image_id_and_save(dockerd: Dockerd, engine: ImageEngine) -> None:
    image_id = import_image(dockerd.client, "azaion/test-images:saved")
    assert engine.image_id("azaion/test-images:saved") == image_id
    tar = b"".join(engine.save(["azaion/test-images:saved"], chunk_size=64 * 1024))
    with tarfile.open(fileobj=io.BytesIO(tar)) as saved:
        manifest = json.load(saved.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == ["azaion/test-images:saved"]


@pytest.mark.docker
def test_unknown_image_is_not_found(engine: ImageEngine) -> None:
    with pytest.raises(NotFoundError, match="azaion/nothing-here"):
        engine.image_id("azaion/nothing-here:1")


def test_missing_dockerd_fails_under_ci_and_skips_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tests.fixtures.dockerd as fixture

    monkeypatch.setattr(fixture, "DOCKERD", Path("/nonexistent/dockerd"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="nonexistent/dockerd"):
        fixture.require_binaries()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="nonexistent/dockerd"):
        fixture.require_binaries()
