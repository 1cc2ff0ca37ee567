"""The RPN of mmdetection 2.x (`specs/detectors.md` §5.1) with static shapes: the shared head,
the fixed-size proposal step, and the MaxIoU-assign-then-random-sample step the RPN and the RoI
head share.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from jdistill.models import layers
from jdistill.ops import assign as assign_ops
from jdistill.ops import boxes as box_ops
from jdistill.ops import nms as nms_ops
from jdistill.ops import sampling


class RPNHead(nn.Module):
    """`rpn_conv` 3x3 + ReLU, then `rpn_cls` (A objectness logits) and `rpn_reg` (4A deltas)."""

    num_anchors: int = 3
    feat_channels: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: [N, H, W, C] -> (cls [N, H, W, A], deltas [N, H, W, 4A]) float32."""
        conv = lambda f, k, name: layers.Conv(  # noqa: E731
            f, k, kernel_init=layers.normal_001, dtype=self.dtype, name=name
        )
        h = layers.relu(conv(self.feat_channels, 3, "rpn_conv")(x))
        cls = conv(self.num_anchors, 1, "rpn_cls")(h)
        reg = conv(self.num_anchors * 4, 1, "rpn_reg")(h)
        return cls.astype(jnp.float32), reg.astype(jnp.float32)


def rpn_proposals(
    cls_levels, delta_levels, anchor_levels, img_shape, *, nms_pre, max_num, iou_threshold
):
    """mmdetection's RPN `_get_bboxes_single` for one image, fixed size.

    Args:
      cls_levels: per level [A_l] objectness logits; delta_levels: per level [A_l, 4].
      anchor_levels: per level [A_l, 4] anchors.
      img_shape: [2] (height, width) of the resized image (boxes are clipped to it).
      nms_pre: anchors kept per level before NMS; max_num: proposals kept after it.
      iou_threshold: the NMS IoU (0.7), within each level.
    Returns:
      boxes [max_num, 4], scores [max_num] (sigmoid; 0 where invalid), valid [max_num] bool.
    """
    boxes, scores, ids = [], [], []
    for lvl, (cls, deltas, anchors) in enumerate(
        zip(cls_levels, delta_levels, anchor_levels, strict=True)
    ):
        k = min(nms_pre, cls.shape[0])
        top, idx = jax.lax.top_k(cls, k)
        b = box_ops.decode_deltas(anchors[idx], deltas[idx], max_shape=img_shape)
        ok = (b[:, 2] - b[:, 0] > 0) & (b[:, 3] - b[:, 1] > 0)  # min_bbox_size 0, strict
        boxes.append(b)
        scores.append(jnp.where(ok, jax.nn.sigmoid(top), -jnp.inf))
        ids.append(jnp.full((k,), lvl, jnp.int32))
    boxes = jnp.concatenate(boxes)
    scores = jnp.concatenate(scores)
    keep, valid = nms_ops.batched_nms(
        boxes, scores, jnp.concatenate(ids), iou_threshold=iou_threshold, max_output=max_num
    )
    return boxes[keep], jnp.where(valid, scores[keep], 0.0), valid


def assign_and_sample(
    key,
    priors,
    prior_valid,
    gts,
    gt_valid,
    pos_iou,
    neg_iou,
    min_pos_iou,
    low_quality,
    num,
    pos_fraction,
):
    """MaxIoUAssigner then RandomSampler for one image.

    Returns (assigned [P] as `max_iou_assign`, and `random_sample`'s idx, is_pos, valid [num]).
    """
    assigned, _ = assign_ops.max_iou_assign(
        priors,
        prior_valid,
        gts,
        gt_valid,
        pos_iou_thr=pos_iou,
        neg_iou_thr=neg_iou,
        min_pos_iou=min_pos_iou,
        match_low_quality=low_quality,
    )
    idx, is_pos, ok = sampling.random_sample(
        key, assigned > 0, assigned == 0, num=num, pos_fraction=pos_fraction
    )
    return assigned, idx, is_pos, ok
