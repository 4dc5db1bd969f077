"""Shared fixtures: each lives in tests/fixtures/ and is loaded here."""

pytest_plugins = ["tests.fixtures.agent", "tests.fixtures.devapi", "tests.fixtures.dockerd"]
