"""Entry point: `python -m jdistill.main --config=configs/X.py[:arg] --workdir=DIR`.

Flags, logging and multi-host initialisation; then `train.run` (or the demo's three runs).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the run writes everything.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # TensorFlow is only used for tfds preparation and TensorBoard: keep it off accelerators.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: PLC0415

    tf.config.set_visible_devices([], "GPU")
    from jdistill import parallel, train  # noqa: PLC0415 (after TF is fenced off)

    parallel.initialize_distributed()
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    if config.get("demo"):
        from jdistill import demo  # noqa: PLC0415

        demo.run(config, _WORKDIR.value)
    else:
        train.run(config, _WORKDIR.value)


def _parse_flags(argv):
    """Parses flags; a bad flag or misspelt `--config.key` is a one-line error, exit code 2.

    Overrides are applied while parsing, so this runs before anything is loaded or compiled.
    """
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        print(f"error: {_one_line(e, argv)}", file=sys.stderr)
        sys.exit(2)


def _one_line(e, argv):
    msg = str(e.args[0] if e.args else e).replace("\\n", "\n").replace("\\'", "'")
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if isinstance(e, AttributeError | KeyError):
        key = lines[0].strip("'\"")
        hint = " ".join(lines[1:]).rstrip("'\"")
        where = [a for a in argv if a.startswith("--config.") and key in a]
        flag = where[0] if where else "--config"
        return f"{flag}: the config has no key {key!r}. {hint}".strip()
    # A config file that fails to load reports its own traceback; its last line is the cause.
    return lines[-1] if lines else type(e).__name__


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
