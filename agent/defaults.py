"""Default paths of DESIGN.md, in a module light enough for every CLI command to import."""

DEFAULT_SOCKET_PATH = "/run/azaion-loader/loader.sock"
