"""DeFeat (Guo et al., CVPR 2021) and FGFI (Wang et al., CVPR 2019), `specs/defeat.md`.

Decisions (the spec's "Decisions for this project"): options are explicit config fields
(mask kind, decoupled or not, weights, temperatures); background is class index K; padding is
never background unless `count_padding=True` (the reference counts its batch padding as
background: that option reproduces its numbers); masks are rasterised on device from the padded
gt boxes with static shapes.

Normalisers follow the reference's per-GPU sums: with `group_size` g > 0 the batch is cut into
groups of g images (the reference's 8 per GPU), each normalised by its own counts, and the group
losses are averaged (DDP's gradient mean). g = 0 is one group of the whole batch.
"""

import functools

import jax
import jax.numpy as jnp

from jdistill.distill import adapters, api, frs
from jdistill.losses import detection as det_losses
from jdistill.ops import anchors as anchor_ops
from jdistill.ops import boxes as box_ops
from jdistill.ops import roi_align as roi_ops

MASKS = ("gt", "roi", "all")
# [N, ...] -> per-group sums [N // g] over everything but the batch axis (g 0: one group).
_groups = det_losses.grouped_sum


def gt_levels(boxes, num_levels):
    """DeFeat's level of each gt box: floor(log2(sqrt((w + 1)(h + 1)) / 56 + 1e-6)), clipped.

    boxes: [..., 4] -> [...] int32 in [0, num_levels - 1] (level 0 is the first distilled one).
    """
    return roi_ops.map_roi_levels(boxes, num_levels, plus_one=True)


def gt_mask_level(boxes, on_level, feat_hw, stride):
    """`mask-neck-gt` of one level for one image: half-open floor rasterisation, binary.

    A box marks cells [floor(y1/s), min(floor(y2/s), H)) x [floor(x1/s), min(floor(x2/s), W))
    (the cell holding x2 / y2 is not marked); when that range is empty along an axis, only the
    cell (floor(y1/s), floor(x1/s)) is marked.

    Args:
      boxes: [G, 4] canvas pixels; on_level: [G] bool (valid and assigned to this level).
      feat_hw: (H, W); stride: the level stride.
    Returns:
      [H, W] float32 in {0, 1}.
    """
    h, w = feat_hw
    lx = jnp.maximum(jnp.floor(boxes[:, 0] / stride), 0).astype(jnp.int32)
    ly = jnp.maximum(jnp.floor(boxes[:, 1] / stride), 0).astype(jnp.int32)
    rx = jnp.minimum(jnp.floor(boxes[:, 2] / stride).astype(jnp.int32), w)
    ry = jnp.minimum(jnp.floor(boxes[:, 3] / stride).astype(jnp.int32), h)
    degenerate = (lx == rx) | (ly == ry)
    ys = jnp.arange(h)[None, :]
    xs = jnp.arange(w)[None, :]
    rows = jnp.where(
        degenerate[:, None], ys == ly[:, None], (ys >= ly[:, None]) & (ys < ry[:, None])
    )
    cols = jnp.where(
        degenerate[:, None], xs == lx[:, None], (xs >= lx[:, None]) & (xs < rx[:, None])
    )
    rows = (rows & on_level[:, None]).astype(jnp.float32)
    count = jnp.einsum("gh,gw->hw", rows, cols.astype(jnp.float32))
    return (count > 0).astype(jnp.float32)


def roi_mask_level(boxes, on_level, anchors, feat_hw, num_anchors, phi):
    """FGFI's `mask-neck-roi` of one level for one image.

    A cell is marked when one of its anchors has IoU > phi * (the best IoU of some gt of this
    level over all this level's anchors) with that gt.

    Args:
      boxes: [G, 4]; on_level: [G] bool; anchors: [H * W * A, 4] (location-major).
      feat_hw: (H, W); num_anchors: A; phi: the threshold factor (0.5).
    Returns:
      [H, W] float32 in {0, 1}.
    """
    iou = box_ops.pairwise_iou(anchors, boxes)  # [HWA, G]
    iou = jnp.where(on_level[None, :], iou, -1.0)
    best = iou.max(axis=0)  # [G]
    hit = (iou > phi * best[None, :]) & on_level[None, :]
    return hit.any(axis=1).reshape(*feat_hw, num_anchors).any(-1).astype(jnp.float32)


