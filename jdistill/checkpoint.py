"""orbax checkpoints: the training state, the data iterator, and strict variable loading.

A training checkpoint in `workdir/checkpoints/<step>/` holds three items:
  state: {step, params: {student, adapters}, batch_stats, opt_state, ...} (never the teacher)
  data:  the grain iterator state (JSON), so a resumed run reads the same next batch
  meta:  JSON: class names and the model config, checked when the checkpoint is a teacher.
"""

import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


class CheckpointMismatchError(ValueError):
    """Keys or shapes of a checkpoint do not match the model; the message lists them all."""


def manager(directory, *, keep=3, create=True):
    """A CheckpointManager for `directory` with the three items."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


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

    Accepts a training run's `checkpoints/` folder (its latest step), one step folder of it,
    or a `workdir` holding `checkpoints/`. Returns (variables as numpy, meta dict or None).
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.isdir(os.path.join(path, "state")):  # a single step directory
        root, step = os.path.dirname(path), int(os.path.basename(path))
        mgr = manager(root, create=False)
    else:
        mgr = manager(path, create=False)
        step = mgr.latest_step()
        if step is None:
            raise FileNotFoundError(f"{path} holds no finished checkpoint")
    out = mgr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
    )
    state = jax.tree_util.tree_map(np.asarray, out.state)
    variables = {"params": state["params"]["student"], "batch_stats": state["batch_stats"]}
    return variables, out.meta


def write_json(path, obj):
    """Writes JSON atomically (a crash never leaves a truncated file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
