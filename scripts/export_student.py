"""Exports a trained student alone: no adapters, no teacher, no optimizer state.

  python scripts/export_student.py --workdir=/tmp/frs_gfl [--step=N] --format=mmdet \
      --out=student.pth
  python scripts/export_student.py --workdir=/tmp/frs_gfl --format=orbax --out=/ckpt/student

`mmdet` writes {'meta': {'CLASSES': ...}, 'state_dict': ...} with mmdetection's key names,
shapes and layouts (BN running stats and num_batches_tracked included), loadable by
mmdetection without key warnings. `orbax` writes a checkpoint that `teacher.init` or `init`
loads.

Without --step the newest step that restores is exported (a damaged newer step is skipped with a
warning). Any error (a damaged or missing checkpoint, an existing --out) is one `error: ...` line
on stderr and exit status 1.
"""

import sys

from absl import app, flags

from jdistill import checkpoint
from jdistill.convert import mmdet, tools

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_FORMAT = flags.DEFINE_enum("format", "mmdet", ["mmdet", "orbax"], "Output format.")
_OUT = flags.DEFINE_string("out", None, "Output .pth file or orbax directory.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    del argv
    try:
        tools.export(_WORKDIR.value, _OUT.value, _FORMAT.value, _STEP.value)
    except (  # the first two are ValueErrors too: named for the reader
        checkpoint.CheckpointError,
        mmdet.ConversionError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {_OUT.value}")


def one_line(exc):
    """An error as one line: a checkpoint error lists one step per line, joined here by '; '."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    return f"{lines[0]} {'; '.join(lines[1:])}"


if __name__ == "__main__":
    app.run(main)
