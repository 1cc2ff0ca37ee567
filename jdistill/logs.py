"""What the console shows: jdistill's own lines, and every library's warnings and errors.

A run's stderr used to be about one line in ten of jdistill's: orbax logs each checkpoint save
and restore in some sixty INFO lines (its options, every temporary folder, every rename and
throughput), tfds draws progress bars while it prepares a data set, and JAX and TensorFlow add
their own INFO lines. `setup` keeps jdistill's lines (the config summary, the data, the step
lines with their ETA, the evaluation tables, the checkpoint warnings), JAX's few lines about
joining a multi-host run and, from any library, every WARNING and above; `--log_all` shows
everything again. absl's `--verbosity=1` still turns on jdistill's debug lines (a library's
debug lines need `--log_all` too).

orbax and tfds log through absl, so their records arrive on the 'absl' Python logger like
jdistill's own: a record is told apart by the file that logged it (inside this package, or the
script being run), not by the logger's name. The one library shown by logger name is JAX's
multi-host join (`_SHOWN_LOGGERS`).
"""

import functools
import logging as std_logging
import os
import sys

from absl import flags, logging

LOG_ALL = flags.DEFINE_bool(
    "log_all",
    False,
    "Show every library's INFO lines and progress bars too (orbax's checkpoint steps, tfds's "
    "data preparation, JAX's backends). Without it the console shows jdistill's lines and "
    "every library's warnings and errors.",
)

_PACKAGE = os.path.dirname(os.path.realpath(__file__))
# Libraries' loggers whose INFO lines are part of the story a person follows: JAX's join of a
# multi-host run says where each process waits for the others (up to --distributed_timeout),
# in a few lines per run.
_SHOWN_LOGGERS = ("jax._src.distributed",)


@functools.cache
def _ours(pathname):
    """Whether a log record's file is jdistill's: inside the package, or the script being run
    (scripts/compare.py and the like log their own progress)."""
    path = os.path.realpath(pathname)
    if path.startswith(_PACKAGE + os.sep):
        return True
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return bool(main_file) and path == os.path.realpath(main_file)


class _OursAndWarnings(std_logging.Filter):
    """Passes jdistill's records at any level and everyone's warnings and errors."""

    def filter(self, record):
        return (
            record.levelno >= std_logging.WARNING
            or _ours(record.pathname)
            or (record.name in _SHOWN_LOGGERS and record.levelno >= std_logging.INFO)
        )


def setup(log_all=None):
    """Installs the console policy; call it first thing in a command's main (after flags).

    Args:
      log_all: show every library's INFO lines and progress bars (True) or only jdistill's
        lines and every library's warnings and errors (False). None: the `--log_all` flag,
        False before flags are parsed.
    Calling it again replaces the policy.
    """
    if log_all is None:
        log_all = LOG_ALL.value if flags.FLAGS.is_parsed() else False
    # TensorFlow only prepares data sets here (tfds: images in, encoded images out), so its
    # oneDNN kernels (matmuls, convolutions) have nothing to do; with them off its import no
    # longer prints "oneDNN custom operations are on" twice, a native line that neither
    # TF_CPP_MIN_LOG_LEVEL nor a Python filter reaches. The environment's choice wins, and this
    # does not depend on --log_all: a flag for the console changes no computation.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    # absl's handler writes the console (and --log_dir's file): a filter there leaves the
    # records to every other handler, pytest's capture among them.
    handler = logging.get_absl_handler()
    for f in [f for f in handler.filters if isinstance(f, _OursAndWarnings)]:
        handler.removeFilter(f)
    if not log_all:
        handler.addFilter(_OursAndWarnings())
    try:  # tfds draws its progress bars with tqdm, outside logging
        from tensorflow_datasets.core.utils import tqdm_utils  # noqa: PLC0415
    except ImportError:
        return
    tqdm_utils.display_progress_bar(log_all)


def log_config(config, config_flag=None, log_all=None):
    """Logs what a run is: a few lines on the console, the whole config at debug level.

    The whole config (some 150 lines) is in the run's `config.json`, which `train.run` writes;
    with `--log_all` (or `--verbosity=1`) it is logged too.

    Args:
      config: the run's ConfigDict.
      config_flag: the command's ml_collections config flag (`flags.FLAGS['config']`), which
        gives the config file, its argument and the `--config.*` overrides.
      log_all: as `setup`'s.
    """
    if log_all is None:
        log_all = LOG_ALL.value if flags.FLAGS.is_parsed() else False
    source, overrides = "", {}
    if config_flag is not None:
        from ml_collections import config_flags  # noqa: PLC0415

        source = config_flags.get_config_filename(config_flag)
        overrides = config_flags.get_override_values(config_flag)
    logging.info("%s", config_summary(config, source, overrides))
    logging.log(logging.INFO if log_all else logging.DEBUG, "config:\n%s", config)


def config_summary(config, source="", overrides=None):
    """A few lines that say what a config trains: file and overrides, models, data, schedule."""
    head = f"config {source or '(given)'}"
    if overrides:
        head += " with " + ", ".join(f"{k}={v!r}" for k, v in sorted(overrides.items()))
    lines = [head + " (all of it: config.json in the workdir, or --log_all)"]
    demo = config.get("demo")
    if demo:
        lines.append(
            f"  demo: teacher {_model(demo.teacher)}, {demo.teacher_steps} steps; students "
            f"{_model(demo.student)}, {demo.student_steps} steps (baseline, then distilled)"
        )
    else:
        student = f"  model: {_model(config.model)}"
        if config.get("init"):
            student += f" from {config.init}"
        teacher = config.get("teacher")
        if teacher:
            student += f"; teacher: {_model(teacher.model)}"
            student += f" from {teacher.init}" if teacher.get("init") else " (no teacher.init)"
        lines.append(student)
    distill = config.get("distill")
    if distill:
        losses = ", ".join(
            f"{key} ({spec.get('fn', key)}) x{spec.get('weight', 1.0):g}"
            if spec.get("fn", key) != key
            else f"{key} x{spec.get('weight', 1.0):g}"
            for key, spec in distill.losses.items()
        )
        if distill.get("auto_balance"):
            losses += ", auto-balanced"
        if distill.get("warmup_steps", 0) > 0:
            losses += f", warm-up {distill.warmup_steps} steps"
        lines.append(f"  distill: {losses}")
    data = config.data
    where = f" at {data.root}" if data.get("root") else ""
    schedule = config.schedule
    train_for = f", {schedule.epochs} epochs"
    if demo:  # each stage has its own step count (above)
        train_for = ""
    elif schedule.get("num_steps", -1) > 0:
        train_for = f", {schedule.num_steps} steps"
    lines.append(
        f"  data: {data.builder}{where} ({data.train_split} / {data.eval_split}); "
        f"batch {config.batch_size}, lr {config.optimizer.lr:g}{train_for}"
    )
    return "\n".join(lines)


def _model(m):
    """'retinanet R50' and its width when not 1, e.g. 'retinanet R18 x0.25'."""
    name = f"{m.family} R{m.depth}" if m.get("depth") else str(m.family)
    width = m.get("width", 1.0)
    return name if width == 1.0 else f"{name} x{width:g}"


def hms(seconds):
    """'H:MM:SS' of a duration in seconds, as the step and progress lines show an ETA."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
