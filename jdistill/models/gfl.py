"""GFL (Generalized Focal Loss) as mmdetection 2.x `GFLHead` (`specs/detectors.md` §3).

Joint class-quality scores trained with quality focal loss, box sides as distributions over
0..reg_max (distribution focal loss plus GIoU on the integral), ATSS assignment.

Normalisers: the QFL average factor and the box-weight sum are `reduce_mean`-ed over GPUs in
the reference; averaging each group's loss over groups of `loss_group_size` images then equals
the global sum divided by the group-mean normaliser, which is what is computed here.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdistill.losses import detection as det_losses
from jdistill.models import dense, layers
from jdistill.ops import anchors as anchor_ops
from jdistill.ops import assign as assign_ops
from jdistill.ops import boxes as box_ops


class GFLHead(nn.Module):
    """GN conv towers, `gfl_cls` (K joint scores) and `gfl_reg` (4 x (reg_max + 1)) with a
    learnable `Scale` per level on the regression logits."""

    num_classes: int
    feat_channels: int = 256
    stacked_convs: int = 4
    reg_max: int = 16
    prior_prob: float = 0.01
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, level, tower=None):
        """x: [N, H, W, C] -> {cls_logits [N, H, W, K], bbox_dist [N, H, W, 4*(reg_max+1)]}
        (float32), plus `tower/cls` and `tower/reg` [N, H, W, feat_channels] in the compute
        dtype: the towers after conv `dense.tower_depth(stacked_convs)` (conv + GN, before
        the ReLU), which CrossKD reads.

        tower: instead of x (pass None), a (cls, reg) pair of features at that point, from
        which the rest of the head runs (CrossKD's teacher head on student features): ReLU
        (not at depth 0, the neck), the remaining tower convs, gfl_cls / gfl_reg, Scale. The
        result then has no `tower/*`.
        """
        depth = dense.tower_depth(self.stacked_convs)
        towers = dict(num_convs=self.stacked_convs, features=self.feat_channels, norm="gn")
        if tower is None:
            c, r, held = layers.conv_towers(x, **towers, dtype=self.dtype, hold=depth)
        else:
            held = None
            c, r = (layers.relu(t) if depth else t for t in tower)
            c, r = layers.conv_towers((c, r), **towers, dtype=self.dtype, start=depth)
        cls = layers.Conv(
            self.num_classes,
            3,
            kernel_init=layers.normal_001,
            bias_init=layers.prior_bias(self.prior_prob),
            dtype=self.dtype,
            name="gfl_cls",
        )(c)
        reg = layers.Conv(
            4 * (self.reg_max + 1),
            3,
            kernel_init=layers.normal_001,
            dtype=self.dtype,
            name="gfl_reg",
        )(r)
        scale = self.param(f"scales_{level}", nn.initializers.ones, (), jnp.float32)
        out = {"cls_logits": cls.astype(jnp.float32), "bbox_dist": reg.astype(jnp.float32) * scale}
        if held is not None:
            out["tower/cls"], out["tower/reg"] = held
        return out


def integral(dist_logits, reg_max):
    """Expected distance under softmax over 0..reg_max. [..., 4*(R+1)] -> [..., 4]."""
    p = jax.nn.softmax(dist_logits.reshape(*dist_logits.shape[:-1], 4, reg_max + 1), axis=-1)
    return p @ jnp.arange(reg_max + 1, dtype=jnp.float32)


class GFL(dense.DenseDetector):
    """The GFL detector: one 8s x 8s anchor per location (ATSS and point centres)."""

    TAPS = dense.DenseDetector.TAPS + ("head/bbox_dist", "tower")
    # `assign/pos`, `assign/neg`, `assign/label_weight`, `assign/valid`: the ATSS assignment.
    LOSS_TAPS = ("assign",)
    VIEWS = (dense.CROSS_VIEW,)

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.num_anchors = 1
        self.reg_max = cfg.reg_max
        head = GFLHead(
            num_classes,
            cfg.neck_channels,
            cfg.stacked_convs,
            cfg.reg_max,
            dtype=layers.compute_dtype(cfg.dtype),
        )
        self.module = dense.DenseModule(
            bbox_head=head, add_extra_convs="on_output", **dense.backbone_kwargs(cfg)
        )

    def priors(self, canvas_hw):
        """Per-level anchors (one square of octave_base_scale * stride per location)."""
        return anchor_ops.multilevel_anchors(
            canvas_hw, self.strides, self.cfg.octave_base_scale, 1, (1.0,)
        )

    def loss(self, outputs, batch, *, taps=None, **unused):
        """QFL + GIoU + DFL with the reference's normalisers (`gfl_head.py` loss).

        Args:
          outputs: from the module; batch: as `RetinaNet.loss`.
          taps: if given, the ATSS assignment is added for the distillers (LD, CrossKD), each
            [B, A] over the priors of all levels: `assign/pos` / `assign/neg` bool,
            `assign/label_weight` float32 (mmdetection's label weights: 1 on every prior that
            is positive or negative) and `assign/valid` bool (priors inside each real image's
            padded size).
        Returns:
          (total, {'loss_cls', 'loss_bbox', 'loss_dfl'}).
        """
        cfg = self.cfg
        priors = self.priors(self.canvas_of(outputs))
        sizes = [len(p) for p in priors]
        anchors = jnp.asarray(np.concatenate(priors))
        strides = jnp.asarray(
            np.concatenate(
                [np.full(n, s, np.float32) for n, s in zip(sizes, self.strides, strict=True)]
            )
        )
        valid = self.valid_priors(outputs, batch)
        gt_valid = self.gt_valid(batch)
        assigned, _ = jax.vmap(
            lambda v, g, gv: assign_ops.atss_assign(anchors, v, sizes, g, gv, topk=cfg.atss_topk)
        )(valid, batch["boxes"], gt_valid)
        pos, matched, labels = self.match(assigned, batch)
        labels = jnp.where(pos, labels, -1)
        if taps is not None:
            taps.update(
                {
                    "assign/pos": pos,
                    "assign/neg": assigned == 0,
                    "assign/label_weight": (assigned >= 0).astype(jnp.float32),
                    "assign/valid": valid,
                }
            )

        cls = self.flat(outputs, "cls_logits", self.num_classes)  # [B, A, K]
        dist_logits = self.flat(outputs, "bbox_dist", 4 * (self.reg_max + 1))
        centers = box_ops.centers(anchors) / strides[:, None]  # stride units
        pred_box = box_ops.distance_to_box(centers, integral(dist_logits, self.reg_max))
        target_box = matched / strides[None, :, None]
        quality = box_ops.aligned_iou(jax.lax.stop_gradient(pred_box), target_box)
        quality = jnp.where(pos, quality, 0.0)
        weight = jax.lax.stop_gradient(jax.nn.sigmoid(cls).max(-1)) * pos

        qfl = det_losses.quality_focal_loss(cls, labels, quality, beta=cfg.qfl_beta)
        qfl = qfl * valid
        giou = det_losses.giou_loss(pred_box, target_box) * weight
        t = box_ops.box_to_distance(centers, target_box, max_dis=self.reg_max)
        dfl_logits = dist_logits.reshape(*dist_logits.shape[:2], 4, self.reg_max + 1)
        dfl = det_losses.distribution_focal_loss(dfl_logits, t).sum(-1) * weight

        groups = det_losses.grouped_sum(jnp.zeros_like(qfl), cfg.loss_group_size).shape[0]
        num_pos = (jnp.maximum(pos.sum(1), 1) * batch["image_valid"]).sum()
        # reduce_mean over groups of sum_img max(npos, 1), clamped to 1 (gfl_head.py)
        avg = jnp.maximum(num_pos / groups, 1.0)
        w_mean = jnp.maximum(weight.sum() / groups, 1.0)
        loss_cls = cfg.qfl_weight * qfl.sum() / (groups * (avg + dense.AVG_EPS))
        loss_bbox = cfg.giou_weight * giou.sum() / (groups * w_mean)
        loss_dfl = cfg.dfl_weight * dfl.sum() / 4.0 / (groups * w_mean)
        metrics = {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_dfl": loss_dfl}
        return loss_cls + loss_bbox + loss_dfl, metrics

    def decode_level(self, level, priors, raw, prior_idx, img_shape):
        """Integral distances times the stride from the anchor centre, clipped to the image."""
        d = raw["bbox_dist"].reshape(-1, 4 * (self.reg_max + 1))[prior_idx]
        dist = integral(d, self.reg_max) * self.strides[level]
        return box_ops.distance_to_box(
            box_ops.centers(priors[prior_idx]), dist, max_shape=img_shape
        )


def defaults(depth=50):
    """mmdetection gfl_r{depth}_fpn: ResNet + FPN (P6 on P5) + GFLHead (GN), ATSS, QFL/DFL/GIoU."""
    return dense.model_defaults(
        "gfl",
        depth,
        octave_base_scale=8,
        reg_max=16,
        atss_topk=9,
        qfl_beta=2.0,
        qfl_weight=1.0,
        dfl_weight=0.25,
        giou_weight=2.0,
        test_nms_iou=0.6,
    )
