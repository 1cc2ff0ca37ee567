"""Where things are: the checkout, the shared data sets, the configs, the CLI's environment."""

import os
import pathlib

import pytest

# This file is tests/helpers/paths.py in the checkout.
REPO = pathlib.Path(__file__).resolve().parents[2]
# The small real data sets live beside the project, never inside it.
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name):
    """Path of a shared data set, or skip the test with a message saying where it was looked for."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the shared data sets sit beside the project checkout")
    return path


def load_config(name, arg=None):
    """`configs/<name>.py`'s get_config(arg), as the CLI would load it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def cli_env(**extra):
    """Environment for a `python -m jdistill.main` subprocess."""
    env = dict(os.environ)
    env.update(extra)
    return env
