"""Static-shape target assigners over padded ground truth.

Ground truth arrives padded to `max_boxes` with a `valid` mask; an image with no boxes is simply
all-invalid. Assignments are integer arrays: -1 ignored, 0 negative, i + 1 positive for gt i
(mmdetection's `assigned_gt_inds` convention).
"""

import jax
import jax.numpy as jnp

from jdistill.ops import boxes as box_ops

# IoUs this close to a gt's best IoU tie with it in the low-quality matching step: a few float32
# ulps of an IoU near 1, far below any difference between two anchors' real overlaps.
TIE_TOL = 2.0**-21


def max_iou_assign(
    priors,
    prior_valid,
    gt_boxes,
    gt_valid,
    *,
    pos_iou_thr,
    neg_iou_thr,
    min_pos_iou,
    match_low_quality=True,
):
    """mmdetection 2.x `MaxIoUAssigner` (gt_max_assign_all=True, ignore_iof_thr=-1), one image.

    Steps (`max_iou_assigner.py`): every prior starts ignored; max IoU in [0, neg_iou_thr) is
    negative; max IoU >= pos_iou_thr is positive for the argmax gt; then, for each gt in index
    order (later gts overwrite), every prior whose IoU equals that gt's best IoU becomes positive
    for it, provided that best IoU >= min_pos_iou. Only valid priors take part, as mmdetection
    assigns only the anchors inside `valid_flags`.

    Args:
      priors: [A, 4] anchors.
      prior_valid: [A] bool; invalid priors are assigned -1 and never count as a gt's best.
      gt_boxes: [G, 4] padded ground-truth boxes.
      gt_valid: [G] bool.
      pos_iou_thr, neg_iou_thr, min_pos_iou: thresholds as in mmdetection.
      match_low_quality: apply the low-quality matching step.
    Returns:
      assigned: [A] int32 (-1 ignored, 0 negative, i + 1 positive for gt i).
      max_iou: [A] float32, each prior's best IoU over valid gts (-1 when there is none).
    """
    iou = box_ops.pairwise_iou(priors, gt_boxes)  # [A, G]
    # Padded gts and invalid priors get IoU -1: below every real IoU, so they never win a max.
    iou = jnp.where(gt_valid[None, :] & prior_valid[:, None], iou, -1.0)
    max_iou = iou.max(axis=1)
    argmax = iou.argmax(axis=1)
    assigned = jnp.full(priors.shape[:1], -1, jnp.int32)
    # No valid gt: max_iou = -1 < neg_iou_thr, so every valid prior is negative, as mmdetection.
    assigned = jnp.where(max_iou < neg_iou_thr, 0, assigned)
    assigned = jnp.where(max_iou >= pos_iou_thr, argmax + 1, assigned)
    if match_low_quality:
        gt_max = iou.max(axis=0)  # [G], best prior per gt
        # mmdetection tests `iou == gt_max`. Ties are common (anchors placed symmetrically
        # about a box), and float32 IoUs of real ties differ by an ulp or two depending on how
        # XLA compiles the arithmetic: the program for 2 processes x 2 devices found 8 tied
        # anchors where the one for 1 process x 4 devices found 4. Within TIE_TOL is a tie.
        tied = iou >= gt_max[None, :] * (1 - TIE_TOL)
        lq = tied & (gt_max >= min_pos_iou)[None, :] & gt_valid[None, :]
        lq = lq & prior_valid[:, None]
        num_gt = gt_boxes.shape[0]
        # The last gt that claims a prior wins, as the reference's loop over gts overwrites.
        last = num_gt - 1 - jnp.argmax(lq[:, ::-1], axis=1)
        assigned = jnp.where(lq.any(axis=1), last + 1, assigned)
    assigned = jnp.where(prior_valid, assigned, -1)
    return assigned.astype(jnp.int32), max_iou


def atss_assign(priors, prior_valid, level_sizes, gt_boxes, gt_valid, *, topk=9):
    """mmdetection 2.x `ATSSAssigner` for one image, with static shapes.

    1. IoU and centre distance between every prior and gt.
    2. Per level, the `topk` priors closest to each gt's centre are candidates.
    3. Threshold per gt = mean + std (unbiased, as torch) of its candidates' IoUs.
    4. A candidate is positive if IoU >= threshold and its centre lies inside the gt with a
       margin: min(l, t, r, b) > 0.01.
    5. A prior positive for several gts goes to the one with the highest IoU.
    Invalid priors (outside the padded image) are never candidates and are assigned -1, as
    mmdetection assigns only the priors inside `valid_flags`; a level with fewer than `topk`
    valid priors contributes only those, as the reference's min(topk, num_level_bboxes).

    Args:
      priors: [A, 4] priors of all levels concatenated, level by level.
      prior_valid: [A] bool.
      level_sizes: static list of the number of priors per level (sums to A).
      gt_boxes: [G, 4]; gt_valid: [G] bool.
      topk: candidates per level.
    Returns:
      assigned: [A] int32 (-1 invalid, 0 negative, i + 1 positive for gt i).
      iou: [A] float32 IoU of each prior with its assigned gt (0 when not positive).
    """
    iou = box_ops.pairwise_iou(priors, gt_boxes)  # [A, G]
    pc = box_ops.centers(priors)
    gc = box_ops.centers(gt_boxes)
    dist = jnp.sqrt(jnp.sum(jnp.square(pc[:, None, :] - gc[None, :, :]), axis=-1))
    dist = jnp.where(prior_valid[:, None], dist, jnp.inf)
    cands = []
    start = 0
    for n in level_sizes:
        k = min(topk, n)
        _, idx = jax.lax.top_k(-dist[start : start + n].T, k)  # [G, k] nearest first
        cands.append(idx + start)
        start += n
    cand = jnp.concatenate(cands, axis=1)  # [G, K]
    g_idx = jnp.arange(gt_boxes.shape[0])[:, None]
    cand_iou = iou[cand, g_idx]  # [G, K]
    cand_ok = prior_valid[cand] & gt_valid[:, None]
    n = jnp.maximum(cand_ok.sum(1, keepdims=True), 1)
    mean = jnp.where(cand_ok, cand_iou, 0.0).sum(1, keepdims=True) / n
    var = jnp.where(cand_ok, jnp.square(cand_iou - mean), 0.0).sum(1, keepdims=True)
    std = jnp.sqrt(var / jnp.maximum(n - 1, 1))
    c = pc[cand]  # [G, K, 2]
    g = gt_boxes[:, None, :]
    margin = jnp.minimum(
        jnp.minimum(c[..., 0] - g[..., 0], c[..., 1] - g[..., 1]),
        jnp.minimum(g[..., 2] - c[..., 0], g[..., 3] - c[..., 1]),
    )
    pos = cand_ok & (cand_iou >= mean + std) & (margin > 0.01)
    scores = jnp.full(iou.shape, -jnp.inf)
    scores = scores.at[cand, jnp.broadcast_to(g_idx, cand.shape)].max(
        jnp.where(pos, cand_iou, -jnp.inf)
    )
    best = scores.max(1)
    arg = scores.argmax(1)
    assigned = jnp.where(best > -jnp.inf, arg + 1, 0)
    assigned = jnp.where(prior_valid, assigned, -1).astype(jnp.int32)
    return assigned, jnp.where(assigned > 0, best, 0.0)
