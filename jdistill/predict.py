"""`python -m jdistill.predict --config=CONFIG --init=CKPT --images=DIR_OR_GLOB --out=DIR
[--score_thr=0.3] [--progress_every=100]`

Runs a detector on any folder or glob of images and writes `detections.json` (COCO results
format plus `file_name`) and one PNG per image to --out (see `evaluate/predict_images.py`).
`--config.key=value` overrides, the multi-host flags, the error line and the exit statuses are
`jdistill.main`'s.
"""

from absl import flags

from jdistill.evaluate import cli

_INIT = flags.DEFINE_string(
    "init",
    "",
    "The detector: a run's workdir (its newest step), its checkpoints/ folder, one step "
    "folder, a converted model, or a .pth / .safetensors.",
)
_IMAGES = flags.DEFINE_string(
    "images",
    "",
    "A folder (its image files, by suffix; not its subfolders), a glob such as "
    "'photos/**/*.jpg' (quoted), or one file.",
)
_OUT = flags.DEFINE_string("out", "", "The folder detections.json and the PNGs go to.")
_SCORE_THR = flags.DEFINE_float(
    "score_thr", 0.3, "Detections scoring below it are neither written nor drawn."
)
_PROGRESS = flags.DEFINE_integer(
    "progress_every",
    100,
    "A progress line (rate, ETA) after every this many images.",
    lower_bound=1,
)


def predict(config):
    import jax  # noqa: PLC0415 (after main's start fences TensorFlow off)

    from jdistill import main  # noqa: PLC0415
    from jdistill.evaluate import model, predict_images, score  # noqa: PLC0415

    # A run's programs are compiled already in its workdir's cache; a weights file's go to --out.
    weights_file = _INIT.value.endswith(model.WEIGHT_FILES)
    main.use_compilation_cache(_OUT.value if weights_file else score.locate(_INIT.value)[1])
    summary = predict_images.predict(
        config,
        _INIT.value,
        _IMAGES.value,
        _OUT.value,
        score_thr=_SCORE_THR.value,
        progress_every=_PROGRESS.value,
    )
    if jax.process_index() == 0:
        print(predict_images.summary_line(summary))


if __name__ == "__main__":
    cli.run(predict, "predicting")
