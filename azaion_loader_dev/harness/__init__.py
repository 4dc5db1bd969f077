"""What the tests, the benchmarks and the scripts start and measure with: one copy of each.

- ``harness.devapi``: ``DevApi``, a dev-api subprocess on a free loopback port (generated
  credentials and images key fragment, its announcement read with a deadline, stop and restart
  on the same port, the ``/_dev/`` admin endpoints), and ``new_dev_api`` to make one;
- ``harness.agent``: ``AgentProcess``, ``python -m agent serve`` with an environment of its own
  (``agent_env``), waited for with a deadline, and requests over its socket or loopback port;
- ``harness.dockerd``: ``DockerDaemon``, a private dockerd, and images built without a registry;
- ``harness.process``: stopping a child process within a deadline, the tail of its log;
- ``harness.measure``: readers of ``/proc`` (RSS, CPU, I/O) and the benchmarks' shared baselines.

Imported by module (``from azaion_loader_dev.harness.agent import AgentProcess``): this file
imports nothing, so a measured child process pays only for what it uses. The pytest fixtures
over these live in ``tests/fixtures/``.
"""
