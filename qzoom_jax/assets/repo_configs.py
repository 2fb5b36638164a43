"""The repository's ``configs/*.py`` for the asset generators (they run from a clone, which has configs/)."""

from __future__ import annotations

import importlib.util
import os

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def repo_config(name: str, preset: str | None = None):
    """``configs/<name>.py``'s ``get_config(preset)``."""
    path = os.path.join(CONFIGS, f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run this script from a clone of the repository")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)
