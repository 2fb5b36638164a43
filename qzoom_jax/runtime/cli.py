"""The command line every entry point shares: ``--config=FILE[:preset]`` (every field overridable as
``--config.a.b=value``), ``--workdir DIR`` (default ``runs/<config name>``; a local path or ``gs://...``) and the
multi-process settings of ``qzoom_jax.runtime.distributed`` (``--coordinator_address``, ``--num_processes``,
``--process_id``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from qzoom_jax.runtime import distributed
from qzoom_jax.runtime.errors import ConfigError, UserError

TRACEBACK_ENV = "QZOOM_TRACEBACK"


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the argparse-based commands (infer, convert, bench): a bad flag is a ConfigError, so it prints
    as the one-line ``error:`` every other user error gets (``--help`` still shows the usage)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message} (see --help)")


@contextlib.contextmanager
def user_errors(traceback: bool = False) -> Iterator[None]:
    """A :class:`UserError` raised inside prints ``error: <message>`` and exits with status 2, unless
    ``traceback`` or ``QZOOM_TRACEBACK=1`` asks for the full traceback. Every entry point's main runs in this."""
    try:
        yield
    except UserError as e:
        if traceback or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(main: Callable[[object, str], object], default_config: str, what: str) -> None:
    """Parse the flags, start the multi-process runtime when there is one, and call ``main(config, workdir)``.
    Flags are defined here, not at import, so entry modules can import each other (training runs label
    generation)."""
    config = config_flags.DEFINE_config_file("config", default_config, f"{what} config file[:preset]")
    workdir = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>), local or gs://")
    env = distributed.ENV_VARS
    coordinator = flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0 "
                                      f"(default ${env['coordinator_address']}); see qzoom_jax.runtime.distributed")
    num_processes = flags.DEFINE_integer("num_processes", None,
                                         f"multi-process: number of processes (default ${env['num_processes']})")
    process_id = flags.DEFINE_integer("process_id", None,
                                      f"multi-process: this process, 0..N-1 (default ${env['process_id']})")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        default_verbosity = not flags.FLAGS["verbosity"].present
        if default_verbosity:  # Orbax logs every save step at INFO; --verbosity=0 shows it
            logging.set_verbosity(logging.WARNING)
        try:
            settings = distributed.initialize(coordinator.value, num_processes.value, process_id.value)
        except ValueError as e:  # settings a user gave: their message, without a traceback
            raise app.UsageError(str(e)) from None
        if default_verbosity and settings is not None and jax.process_index() != 0:
            logging.set_verbosity(logging.ERROR)  # the other processes would repeat process 0's warnings
        with user_errors(traceback=flags.FLAGS.verbosity >= 1):
            main(config.value, workdir.value or os.path.join("runs", config.value.name))

    app.run(_main)
