"""Errors a user can cause, shared by every layer (so a config, checkpoint or data error can be raised anywhere).

Every entry point catches :class:`UserError` and prints one line, ``error: <message>``, naming the file, key or
value, then exits with status 2 (``runtime.cli.user_errors``); ``--verbosity=1`` or ``QZOOM_TRACEBACK=1`` shows the
traceback instead. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with something the user gave: a file, a key, a value, a flag. The message names it."""


class ConfigError(UserError, ValueError):
    """A config.json or job config that we cannot turn into a model or a run; the message names the key."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit its config, or broken weights: the message names the file, tensor, shapes."""


class DataError(UserError, ValueError):
    """A malformed data file (JSONL line, pickle record, dataset): the message names the file and line or key."""


class ImageError(UserError, ValueError):
    """An image that cannot be used (corrupt, too small, too elongated, a decompression bomb); names the image."""


class RunError(UserError, RuntimeError):
    """A run that cannot proceed as asked (its workdir is locked by another run, nothing to train on, ...)."""
