"""CrossKD (Wang et al., CVPR 2024), as jbwang1997/CrossKD computes it
(`mmdet/models/detectors/crosskd_gfl.py`, `crosskd_retinanet.py`; `specs/distillers.md`,
CrossKD).

The student's head features are cut after tower conv 3 of 4 (before its ReLU), re-standardised
per channel to the teacher's statistics at the same point, and run through the frozen
teacher's remaining tower conv and output convs: the cross-head predictions X. They are pulled
towards the teacher's own predictions T; the gradient reaches the student's backbone, neck and
first tower convs through the teacher's layers, while the student's own head sees only the
ground truth. The teacher's detector computes X (`dense.DenseDetector.cross_head`, the view
'teacher_head_on_student_towers'); this module holds the losses.

Losses, over the priors of all levels, with lw the student's label weights (`assign/label_weight`:
1 on every positive and negative prior, 0 on ignored and invalid ones; for GFL every prior inside
a real image's padded size) and w = sigmoid(max_k T_cls) where lw > 0, else 0:

- cls (both families, `KDQualityFocalLoss`, beta 1, weight 1):
      l_cls = sum_{priors, classes} lw * BCE(X_cls, s_T) * |sigmoid(X_cls) - s_T|^beta,
      s_T = sigmoid(T_cls),
  divided by GFL's QFL normaliser for GFL (the mean over images-per-GPU groups of
  sum_img max(num_pos, 1), `reduce_mean`-ed in the original, plus torch's eps) and by
  RetinaNet's per group for RetinaNet (each group's sum_img max(num_pos, 1) + eps, group terms
  averaged), exactly as the student's own classification loss is normalised.
- reg, GFL (`KnowledgeDistillationKLDivLoss`, class_reduction 'sum', T 1, weight 4):
      l_reg = [sum_{priors, sides} w * T^2 KL(softmax(T_dist / T) || softmax(X_dist / T))]
              / (4 + eps) / sum_priors w
  per group of images (the original's `kd_avg_factor` is its own GPU's sum of weights, neither
  `reduce_mean`-ed nor clamped), group terms averaged (DDP).
- reg, RetinaNet (`GIoULoss`, weight 1): both predictions decoded on the anchors (DeltaXYWH,
  means 0, stds 1, the dw/dh clamp, no clipping),
      l_reg = sum_priors w * (1 - GIoU(X_box, T_box)) / (sum_img max(num_pos, 1) + eps)
  per group, averaged: the same normaliser as the classification term.

The loss returned is cls_weight * l_cls + reg_weight * l_reg, before `weight` (1) and warm-up.

Settings (`defaults`, overlaid by the config block): `cls_weight` 1, `reg_weight` -1 (negative:
the family's, 4 for GFL and 1 for RetinaNet), `beta` 1, `tau` 1 (the KL's T, GFL), `group_size` 2
(mmdetection's images per GPU, for the normalisers; the view's statistics use the teacher
model's `loss_group_size`, also 2), `count_padding` False (see Padding).

Quirks of the original, kept: the student's std gets the 1e-6, the teacher's none; the std is
unbiased; the statistics and the mean/std gradients flow through the student (nothing is
detached on its side); w is sigmoid of the max logit (the same as the max sigmoid); the GFL
regression weight sum is per GPU and unclamped (an all-padding group contributes 0 here instead
of NaN). The CrossKD RetinaNet configs build the student's FPN extra convs 'on_output' while the
teacher (mmdetection's RetinaNet) uses 'on_input'; here a RetinaNet student keeps its family's
'on_input'.

Both heads must have the same `stacked_convs` (the cut is after conv stacked_convs - 1 on
both sides; `dense.tower_depth`): `check` refuses a pair that differs.

Padding: the loss terms count only priors with a label weight, which excludes everything
outside each real image's padded size, in the original as here. The statistics of the view are
taken over the same valid cells (the student's `assign/valid`), where the original also counts
its batch padding; `count_padding=True` takes them over every cell, the original's rule (the
trainer hands the setting to the view, `plan.views`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.distill import api, pkd
from jdistill.distill import ld as ld_lib
from jdistill.losses import detection as det_losses
from jdistill.ops import anchors as anchor_ops
from jdistill.ops import boxes as box_ops

FAMILIES = ("gfl", "retinanet")
REG_OUTPUT = {"gfl": "bbox_dist", "retinanet": "box_deltas"}
REG_WEIGHT = {"gfl": 4.0, "retinanet": 1.0}  # the originals' loss_reg_kd weights
AVG_EPS = ld_lib.AVG_EPS


def kd_quality_focal(pred, target, beta=1.0):
    """`kd_quality_focal_loss` per element: BCE(x, sigmoid(t)) * |sigmoid(x) - sigmoid(t)|^beta.

    pred, target: [..., K] logits (the target's gradient is stopped). Returns [..., K].
    """
    soft = jax.lax.stop_gradient(jax.nn.sigmoid(target))
    bce = det_losses.bce_with_logits(pred, soft)
    return bce * jnp.abs(jax.nn.sigmoid(pred) - soft) ** beta


def _flat(taps, key, channels):
    """[N, H, W, A * channels] -> [N, H * W * A, channels] float32."""
    x = taps[key]
    return x.reshape(x.shape[0], -1, channels).astype(jnp.float32)


def _level_anchors(anchors_cfg, hw, stride):
    """RetinaNet's anchors of one level, [H * W * A, 4] numpy (as `RetinaNet.priors`)."""
    per_octave = anchors_cfg["scales_per_octave"]
    scales = [anchors_cfg["octave_base_scale"] * 2 ** (i / per_octave) for i in range(per_octave)]
    base = anchor_ops.base_anchors(stride, scales, tuple(anchors_cfg["anchor_ratios"]))
    return anchor_ops.grid_anchors(hw, stride, base)


def gather(student_taps, teacher_taps, spec):
    """The per-prior tensors of every paired level, concatenated like the assignment taps.

    Returns dict: x_cls, t_cls [N, A_total, K]; x_reg, t_reg [N, A_total, D] (D = 4 * (R + 1)
    for GFL, 4 for RetinaNet); anchors [A_total, 4] numpy (RetinaNet) or None.
    """
    family = spec.student.family
    k = spec.student.num_classes
    d = 4 * (spec.student.reg_max + 1) if family == "gfl" else 4
    reg = REG_OUTPUT[family]
    parts = {"x_cls": [], "t_cls": [], "x_reg": [], "t_reg": [], "anchors": []}
    for _, _, t_lvl, stride in api.paired_levels(spec):
        parts["x_cls"].append(_flat(teacher_taps, f"cross/cls_logits/{t_lvl}", k))
        parts["t_cls"].append(_flat(teacher_taps, f"head/cls_logits/{t_lvl}", k))
        parts["x_reg"].append(_flat(teacher_taps, f"cross/{reg}/{t_lvl}", d))
        parts["t_reg"].append(_flat(teacher_taps, f"head/{reg}/{t_lvl}", d))
        if family == "retinanet":
            hw = teacher_taps[f"head/cls_logits/{t_lvl}"].shape[1:3]
            parts["anchors"].append(_level_anchors(spec.student.anchors, hw, stride))
    out = {key: jnp.concatenate(v, axis=1) for key, v in parts.items() if key != "anchors"}
    out["t_cls"] = jax.lax.stop_gradient(out["t_cls"])
    out["t_reg"] = jax.lax.stop_gradient(out["t_reg"])
    out["anchors"] = np.concatenate(parts["anchors"]) if parts["anchors"] else None
    return out


def crosskd(student_taps, teacher_taps, batch, params, *, cfg, spec):
    """The CrossKD loss (module docstring), before `weight` and warm-up.

    Args:
      student_taps: `assign/label_weight` [N, A_total] float32, `assign/pos` [N, A_total] bool.
      teacher_taps: `head/cls_logits/p{l}`, `head/bbox_dist/p{l}` (GFL) or
        `head/box_deltas/p{l}` (RetinaNet), and the view's `cross/*/p{l}` of the same shapes.
      batch: `image_valid` [N] bool (padding examples add nothing to the positive counts).
      params: None.
      cfg: `cls_weight`, `reg_weight` (negative: the family's), `beta`, `tau`, `group_size`.
      spec: the `api.Pair` (one family, GFL or RetinaNet; `check`).
    Returns:
      (scalar float32, {'cls': l_cls, 'reg': l_reg} unweighted).
    """
    del params
    family = spec.student.family
    g = gather(student_taps, teacher_taps, spec)
    lw = student_taps["assign/label_weight"].astype(jnp.float32)  # [N, A]
    pos = student_taps["assign/pos"]
    n, a = lw.shape
    if g["x_cls"].shape[1] != a:
        raise ValueError(
            f"CrossKD: the levels have {g['x_cls'].shape[1]} priors, the assignment {a}"
        )
    image_valid = batch.get("image_valid", jnp.ones((n,), bool)).astype(jnp.float32)
    group = cfg.group_size
    num_pos = jnp.maximum(pos.sum(1), 1).astype(jnp.float32) * image_valid  # [N]

    cls = (kd_quality_focal(g["x_cls"], g["t_cls"], cfg.beta) * lw[..., None]).sum(-1)  # [N, A]
    w = jax.nn.sigmoid(g["t_cls"].max(-1)) * (lw > 0)  # [N, A], constant

    if family == "gfl":
        groups = det_losses.grouped_sum(num_pos, group).shape[0]
        # reduce_mean over the GPUs of sum_img max(num_pos, 1): the QFL normaliser
        avg = jnp.maximum(num_pos.sum() / groups, 1.0)
        l_cls = cls.sum() / (groups * (avg + AVG_EPS))
        bins = spec.student.reg_max + 1
        kl = ld_lib.side_kl(
            g["x_reg"].reshape(n, a, 4, bins),
            g["t_reg"].reshape(n, a, 4, bins),
            cfg.tau,
            reduction="sum",
        )  # [N, A, 4]
        num = det_losses.grouped_sum(w[..., None] * kl, group) / (4.0 + AVG_EPS)
        den = det_losses.grouped_sum(w, group)
        l_reg = jnp.mean(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0))
    else:
        avg = det_losses.grouped_sum(num_pos, group) + AVG_EPS  # [groups]
        l_cls = jnp.mean(det_losses.grouped_sum(cls, group) / avg)
        anchors = jnp.asarray(g["anchors"])[None]
        x_box = box_ops.decode_deltas(anchors, g["x_reg"])
        t_box = box_ops.decode_deltas(anchors, g["t_reg"])
        giou = det_losses.giou_loss(x_box, t_box)  # [N, A]
        l_reg = jnp.mean(det_losses.grouped_sum(w * giou, group) / avg)

    reg_weight = cfg.get("reg_weight")
    reg_weight = REG_WEIGHT[family] if reg_weight is None or reg_weight < 0 else reg_weight
    total = cfg.cls_weight * l_cls + reg_weight * l_reg
    return total, {"cls": l_cls, "reg": l_reg}


