"""Scoring a checkpoint on a config's eval split: the logic of `python -m jdistill.evaluate`.

The model is read by `model.read` (any checkpoint `teacher.init` accepts), the split is prepared
as training prepares it (its first `eval_max_images` images), and both go through
`runner.evaluate`, the function training evaluates with, with the variables placed on the mesh
as training places them. So a step scored here gives, bit for bit, the numbers of the run's own
evaluation of that step (`eval/step_N.json`).

Files go to `--out`, by default `<workdir>/evaluate/` for a run's checkpoint (the workdir is the
folder holding `checkpoints/`; a converted model's folder stands for it) and `<name>_eval/`
beside a `.pth` / `.safetensors`: `[teacher_]step_<N>.json` (the metrics, as training writes
them), `.detections.json` (COCO results format) and `.png` (the first `num_vis_images` images).
"""

import dataclasses
import os

import jax
from absl import logging

from jdistill import config_lib, parallel, paths
from jdistill.config_lib import ConfigError
from jdistill.data import datasets
from jdistill.evaluate import model, runner
from jdistill.models import detector as detector_lib


def check_config(config):
    """Refuses the settings evaluation (and prediction) cannot use, before anything is loaded."""
    config_lib.check_eval(config)
    config_lib.check_models(config)


def locate(init, out=""):
    """(the folder the files go to, the workdir whose compilation cache to use) for `init`.

    Path logic only, nothing is read: a run's checkpoint (its workdir, `checkpoints/` or a step
    folder) -> `<workdir>/evaluate`, sharing the run's compiled programs; a converted model's
    folder (or a step of it) -> `<folder>/evaluate`; a weights file -> `<name>_eval` beside it.
    `out`, when given, is where the files go.
    """
    init = paths.absolute(init).rstrip("/")
    if init.endswith(model.WEIGHT_FILES):
        folder = os.path.splitext(init)[0] + "_eval"
        return out or folder, out or folder
    root = init
    if os.path.basename(root).isdigit():  # one step folder
        root = os.path.dirname(root)
    if os.path.basename(root) == "checkpoints":
        root = os.path.dirname(root)
    return out or f"{root}/evaluate", root


@dataclasses.dataclass(frozen=True)
class Target:
    """What a command scores: the model config, the checkpoint, the keys its match skips
    (`teacher.init_skip`) and the tag of the files ('teacher_' or '')."""

    model_cfg: object
    init: str
    skip: tuple
    tag: str


def target(config, init="", *, teacher=False):
    """The `Target` of the flags: `config.model` and `init`, or with `teacher`
    `config.teacher.model` and `init` or else `config.teacher.init`.

    Raises:
      ConfigError: `teacher` without a teacher in the config; no checkpoint named.
    """
    if teacher:
        if not config.get("teacher"):
            raise ConfigError("--teacher: the config has no teacher (config.teacher is not set)")
        found = Target(
            config.teacher.model,
            init or config.teacher.get("init", ""),
            tuple(config.teacher.get("init_skip", ())),
            "teacher_",
        )
    else:
        found = Target(config.model, init, (), "")
    if not found.init:
        raise ConfigError(
            "--init is empty: name the checkpoint to score (a run's workdir, a step folder, a "
            ".pth or .safetensors)" + ("; config.teacher.init is empty too" if teacher else "")
        )
    return found


def score(config, init="", out="", *, teacher=False):
    """Scores a checkpoint on the eval split of `config`.

    Args:
      config: a run config (`configs/`), locked.
      init: the checkpoint (see `model.read`); empty with `teacher`: `config.teacher.init`.
      out: where the files go (empty: see `locate`).
      teacher: score `config.teacher.model` (files `teacher_step_<N>.*`), not `config.model`.
    Returns:
      (metrics dict, as `runner.evaluate` returns them; the path of the eval JSON).
    Raises:
      ConfigError: a bad flag or config value, before anything is read.
      FileNotFoundError, CheckpointError, ConversionError: the checkpoint (one line each).
      ValueError: a checkpoint of another model or of other classes.
    """
    check_config(config)
    found = target(config, init, teacher=teacher)
    model_cfg, init, skip, tag = found.model_cfg, found.init, found.skip, found.tag
    out, _ = locate(init, out)
    ckpt = model.read(init)  # a missing or damaged checkpoint fails here, before the data
    mesh = parallel.make_mesh()
    split = datasets.open(config, train=False).eval
    names = tuple(split.class_names)
    model.check_classes(ckpt, names)
    detector = detector_lib.build(model_cfg, len(names))
    variables = model.placed(ckpt, detector, model_cfg, mesh, config, skip=skip, teacher=teacher)
    logging.info(
        "scoring %s (step %d) on split %r (%d images)", init, ckpt.step, split.name, len(split)
    )
    metrics = runner.evaluate(
        jax.jit(runner.make_predict(detector, model_cfg)),
        variables,
        split,
        config,
        mesh,
        ckpt.root,
        tag,
        ckpt.step,
        split.category_ids,
        eval_dir=out,
    )
    return metrics, f"{out}/{tag}step_{ckpt.step}.json"


def table(metrics, json_path):
    """The metrics as printed: one `name  value` row each (n/a: no ground truth in that COCO
    area range), then the files written."""
    width = max((len(k) for k in metrics), default=0)
    rows = [
        f"{k:<{width}}  {v:.4f}" if v >= 0 else f"{k:<{width}}  n/a" for k, v in metrics.items()
    ]
    stem = json_path[: -len(".json")]
    written = [f"{stem}{s}" for s in (".json", ".detections.json", ".png")]
    rows.append("wrote " + ", ".join(p for p in written if paths.path(p).exists()))
    return "\n".join(rows)
