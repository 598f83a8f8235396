"""The two errors a user can act on: a wrong configuration, and data that cannot feed a run.
Commands print either as one line before any rank starts."""


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and what is allowed."""


class DataError(RuntimeError):
    """The data cannot feed this run (missing shards, too few shards for the ranks, ...)."""
