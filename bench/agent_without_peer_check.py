"""The agent with its peer check switched off: bench/bench_load.py's baseline for the check's
cost. Nothing in the agent itself turns the check off; this module does, for measuring only."""

import sys

import agent.server
from agent.cli import main

agent.server.PEER_CHECK = False
raise SystemExit(main(sys.argv[1:]))