def check(cfg, spec):
    """Errors for a pair or settings CrossKD cannot take."""
    s, t = spec.student, spec.teacher
    if s.family not in FAMILIES:
        return (
            f"CrossKD has GFL and RetinaNet forms (crosskd_gfl.py, crosskd_retinanet.py), not "
            f"{s.family!r}"
        )
    reg = f"head/{REG_OUTPUT[s.family]}"
    if reg not in t.provides:
        return f"the teacher provides no {reg!r} taps"
    for what in ("channels", "num_classes", "num_anchors", "reg_max", "strides", "stacked_convs"):
        if getattr(s, what) != getattr(t, what):
            return (
                f"the student's {what} ({getattr(s, what)}) differ from the teacher's "
                f"({getattr(t, what)}): the teacher's head runs on the student's features and "
                "their predictions are compared prior by prior"
            )
    if s.family == "retinanet" and dict(s.anchors) != dict(t.anchors):
        return f"the student's anchors {dict(s.anchors)} differ from the teacher's"
    return api.check_settings(cfg)


DISTILLERS = {
    "crosskd": api.Distiller(
        crosskd,
        student_taps=("tower", "assign"),
        teacher_taps=("head/cls_logits", "tower"),
        views=("teacher_head_on_student_towers",),
        defaults={
            "weight": 1.0,
            "cls_weight": 1.0,
            "reg_weight": -1.0,  # negative: the family's (GFL 4, RetinaNet 1)
            "beta": 1.0,
            "tau": 1.0,
            "group_size": 2,
            "count_padding": False,
        },
        same_family=(
            "CrossKD runs the teacher's head on the student's head features and compares the "
            "two predictions prior by prior, so both heads must be one design (GFL or RetinaNet)"
        ),
        check=check,
    ),
}

# jbwang1997/CrossKD's published recipes. Each spells its family's box weight (GFL's KL 4,
# RetinaNet's GIoU 1) where the default -1 would pick the same by family.
PRESETS = {
    # configs/crosskd/crosskd_r50_gflv1_r101-2x-ms_fpn_1x_coco.py: 40.2 -> 43.7.
    "crosskd_gfl": {"crosskd": {"fn": "crosskd", "reg_weight": 4.0}},
    # configs/crosskd/crosskd_r50_retinanet_r101_fpn_2x_coco.py: 37.4 -> 39.7.
    "crosskd_retinanet": {"crosskd": {"fn": "crosskd", "reg_weight": 1.0}},
}
# configs/crosskd+pkd/crosskd+pkd_r50_gflv1_r101-2x-ms_fpn_1x_coco.py, 40.2 -> 43.9: CrossKD's
# GFL term plus its PKD term, which is PKD's `pkd_gfl`.
PRESETS["crosskd_pkd_gfl"] = {**PRESETS["crosskd_gfl"], **pkd.PRESETS["pkd_gfl"]}
