"""Converts an mmdetection checkpoint into a jdistill orbax checkpoint for `teacher.init`.

  python scripts/convert_mmdet_checkpoint.py --config=configs/gfl_r101_mstrain_2x_coco.py \
      --src=gfl_r101_fpn_mstrain_2x_coco_20200629_200126-dd12f847.pth --out=/ckpt/gfl_r101_orbax

The config's `model` block defines the architecture (use the teacher's own config, or pass
`--teacher` to convert the `teacher` block of a distillation config). Class names come from the
checkpoint's meta (`CLASSES`), or from `--config.data` if it has none. Strict: every missing,
unexpected or mis-shaped key is listed in one error; `--skip` regexes relax named keys.

Any failure ends stderr with one line, `error: <cause>` (exit 1; 2 for a bad flag or config),
and a missing --src or an --out that exists or cannot be written is refused before anything is
read.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jdistill import cli_flags, config_lib, exits, logs, paths
from jdistill.convert import mmdet, tools

_CONFIG = config_flags.DEFINE_config_file("config", None, "jdistill config.", lock_config=True)
_SRC = flags.DEFINE_string("src", None, "mmdetection .pth or .safetensors file.")
_OUT = flags.DEFINE_string("out", None, "Output orbax checkpoint directory.")
_TEACHER = flags.DEFINE_bool("teacher", False, "Convert the config's teacher model block.")
_SKIP = flags.DEFINE_multi_string("skip", [], "Regexes of torch keys that may differ.")
flags.mark_flags_as_required(["config", "src", "out"])


def main(argv):
    """Converts and ends the process: 0, or one line `error: <cause>` and 1."""
    del argv  # `cli_flags.parse_flags` refused any positional argument
    logs.setup()  # orbax's INFO lines only with --log_all
    try:
        _convert()
        code = exits.EXIT_OK
    except (mmdet.ConversionError, ValueError, OSError) as e:  # the user's to fix: no traceback
        code = _report(e)
    except BaseException as e:  # noqa: BLE001 (anything else: its traceback, then one line)
        code = exits.report(e)
    exits.exit_process(code)


def _convert():
    config = _CONFIG.value
    if _TEACHER.value and not config.get("teacher"):
        raise config_lib.ConfigError(
            f"--teacher: {config_flags.get_config_filename(flags.FLAGS['config'])} has no "
            "teacher block (not a distillation config); drop --teacher to convert its model"
        )
    model_cfg = config.teacher.model if _TEACHER.value else config.model
    # The cheap checks first: reading and converting a large .pth takes a while.
    src = paths.path(_SRC.value) if _SRC.value else None
    if src is None or not src.exists():
        raise FileNotFoundError(f"--src={_SRC.value}: no such file")
    if src.is_dir():
        raise config_lib.ConfigError(
            f"--src={_SRC.value}: is a folder; name the .pth or .safetensors file (an orbax "
            "checkpoint needs no conversion: teacher.init reads it)"
        )
    config_lib.check_output(_OUT.value, folder=True)
    tools.convert(model_cfg, _SRC.value, _OUT.value, tuple(_SKIP.value))
    print(f"wrote {_OUT.value}")


def _report(e):
    """Prints `e` so that stderr ends with one line, `error: <cause>`, as `jdistill.main` does:
    a message's further lines (every mismatched key) come first. Returns the exit status."""
    lines = [ln.rstrip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    cause = lines[0]
    if len(lines) > 1:
        print("\n".join(lines), file=sys.stderr)
        cause += f" [{len(lines) - 1} more lines above]"
    print(f"error: {cause}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.parse_flags)
