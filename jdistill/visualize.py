"""`python -m jdistill.visualize --workdir=DIR [--step=N] [--out=DIR] [--num_images=K]`

Pictures of what a finished (or stopped) distillation run distils: for each of its terms whose
method weighs or masks locations, the maps over the first K validation images, per FPN level,
as training draws them at each evaluation (`evaluate/distill_maps.py`). The run's own
`config.json` says the models, the data and the terms; the student is read from the step's
checkpoint (default: the newest that restores), the teacher from the config's `teacher.init`.

Writes `<out>/step_<N>.maps.<key>.png` (default out: `<workdir>/eval`, where training writes
them; for the step training evaluated, the files are byte for byte training's) and prints their
paths. A workdir without a distillation config, a step without a checkpoint or a damaged one
ends in one `error:` line (exit 1); nothing already written is touched but the files named.
"""

import dataclasses
import json
import os

from absl import app, flags

from jdistill import cli_flags, exits


def define_flags():
    """The command's flags, defined when it runs as a command (importing this module for
    `draw` defines none: `jdistill.main` has its own `--workdir`)."""
    return dict(
        workdir=flags.DEFINE_string("workdir", None, "The run's workdir (holds config.json)."),
        step=flags.DEFINE_integer("step", -1, "The checkpoint step to draw (-1: the newest)."),
        out=flags.DEFINE_string("out", "", "Where the PNGs go (default: <workdir>/eval)."),
        num_images=flags.DEFINE_integer(
            "num_images", 0, "Validation images drawn (0: the run's num_vis_images, or 4)."
        ),
    )


def run_config(workdir):
    """The run's config (from `<workdir>/config.json`), unlocked; raises FileNotFoundError or
    ValueError naming the file when it is missing or not a config."""
    import ml_collections  # noqa: PLC0415

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: --workdir must be a run's workdir (training writes it)"
        )
    try:
        with open(path) as f:
            raw = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"{path} is not a jdistill run config (no `model` block)")
    return ml_collections.ConfigDict(raw)


def draw(workdir, step=-1, out="", num_images=0):
    """Writes the maps of the run at `workdir` (see the module docstring); returns the paths.

    Raises:
      ValueError: no distillation term with maps in the run's config; a checkpoint of other
        classes.
      FileNotFoundError, CheckpointError: no such step, or it cannot be restored.
    """
    import jax  # noqa: PLC0415

    from jdistill import experiment, parallel  # noqa: PLC0415
    from jdistill.data import datasets  # noqa: PLC0415
    from jdistill.evaluate import distill_maps, model  # noqa: PLC0415

    workdir = os.path.abspath(workdir)
    config = run_config(workdir)
    # The run's own count, unless asked for another; a run that drew none (0) draws 4 here.
    config.num_vis_images = num_images if num_images > 0 else config.get("num_vis_images") or 4
    drawn = [
        k
        for k, block in ((config.get("distill") or {}).get("losses") or {}).items()
        if _has_maps(block.get("fn"))
    ]
    if not config.get("teacher") or not drawn:
        raise ValueError(
            f"{workdir} is not a distillation run with a method that masks or weighs locations "
            "(its config.distill.losses has none of FRS, DeFeat, FGFI, FGD, MGD, LD, CWD)"
        )
    folder = os.path.join(workdir, "checkpoints")
    ckpt = model.read(folder if step < 0 else os.path.join(folder, str(step)))
    mesh = parallel.make_mesh()
    split = datasets.open(config, train=False).eval
    names = tuple(split.class_names)
    model.check_classes(ckpt, names)
    models = experiment.build_models(config, len(names))
    student_vars = model.placed(ckpt, models.student, config.model, mesh, config)
    canvas = tuple(config.data.canvases[0])
    teacher_vars = experiment.load_teacher(config, models.teacher, names, canvas)
    teacher_vars = jax.device_put(teacher_vars, parallel.replicated(mesh))
    # Read as training reads it (prefolded), so the maps are training's bit for bit.
    teacher, teacher_vars, _ = experiment.place_teacher(
        config.teacher.model, models.teacher, teacher_vars, mesh
    )
    models = dataclasses.replace(models, teacher=teacher)
    spec = models.student.spec
    return distill_maps.write(
        jax.jit(distill_maps.make_maps_fn(config, models)),
        student_vars,
        teacher_vars,
        split,
        config,
        mesh,
        out or os.path.join(workdir, "eval"),
        ckpt.step,
        dict(zip(spec.levels, spec.strides, strict=True)),
    )


def _has_maps(fn):
    from jdistill.distill import registry  # noqa: PLC0415

    try:
        return registry.get(fn).maps is not None
    except KeyError:
        return False


def main(argv, opts):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jdistill import logs  # noqa: PLC0415

    logs.setup()
    o = {k: flag.value for k, flag in opts.items()}
    exits.run(lambda: _draw_and_print(**o))


def _draw_and_print(workdir, step, out, num_images):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: PLC0415 (tfds reads the prepared data set)

    tf.config.set_visible_devices([], "GPU")
    from jdistill import stopping  # noqa: PLC0415 (after TF is fenced off, as jdistill.main)

    # SIGTERM / SIGINT end the command in one line, as every other command's.
    stopping.SIGNALS.install()
    with stopping.SIGNALS.phase(
        "drawing the maps", "the PNGs written before are kept; re-run the same command"
    ):
        written = draw(workdir, step, out, num_images)
    print("\n".join(f"wrote {p}" for p in written))


if __name__ == "__main__":
    FLAGS = define_flags()
    flags.mark_flags_as_required(["workdir"])
    app.run(lambda argv: main(argv, FLAGS), flags_parser=cli_flags.parse_flags)
