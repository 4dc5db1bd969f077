"""Defaults shared by the agent and its CLI, light enough for every CLI command to import."""

DEFAULT_SOCKET_PATH = "/run/azaion-loader/loader.sock"

# dev-api's limits on stored parts (agent.devapi, and its CLI's defaults).
DEFAULT_MAX_SMALL_BYTES = 1024 * 1024
DEFAULT_MAX_BIG_BYTES = 64 * 1024**3
