"""Saving and resuming a training run: the state, every process's iterator position, the meta.

See the package docstring for the items of a step and for what happens to damaged steps.
"""

import os

import orbax.checkpoint as ocp
from absl import logging

from jdistill import paths
from jdistill.checkpoint import damage
from jdistill.checkpoint.layout import ITEMS, CheckpointError, CheckpointMismatchError


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
    with damage.quiet_failed_reads():
        found, bad = _newest_restorable(mgr, directory, abstract_state)
    if found is not None:
        step, state, data_state, meta = found
        unfinished = damage.unfinished_saves(directory)
        if bad or unfinished:
            damage.set_aside(mgr, directory, bad, unfinished, step)
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
            diffs = damage.tree_differences(folder, abstract_state)
            if diffs:
                raise CheckpointMismatchError(damage.other_model_message(folder, diffs))
            return (step, *restore(mgr, step, abstract_state)), bad
        except CheckpointMismatchError:
            raise
        except Exception as e:
            if damage.is_transient(e):
                raise
            bad.append((folder, damage.cause(e)))
            logging.debug("restoring %s failed", folder, exc_info=True)
    return None, bad
