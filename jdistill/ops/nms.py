"""Fixed-size greedy NMS and mmdetection's dense-head post-processing.

Greedy NMS keeps boxes in descending score order and drops every later box whose IoU with a
kept one is > iou_threshold (strictly, as mmcv's kernel). Keeping at most `max_output` boxes, the
kept set is exactly the first `max_output` picks of full greedy NMS, so the loop runs
`max_output` times over N candidates: O(max_output * N) work, no N x N IoU matrix, static shapes.
"""

import jax
import jax.numpy as jnp

from jdistill.ops import boxes as box_ops


def greedy_nms(boxes, scores, *, iou_threshold, max_output):
    """Greedy NMS of one set of boxes, fixed size.

    Args:
      boxes: [N, 4].
      scores: [N]; candidates with score -inf are padding and never kept.
      iou_threshold: a box is suppressed when its IoU with a kept box is > this.
      max_output: K, the number of boxes returned.
    Returns:
      indices: [K] int32 into the N candidates, in descending score order.
      valid: [K] bool, False for slots past the last kept box.
    """
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)

    def body(i, carry):
        live, idx, valid = carry
        best = jnp.argmax(live)
        ok = live[best] > -jnp.inf
        iou = box_ops.pairwise_iou(boxes[best][None], boxes)[0]
        suppress = (iou > iou_threshold) | (jnp.arange(live.shape[0]) == best)
        live = jnp.where(ok & suppress, -jnp.inf, live)
        idx = idx.at[i].set(jnp.where(ok, best, 0))
        valid = valid.at[i].set(ok)
        return live, idx, valid

    init = (
        scores,
        jnp.zeros((max_output,), jnp.int32),
        jnp.zeros((max_output,), bool),
    )
    _, idx, valid = jax.lax.fori_loop(0, max_output, body, init)
    return idx, valid


def batched_nms(boxes, scores, idxs, *, iou_threshold, max_output):
    """mmcv `batched_nms`: NMS that never suppresses across groups (classes or levels).

    Boxes of group g are offset by g * (max_coordinate + 1) so groups cannot overlap.

    Args:
      boxes: [N, 4]; scores: [N] (-inf for padding); idxs: [N] int group ids.
      iou_threshold, max_output: as in `greedy_nms`.
    Returns:
      indices: [K] int32; valid: [K] bool.
    """
    finite = scores > -jnp.inf
    max_coord = jnp.max(jnp.where(finite[:, None], boxes, 0.0))
    offset = idxs.astype(boxes.dtype) * (max_coord + 1.0)
    return greedy_nms(
        boxes + offset[:, None], scores, iou_threshold=iou_threshold, max_output=max_output
    )


def dense_topk_per_level(scores, *, score_thr, nms_pre):
    """mmdetection >= 2.18 `filter_scores_and_topk` for one level of one image.

    Keeps the (prior, class) pairs with score > score_thr, sorted descending, at most nms_pre.

    Args:
      scores: [P, C] sigmoid scores of P priors and C classes.
      score_thr: strict lower bound.
      nms_pre: the number of pairs kept (static).
    Returns:
      top_scores: [k] (-inf where fewer than k pairs pass), prior_idx: [k], labels: [k],
      with k = min(nms_pre, P * C).
    """
    num_classes = scores.shape[1]
    flat = jnp.where(scores > score_thr, scores, -jnp.inf).reshape(-1)
    k = min(nms_pre, flat.shape[0])
    top, idx = jax.lax.top_k(flat, k)
    return top, idx // num_classes, idx % num_classes