def level_masks(cfg, targets, level_hws, strides, anchors):
    """Per-level [N, H_l, W_l] foreground masks of the configured kind (`cfg.mask`).

    `strides` of the levels; `anchors`: the student's anchor settings (`anchor_scale`,
    `anchor_ratios`), which the 'roi' (FGFI) masks are made of.
    """
    kind = cfg.get("mask", "gt")
    if kind not in MASKS:
        raise ValueError(f"DeFeat mask {kind!r}: use one of {MASKS}")
    n = targets["boxes"].shape[0]
    if kind == "all":
        return [jnp.ones((n, *hw), jnp.float32) for hw in level_hws]
    num_levels = len(level_hws)
    valid = targets["box_valid"] & targets["image_valid"][:, None]
    lvl = gt_levels(targets["boxes"], num_levels)  # [N, G]
    ratios = tuple(anchors.get("anchor_ratios", (0.5, 1.0, 2.0)))
    masks = []
    for i, (hw, stride) in enumerate(zip(level_hws, strides, strict=True)):
        on = valid & (lvl == i)
        if kind == "gt":
            fn = functools.partial(gt_mask_level, feat_hw=hw, stride=stride)
        else:
            base = anchor_ops.base_anchors(stride, [anchors.get("anchor_scale", 8)], ratios)
            fn = functools.partial(
                roi_mask_level,
                anchors=jnp.asarray(anchor_ops.grid_anchors(hw, stride, base)),
                feat_hw=hw,
                num_anchors=len(ratios),
                phi=cfg.get("roi_phi", 0.5),
            )
        masks.append(jax.vmap(fn)(targets["boxes"], on))
    return masks


def neck_masks(teacher_taps, targets, *, cfg, spec):
    """The locations each term of `defeat_neck` averages over, per level pair.

    Foreground F = M V and background B = (1 - M) V, with M the configured mask (`level_masks`)
    and V the pixel validity (`api.level_valid`) times the image validity.

    Args:
      teacher_taps: `neck/{level}` [N, H, W, C] (only their grids are read).
      targets: the batch: `boxes` [N, G, 4], `box_valid` [N, G], `image_valid` [N],
        `pad_shape` [N, 2].
      cfg, spec: as `defeat_neck`'s.
    Returns:
      [(pair index, student level, teacher level, F [N, H, W], B [N, H, W])] float32 in {0, 1},
      on the teacher level's grid (the student's: the two are compared cell by cell).
    """
    pairs = api.paired_levels(spec)
    hws = [tuple(teacher_taps[f"neck/{t_lvl}"].shape[1:3]) for _, _, t_lvl, _ in pairs]
    strides = [stride for *_, stride in pairs]
    masks = level_masks(cfg, targets, hws, strides, spec.student.anchors)
    out = []
    for (i, s_lvl, t_lvl, stride), hw, mask in zip(pairs, hws, masks, strict=True):
        valid = api.level_valid(targets, hw, stride, cfg)
        valid = valid * targets["image_valid"][:, None, None]
        out.append((i, s_lvl, t_lvl, mask * valid, (1.0 - mask) * valid))
    return out


