"""agent.images against a real, private dockerd (see tests/fixtures/dockerd.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import DockerError, DockerUnavailable, NotFoundError
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
def test_save_then_load_round_trip(dockerd: Dockerd, engine: ImageEngine) -> None:
    image_id = import_image(dockerd.client, "azaion/test-images:roundtrip")
    assert engine.image_id("azaion/test-images:roundtrip") == image_id
    tar = b"".join(engine.save(["azaion/test-images:roundtrip"], chunk_size=64 * 1024))
    dockerd.client.images.remove("azaion/test-images:roundtrip")
    assert engine.present([image_id]) == set()

    loaded = engine.load(tar[i : i + 65536] for i in range(0, len(tar), 65536))

    assert loaded == ["azaion/test-images:roundtrip"]
    assert engine.present([image_id, "sha256:" + "0" * 64]) == {image_id}
    assert "azaion/test-images:roundtrip" in engine.repo_tags(image_id)


@pytest.mark.docker
def test_tag_points_a_new_tag_at_the_image(dockerd: Dockerd, engine: ImageEngine) -> None:
    image_id = import_image(dockerd.client, "azaion/test-images:tagme")
    engine.tag(image_id, "azaion/test-images", "v9")
    assert engine.image_id("azaion/test-images:v9") == image_id


@pytest.mark.docker
def test_unknown_image_is_not_found(engine: ImageEngine) -> None:
    with pytest.raises(NotFoundError, match="azaion/nothing-here"):
        engine.image_id("azaion/nothing-here:1")


@pytest.mark.docker
def test_garbage_is_a_docker_error(engine: ImageEngine) -> None:
    with pytest.raises(DockerError, match="could not load") as caught:
        engine.load(iter([b"this is not a tar archive" * 100]))
    assert not isinstance(caught.value, DockerUnavailable)


class _Stop(Exception):
    pass


@pytest.mark.docker
def test_failing_source_aborts_the_load_and_nothing_is_kept(
    dockerd: Dockerd, engine: ImageEngine
) -> None:
    image_id = import_image(dockerd.client, "azaion/test-images:aborted")
    tar = b"".join(engine.save(["azaion/test-images:aborted"]))
    dockerd.client.images.remove("azaion/test-images:aborted")
    before = dockerd.image_ids()

    def half_then_fail() -> Iterator[bytes]:
        yield tar[: len(tar) // 2]
        raise _Stop("source failed")

    with pytest.raises(_Stop):
        engine.load(half_then_fail())

    assert dockerd.image_ids() == before
    assert image_id not in dockerd.image_ids()


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
