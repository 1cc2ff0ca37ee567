"""Exports a trained student alone: no adapters, no teacher, no optimizer state.

  python scripts/export_student.py --workdir=/tmp/frs_gfl [--step=N] --format=mmdet \
      --out=student.pth
  python scripts/export_student.py --workdir=/tmp/frs_gfl --format=orbax --out=/ckpt/student

`mmdet` writes {'meta': {'CLASSES': ...}, 'state_dict': ...} with mmdetection's key names,
shapes and layouts (BN running stats and num_batches_tracked included), loadable by
mmdetection without key warnings. `orbax` writes a checkpoint that `teacher.init` or `init`
loads.

Without --step the newest step that restores is exported (a damaged newer step is skipped with a
warning). Any error (a bad flag, a damaged or missing checkpoint, an --out that exists or cannot
be written) is one `error: ...` line on stderr and exit status 1 (2 for a bad flag); an --out
that cannot be written is refused before the checkpoint is read.
"""

import sys

from absl import app, flags

from jdistill import checkpoint, cli_flags, config_lib, exits, logs
from jdistill.convert import mmdet, tools

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_FORMAT = flags.DEFINE_enum("format", "mmdet", ["mmdet", "orbax"], "Output format.")
_OUT = flags.DEFINE_string("out", None, "Output .pth file or orbax directory.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    """Exports and ends the process: 0, or one line `error: <cause>` and 1."""
    del argv  # `cli_flags.parse_flags` refused any positional argument
    logs.setup()  # orbax's INFO lines only with --log_all
    try:
        _export()
        code = exits.EXIT_OK
    except (  # the user's to fix: the message alone, on one line
        checkpoint.CheckpointError,
        mmdet.ConversionError,
        config_lib.ConfigError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        code = exits.EXIT_ERROR
    except BaseException as e:  # noqa: BLE001 (anything else: its traceback, then one line)
        code = exits.report(e)
    exits.exit_process(code)


def _export():
    if _STEP.value is not None and _STEP.value < 0:
        raise config_lib.ConfigError(f"--step={_STEP.value}: a step is 0 or more")
    # Before the checkpoint is read: a folder or an unwritable place for a .pth used to fail
    # at the final rename, after the whole export, leaving the temporary file behind.
    config_lib.check_output(_OUT.value, folder=_FORMAT.value == "orbax")
    tools.export(_WORKDIR.value, _OUT.value, _FORMAT.value, _STEP.value)
    print(f"wrote {_OUT.value}")


def one_line(exc):
    """An error as one line: a checkpoint error lists one step per line, joined here by '; '."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    return f"{lines[0]} {'; '.join(lines[1:])}"


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.parse_flags)
