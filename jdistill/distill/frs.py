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

from jdistill.distill import adapters, api
from jdistill.losses import detection as det_losses


def richness_mask(teacher_logits):
    """M = stop_gradient(max_k sigmoid(z_t)). teacher_logits: [N, H, W, K] -> [N, H, W]."""
    return jax.lax.stop_gradient(jax.nn.sigmoid(teacher_logits.astype(jnp.float32)).max(-1))


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


def _levels(teacher_taps, batch, cfg, spec):
    """Yields (pair index, student level, teacher level, valid [N, H, W] float) per level pair
    (paired by stride, `api.paired_levels`)."""
    for i, s_lvl, t_lvl, stride in api.paired_levels(spec):
        hw = teacher_taps[f"head/cls_logits/{t_lvl}"].shape[1:3]
        yield i, s_lvl, t_lvl, api.level_valid(batch, hw, stride, cfg)


def frs_feat(student_taps, teacher_taps, batch, params, *, cfg, spec):
    """FRS feature term: sum_l sum M (T - A(S))^2 / sum M, before weight and warm-up.

    Args:
      student_taps: `neck/p{l}` [N, H, W, C_s] student neck features.
      teacher_taps: `neck/p{l}` [N, H, W, C_t] and `head/cls_logits/p{l}` [N, H, W, K] (the
        richness source: RetinaNet anchor x class logits, GFL joint scores, FCOS class logits,
        the RPN objectness for Faster R-CNN).
      batch: uses `pad_shape` [N, 2] int32.
      params: `adapters.init` params, one conv per level pair.
      cfg: `adapter` (kernel kind), optional `count_padding`.
      spec: the student/teacher `api.Pair`.
    Returns:
      (scalar loss, {} metrics).
    """
    total = jnp.float32(0.0)
    for i, s_lvl, t_lvl, valid in _levels(teacher_taps, batch, cfg, spec):
        adapted = adapters.apply_level(params, i, student_taps[f"neck/{s_lvl}"])
        l_feat, _ = frs_level(
            adapted,
            teacher_taps[f"neck/{t_lvl}"],
            None,
            teacher_taps[f"head/cls_logits/{t_lvl}"],
            valid,
        )
        total += l_feat
    return total, {}


def frs_cls(student_taps, teacher_taps, batch, params, *, cfg, spec):
    """FRS classification term: sum_l sum M BCE(sigmoid(z_s), sigmoid(z_t)) / sum M.

    Args: as `frs_feat`, reading `head/cls_logits/p{l}` [N, H, W, K] from both; no params.
    Returns:
      (scalar loss, {} metrics).
    """
    del params
    total = jnp.float32(0.0)
    for _, s_lvl, t_lvl, valid in _levels(teacher_taps, batch, cfg, spec):
        _, l_cls = frs_level(
            None,
            None,
            student_taps[f"head/cls_logits/{s_lvl}"],
            teacher_taps[f"head/cls_logits/{t_lvl}"],
            valid,
        )
        total += l_cls
    return total, {}


def richness_maps(student_taps, teacher_taps, batch, *, cfg, spec):
    """What both FRS terms weigh locations by: {'richness (teacher)': {level: [N, H, W]}}, the
    mask M times the pixel mask, on each student level of a pair (`api.Distiller.maps`)."""
    del student_taps
    out = {}
    for _, s_lvl, t_lvl, valid in _levels(teacher_taps, batch, cfg, spec):
        out[s_lvl] = richness_mask(teacher_taps[f"head/cls_logits/{t_lvl}"]) * valid
    return {"richness (teacher)": out}


def init_adapters(rng, *, cfg, spec):
    """One adapter conv (`cfg.adapter`: conv3x3, conv1x1 or defeat3x3) per level pair, mapping
    the student's neck channels onto the teacher's."""
    return adapters.init(
        rng,
        num_levels=len(api.paired_levels(spec)),
        in_channels=spec.student.channels,
        out_channels=spec.teacher.channels,
        kind=cfg.adapter,
    )


def check_adapter(cfg, spec):
    del spec
    if cfg.get("adapter") not in adapters.KERNELS:
        return f"adapter must be one of {sorted(adapters.KERNELS)}, not {cfg.get('adapter')!r}"
    return None


DISTILLERS = {
    "frs_feat": api.Distiller(
        frs_feat,
        student_taps=("neck",),
        teacher_taps=("neck", "head/cls_logits"),
        init=init_adapters,
        defaults={"adapter": "conv3x3", "count_padding": False},
        check=check_adapter,
        maps=richness_maps,
    ),
    "frs_cls": api.Distiller(
        frs_cls,
        student_taps=("head/cls_logits",),
        teacher_taps=("head/cls_logits",),
        defaults={"count_padding": False},
        same_family=(
            "it compares classification logits prior by prior, and another family's head has "
            "other priors and outputs"
        ),
        maps=richness_maps,
    ),
}

# The FRS paper's recipes (Du et al., NeurIPS 2021, Table 1; specs/frs.md), per student family:
# the two terms' weights only, since the 3x3 adapters are `frs_feat`'s default. The paper also
# warms the weights up over 500 steps, a `distill` setting the configs pass
# (`config_lib.distill_preset(..., warmup_steps=500)`).
PRESETS = {
    # RetinaNet R101 -> R50 2x: 37.4 -> 39.7 box AP.
    "frs_retinanet": {
        "frs_feat": {"fn": "frs_feat", "weight": 0.005},
        "frs_cls": {"fn": "frs_cls", "weight": 0.02},
    },
    # GFL R101 mstrain 2x -> R50 1x, on GFL's joint class-quality logits: 40.2 -> 43.6.
    "frs_gfl": {
        "frs_feat": {"fn": "frs_feat", "weight": 0.1},
        "frs_cls": {"fn": "frs_cls", "weight": 0.05},
    },
    # FCOS R101-caffe -> R50-caffe mstrain 2x, on the class logits (centerness unused): 38.5 ->
    # 40.9.
    "frs_fcos": {
        "frs_feat": {"fn": "frs_feat", "weight": 0.01},
        "frs_cls": {"fn": "frs_cls", "weight": 0.05},
    },
    # Faster R-CNN R101 2x -> R50 1x, the mask and class term on the RPN objectness: 37.4 -> 39.5.
    "frs_faster_rcnn": {
        "frs_feat": {"fn": "frs_feat", "weight": 0.002},
        "frs_cls": {"fn": "frs_cls", "weight": 0.1},
    },
}
