"""The two user-facing conversions: an mmdetection checkpoint into a jdistill teacher, and a
trained student out to mmdetection (or orbax). The scripts in `scripts/` are thin flags around
these."""

import os

import jax
import jax.numpy as jnp

from jdistill import checkpoint
from jdistill.convert import mmdet
from jdistill.models import detector


def convert(model_cfg, src, out, skip=(), class_names=None):
    """Reads `src`, converts it for `model_cfg` and writes the orbax checkpoint `out`."""
    sd, meta = mmdet.read_checkpoint(src)
    names = list(meta.get("CLASSES") or class_names or [])
    if not names:
        raise ValueError(f"{src} has no meta.CLASSES; pass the class names via the data config")
    det = detector.build(model_cfg, len(names))
    expected = jax.eval_shape(
        det.module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32)
    )
    variables = mmdet.to_flax(sd, expected, family=model_cfg.family, skip=skip, what=src)
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; refusing to overwrite it")
    meta = {"class_names": names, "model": model_cfg.to_dict(), "source": os.path.abspath(src)}
    mmdet.write_orbax(out, variables, meta)
    return variables


def export(workdir, out, fmt, step=None):
    """Writes the student of `workdir` (at `step`, default latest) to `out` in `fmt`.

    Without `step`, a newest step that cannot be restored is skipped with a warning and the
    newest one that restores is written; a named `step` that cannot be restored is a
    `checkpoint.CheckpointError` naming its folder.
    """
    ckpt = os.path.join(workdir, "checkpoints")
    path = ckpt if step is None else os.path.join(ckpt, str(step))
    variables, meta = checkpoint.load_model_variables(path)
    meta = meta or {}
    if os.path.exists(out) and (os.path.isfile(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    if fmt == "orbax":
        mmdet.write_orbax(out, variables, meta)
    else:
        family = meta.get("model", {}).get("family")
        if family is None:
            raise ValueError(f"{path} has no model meta; cannot name mmdetection's keys")
        sd = mmdet.to_mmdet(variables, family)
        mmdet.write_pth(out, sd, {"CLASSES": meta.get("class_names", []), "jdistill": meta})
    return variables
