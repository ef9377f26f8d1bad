"""ainode: the running node (CLI, servers, pipeline)."""

__version__ = "0.1.0"
