"""orbax checkpoints: the training state, the data iterator, and strict variable loading.

A training checkpoint in `workdir/checkpoints/<step>/` holds three items:
  state: {step, params: {student, adapters}, batch_stats, opt_state, ...} (never the teacher)
  data:  every process's grain iterator state (JSON), so a resumed run reads the same next batch
  meta:  JSON: class names and the model config, checked when the checkpoint is a teacher.

Checkpoints you can trust: a step that cannot be read back (a truncated or deleted array file, a
missing manifest or `_METADATA`, garbage iterator JSON, an empty step folder) is never fatal while
an older step restores. Resuming (`restore_newest`) warns in one line per bad step, moves the bad
step folder into `checkpoints/damaged/` (kept for inspection, never deleted) and continues from the
newest step that restores; reading a model (`load_model_variables`) skips bad steps the same way
but never moves anything, since a teacher's folder may be shared or read-only. A checkpoint whose
tree differs from the model (another model's or config's workdir) is not damage: that is one
`CheckpointMismatchError`, with no fallback, since the older steps come from the same other model.
"""

import contextlib
import gc
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

ITEMS = ("state", "data", "meta")
# Bad step folders go here, inside the checkpoints folder: orbax lists only folders named by
# their step number, so it neither restores nor garbage-collects what lies here.
DAMAGED_DIR = "damaged"
# orbax writes a step as `<step>.orbax-checkpoint-tmp-<n>` and renames it when complete (on local
# file systems), so such a folder is a save that a crash or preemption interrupted.
TMP_MARKER = ".orbax-checkpoint-tmp"
_STEP_NAME = re.compile(r"^\d+$")
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder and the cause."""


class CheckpointMismatchError(CheckpointError):
    """Keys or shapes of a checkpoint do not match the model; the message lists them (all of
    them from `check_and_merge`; the first few, and how many, from `restore_newest`)."""


def manager(directory, *, keep=3, create=True):
    """A CheckpointManager for `directory` with the three items."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(paths.absolute(directory), options=options, item_names=ITEMS)


def save(mgr, step, state, data_state, meta, force=False):
    """Saves asynchronously (orbax) at `step`."""
    return mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )


def data_states(per_process):
    """The `data` item of a checkpoint: every process's iterator state, in process order."""
    return {"process_count": len(per_process), "per_process": list(per_process)}


def data_state_of_process(data, index, count, directory):
    """This process's iterator state from a checkpoint's `data` item (None: no item).

    A checkpoint written by another number of processes resumes when its processes were all at
    the same position: the input is a function of the global step alone (the sampler, the
    canvas and every example's augmentation are keyed by the step and the position in the
    global batch, never by the process), so that position is every new process's too. Single-
    process checkpoints of earlier versions hold the bare state.

    Raises:
      CheckpointError: the writing processes were at different positions.
    """
    if data is None or "per_process" not in data:
        return data
    states = data["per_process"]
    if len(states) == count:
        return states[index]
    if any(s != states[0] for s in states):
        raise CheckpointError(
            f"checkpoints in {directory} were written by {len(states)} processes whose input "
            f"iterators were at different positions; resume with {len(states)} processes"
        )
    if index == 0:
        logging.info(
            "resuming with %d processes from a checkpoint written by %d (same input position)",
            count,
            len(states),
        )
    return states[0]


def restore(mgr, step, abstract_state):
    """Restores (state, data_state, meta) at `step` onto `abstract_state`'s shardings."""
    out = mgr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return out.state, out.data, out.meta


def restore_newest(mgr, abstract_state):
    """Restores the newest step of `mgr` that can be read back, setting bad steps aside.

    Newer steps that cannot be restored, and unfinished saves (`*.orbax-checkpoint-tmp-*`), are
    each reported in one warning and moved into `checkpoints/damaged/`; `mgr` is then reloaded,
    so it no longer lists them and a later save at the same step number works. Nothing is moved
    unless some step restores: a run that cannot resume must not silently start from scratch
    the next time it is launched.

    Args:
      mgr: the run's CheckpointManager (from `manager`).
      abstract_state: ShapeDtypeStructs (with shardings) of the training state.
    Returns:
      (step, state, data_state, meta), or (None, None, None, None) when `mgr` holds no step.
    Raises:
      CheckpointMismatchError: a step's tree differs from `abstract_state` (another model's or
        config's workdir); raised at once, older steps are not tried.
      CheckpointError: steps exist but none restores; the message has one line per step.
    """
    directory = os.fspath(mgr.directory)
    with _quiet_failed_reads():
        found, bad = _newest_restorable(mgr, directory, abstract_state)
    if found is not None:
        step, state, data_state, meta = found
        unfinished = _unfinished_saves(directory)
        if bad or unfinished:
            _set_aside(mgr, directory, bad, unfinished, step)
        return step, state, data_state, meta
    if bad:
        raise CheckpointError(
            "\n".join(
                [f"no checkpoint in {directory} can be restored (nothing was moved):"]
                + [f"  {folder}: {cause}" for folder, cause in bad]
                + [
                    f"Move the damaged step folders out of {directory} to train from scratch, "
                    f"or use a fresh --workdir."
                ]
            )
        )
    return None, None, None, None


