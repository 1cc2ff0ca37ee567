"""Telling a damaged checkpoint step from another model's, and setting damaged steps aside.

A step that cannot be read back (a truncated or deleted array file, a missing manifest or
`_METADATA`, garbage iterator JSON, an empty folder) is damage: the caller falls back to an older
step and reports this step in one line (`cause`). A step whose tree differs from the model is not
damage (`tree_differences`), and a read that failed for want of memory, permission or a network
(`is_transient`) says nothing about the files, so neither is ever set aside.
"""

import contextlib
import gc
import logging as std_logging
import os
import re
import sys
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from jdistill import paths
from jdistill.checkpoint.layout import DAMAGED_DIR, ITEMS, TMP_MARKER, CheckpointError

# Status codes (tensorstore, XLA) that say nothing about a file's content: the same read may
# succeed later, with more memory or other permissions, so the step is not called damaged.
_TRANSIENT_STATUS = (
    "RESOURCE_EXHAUSTED",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "ABORTED",
)


def set_aside(mgr, directory, bad, unfinished, step):
    """Moves bad and unfinished step folders into `directory/damaged/`, one warning each."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moves = [(folder, f"cannot be restored ({cause})") for folder, cause in bad]
    moves += [(f, "is an unfinished save (the run stopped while writing it)") for f in unfinished]
    primary = jax.process_index() == 0
    for folder, what in moves:
        dest = _aside_path(directory, os.path.basename(folder), stamp)
        if primary:  # one host moves and reports; the others wait at the barrier below
            paths.path(dest).parent.mkdir(parents=True, exist_ok=True)
            paths.path(folder).rename(dest)
            logging.warning(
                "checkpoint %s %s; moved it aside to %s; resuming from step %d",
                folder,
                what,
                dest,
                step,
            )
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes("jdistill_checkpoint_set_aside")
    # The manager caches its step list: without a reload it would still list the moved steps,
    # refuse to save at their step numbers and try to garbage-collect them.
    mgr.reload()


def _aside_path(directory, name, stamp):
    dest = os.path.join(directory, DAMAGED_DIR, f"{name}.{stamp}")
    n = 1
    while paths.path(dest).exists():  # the same step set aside twice within one second
        n += 1
        dest = os.path.join(directory, DAMAGED_DIR, f"{name}.{stamp}-{n}")
    return dest


def unfinished_saves(directory):
    """Paths of the saves in `directory` that a crash or preemption interrupted, sorted."""
    return sorted(
        os.path.join(directory, p.name)
        for p in paths.path(directory).iterdir()
        if TMP_MARKER in p.name and p.is_dir()
    )


def tree_differences(folder, abstract_state):
    """Missing keys, unexpected keys and shape mismatches of the saved state tree vs the model.

    Reads only the tree metadata (`state/_METADATA`), so it is cheap and tells "another model"
    apart from "damaged arrays". A step without its items, or with unreadable metadata, raises
    (and is then treated as damaged).
    """
    missing = [item for item in ITEMS if not (paths.path(folder) / item).is_dir()]
    if len(missing) == len(ITEMS):
        raise CheckpointError("empty step folder (no state, data or meta item)")
    if missing:
        raise CheckpointError(f"missing item folder(s): {', '.join(missing)}")
    have = _leaf_shapes(saved_tree(folder))
    want = _leaf_shapes(abstract_state)
    diffs = [f"  missing key: {k}" for k in sorted(want) if k not in have]
    diffs += [f"  unexpected key: {k}" for k in sorted(have) if k not in want]
    diffs += [
        f"  shape mismatch: {k}: checkpoint {have[k]} vs model {want[k]}"
        for k in sorted(want)
        if k in have and have[k] != want[k]
    ]
    return diffs


def _leaf_shapes(tree):
    """{'a/b/0/c': shape} of a pytree; dicts, namedtuples and lists all name their children,
    so the model's optax state and orbax's metadata tree of it give the same keys."""

    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): tuple(np.shape(v)) for path, v in leaves}


def other_model_message(folder, diffs, shown=8):
    more = f"\n  ... and {len(diffs) - shown} more" if len(diffs) > shown else ""
    return (
        f"the checkpoint at {folder} was written by a different model or config than this run "
        f"({len(diffs)} differences in the state tree):\n"
        + "\n".join(diffs[:shown])
        + more
        + "\nUse a fresh --workdir for this config (or run this workdir with the config that "
        "wrote it)."
    )


def saved_tree(folder):
    """The metadata tree (shape and dtype per leaf) of a step's state, read without its arrays."""
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(epath.Path(folder) / "state")
    finally:
        handler.close()
    return getattr(metadata, "tree", metadata)


