"""The configs the CLI reads (demo and experiment configs, TPU presets, the public checkpoints'
config.json files) ship inside the package as `tgpo_jax/configs`, so a plain `pip install .` or a
wheel has them; in the repository, the top-level `configs/` is a link to that folder, so they stay
editable there."""

from __future__ import annotations

import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# How the docs and the bundled configs name these files: relative to the repository root.
_PREFIX = "configs" + os.sep


def config_path(*parts: str) -> str:
    """A file or folder of the bundled configs, e.g. config_path("presets")."""
    return os.path.join(CONFIG_DIR, *parts)


def resolve_config(path: str) -> str:
    """`path` as given when it exists; a `configs/...` path that does not exist where the command
    runs (an installed package, another working directory) is read from the bundled copy."""
    if os.path.exists(path) or not os.path.normpath(path).startswith(_PREFIX):
        return path
    bundled = os.path.join(CONFIG_DIR, os.path.normpath(path)[len(_PREFIX) :])
    return bundled if os.path.exists(bundled) else path