def _newest_restorable(mgr, directory, abstract_state):
    """((step, state, data_state, meta) or None, [(folder, cause)] of newer steps that failed)."""
    bad = []
    for step in sorted(mgr.all_steps(), reverse=True):
        # orbax's default step name format, which `manager` uses, is the bare step number.
        folder = os.path.join(directory, str(step))
        try:
            diffs = _tree_differences(folder, abstract_state)
            if diffs:
                raise CheckpointMismatchError(_other_model_message(folder, diffs))
            return (step, *restore(mgr, step, abstract_state)), bad
        except CheckpointMismatchError:
            raise
        except Exception as e:
            if _is_transient(e):
                raise
            bad.append((folder, _cause(e)))
            logging.debug("restoring %s failed", folder, exc_info=True)
    return None, bad


def _set_aside(mgr, directory, bad, unfinished, step):
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


def _unfinished_saves(directory):
    return sorted(
        os.path.join(directory, p.name)
        for p in paths.path(directory).iterdir()
        if TMP_MARKER in p.name and p.is_dir()
    )


def _tree_differences(folder, abstract_state):
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
    have = _leaf_shapes(_saved_tree(folder))
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


def _other_model_message(folder, diffs, shown=8):
    more = f"\n  ... and {len(diffs) - shown} more" if len(diffs) > shown else ""
    return (
        f"the checkpoint at {folder} was written by a different model or config than this run "
        f"({len(diffs)} differences in the state tree):\n"
        + "\n".join(diffs[:shown])
        + more
        + "\nUse a fresh --workdir for this config (or run this workdir with the config that "
        "wrote it)."
    )


def _chain(exc):
    """`exc` and its explicit causes (`raise ... from`), outermost first."""
    seen = []
    while exc is not None and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__
    return seen


def _cause(exc, limit=300):
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


def _is_transient(exc):
    for e in _chain(exc):
        if isinstance(e, (PermissionError, MemoryError, TimeoutError, ConnectionError)):
            return True
        if str(e).startswith(_TRANSIENT_STATUS):
            return True
    return False


