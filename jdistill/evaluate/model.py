"""A trained detector's variables for inference, from any checkpoint `teacher.init` accepts.

`read` takes a run's workdir (its newest step that restores), its `checkpoints/` folder, one
step folder, a converted model's folder (`scripts/convert_mmdet_checkpoint.py`), or an
mmdetection `.pth` / `.safetensors`. `variables` then matches it strictly against a detector:
through `checkpoint.load_model_variables` and `checkpoint.check_and_merge` for orbax, through
`convert.mmdet.load_variables` for a weights file, the loaders `teacher.init` goes through. So
every missing, unexpected or mis-shaped key is named in one error, a damaged file is one line,
and a file that holds only an ImageNet backbone is refused.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
from absl import logging

from jdistill import checkpoint, parallel, paths

WEIGHT_FILES = (".pth", ".safetensors")


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint, read.

    path: as given; step: the training step read (0 for a weights file, as its conversion
    writes it); root: the run's workdir or the model's folder (for a file, the file);
    class_names, category_ids: what the checkpoint records (a run records both, a converted
    model or an mmdetection file its class names), else None; loaded: the orbax student
    variables as read (numpy), None for a weights file (converted by `variables`).
    """

    path: str
    step: int
    root: str
    class_names: tuple | None
    category_ids: tuple | None
    loaded: dict | None = None

    @property
    def is_file(self):
        return self.loaded is None


def read(path):
    """Reads the checkpoint at `path` (see the module docstring) -> `Checkpoint`.

    Raises:
      FileNotFoundError: nothing at `path`, or no finished step in it.
      CheckpointError, ConversionError: a damaged step or file (one line each).
    """
    if not path:
        raise ValueError(
            "--init is empty: name a checkpoint (a run's workdir, a step folder or a .pth)"
        )
    if str(path).endswith(WEIGHT_FILES):
        return _read_file(str(path))
    return _read_orbax(str(path))


def _read_file(path):
    from jdistill.convert import mmdet  # noqa: PLC0415 (needs the [convert] extra)

    # Read once here for the class names the file records, and again, converted, by
    # `variables`: `mmdet.load_variables` takes a path; a second read costs seconds at most.
    _, meta = mmdet.read_checkpoint(path)
    names = meta.get("CLASSES")
    ids = (meta.get("jdistill") or {}).get("category_ids")  # a student exported by jdistill
    return Checkpoint(path, 0, path, _tuple(names), _tuple(ids))


def _read_orbax(path):
    folder = paths.absolute(path).rstrip("/")
    if paths.path(folder, "checkpoints").is_dir():
        folder = f"{folder}/checkpoints"
    steps = _steps(folder)
    if not steps:
        # One step folder, or a folder with no step in it: the loader reads the one or names
        # what is wrong in one line.
        loaded, meta = checkpoint.load_model_variables(path)
        name = os.path.basename(folder)
        return _checkpoint(path, int(name), os.path.dirname(folder), loaded, meta)
    # The newest step that restores, as `teacher.init` reads a folder of steps; each step is
    # read by its own folder so that the step scored is known (the eval JSON names it).
    bad = []
    for step in steps:
        step_folder = f"{folder}/{step}"
        try:
            loaded, meta = checkpoint.load_model_variables(step_folder)
        except checkpoint.CheckpointError as e:
            bad.append(str(e).splitlines()[0])
            continue
        for why in bad:
            logging.warning("%s; reading step %d instead", why, step)
        return _checkpoint(path, step, folder, loaded, meta)
    raise checkpoint.CheckpointError(
        "\n".join([f"no checkpoint in {folder} can be restored:"] + [f"  {w}" for w in bad])
    )


def _steps(folder):
    """The finished steps in a folder of steps, newest first ([] for a step folder or none)."""
    if not paths.path(folder).is_dir():
        return []
    mgr = checkpoint.manager(folder, create=False)
    try:
        return sorted(mgr.all_steps(), reverse=True)
    finally:
        mgr.close()


def _checkpoint(path, step, steps_folder, loaded, meta):
    meta = meta or {}
    root = os.path.dirname(steps_folder) if steps_folder.endswith("/checkpoints") else steps_folder
    return Checkpoint(
        path, step, root, _tuple(meta.get("class_names")), _tuple(meta.get("category_ids")), loaded
    )


def _tuple(values):
    return tuple(values) if values else None


def expected(detector, canvas):
    """ShapeDtypeStructs of a detector's {'params', 'batch_stats'}, as `teacher.init` builds
    them (shapes do not depend on the canvas)."""
    return jax.eval_shape(
        detector.module.init, jax.random.PRNGKey(0), jnp.zeros((1, *canvas, 3), jnp.float32)
    )


def variables(ckpt, expected_tree, model_cfg, *, skip=(), what="checkpoint"):
    """`expected_tree` filled from the checkpoint, strictly (numpy arrays).

    `skip`: regexes of keys left out of the match (`teacher.init_skip`); those keep their
    `expected_tree` entry, which must then be replaced by the caller.
    Raises:
      CheckpointMismatchError, ConversionError: every missing, unexpected or mis-shaped key.
    """
    if ckpt.is_file:
        from jdistill.convert import mmdet  # noqa: PLC0415

        merged, _ = mmdet.load_variables(
            ckpt.path,
            expected_tree,
            family=model_cfg.family,
            skip=tuple(skip),
            what=what,
            backbone_ok=False,  # an ImageNet backbone alone would score a random head
        )
        return merged
    return checkpoint.check_and_merge(
        ckpt.loaded, expected_tree, skip=tuple(skip), what=f"{what} {ckpt.path}"
    )


def check_classes(ckpt, names):
    """Refuses (ValueError) a checkpoint that records other classes than the data set's
    `names`, in order; one that records none passes."""
    if ckpt.class_names is not None and ckpt.class_names != tuple(names):
        raise ValueError(
            f"{ckpt.path} was trained on classes {list(ckpt.class_names)} but the data set has "
            f"{list(names)}; reading it with these labels would be meaningless"
        )


def placed(ckpt, detector, model_cfg, mesh, config, *, skip=(), teacher=False):
    """`ckpt`'s variables for `detector`, matched strictly (`variables`) and placed on the mesh
    as training holds them (`on_mesh`)."""
    canvas = tuple(config.data.canvases[0])
    what = "teacher checkpoint" if teacher else "checkpoint"
    tree = variables(ckpt, expected(detector, canvas), model_cfg, skip=skip, what=what)
    return on_mesh(tree, mesh, config, teacher=teacher)


def on_mesh(variables_tree, mesh, config, *, teacher):
    """Variables placed on the mesh as training holds them, so that the jitted predict compiles
    to the same program: a teacher replicated; a student with the training state's shardings
    (`config.param_sharding` rules over `params/student/...` and `batch_stats/...`)."""
    if teacher:
        return jax.device_put(variables_tree, parallel.replicated(mesh))
    as_state = {
        "params": {"student": variables_tree["params"]},
        "batch_stats": variables_tree["batch_stats"],
    }
    sharding = parallel.param_shardings(as_state, mesh, config.get("param_sharding", ()))
    placed = jax.device_put(as_state, sharding)
    return {"params": placed["params"]["student"], "batch_stats": placed["batch_stats"]}