def defeat_neck(student_taps, teacher_taps, targets, adapter_params, *, cfg, spec):
    """DeFeat's decoupled neck loss (`decoupled=True`) or FGFI's foreground-only loss.

    Per level l, with D = A_l(S_l) - T_l over [N, H, W, C], mask M and pixel validity V:
      L_fg_l = sum M V D^2 / max(1, 2 C sum M V),
      L_bg_l = sum (1 - M) V D^2 / max(1, 2 C sum (1 - M) V)
    and the loss is fg_weight * mean_l L_fg_l + bg_weight * mean_l L_bg_l (no background term
    when `decoupled` is False: FGFI). Levels without foreground still count in the mean.

    Args:
      student_taps / teacher_taps: `neck/{level}` [N, H, W, C].
      targets: the batch: `boxes`, `box_valid`, `image_valid`, `pad_shape`.
      adapter_params: one adapter conv per level pair (`adapters.py`).
      cfg: mask ('gt' | 'roi' | 'all'), decoupled, fg_weight, bg_weight, group_size,
        count_padding, roi_phi.
      spec: the student/teacher `api.Pair`; levels pair by stride, 'roi' masks use the
        student's anchors.
    Returns:
      (scalar, {'fg', 'bg', 'fg_cells'}).
    """
    levels = neck_masks(teacher_taps, targets, cfg=cfg, spec=spec)
    g = cfg.get("group_size", 0)
    fg_total, bg_total, cells = 0.0, 0.0, 0.0
    for i, s_lvl, t_lvl, fg, bg in levels:
        s = adapters.apply_level(adapter_params, i, student_taps[f"neck/{s_lvl}"])
        t = jax.lax.stop_gradient(teacher_taps[f"neck/{t_lvl}"].astype(jnp.float32))
        c = t.shape[-1]
        sq = jnp.square(s - t).sum(-1)  # [N, H, W]
        fg_total += jnp.mean(_groups(fg * sq, g) / jnp.maximum(1.0, 2 * c * _groups(fg, g)))
        bg_total += jnp.mean(_groups(bg * sq, g) / jnp.maximum(1.0, 2 * c * _groups(bg, g)))
        cells += fg.sum()
    n_levels = len(levels)
    fg_loss = cfg.fg_weight * fg_total / n_levels
    bg_loss = cfg.bg_weight * bg_total / n_levels if cfg.get("decoupled", True) else 0.0
    return fg_loss + bg_loss, {"fg": fg_loss, "bg": jnp.float32(bg_loss), "fg_cells": cells}


def neck_maps(student_taps, teacher_taps, targets, *, cfg, spec):
    """What `defeat_neck` averages its terms over (`api.Distiller.maps`): `neck_masks`' F as
    'foreground' (gt boxes, or FGFI's RoI-anchor cells with `mask='roi'`) and, when the loss
    has a background term (`decoupled`), B as 'background'.

    Returns:
      {'foreground': {student level: [N, H, W]}, 'background': {...}} float32 in {0, 1}.
    """
    del student_taps
    levels = neck_masks(teacher_taps, targets, cfg=cfg, spec=spec)
    out = {"foreground": {s_lvl: fg for _, s_lvl, _, fg, _ in levels}}
    if cfg.get("decoupled", True):
        out["background"] = {s_lvl: bg for _, s_lvl, _, _, bg in levels}
    return out


def temperature_kl(student_logits, teacher_logits, rows, temperature, group_size=0):
    """T^2 * sum_{rows} KL(softmax(z_t / T) || softmax(z_s / T)) / #rows (0 when no rows).

    Args:
      student_logits, teacher_logits: [N, R, K + 1]; rows: [N, R] bool.
    Returns:
      scalar, averaged over groups of `group_size` images.
    """
    t = temperature
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_q = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, -1)
    kl = (jnp.exp(log_q) * (log_q - log_p)).sum(-1) * rows
    num = _groups(kl, group_size)
    den = _groups(rows.astype(jnp.float32), group_size)
    return jnp.mean(jnp.where(den > 0, num / jnp.maximum(den, 1.0), 0.0)) * t * t


def defeat_roi_kd(student_taps, teacher_taps, targets, adapter_params, *, cfg, spec):
    """DeFeat's decoupled proposal KD on the student's sampled RoIs (`SampleSTU`).

    The teacher's RoI head ran on the same RoIs (`roi/cls_logits` in the teacher taps), so the
    labels that split foreground from background are consistent. Background is label K.
    Loss: fg_weight * KL(fg rows, fg_temperature) + bg_weight * KL(bg rows, bg_temperature).

    Args:
      student_taps: `roi/cls_logits` [N, R, K + 1], `roi/labels` [N, R], `roi/valid` [N, R].
      teacher_taps: `roi/cls_logits` [N, R, K + 1].
    Returns:
      (scalar, {'fg', 'bg'}).
    """
    del targets, adapter_params
    labels = student_taps["roi/labels"]
    valid = student_taps["roi/valid"]
    k = spec.student.num_classes
    fg_rows = valid & (labels < k)
    bg_rows = valid & (labels == k)
    g = cfg.get("group_size", 0)
    zs, zt = student_taps["roi/cls_logits"], teacher_taps["roi/cls_logits"]
    fg = cfg.fg_weight * temperature_kl(zs, zt, fg_rows, cfg.fg_temperature, g)
    bg = cfg.bg_weight * temperature_kl(zs, zt, bg_rows, cfg.bg_temperature, g)
    return fg + bg, {"fg": fg, "bg": bg}


