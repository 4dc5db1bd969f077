"""Every error class has its own HTTP row, and the mapping lives in one place."""

from __future__ import annotations

import inspect

from agent import errors
from agent.server import ERROR_STATUS, status_for


def _all_error_classes() -> list[type[errors.LoaderError]]:
    return [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.LoaderError)
    ]


def test_every_error_class_is_mapped() -> None:
    unmapped = [cls.__name__ for cls in _all_error_classes() if cls not in ERROR_STATUS]
    assert not unmapped, f"add these to agent.server.ERROR_STATUS: {unmapped}"


def test_statuses_are_errors_and_codes_are_short() -> None:
    for cls, (status, code) in ERROR_STATUS.items():
        assert 400 <= status < 600, cls
        assert code.isidentifier() and code.islower(), code


def test_subclass_without_row_takes_parents() -> None:
    class Special(errors.UpstreamTimeout):
        pass

    assert status_for(Special("x")) == (504, "upstream_timeout")
    assert status_for(errors.BadCredentials("x")) == (401, "bad_credentials")
    assert status_for(errors.InvalidName("x")) == (400, "invalid_name")
