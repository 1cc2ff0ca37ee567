"""Compiles a config's train and predict steps for an accelerator this machine does not have,
and reports what a run there would need: memory per device, FLOPs, memory traffic by kind, the
roofline, and the largest batch that fits.

  python scripts/aot_compile.py --config=configs/frs_gfl.py --target=h100:8
      [--batch_per_device=2]   # images per device (the report is per device)
      [--batch_size=N]         # or a global batch, which must divide over the devices
      [--fit]                  # also find the largest batch per device that fits
      [--dump_hlo=FILE]        # write the compiled train program's text
      [--nopredict]            # the train step only
      [--num_classes=N]        # default: the data set's (COCO 80, VOC 20)
      [--config.model.dtype=bfloat16 --config.teacher.model.dtype=bfloat16 ...]

Targets (`jdistill/aot/targets.py`): h100:N and a100:N GPUs (N > 8: hosts of 8), and TPU slices
v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2. GPUs need jax's CUDA plugin (it loads without a GPU),
TPUs libtpu; both in a venv of their own (README, "Before you rent"). The state and the teacher
are shapes only (`experiment.setup(abstract=True)`), so no teacher checkpoint is needed.

Memory traffic is counted in one device's compiled program as `jdistill/aot/traffic.py` says:
the operands and results of the ENTRY computation's top-level instructions. The roofline takes
each chip's published peak dense bf16 FLOP/s and memory bandwidth (`targets.CHIPS`, sources
there). Rows print as they are measured, one `key  value` per line on stdout.
"""

import os

# The CUDA plugin checks the CUDA libraries against a GPU driver that a compile-only machine
# does not have; TensorFlow (imported by tfds through the data package) only prepares data.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# libtpu locks /tmp/libtpu_lockfile for the process that owns the TPU; a compile-only process
# owns none, and two of them (two targets compiled at once) must not refuse each other.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jdistill import cli_flags, exits  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_TARGET = flags.DEFINE_string("target", None, "Accelerator and size, e.g. h100:8 or v5e:2x2.")
_BATCH = flags.DEFINE_integer("batch_per_device", 2, "Images per device.")
_GLOBAL = flags.DEFINE_integer(
    "batch_size", 0, "Global batch instead (0: batch_per_device x devices); must divide."
)
_FIT = flags.DEFINE_bool("fit", False, "Find the largest batch per device that fits.")
_DUMP = flags.DEFINE_string("dump_hlo", "", "Write the compiled train program's text here.")
_PREDICT = flags.DEFINE_bool("predict", True, "Also compile the predict step.")
_CLASSES = flags.DEFINE_integer("num_classes", 0, "Classes (0: the data set's, COCO 80, VOC 20).")


def main(argv):
    del argv
    from jdistill.aot import report, targets  # noqa: PLC0415 (after the environment is set)

    config = _CONFIG.value
    target = targets.parse(_TARGET.value)
    per_device = _batch_per_device(target.num_devices)
    devices = targets.devices(target)
    chip = target.chip
    classes = report.num_classes(config, _CLASSES.value)
    h, w = report.canvas(config)
    row = report.row
    row("target", f"{target.spec} ({devices[0].device_kind}, {target.num_hosts} host(s))")
    row("devices", str(target.num_devices))
    row("batch per device", f"{per_device} ({per_device * target.num_devices} per step)")
    row("canvas", f"{h}x{w} (the config's largest)")
    row("dtype", f"student {config.model.dtype}, teacher {_teacher_dtype(config)}")
    train, predict = report.compile_steps(
        config, devices, per_device, classes, predict=_PREDICT.value
    )
    for p in (train, predict):
        if p is None:
            continue
        row(f"{p.what} compile time", f"{p.compile_s:.1f} s")
        report.memory_rows(p, chip)
        report.traffic_rows(p, chip)
    if _DUMP.value:
        with open(_DUMP.value, "w") as f:
            f.write(train.hlo)
        row("train program", f"written to {_DUMP.value}")
    if _FIT.value:
        best, program = report.fit(config, devices, chip, classes, train)
        usable = f"{chip.usable:.0%} of {chip.memory / report.GIB:.0f} GiB"
        if best:
            row(
                "fits",
                f"at most {best} images per device ({program.memory.total / report.GIB:.2f} "
                f"GiB of the {usable} a program may take)",
            )
        else:
            row("fits", f"not even 1 image per device within {usable}")


def _batch_per_device(num_devices):
    """Images per device from --batch_per_device or --batch_size; ValueError (one line) for a
    batch below 1 or a global batch that does not divide over the devices."""
    if _GLOBAL.value:
        if _GLOBAL.value < 1 or _GLOBAL.value % num_devices:
            raise ValueError(
                f"--batch_size={_GLOBAL.value} does not divide over the target's {num_devices} "
                "devices (the batch is split evenly over them)"
            )
        return _GLOBAL.value // num_devices
    if _BATCH.value < 1:
        raise ValueError(f"--batch_per_device={_BATCH.value}: must be at least 1")
    return _BATCH.value


def _teacher_dtype(config):
    teacher = config.get("teacher")
    return teacher.model.dtype if teacher else "(none)"


def cli(argv):
    """Runs `main`; any failure (an unknown target, a missing plugin, a batch that does not fit
    the devices) ends in one `error:` line and exit 1."""
    exits.run(lambda: main(argv))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "target"])
    app.run(cli, flags_parser=cli_flags.parse_flags)
