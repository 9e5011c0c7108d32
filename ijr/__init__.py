"""IJR, the Isolated Job Runner: run host commands as isolated, resource-limited jobs."""

__version__ = "0.1.0"
