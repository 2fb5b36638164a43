"""Errors a user can cause, shared by every layer (so a config or data error can be raised anywhere)."""


class ConfigError(ValueError):
    """A config.json or job config that we cannot turn into a model or a run; the message names the key."""
