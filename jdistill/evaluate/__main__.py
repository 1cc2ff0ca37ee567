"""`python -m jdistill.evaluate --config=CONFIG --init=CKPT [--out=DIR] [--teacher]`

Scores a checkpoint (a run's workdir, one step folder, a converted model, or an mmdetection
`.pth` / `.safetensors`) on the config's eval split through the code training evaluates with,
writes the eval JSON, the detections JSON and a PNG to --out and prints the metrics (see
`score.py`). `--config.key=value` overrides, the multi-host flags, the error line and the exit
statuses are `jdistill.main`'s.
"""

from absl import flags

from jdistill.evaluate import cli

_INIT = flags.DEFINE_string(
    "init",
    "",
    "The checkpoint to score: a run's workdir (its newest step), its checkpoints/ folder, one "
    "step folder, a converted model, or a .pth / .safetensors. With --teacher, default "
    "config.teacher.init.",
)
_OUT = flags.DEFINE_string(
    "out",
    "",
    "Where the eval JSON, detections JSON and PNG go. Default: <workdir>/evaluate for a run's "
    "checkpoint, <name>_eval beside a weights file.",
)
_TEACHER = flags.DEFINE_bool(
    "teacher", False, "Score the distillation config's teacher (config.teacher.model)."
)


def evaluate(config):
    import jax  # noqa: PLC0415 (after main's start fences TensorFlow off)

    from jdistill import main  # noqa: PLC0415
    from jdistill.evaluate import score  # noqa: PLC0415

    found = score.target(config, _INIT.value, teacher=_TEACHER.value)
    out, cache_workdir = score.locate(found.init, _OUT.value)
    main.use_compilation_cache(cache_workdir)
    metrics, json_path = score.score(config, found.init, out, teacher=_TEACHER.value)
    if jax.process_index() == 0:
        print(score.table(metrics, json_path))


if __name__ == "__main__":
    cli.run(evaluate, "scoring the checkpoint")
