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

Modules:
  layout:    the step folder's items and names, and the two errors;
  state:     saving and resuming a training run (state, iterator positions, meta);
  damage:    telling a damaged step from another model's, and setting damaged steps aside;
  variables: a model's variables read from a checkpoint and matched key by key.
"""

from jdistill.checkpoint.layout import (
    DAMAGED_DIR,
    ITEMS,
    TMP_MARKER,
    CheckpointError,
    CheckpointMismatchError,
)
from jdistill.checkpoint.state import (
    data_state_of_process,
    data_states,
    manager,
    restore,
    restore_newest,
    save,
)
from jdistill.checkpoint.variables import check_and_merge, load_model_variables

__all__ = [
    "DAMAGED_DIR",
    "ITEMS",
    "TMP_MARKER",
    "CheckpointError",
    "CheckpointMismatchError",
    "check_and_merge",
    "data_state_of_process",
    "data_states",
    "load_model_variables",
    "manager",
    "restore",
    "restore_newest",
    "save",
]
