"""FCOS as mmdetection 2.x `FCOSHead` (`specs/detectors.md` §4): anchor-free points, regress
ranges, centerness, focal + IoU + centerness BCE losses.

Points are ((x + 0.5) s, (y + 0.5) s). Every point inside an image's 32-padded size takes part
as a negative (the reference also counts its own batch padding; our larger canvas padding is
excluded, as every loss here excludes canvas padding). `num_pos` and the centerness sum are
`reduce_mean`-ed in the reference, so the global sums are divided by the group-mean
normaliser, as for GFL.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdistill.losses import detection as det_losses
from jdistill.models import dense, layers
from jdistill.ops import anchors as anchor_ops
from jdistill.ops import boxes as box_ops

INF = 1e8


class FCOSHead(nn.Module):
    """GN conv towers; `conv_cls` (K), `conv_reg` (4, exp(scale * x) or relu(scale * x)) and
    `conv_centerness` (1) on the cls tower (or the reg tower with centerness_on_reg)."""

    num_classes: int
    feat_channels: int = 256
    stacked_convs: int = 4
    norm_on_bbox: bool = False
    centerness_on_reg: bool = False
    prior_prob: float = 0.01
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, level):
        """x: [N, H, W, C] -> {cls_logits [.., K], bbox_pred [.., 4], centerness [.., 1]}.

        bbox_pred is exp(scale * reg) in pixels, or relu(scale * reg) in stride units with
        norm_on_bbox (the caller multiplies by the stride at test time, as the reference).
        """
        c, r = layers.conv_towers(
            x,
            num_convs=self.stacked_convs,
            features=self.feat_channels,
            norm="gn",
            dtype=self.dtype,
        )
        cls = layers.Conv(
            self.num_classes,
            3,
            kernel_init=layers.normal_001,
            bias_init=layers.prior_bias(self.prior_prob),
            dtype=self.dtype,
            name="conv_cls",
        )(c)
        reg = layers.Conv(4, 3, kernel_init=layers.normal_001, dtype=self.dtype, name="conv_reg")(r)
        ctr = layers.Conv(
            1, 3, kernel_init=layers.normal_001, dtype=self.dtype, name="conv_centerness"
        )(r if self.centerness_on_reg else c)
        scale = self.param(f"scales_{level}", nn.initializers.ones, (), jnp.float32)
        reg = reg.astype(jnp.float32) * scale
        reg = jax.nn.relu(reg) if self.norm_on_bbox else jnp.exp(reg)
        return {
            "cls_logits": cls.astype(jnp.float32),
            "bbox_pred": reg,
            "centerness": ctr.astype(jnp.float32),
        }


def points(canvas_hw, strides):
    """Per-level points ((x + 0.5) s, (y + 0.5) s), (y, x) row-major: list of [H*W, 2]."""
    out = []
    for s in strides:
        h = anchor_ops.feature_size(canvas_hw[0], s)
        w = anchor_ops.feature_size(canvas_hw[1], s)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        out.append(np.stack([(xs.ravel() + 0.5) * s, (ys.ravel() + 0.5) * s], axis=-1))
    return out


def centerness_target(ltrb):
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)). [..., 4] -> [...]."""
    lr = ltrb[..., jnp.array([0, 2])]
    tb = ltrb[..., jnp.array([1, 3])]
    c = (lr.min(-1) / jnp.maximum(lr.max(-1), 1e-12)) * (
        tb.min(-1) / jnp.maximum(tb.max(-1), 1e-12)
    )
    return jnp.sqrt(jnp.clip(c, 0.0))


def fcos_targets(pts, ranges, strides, gt_boxes, gt_valid, *, center_sampling, radius):
    """FCOS `_get_target_single` with static shapes, one image.

    Args:
      pts: [P, 2] points of all levels; ranges: [P, 2] regress range (lo, hi) per point;
      strides: [P] stride per point.
      gt_boxes: [G, 4]; gt_valid: [G] bool.
      center_sampling, radius: the optional centre-sampling rule.
    Returns:
      assigned: [P] int32 (0 background, i + 1 for gt i); ltrb: [P, 4] targets in pixels.
    """
    x, y = pts[:, 0:1], pts[:, 1:2]
    g = gt_boxes[None]  # [1, G, 4]
    ltrb = jnp.stack([x - g[..., 0], y - g[..., 1], g[..., 2] - x, g[..., 3] - y], -1)
    if center_sampling:
        cx = (g[..., 0] + g[..., 2]) / 2
        cy = (g[..., 1] + g[..., 3]) / 2
        r = strides[:, None] * radius
        x1 = jnp.maximum(cx - r, g[..., 0])
        y1 = jnp.maximum(cy - r, g[..., 1])
        x2 = jnp.minimum(cx + r, g[..., 2])
        y2 = jnp.minimum(cy + r, g[..., 3])
        inside = jnp.minimum(jnp.minimum(x - x1, y - y1), jnp.minimum(x2 - x, y2 - y)) > 0
    else:
        inside = ltrb.min(-1) > 0
    max_reg = ltrb.max(-1)
    in_range = (max_reg >= ranges[:, 0:1]) & (max_reg <= ranges[:, 1:2])
    area = box_ops.area(gt_boxes)[None]
    area = jnp.where(inside & in_range & gt_valid[None], area, INF)
    best = area.argmin(1)
    assigned = jnp.where(area.min(1) < INF, best + 1, 0).astype(jnp.int32)
    return assigned, jnp.take_along_axis(ltrb, best[:, None, None], axis=1)[:, 0]


