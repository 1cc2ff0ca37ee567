"""Paths a run writes or reads that may be remote (`gs://...`), through `etils.epath`.

The workdir, `teacher.init` and `TFDS_DATA_DIR` of a pod run live on GCS: no local disk is
shared between a pod's workers. So code that touches them never calls `open()`, `os.makedirs`
or `os.path.*` on them (tests/test_paths.py lists those calls); it uses `path()` below, whose
objects have the `pathlib` methods on every file system tensorflow's gfile knows.
"""

import json
import os

from etils import epath


def is_remote(p):
    """Whether `p` names a file system other than the local one (`gs://b/x`, `s3://...`)."""
    return "://" in os.fspath(p)


def absolute(p):
    """`p` made absolute when local (orbax wants absolute paths); a URI as it is."""
    p = os.fspath(p)
    return p if is_remote(p) else os.path.abspath(p)


def path(p, *parts):
    """An `epath.Path` for a local path or a URI (joined with `parts`)."""
    return epath.Path(absolute(p)).joinpath(*parts)


def write_bytes(p, data):
    """Writes `data` atomically: a crash never leaves a truncated file.

    Locally through a temporary file and a rename; an object store writes an object whole.
    """
    target = path(p)
    if is_remote(p):
        target.write_bytes(data)
        return
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(target)


def write_text(p, text):
    """Writes `text` atomically (see `write_bytes`)."""
    write_bytes(p, text.encode())


def write_json(p, obj, indent=2):
    """Writes JSON atomically (see `write_text`); indent None: compact."""
    write_text(p, json.dumps(obj, indent=indent, sort_keys=indent is not None))
