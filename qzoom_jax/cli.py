"""The command line every entry point shares: ``--config=FILE[:preset]`` (every field overridable as
``--config.a.b=value``) and ``--workdir DIR`` (default ``runs/<config name>``)."""

from __future__ import annotations

import os
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags


def run(main: Callable[[object, str], object], default_config: str, what: str) -> None:
    """Parse the flags and call ``main(config, workdir)``. Flags are defined here, not at import, so entry
    modules can import each other (training runs label generation)."""
    config = config_flags.DEFINE_config_file("config", default_config, f"{what} config file[:preset]")
    workdir = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>)")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:  # Orbax logs every save step at INFO; --verbosity=0 shows it
            logging.set_verbosity(logging.WARNING)
        main(config.value, workdir.value or os.path.join("runs", config.value.name))

    app.run(_main)
