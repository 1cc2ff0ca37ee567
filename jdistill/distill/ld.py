"""LD: localization distillation (Zheng et al., CVPR 2022), main region only, as mmdetection's
`LDHead` (`mmdet/models/dense_heads/ld_head.py`) with `KnowledgeDistillationKLDivLoss`
(`mmdet/models/losses/kd_loss.py`) computes it (`specs/distillers.md`, LD).

GFL heads predict each box side as a distribution over reg_max + 1 bins (`head/bbox_dist`,
[N, H, W, 4 * (reg_max + 1)], after the level's Scale). At every positive of the student's own
ATSS assignment (the "main region"), each side of the student's distribution is pulled towards
the teacher's, softened by a temperature tau:

    KL_side = tau^2 * mean_bins p_T (log p_T - log_softmax(z_S / tau)),  p_T = softmax(z_T / tau)
    w       = max_k sigmoid(student cls logits)          (under stop_gradient)
    L       = sum_levels sum_positives sum_sides w * KL_side / (4 + eps)

returned without `weight` (the trainer applies it and the warm-up).

Settings (`defaults`, overlaid by the config block): `weight` 0.25 and `tau` 10 (mmdetection's
`loss_ld`), `group_size` 2.

Quirks of the original, kept:
- The KL is a mean over the bins (`class_reduction='mean'`), times tau^2.
- The normaliser is `avg_factor=4.0` (torch's float32 eps added, as `weight_reduce_loss`), not
  the sum of weights that divides GFL's own box terms: the loss is a sum over the positives of
  one GPU, and DDP averages the GPUs. With `group_size` g the batch is cut into groups of g
  images (mmdetection's 2 per GPU) and L is the sum over the batch divided by the number of
  groups, i.e. the mean of the per-group sums.
- The weight is the student's own classification score (`cls_score.detach().sigmoid()`), not
  the teacher's.
- Positives are the student loss's (`assign/pos`); the teacher's and the student's anchors are
  the same, since ATSS depends on the boxes only.

Padding: positives lie inside each real image's padded size (ATSS assigns valid priors of real
images only), so no padding cell ever counts and there is nothing for `count_padding` to
change; the original behaves the same (its label weights exclude its batch padding too).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.distill import api
from jdistill.losses import detection as det_losses

SIDES = 4
# torch's float32 eps, added to avg_factor by mmdetection's `weight_reduce_loss`.
AVG_EPS = float(np.finfo(np.float32).eps)


def _flat(taps, name, level, channels):
    """taps[f'{name}/{level}'] [N, H, W, A * channels] -> [N, H * W * A, channels] float32."""
    x = taps[f"{name}/{level}"]
    return x.reshape(x.shape[0], -1, channels).astype(jnp.float32)


def side_kl(student_logits, teacher_logits, tau, reduction="mean"):
    """tau^2 * KL(softmax(t / tau) || softmax(s / tau)) per side, over the last axis.

    student_logits, teacher_logits: [..., bins] float32. reduction: 'mean' (LD) or 'sum'
    (CrossKD) over the bins, as mmdetection's `class_reduction`. Returns [...]; the teacher's
    side carries no gradient.
    """
    log_q = jax.nn.log_softmax(student_logits / tau, axis=-1)
    log_p = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_logits / tau, axis=-1))
    # p (log p - log q); torch's kl_div gives 0 where p is 0, as p * finite does here
    kl = jnp.exp(log_p) * (log_p - log_q)
    kl = kl.mean(-1) if reduction == "mean" else kl.sum(-1)
    return kl * (tau * tau)


def main_region(student_taps, spec):
    """LD's main region and its weights, per level pair: the student assigner's positives and,
    at them, the student's own score w = max_k sigmoid(cls logits) (under stop_gradient).

    Args:
      student_taps: `head/cls_logits/p{l}` [N, H, W, A * K], `assign/pos` [N, A_total] bool
        (the levels' priors, concatenated, each location-major).
      spec: the `api.Pair`.
    Returns:
      [(student level, teacher level, pos [N, H_l W_l A], w pos [N, H_l W_l A])] float32.
    Raises:
      ValueError: when the levels' priors do not add up to `assign/pos`'s.
    """
    pos = student_taps["assign/pos"]
    pairs = api.paired_levels(spec)
    k = spec.student.num_classes
    cls = [_flat(student_taps, "head/cls_logits", s_lvl, k) for _, s_lvl, _, _ in pairs]
    total = sum(x.shape[1] for x in cls)
    if total != pos.shape[1]:
        raise ValueError(f"LD: assign/pos has {pos.shape[1]} priors, the levels {total}")
    out = []
    start = 0
    for (_, s_lvl, t_lvl, _), s_cls in zip(pairs, cls, strict=True):
        size = s_cls.shape[1]
        lvl_pos = pos[:, start : start + size].astype(jnp.float32)  # [N, HW]
        start += size
        w = jax.lax.stop_gradient(jax.nn.sigmoid(s_cls).max(-1)) * lvl_pos
        out.append((s_lvl, t_lvl, lvl_pos, w))
    return out


def ld(student_taps, teacher_taps, batch, params, *, cfg, spec):
    """The LD loss (module docstring), before `weight` and warm-up.

    Args:
      student_taps: `head/bbox_dist/p{l}` [N, H, W, 4 * (R + 1)], `head/cls_logits/p{l}`
        [N, H, W, K], `assign/pos` [N, A_total] bool (the levels' priors, concatenated).
      teacher_taps: `head/bbox_dist/p{l}` [N, H, W, 4 * (R + 1)].
      batch: unused (positives never lie in padding).
      params: None.
      cfg: `tau`, `group_size`.
      spec: the `api.Pair` (same reg_max; `check`).
    Returns:
      (scalar float32, {student level: its share of the loss}).
    """
    del batch, params
    bins = spec.student.reg_max + 1
    n = student_taps["assign/pos"].shape[0]
    groups = det_losses.grouped_sum(jnp.zeros((n,)), cfg.group_size).shape[0]
    total = jnp.float32(0.0)
    metrics = {}
    for s_lvl, t_lvl, _, w in main_region(student_taps, spec):
        s_dist = _flat(student_taps, "head/bbox_dist", s_lvl, SIDES * bins)
        t_dist = _flat(teacher_taps, "head/bbox_dist", t_lvl, SIDES * bins)
        size = w.shape[1]
        kl = side_kl(
            s_dist.reshape(n, size, SIDES, bins),
            jax.lax.stop_gradient(t_dist).reshape(n, size, SIDES, bins),
            cfg.tau,
        )  # [N, HW, 4]
        term = (w[..., None] * kl).sum() / (SIDES + AVG_EPS) / groups
        metrics[s_lvl] = term
        total = total + term
    return total, metrics


def main_region_maps(student_taps, teacher_taps, batch, *, cfg, spec):
    """What LD weighs locations by (`api.Distiller.maps`), from `main_region`: per student
    level, its positives ('main region', in {0, 1}) and the weight the loss gives each, the
    student's max class score there ('weight (student score)', in [0, 1]).

    Args:
      student_taps: `head/cls_logits/p{l}` [N, H, W, K], `assign/pos` [N, A_total] bool.
    Returns:
      {'main region': {level: [N, H, W]}, 'weight (student score)': {...}} float32; a cell's
      value sums its priors' (GFL has one per cell).
    """
    del teacher_taps, batch, cfg
    out = {"main region": {}, "weight (student score)": {}}
    for s_lvl, _, pos, w in main_region(student_taps, spec):
        n, h, wd = student_taps[f"head/cls_logits/{s_lvl}"].shape[:3]
        out["main region"][s_lvl] = pos.reshape(n, h, wd, -1).sum(-1)
        out["weight (student score)"][s_lvl] = w.reshape(n, h, wd, -1).sum(-1)
    return out


def check(cfg, spec):
    """Errors for a pair LD cannot take: not GFL, another reg_max, or a bad group size."""
    s, t = spec.student, spec.teacher
    if s.family != "gfl":
        return f"LD distils GFL's box-side distributions; the student is {s.family!r}"
    if s.reg_max != t.reg_max:
        return (
            f"the student's reg_max ({s.reg_max}) differs from the teacher's ({t.reg_max}): "
            "their box-side distributions have different bins"
        )
    if tuple(s.strides) != tuple(t.strides):
        return f"the student's strides {s.strides} differ from the teacher's {t.strides}"
    return api.check_settings(cfg)


DISTILLERS = {
    "ld": api.Distiller(
        ld,
        student_taps=("head/bbox_dist", "head/cls_logits", "assign"),
        teacher_taps=("head/bbox_dist",),
        defaults={"weight": 0.25, "tau": 10.0, "group_size": 2},
        same_family=(
            "LD distils GFL's box-side distributions (the DFL bins of `gfl_reg`), which only a "
            "GFL teacher predicts for a GFL student"
        ),
        check=check,
        maps=main_region_maps,
    ),
}

# mmdetection configs/ld, ld_r50_gflv1_r101_fpn_coco_1x (GFL R101 -> R50, 40.1 -> 41.0): its
# `loss_ld` (weight 0.25, T 10) over 2 images per GPU, the defaults.
PRESETS = {"ld_gfl": {"ld": {"fn": "ld"}}}
