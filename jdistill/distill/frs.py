"""FRS: Feature Richness Score distillation (Du et al., NeurIPS 2021), `specs/frs.md`.

On every FPN level the teacher's classification output gives a richness mask
M = max_k sigmoid(z_t): where the teacher sees any object, the student imitates the teacher's
neck features (through an adaptation conv) and its classification scores.

Normalisation: the sums run over the whole global batch (the reference sums per GPU of 2
images). Padding: pixels outside each image's 32-padded size (the region mmdetection would not
have had) are excluded from sums and mask mass; set `count_padding=True` to include them.
"""

import jax
import jax.numpy as jnp

from jdistill.distill import adapters
from jdistill.losses import detection as det_losses


def richness_mask(teacher_logits):
    """M = stop_gradient(max_k sigmoid(z_t)). teacher_logits: [N, H, W, K] -> [N, H, W]."""
    return jax.lax.stop_gradient(jax.nn.sigmoid(teacher_logits.astype(jnp.float32)).max(-1))


def pixel_valid(pad_shape, feat_hw, stride):
    """[N, H, W] float mask of cells inside ceil(pad_shape / stride). pad_shape: [N, 2]."""
    h, w = feat_hw
    vh = (pad_shape[:, 0] + stride - 1) // stride
    vw = (pad_shape[:, 1] + stride - 1) // stride
    ys = jnp.arange(h)[None, :, None] < vh[:, None, None]
    xs = jnp.arange(w)[None, None, :] < vw[:, None, None]
    return (ys & xs).astype(jnp.float32)


def frs_level(student_feat, teacher_feat, student_logits, teacher_logits, valid):
    """Unweighted FRS feature and classification terms of one level.

    Either term is skipped (returned as None) when its student input is None.

    Args:
      student_feat: [N, H, W, C] adapted student neck features A(S), or None.
      teacher_feat: [N, H, W, C] teacher neck features T.
      student_logits: [N, H, W, K] student classification logits, or None.
      teacher_logits: [N, H, W, K] teacher classification logits.
      valid: [N, H, W] float pixel mask (1 counts, 0 is padding).
    Returns:
      (l_feat, l_cls): scalars. l_feat = sum M (T - A(S))^2 / sum M;
      l_cls = sum M BCE(sigmoid(z_s), sigmoid(z_t)) / sum M. Channel sums are not averaged:
      the mask mass is counted once per location (reference normaliser).
    """
    mask = richness_mask(teacher_logits) * valid
    norm = mask.sum()
    l_feat = l_cls = None
    if student_feat is not None:
        t_feat = jax.lax.stop_gradient(teacher_feat.astype(jnp.float32))
        sq = jnp.square(t_feat - student_feat.astype(jnp.float32)).sum(-1)
        l_feat = (mask * sq).sum() / norm
    if student_logits is not None:
        q = jax.nn.sigmoid(jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)))
        bce = det_losses.bce_with_logits(student_logits, q).sum(-1)
        l_cls = (mask * bce).sum() / norm
    return l_feat, l_cls


def _level_inputs(student_taps, teacher_taps, targets, cfg):
    """Yields (level index, level name, valid [N, H, W] float) for each configured level."""
    for i, (lvl, stride) in enumerate(zip(cfg.levels, cfg.strides, strict=True)):
        t_logits = teacher_taps[f"head/cls_logits/{lvl}"]
        n, h, w, _ = t_logits.shape
        if cfg.get("count_padding", False):
            valid = jnp.ones((n, h, w), jnp.float32)
        else:
            valid = pixel_valid(targets["pad_shape"], (h, w), stride)
        yield i, lvl, valid


def frs_feat(student_taps, teacher_taps, targets, adapter_params, *, cfg):
    """FRS feature term: sum_l sum M (T - A(S))^2 / sum M, before weight and warm-up.

    Args:
      student_taps: `neck/p{l}` [N, H, W, C] student neck features.
      teacher_taps: `neck/p{l}` [N, H, W, C] and `head/cls_logits/p{l}` [N, H, W, K] (the
        richness source: RetinaNet anchor x class logits, GFL joint scores, FCOS class logits,
        the RPN objectness for Faster R-CNN).
      targets: the batch; uses `pad_shape` [N, 2] int32.
      adapter_params: params of `adapters.LevelAdapters`, one conv per level.
      cfg: `levels`, `strides`, `adapter` (kernel spec), optional `count_padding`.
    Returns:
      (scalar loss, {} metrics).
    """
    total = jnp.float32(0.0)
    for i, lvl, valid in _level_inputs(student_taps, teacher_taps, targets, cfg):
        adapted = adapters.apply_level(adapter_params, i, student_taps[f"neck/{lvl}"])
        l_feat, _ = frs_level(
            adapted,
            teacher_taps[f"neck/{lvl}"],
            None,
            teacher_taps[f"head/cls_logits/{lvl}"],
            valid,
        )
        total += l_feat
    return total, {}


def frs_cls(student_taps, teacher_taps, targets, adapter_params, *, cfg):
    """FRS classification term: sum_l sum M BCE(sigmoid(z_s), sigmoid(z_t)) / sum M.

    Args: as `frs_feat`, reading `head/cls_logits/p{l}` [N, H, W, K] from both; no adapter.
    Returns:
      (scalar loss, {} metrics).
    """
    del adapter_params
    total = jnp.float32(0.0)
    for _, lvl, valid in _level_inputs(student_taps, teacher_taps, targets, cfg):
        _, l_cls = frs_level(
            None,
            None,
            student_taps[f"head/cls_logits/{lvl}"],
            teacher_taps[f"head/cls_logits/{lvl}"],
            valid,
        )
        total += l_cls
    return total, {}