def dense_selection(student_taps):
    """The priors each term of `defeat_dense_kd` averages over: the student assigner's
    positives and negatives (ignored priors in neither).

    Args:
      student_taps: `assign/pos`, `assign/neg` [N, P] bool, P = sum_l H_l W_l A_l.
    Returns:
      {'pos': [N, P], 'neg': [N, P]} float32 in {0, 1}.
    """
    return {name: student_taps[f"assign/{name}"].astype(jnp.float32) for name in ("pos", "neg")}


def defeat_dense_kd(student_taps, teacher_taps, targets, adapter_params, *, cfg, spec):
    """DeFeat for one-stage detectors: decoupled dense classification KD.

    Any dense head with per-class sigmoid logits and an assigner that taps its positives and
    negatives: RetinaNet (A anchors per location, MaxIoU) and GFL (A = 1, ATSS; its quality
    focal scores are sigmoid logits too). The DeFeat paper publishes the RetinaNet form only.

    Per prior, kd = T^2 * sum_k BCE(sigmoid(z_s / T), sigmoid(z_t / T)); averaged separately
    over the priors the detector's own assigner marks positive and negative (`assign/pos`,
    `assign/neg` taps, ignored priors in neither, `dense_selection`):
      pos_weight * sum_pos kd / max(1, #pos) + neg_weight * sum_neg kd / max(1, #neg).

    Args:
      student_taps: `head/cls_logits/{level}` [N, H, W, A * K], `assign/pos`, `assign/neg`
        [N, sum_l H_l W_l A] bool.
      teacher_taps: `head/cls_logits/{level}`.
    Returns:
      (scalar, {'pos', 'neg'}).
    """
    del targets, adapter_params
    t = cfg.get("temperature", 1.0)
    n = student_taps["assign/pos"].shape[0]
    a_total = student_taps["assign/pos"].shape[1]
    zs = jnp.concatenate(
        [student_taps[f"head/cls_logits/{lvl}"].reshape(n, -1) for lvl in spec.student.levels], 1
    )
    zt = jnp.concatenate(
        [teacher_taps[f"head/cls_logits/{lvl}"].reshape(n, -1) for lvl in spec.teacher.levels], 1
    )
    zs = zs.reshape(n, a_total, -1).astype(jnp.float32) / t
    q = jax.nn.sigmoid(jax.lax.stop_gradient(zt).reshape(n, a_total, -1).astype(jnp.float32) / t)
    # BCE against the teacher's soft targets (FRS's class term); its gradient is the KL's.
    kd = (jax.nn.softplus(zs) - q * zs).sum(-1) * t * t
    g = cfg.get("group_size", 0)
    out = {}
    for name, sel in dense_selection(student_taps).items():
        val = jnp.mean(_groups(kd * sel, g) / jnp.maximum(1.0, _groups(sel, g)))
        out[name] = cfg[f"{name}_weight"] * val
    return out["pos"] + out["neg"], out