@contextlib.contextmanager
def _quiet_failed_reads():
    """Keeps failed orbax reads to the one line per step that the caller reports.

    When one array of a step cannot be read, orbax abandons the reads of the other arrays: their
    coroutines and asyncio callbacks report through `sys.unraisablehook` ("Exception ignored
    in ...", each with a tensorstore spec dump) when they are collected, which may be after the
    read has failed (a tensorstore thread still holds them). Those repeat the failure the caller
    reports, so a filter, installed once for the life of the process, sends them to the debug
    log; any other unraisable goes to the usual hook. Callers record a failed read's one-line
    cause and drop its exception (which references the abandoned coroutines), so that most are
    collected right here.
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
    try:
        yield
    finally:
        gc.collect()  # one collection per resume or model read: cheap next to either


def _flatten(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    else:
        out[prefix] = tree
    return out


def _unflatten(flat):
    tree = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def check_and_merge(loaded, expected, *, skip=(), what="checkpoint"):
    """Strictly matches a loaded variable tree against the model's.

    Args:
      loaded: nested dict of arrays from a checkpoint.
      expected: nested dict of arrays (or ShapeDtypeStructs) the model wants.
      skip: regexes of 'a/b/c' paths that may be missing, extra or differently shaped; those
        keep the value in `expected`.
      what: names the source in the error.
    Returns:
      `expected`'s structure filled from `loaded`.
    Raises:
      CheckpointMismatchError listing every missing key, unexpected key and shape mismatch.
    """
    want = _flatten(expected)
    have = _flatten(loaded)
    skipped = lambda k: any(re.search(r, k) for r in skip)  # noqa: E731
    missing = sorted(k for k in want if k not in have and not skipped(k))
    unexpected = sorted(k for k in have if k not in want and not skipped(k))
    shapes = sorted(
        f"{k}: checkpoint {tuple(np.shape(have[k]))} vs model {tuple(want[k].shape)}"
        for k in want
        if k in have and tuple(np.shape(have[k])) != tuple(want[k].shape) and not skipped(k)
    )
    if missing or unexpected or shapes:
        lines = [f"{what} does not match the model:"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  shape mismatch: {s}" for s in shapes]
        raise CheckpointMismatchError("\n".join(lines))
    merged = {
        k: (np.asarray(have[k], dtype=want[k].dtype) if k in have and not skipped(k) else want[k])
        for k in want
    }
    return _unflatten(merged)


def load_model_variables(path):
    """Reads {'params', 'batch_stats'} of the student from a checkpoint directory.

    Accepts a training run's `checkpoints/` folder, one step folder of it, or a `workdir` holding
    `checkpoints/`. From a folder of steps it reads the newest step that restores: a newer step
    that cannot be read is skipped with one warning line (and left where it is: this path never
    writes, a teacher's folder may be shared or read-only). An explicitly named step folder is
    read or refused, never swapped for another step.

    Returns:
      (variables as numpy, meta dict or None).
    Raises:
      FileNotFoundError: nothing at `path`, or no finished step in it.
      CheckpointError: the named step, or every step, cannot be restored (one line per step).
    """
    path = paths.absolute(path)
    if paths.path(path, "checkpoints").is_dir():
        path = os.path.join(path, "checkpoints")
    if not paths.path(path).is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    name = os.path.basename(path)
    if _STEP_NAME.match(name) or TMP_MARKER in name or paths.path(path, "state").is_dir():
        if not _STEP_NAME.match(name):
            raise CheckpointError(
                f"checkpoint {path} is not a finished step folder (an unfinished save, or not "
                f"named by its step number); name a step folder such as "
                f"{os.path.join(os.path.dirname(path), '<step>')}"
            )
        mgr = manager(os.path.dirname(path), create=False)
        try:
            with _quiet_failed_reads():
                out, cause = _read_student(mgr, int(name), path)
        finally:
            mgr.close()
        if cause is not None:
            raise CheckpointError(f"checkpoint {path} cannot be restored: {cause}")
        return out
    mgr = manager(path, create=False)
    try:
        steps = sorted(mgr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{path} holds no finished checkpoint")
        bad = []
        with _quiet_failed_reads():
            for step in steps:
                folder = os.path.join(path, str(step))
                out, cause = _read_student(mgr, step, folder)
                if cause is None:
                    break
                bad.append((folder, cause))
    finally:
        mgr.close()
    if cause is not None:
        raise CheckpointError(
            "\n".join(
                [f"no checkpoint in {path} can be restored:"]
                + [f"  {folder}: {why}" for folder, why in bad]
            )
        )
    for folder, why in bad:
        logging.warning(
            "checkpoint %s cannot be restored (%s); reading step %d instead", folder, why, step
        )
    return out


def _on_one_device(folder):
    """The saved state tree as ShapeDtypeStructs on this process's first device.

    Without a target, orbax restores onto the devices the checkpoint was saved from, and a
    teacher trained on 8 GPUs could not be read on a machine with fewer. Variables are read
    whole into host memory anyway.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), _saved_tree(folder)
    )


def _saved_tree(folder):
    """The metadata tree (shape and dtype per leaf) of a step's state, read without its arrays."""
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(epath.Path(folder) / "state")
    finally:
        handler.close()
    return getattr(metadata, "tree", metadata)


def _read_student(mgr, step, folder):
    """((variables, meta), None) of one step, or (None, the one-line cause) when it cannot be
    read back. The data item is not read: a damaged iterator state does not spoil the weights.
    The exception is not kept (see `_quiet_failed_reads`)."""
    try:
        out = mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_on_one_device(folder)),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except Exception as e:
        if _is_transient(e):
            raise
        logging.debug("restoring %s failed", folder, exc_info=True)
        missing = [i for i in ("state", "meta") if not paths.path(folder, i).is_dir()]
        return None, (f"missing item folder(s): {', '.join(missing)}" if missing else _cause(e))
    state = jax.tree_util.tree_map(np.asarray, out.state)
    student = state.get("params", {}).get("student") if isinstance(state, dict) else None
    if student is None:
        return None, (
            "not a jdistill checkpoint: its state has no params/student (a model converted for "
            "jdistill, or a training run's checkpoint, has)"
        )
    return ({"params": student, "batch_stats": state.get("batch_stats", {})}, out.meta), None
