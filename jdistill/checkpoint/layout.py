"""What lies where in a run's `checkpoints/` folder, and the errors that name a bad checkpoint."""

import re

# The items of every step folder, `checkpoints/<step>/<item>/`.
ITEMS = ("state", "data", "meta")
# Bad step folders go here, inside the checkpoints folder: orbax lists only folders named by
# their step number, so it neither restores nor garbage-collects what lies here.
DAMAGED_DIR = "damaged"
# orbax writes a step as `<step>.orbax-checkpoint-tmp-<n>` and renames it when complete (on local
# file systems), so such a folder is a save that a crash or preemption interrupted.
TMP_MARKER = ".orbax-checkpoint-tmp"
# orbax's default step name format, which `state.manager` uses: the bare step number.
STEP_NAME = re.compile(r"^\d+$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder and the cause."""


class CheckpointMismatchError(CheckpointError):
    """Keys or shapes of a checkpoint do not match the model; the message lists them (all of
    them from `check_and_merge`; the first few, and how many, from `restore_newest`)."""
