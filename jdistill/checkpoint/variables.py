"""A model's variables: read from a checkpoint, and matched key by key against the model's.

`load_model_variables` reads the student of a training run or of a converted model (a teacher,
a model to export); `check_and_merge` fills the model's variable tree from it and names every
missing key, unexpected key and shape mismatch at once.
"""

import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jdistill import paths
from jdistill.checkpoint import damage, layout
from jdistill.checkpoint.layout import TMP_MARKER, CheckpointError, CheckpointMismatchError
from jdistill.checkpoint.state import manager


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
        raise FileNotFoundError(_not_found(path))
    name = os.path.basename(path)
    if layout.STEP_NAME.match(name) or TMP_MARKER in name or paths.path(path, "state").is_dir():
        if not layout.STEP_NAME.match(name):
            raise CheckpointError(
                f"checkpoint {path} is not a finished step folder (an unfinished save, or not "
                f"named by its step number); name a step folder such as "
                f"{os.path.join(os.path.dirname(path), '<step>')}"
            )
        mgr = manager(os.path.dirname(path), create=False)
        try:
            with damage.quiet_failed_reads():
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
        with damage.quiet_failed_reads():
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


def _not_found(path):
    """'no checkpoint at <path>' and what lies there instead: the steps of the folder above (a
    mistyped step, a workdir named one level too deep), or the part of the path that is missing
    or is a file (a workdir typed wrong)."""
    where = paths.path(path)
    head = f"no checkpoint at {path}"
    if where.exists():
        return (
            f"{head}: it is a file, not a checkpoint folder (weights files end in .pth or "
            ".safetensors)"
        )
    parent = where.parent
    if parent.is_dir():
        steps = sorted(
            int(c.name) for c in parent.iterdir() if layout.STEP_NAME.match(c.name) and c.is_dir()
        )
        if steps:
            return f"{head}: {parent} holds steps {steps}"
        return f"{head}: {parent} holds no step folders (is it a training run's workdir?)"
    child, above = where, parent
    while not above.exists() and above.parent != above:
        child, above = above, above.parent
    if above.exists() and not above.is_dir():
        return f"{head}: {above} is a file"
    return f"{head}: {child} does not exist"


def _on_one_device(folder):
    """The saved state tree as ShapeDtypeStructs on this process's first device.

    Without a target, orbax restores onto the devices the checkpoint was saved from, and a
    teacher trained on 8 GPUs could not be read on a machine with fewer. Variables are read
    whole into host memory anyway.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), damage.saved_tree(folder)
    )


def _read_student(mgr, step, folder):
    """((variables, meta), None) of one step, or (None, the one-line cause) when it cannot be
    read back. The data item is not read: a damaged iterator state does not spoil the weights.
    The exception is not kept (see `damage.quiet_failed_reads`)."""
    try:
        out = mgr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_on_one_device(folder)),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except Exception as e:
        if damage.is_transient(e):
            raise
        logging.debug("restoring %s failed", folder, exc_info=True)
        missing = [i for i in ("state", "meta") if not paths.path(folder, i).is_dir()]
        return None, (
            f"missing item folder(s): {', '.join(missing)}" if missing else damage.cause(e)
        )
    state = jax.tree_util.tree_map(np.asarray, out.state)
    student = state.get("params", {}).get("student") if isinstance(state, dict) else None
    if student is None:
        return None, (
            "not a jdistill checkpoint: its state has no params/student (a model converted for "
            "jdistill, or a training run's checkpoint, has)"
        )
    return ({"params": student, "batch_stats": state.get("batch_stats", {})}, out.meta), None