def _chain(exc):
    """`exc` and its explicit causes (`raise ... from`), outermost first."""
    seen = []
    while exc is not None and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__
    return seen


def cause(exc, limit=300):
    """One line that says what is wrong: the innermost explicit cause with a message.

    orbax wraps tensorstore's errors in messages that dump the whole tensorstore spec; the
    innermost cause names the array and the fault ("OUT_OF_RANGE: ... byte range [0, 15157) is
    not valid for value of size 10").
    """
    for e in reversed(_chain(exc)):
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        text = str(text).split(" [tensorstore_spec=")[0]
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        if line:
            line = line if len(line) <= limit else line[: limit - 3] + "..."
            return line if isinstance(e, CheckpointError) else f"{type(e).__name__}: {line}"
    return type(exc).__name__


def is_transient(exc):
    for e in _chain(exc):
        if isinstance(e, (PermissionError, MemoryError, TimeoutError, ConnectionError)):
            return True
        if str(e).startswith(_TRANSIENT_STATUS):
            return True
    return False


@contextlib.contextmanager
def quiet_failed_reads():
    """Keeps failed orbax reads to the one line per step that the caller reports.

    When one array of a step cannot be read, orbax abandons the reads of the other arrays: their
    coroutines and asyncio callbacks report through `sys.unraisablehook` ("Exception ignored
    in ...", each with a tensorstore spec dump) when they are collected, which may be after the
    read has failed (a tensorstore thread still holds them). Those repeat the failure the caller
    reports, so a filter, installed once for the life of the process, sends them to the debug
    log; any other unraisable goes to the usual hook. Callers record a failed read's one-line
    cause and drop its exception (which references the abandoned coroutines), so that most are
    collected right here.

    asyncio reports the abandoned orbax tasks themselves the same way: "Task exception was never
    retrieved" (with a traceback and a spec dump, some 80 lines each) for a read that failed in
    the loop iteration where orbax's read ended, and "Task was destroyed but it is pending" for
    one still running then. That iteration's count depends on timing (none in most runs, one or
    five under load), so a second filter, on the 'asyncio' logger and also for the life of the
    process, sends those of tasks running orbax's coroutines to the debug log.
    """
    if not getattr(sys.unraisablehook, "drops_orbax_leftovers", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            obj, exc = unraisable.object, unraisable.exc_value
            leftover = (
                isinstance(obj, types.CoroutineType) and "orbax" in obj.cr_code.co_filename
            ) or (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")
            if leftover:
                logging.debug("after a failed checkpoint read: %s: %s", type(exc).__name__, exc)
            else:
                previous(unraisable)

        hook.drops_orbax_leftovers = True
        sys.unraisablehook = hook
    asyncio_logger = std_logging.getLogger("asyncio")
    if not any(isinstance(f, _OrbaxTaskLeftovers) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_OrbaxTaskLeftovers())
    try:
        yield
    finally:
        gc.collect()  # one collection per resume or model read: cheap next to either


# asyncio's reports of a task nobody awaited to the end (asyncio/tasks.py)
_ASYNCIO_LEFTOVER = ("Task exception was never retrieved", "Task was destroyed but it is pending")
# The task's coroutine and where it is defined or stopped, as asyncio's message names them:
# "coro=<async_deserialize() done, defined at /.../serialization.py:394>".
# (A nested coroutine's name has "<locals>" in it.)
_TASK_CORO = re.compile(r"coro=<\S+?\(\) (?:done, defined|running) at (.+?):\d+")
_ORBAX_DIR = os.path.dirname(os.path.realpath(ocp.__file__))


class _OrbaxTaskLeftovers(std_logging.Filter):
    """Sends asyncio's reports of orbax's abandoned tasks to the debug log (one line each)."""

    def filter(self, record):
        message = record.getMessage()
        if not message.startswith(_ASYNCIO_LEFTOVER):
            return True
        found = _TASK_CORO.search(message)
        if not found or not os.path.realpath(found.group(1)).startswith(_ORBAX_DIR + os.sep):
            return True  # not orbax's: whatever it is, it is shown
        exc = record.exc_info[1] if record.exc_info else None
        what = cause(exc, limit=200) if exc else "pending"
        logging.debug("after a failed checkpoint read: %s (%s)", message.splitlines()[0], what)
        return False