def dense_maps(student_taps, teacher_taps, targets, *, cfg, spec):
    """What `defeat_dense_kd` averages its terms over (`api.Distiller.maps`): per student level,
    the number of each cell's priors (of its A = channels / K) in `dense_selection`'s
    positives ('positive') and negatives ('negative').

    Args:
      student_taps: `head/cls_logits/{level}` [N, H, W, A * K] (only their shapes are read),
        `assign/pos`, `assign/neg` [N, sum_l H_l W_l A] bool, levels in `spec.student.levels`
        order, each location-major.
    Returns:
      {'positive': {level: [N, H, W]}, 'negative': {...}} float32 counts in [0, A].
    """
    del teacher_taps, targets, cfg
    sel = dense_selection(student_taps)
    shapes = [student_taps[f"head/cls_logits/{lvl}"].shape for lvl in spec.student.levels]
    sizes = [h * w * (c // spec.student.num_classes) for _, h, w, c in shapes]
    if sum(sizes) != sel["pos"].shape[1]:
        raise ValueError(
            f"DeFeat: assign/pos has {sel['pos'].shape[1]} priors, the levels {sum(sizes)}"
        )
    out = {"positive": {}, "negative": {}}
    start = 0
    for lvl, (n, h, w, _), size in zip(spec.student.levels, shapes, sizes, strict=True):
        for name, key in (("positive", "pos"), ("negative", "neg")):
            out[name][lvl] = sel[key][:, start : start + size].reshape(n, h, w, -1).sum(-1)
        start += size
    return out


_SAME_HEAD = (
    "it compares the {what} of both heads one to one, which another family's head does not have"
)
DISTILLERS = {
    "defeat_neck": api.Distiller(
        defeat_neck,
        student_taps=("neck",),
        teacher_taps=("neck",),
        init=frs.init_adapters,
        # The reference's released settings, but one normalisation group (`PRESETS`).
        defaults={
            "adapter": "defeat3x3",
            "mask": "gt",
            "decoupled": True,
            "fg_weight": 3.0,
            "bg_weight": 12.0,
            "roi_phi": 0.5,
            "group_size": 0,
            "count_padding": False,
        },
        check=frs.check_adapter,
        maps=neck_maps,
    ),
    "defeat_roi_kd": api.Distiller(
        defeat_roi_kd,
        student_taps=("roi",),
        views=("teacher_roi_head_on_student_rois",),
        defaults={
            "fg_weight": 2.0,
            "bg_weight": 2.0,
            "fg_temperature": 1.0,
            "bg_temperature": 1.0,
            "group_size": 0,
        },
        same_family=_SAME_HEAD.format(what="RoI classifications"),
    ),
    "defeat_dense_kd": api.Distiller(
        defeat_dense_kd,
        student_taps=("head/cls_logits", "assign"),
        teacher_taps=("head/cls_logits",),
        defaults={"pos_weight": 1.0, "neg_weight": 1.0, "temperature": 1.0, "group_size": 0},
        same_family=_SAME_HEAD.format(what="anchor classifications"),
        maps=dense_maps,
    ),
}

# The recipes of the DeFeat reference (specs/defeat.md, "Decisions for this project"); its
# normalisers run per GPU, hence `group_size` (images per group).
PRESETS = {
    # The released config (voc_stu_faster_rcnn_r50_decouple_neck.py), Faster R-CNN R101 -> R50
    # on VOC 07+12, 80.52 -> 82.04 VOC07 mAP: the decoupled neck terms only (fg 3, bg 12, gt
    # masks, DeFeat-init 3x3 adapters: the defaults), 8 images per GPU, no head term, no decay.
    "defeat_released": {"defeat_neck": {"fn": "defeat_neck", "group_size": 8}},
    # The paper's: plus the decoupled proposal KD on the student's sampled RoIs (fg and bg
    # weight 2, temperatures 1 and 1: the defaults), also per 8 images.
    "defeat_paper": {
        "defeat_neck": {"fn": "defeat_neck", "group_size": 8},
        "defeat_roi_kd": {"fn": "defeat_roi_kd", "group_size": 8},
    },
    # FGFI (Wang et al., CVPR 2019) as the reference runs it (voc_stu_faster_rcnn_r50_FGFI.py):
    # RoI-anchor masks (phi 0.5, the default), the foreground term only (weight 3, normalised by
    # 2 C N_p), DeFeat-init adapters, 4 images per GPU. About 81.0-81.2 VOC07 mAP.
    "fgfi": {
        "defeat_neck": {
            "fn": "defeat_neck",
            "mask": "roi",
            "decoupled": False,
            "bg_weight": 0.0,
            "group_size": 4,
        }
    },
    # Ours for a one-stage detector (Decision 6; the reference code cannot run RetinaNet, §7.17,
    # and the paper's 36.5 -> 39.7 gives no settings): the released neck terms on P3..P7 plus
    # the decoupled dense classification KD (positive and negative weight 1, temperature 1),
    # per GPU of 2 images.
    "defeat_retinanet": {
        "defeat_neck": {"fn": "defeat_neck", "group_size": 2},
        "defeat_dense_kd": {"fn": "defeat_dense_kd", "group_size": 2},
    },
}
