"""azaion-loader's development tools: never part of the device package.

- ``devapi``: the reference Resource API + CDN (docs/resource-api.md), with fault injection;
- ``cli``: the ``azaion-loader-dev`` command (``azaion-loader-dev dev-api ...``);
- ``harness``: what the tests, the benchmarks and the scripts start and measure with (a dev-api
  process, an agent process, a private dockerd, /proc readers).

This package may import ``agent``; ``agent`` never imports it (only ``azaion-loader dev-api``
looks for it, when called). ``packaging/build-deb.sh`` leaves it out of the .deb.
"""
