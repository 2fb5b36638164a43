"""Config files (``configs/*.py``) by path: they are loaded so, not imported, by ``--config=`` and by one another;
the asset generators read the repository's (they run from a clone, which has configs/)."""

from __future__ import annotations

import importlib.util
import os

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def config_module(name: str, beside: str | None = None):
    """``<name>.py`` of the directory of file ``beside`` (a config file naming a sibling), or of the repository's
    configs/, as a module."""
    path = os.path.join(os.path.dirname(os.path.abspath(beside)) if beside else CONFIGS, f"{name}.py")
    if not os.path.isfile(path):
        where = "next to the config file that names it" if beside else "run this script from a clone of the repository"
        raise FileNotFoundError(f"{path} not found: {where}")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def repo_config(name: str, preset: str | None = None):
    """``configs/<name>.py``'s ``get_config(preset)``."""
    return config_module(name).get_config(preset)