class FCOS(dense.DenseDetector):
    """The FCOS detector (one point per location)."""

    regress_ranges = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))
    TAPS = dense.DenseDetector.TAPS + ("head/bbox_pred", "head/centerness")

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.num_anchors = 1
        head = FCOSHead(
            num_classes,
            cfg.neck_channels,
            cfg.stacked_convs,
            cfg.norm_on_bbox,
            cfg.centerness_on_reg,
            dtype=layers.compute_dtype(cfg.dtype),
        )
        self.module = dense.DenseModule(
            bbox_head=head,
            add_extra_convs="on_output",
            relu_before_extra_convs=True,
            **dense.backbone_kwargs(cfg),
        )

    def priors(self, canvas_hw):
        """Per-level points as zero-size boxes [x, y, x, y]: list of [H*W, 4]."""
        return [np.concatenate([p, p], -1) for p in points(canvas_hw, self.strides)]

    def loss(self, outputs, batch, **unused):
        """Focal / num_pos, centerness-weighted IoU loss / sum of centerness, centerness BCE."""
        cfg = self.cfg
        pts_l = points(self.canvas_of(outputs), self.strides)
        sizes = [len(p) for p in pts_l]
        pts = jnp.asarray(np.concatenate(pts_l))
        per_point = lambda vals: jnp.asarray(
            np.concatenate(  # noqa: E731
                [
                    np.tile(np.asarray(v, np.float32), (n, 1))
                    for n, v in zip(sizes, vals, strict=True)
                ]
            )
        )
        ranges = per_point(self.regress_ranges)
        strides = per_point([[s] for s in self.strides])[:, 0]
        valid = self.valid_priors(outputs, batch)
        gt_valid = self.gt_valid(batch)
        assigned, ltrb = jax.vmap(
            lambda g, gv: fcos_targets(
                pts,
                ranges,
                strides,
                g,
                gv,
                center_sampling=cfg.center_sampling,
                radius=cfg.center_sample_radius,
            )
        )(batch["boxes"], gt_valid)
        pos, _, labels = self.match(assigned, batch)
        pos = pos & valid
        onehot = jax.nn.one_hot(labels, self.num_classes) * pos[..., None]

        cls = self.flat(outputs, "cls_logits", self.num_classes)
        reg = self.flat(outputs, "bbox_pred", 4)
        ctr_logit = self.flat(outputs, "centerness", 1)[..., 0]
        focal = (
            det_losses.sigmoid_focal_loss(
                cls, onehot, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma
            ).sum(-1)
            * valid
        )
        if cfg.norm_on_bbox:
            ltrb = ltrb / strides[None, :, None]
        ctr_t = jnp.where(pos, centerness_target(jnp.where(pos[..., None], ltrb, 1.0)), 0.0)
        pred_box = box_ops.distance_to_box(pts[None], reg)
        target_box = box_ops.distance_to_box(pts[None], jnp.where(pos[..., None], ltrb, 1.0))
        iou = det_losses.iou_log_loss(pred_box, target_box) * ctr_t
        ctr_loss = det_losses.bce_with_logits(ctr_logit, ctr_t) * pos

        groups = det_losses.grouped_sum(jnp.zeros_like(focal), cfg.loss_group_size).shape[0]
        num_pos = jnp.maximum(pos.sum() / groups, 1.0)  # max(reduce_mean(#pos), 1)
        ctr_mean = jnp.maximum(ctr_t.sum() / groups, 1e-6)
        loss_cls = focal.sum() / (groups * (num_pos + dense.AVG_EPS))
        loss_bbox = iou.sum() / (groups * (ctr_mean + dense.AVG_EPS))
        loss_ctr = ctr_loss.sum() / (groups * (num_pos + dense.AVG_EPS))
        metrics = {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_ctr}
        return loss_cls + loss_bbox + loss_ctr, metrics

    def score_factors(self, outputs, level):
        """sigmoid(centerness) per point, multiplied into the scores after the threshold."""
        c = outputs["centerness"][level]
        return jax.nn.sigmoid(c.reshape(c.shape[0], -1))

    def decode_level(self, level, priors, raw, prior_idx, img_shape):
        """distance2bbox(point, pred) clipped to the image (pred x stride with norm_on_bbox)."""
        d = raw["bbox_pred"].reshape(-1, 4)[prior_idx]
        if self.cfg.norm_on_bbox:
            d = d * self.strides[level]
        return box_ops.distance_to_box(priors[prior_idx, :2], d, max_shape=img_shape)


def defaults(depth=50):
    """mmdetection fcos_r{depth}_caffe_fpn_gn-head: caffe ResNet (BN frozen), FPN with ReLU
    before P7, GN head; focal + IoU + centerness; no tricks (norm_on_bbox etc. off)."""
    return dense.model_defaults(
        "fcos",
        depth,
        style="caffe",
        norm_trainable=False,  # caffe backbones: BN fully frozen (requires_grad=False)
        norm_on_bbox=False,
        centerness_on_reg=False,
        center_sampling=False,
        center_sample_radius=1.5,
        focal_alpha=0.25,
        focal_gamma=2.0,
    )
