"""Static-shape target assigners over padded ground truth.

Ground truth arrives padded to `max_boxes` with a `valid` mask; an image with no boxes is simply
all-invalid. Assignments are integer arrays: -1 ignored, 0 negative, i + 1 positive for gt i
(mmdetection's `assigned_gt_inds` convention).
"""

import jax.numpy as jnp

from jdistill.ops import boxes as box_ops


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
        lq = (iou == gt_max[None, :]) & (gt_max >= min_pos_iou)[None, :] & gt_valid[None, :]
        lq = lq & prior_valid[:, None]
        num_gt = gt_boxes.shape[0]
        # The last gt that claims a prior wins, as the reference's loop over gts overwrites.
        last = num_gt - 1 - jnp.argmax(lq[:, ::-1], axis=1)
        assigned = jnp.where(lq.any(axis=1), last + 1, assigned)
    assigned = jnp.where(prior_valid, assigned, -1)
    return assigned.astype(jnp.int32), max_iou
