"""Pictures of what a run distils: every term's maps (`api.Distiller.maps`) over a few
validation images, per FPN level.

At each of the student's evaluations a distillation run writes, beside `eval/step_<N>.png`,
`eval/step_<N>.maps.<key>.png` for each term (`distill.losses.<key>`) whose method weighs or
masks locations: FRS's richness mask, DeFeat's and FGFI's foreground/background masks, FGD's
masks and attention, MGD's random mask, LD's main region, CWD's spatial softmax.
`python -m jdistill.visualize --workdir=DIR [--step=N]` writes the same for a finished run.

The maps come from one jitted function of the two detectors on the first `num_vis_images`
validation images, prepared as evaluation prepares them, with the student in evaluation mode
(BN on its running statistics) and its loss run for the taps it adds (assignments, RoIs), so a
map shows what the loss would weigh on that batch. Each map is scaled to its own maximum per
image and level, which its tile's label gives (the colours compare locations; the labels
compare levels).
"""

import jax
import numpy as np
from jax.experimental import multihost_utils

from jdistill import experiment, paths
from jdistill.data import datasets, pipeline
from jdistill.distill import plan
from jdistill.evaluate import runner, visualize


def drawn_terms(terms):
    """The terms whose distiller has maps, in config order."""
    return [t for t in terms if t.distiller.maps is not None]


def make_maps_fn(config, models):
    """The jittable maps(student_vars, teacher_vars, batch) -> {key: {name: {level: array}}}.

    Args:
      config: the run config.
      models: `experiment.Models` with a teacher and terms.
    Returns:
      per drawn term (`drawn_terms`), its distiller's maps of the batch: [N, H, W] float32 per
      student level, or [N, C] vectors.
    """
    student, teacher, spec = models.student, models.teacher, models.spec
    terms = drawn_terms(models.terms)
    views = plan.views(terms)
    key = jax.random.PRNGKey(config.seed + 3)  # fixed: the train step's base key

    def maps_fn(student_vars, teacher_vars, batch):
        x_t = experiment.model_inputs(teacher, config.teacher.model, batch)
        t_outputs, t_taps = teacher.module.apply(teacher_vars, x_t)
        x_s = experiment.model_inputs(student, config.model, batch)
        outputs, taps = student.module.apply(student_vars, x_s)
        taps = dict(taps)
        # Run for the taps it adds (assignments, sampled RoIs), as in training; its value is
        # not needed.
        student.loss(outputs, batch, variables=student_vars, rng=key, taps=taps)
        t_view = dict(t_taps)
        for name, count_padding in views.items():
            t_view.update(
                teacher.view(
                    name, teacher_vars, t_outputs, t_taps, taps, count_padding=count_padding
                )
            )
        d_batch = {**batch, "rng": jax.random.fold_in(key, experiment.DISTILL_STREAM)}
        return {t.key: t.distiller.maps(taps, t_view, d_batch, cfg=t.cfg, spec=spec) for t in terms}

    return maps_fn


def first_batch(split, config):
    """This host's part of the evaluation batch of the split's first `num_vis_images` images
    (one canvas: the first image's), as `runner.evaluate` prepares it; None when none is
    drawn."""
    n = min(config.get("num_vis_images", 4), len(split))
    if n <= 0:
        return None
    it = iter(pipeline.eval_dataset(split.head(n), config.data, config.eval_batch_size))
    try:
        return next(it)
    finally:
        runner.close_iterator(it)  # its reader threads


def write(maps_fn, student_vars, teacher_vars, split, config, mesh, eval_dir, step, strides):
    """Computes the maps on the split's first images and writes one PNG per drawn term.

    Args:
      maps_fn: `make_maps_fn`'s, jitted.
      student_vars, teacher_vars: the detectors' variables on the mesh.
      split: the eval split.
      config: the run config.
      mesh: the device mesh.
      eval_dir: where `step_<step>.maps.<key>.png` go.
      step: the training step drawn.
      strides: {student level: stride}.
    Returns:
      the paths written (process 0; [] elsewhere).
    """
    local = first_batch(split, config)
    if local is None:
        return []
    batch = datasets.device_batch(local, mesh)
    # Collectives: every process gathers, process 0 alone draws.
    maps = multihost_utils.process_allgather(maps_fn(student_vars, teacher_vars, batch), tiled=True)
    full = multihost_utils.process_allgather(
        {k: batch[k] for k in ("image", "img_shape", "image_valid")}, tiled=True
    )
    if jax.process_index() != 0:
        return []
    real = np.asarray(full["image_valid"])
    images = [
        np.asarray(img)[: int(h), : int(w)]
        for img, (h, w), ok in zip(full["image"], full["img_shape"], real, strict=True)
        if ok
    ]
    paths.path(eval_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for key, term_maps in maps.items():
        kept = {
            name: {lvl: np.asarray(a)[real] for lvl, a in levels.items()}
            for name, levels in term_maps.items()
        }
        path = f"{eval_dir}/step_{step}.maps.{key}.png"
        visualize.draw_maps(images, kept, strides, path, title=f"{key}, step {step}")
        written.append(path)
    return written
