"""Defaults shared by the agent and its CLI, light enough for every CLI command to import."""

DEFAULT_SOCKET_PATH = "/run/azaion-loader/loader.sock"

# The longest resource or folder name, in the local API, the Resource API contract and the
# cache alike: servers need room beside a name for temporary names of their own (255 bytes is
# the usual file-name limit).
NAME_MAX_LENGTH = 200

# dev-api's limits on stored parts (azaion_loader_dev.devapi, and its CLI's defaults).
DEFAULT_MAX_SMALL_BYTES = 1024 * 1024
DEFAULT_MAX_BIG_BYTES = 64 * 1024**3
