"""Shared fixtures: each lives in tests/fixtures/ and is loaded here.

``secretwatch`` comes last: it watches every test's agent logs and responses for the test
passwords, tokens and key fragments that the other fixtures create.
"""

pytest_plugins = [
    "tests.fixtures.agent",
    "tests.fixtures.devapi",
    "tests.fixtures.dockerd",
    "tests.fixtures.secretwatch",
    "tests.fixtures.hostile",  # after the watch: it tells the watch its secrets
    "tests.fixtures.release",
    "tests.fixtures.users",
]
