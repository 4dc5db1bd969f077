"""One exception tree, one meaning table: every error class of the package lives in
``agent.errors``, has its own row in ``MEANINGS``, and the tree in the docstring is the code's."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import agent
from agent import errors
from agent.errors import MEANINGS, describe, status_for


def _every_module() -> list[str]:
    return [
        info.name
        for info in pkgutil.walk_packages(agent.__path__, prefix=f"{agent.__name__}.")
        if not info.name.endswith(".__main__")  # importing it runs the CLI
    ]


def _error_classes_of_the_package() -> set[type[errors.LoaderError]]:
    found: set[type[errors.LoaderError]] = set()
    for name in _every_module():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, errors.LoaderError) and obj.__module__.startswith("agent"):
                found.add(obj)
    return found


def test_the_walk_sees_the_whole_package() -> None:
    modules = _every_module()
    assert {"agent.server", "agent.unlock", "agent.cli.local", "agent.localclient"} <= set(modules)


def test_every_error_class_lives_in_errors() -> None:
    elsewhere = sorted(
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in _error_classes_of_the_package()
        if cls.__module__ != errors.__name__
    )
    assert not elsewhere, f"move these into agent/errors.py: {elsewhere}"


def test_every_error_class_has_its_own_meaning() -> None:
    unmapped = [cls.__name__ for cls in _error_classes_of_the_package() if cls not in MEANINGS]
    assert not unmapped, f"add rows to agent.errors.MEANINGS: {unmapped}"


def test_the_docstring_draws_the_tree() -> None:
    """Each class is drawn once, one level under its parent, and only the classes there are."""
    parents: dict[str, str] = {}
    stack: list[str] = []  # the class drawn last at each depth
    for line in (errors.__doc__ or "").splitlines():
        match = re.fullmatch(r"    ((?:\|   |    )*)(?:\+-- )?([A-Z]\w+)\s{2,}.*", line)
        if match is None:
            continue
        depth = len(match[1]) // 4 + (1 if "+--" in line else 0)
        del stack[depth:]
        if stack:
            parents[match[2]] = stack[-1]
        stack.append(match[2])
    assert set(parents) | {"LoaderError"} == {cls.__name__ for cls in MEANINGS}
    for cls in MEANINGS:
        if cls is not errors.LoaderError:
            assert parents[cls.__name__] == cls.__mro__[1].__name__, cls.__name__


def test_statuses_are_errors_and_codes_are_short() -> None:
    for cls, meaning in MEANINGS.items():
        assert 400 <= meaning.status < 600, cls
        assert meaning.code.isidentifier() and meaning.code.islower(), meaning.code


def test_subclass_without_row_takes_parents() -> None:
    class Special(errors.UpstreamTimeout):
        pass

    assert status_for(Special("x")) == (504, "upstream_timeout")
    assert status_for(errors.BadCredentials("x")) == (401, "bad_credentials")
    assert status_for(errors.InvalidName("x")) == (400, "invalid_name")
    assert describe(Special("slow")) == "the Resource API failed: slow"


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (errors.WrongKeyError("no"), "wrong key fragment: no"),
        (errors.TamperedError("chunk 3"), "the archive is tampered or corrupt: chunk 3"),
        (errors.DockerUnavailable("down"), "Docker load error: down"),
        (errors.UnlockError("images missing"), "images missing"),
        (KeyError("secret-looking text"), "unexpected error: KeyError"),
    ],
)
def test_describe_names_the_kind_then_the_message(error: BaseException, text: str) -> None:
    assert describe(error, subject="the archive") == text
