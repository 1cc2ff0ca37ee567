"""RetinaNet as mmdetection 2.x (`specs/detectors.md` §2): head, targets, losses, decode.

Losses are normalised per group of `loss_group_size` images (mmdetection's 2 images per GPU,
each GPU normalising by its own sum_img max(num_pos, 1)) and averaged over groups, so a run on
any number of devices optimises the reference's objective.
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


class RetinaHead(nn.Module):
    """Two towers of `stacked_convs` 3x3 convs (bias, ReLU), then `retina_cls`/`retina_reg`.

    Shared across levels: calling it on each level reuses the same params.
    """

    num_classes: int
    num_anchors: int = 9
    feat_channels: int = 256
    stacked_convs: int = 4
    prior_prob: float = 0.01
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, level, tower=None):
        """x: [N, H, W, C] -> {cls_logits [N, H, W, A*K], box_deltas [N, H, W, A*4]} float32,
        plus `tower/cls` and `tower/reg` [N, H, W, feat_channels] in the compute dtype: the
        towers after conv `dense.tower_depth(stacked_convs)` (its output with bias, before the
        ReLU), which CrossKD reads.

        tower: instead of x (pass None), a (cls, reg) pair of features at that point, from
        which the rest of the head runs (CrossKD's teacher head on student features): ReLU
        (not at depth 0, the neck), the remaining tower convs, retina_cls / retina_reg. The
        result then has no `tower/*`.
        """
        del level
        conv = lambda f, name, **kw: layers.Conv(  # noqa: E731
            f, 3, kernel_init=layers.normal_001, dtype=self.dtype, name=name, **kw
        )
        depth = dense.tower_depth(self.stacked_convs)
        towers = dict(num_convs=self.stacked_convs, features=self.feat_channels, norm=None)
        if tower is None:
            c, r, held = layers.conv_towers(x, **towers, dtype=self.dtype, hold=depth)
        else:
            held = None
            c, r = (layers.relu(t) if depth else t for t in tower)
            c, r = layers.conv_towers((c, r), **towers, dtype=self.dtype, start=depth)
        cls = conv(
            self.num_anchors * self.num_classes,
            "retina_cls",
            bias_init=layers.prior_bias(self.prior_prob),
        )(c)
        reg = conv(self.num_anchors * 4, "retina_reg")(r)
        out = {"cls_logits": cls.astype(jnp.float32), "box_deltas": reg.astype(jnp.float32)}
        if held is not None:
            out["tower/cls"], out["tower/reg"] = held
        return out


class RetinaNet(dense.DenseDetector):
    """The RetinaNet detector: module plus its targets, losses and test-time decode.

    Args:
      cfg: the `model` config block (`defaults` below).
      num_classes: K, foreground classes.
    """

    TAPS = dense.DenseDetector.TAPS + ("head/box_deltas", "tower")
    # `assign/pos`, `assign/neg`, `assign/label_weight`, `assign/valid`: the anchor assignment.
    LOSS_TAPS = ("assign",)
    VIEWS = (dense.CROSS_VIEW,)

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.ratios = tuple(cfg.anchor_ratios)
        self.num_anchors = len(self.ratios) * cfg.scales_per_octave
        head = RetinaHead(
            num_classes,
            self.num_anchors,
            cfg.neck_channels,
            cfg.stacked_convs,
            dtype=layers.compute_dtype(cfg.dtype),
        )
        self.module = dense.DenseModule(
            bbox_head=head, add_extra_convs="on_input", **dense.backbone_kwargs(cfg)
        )

    def priors(self, canvas_hw):
        """Per-level anchors for a canvas: list of [H_l * W_l * A, 4] numpy constants."""
        return anchor_ops.multilevel_anchors(
            canvas_hw,
            self.strides,
            self.cfg.octave_base_scale,
            self.cfg.scales_per_octave,
            self.ratios,
        )

    def loss(self, outputs, batch, *, taps=None, **unused):
        """Detection losses of a batch.

        Args:
          outputs: from the module.
          batch: `boxes` [B, G, 4] canvas pixels, `labels` [B, G] int32, `box_valid` [B, G],
            `pad_shape` [B, 2] int32, `image_valid` [B] (padding examples contribute nothing).
          taps: if given, the assignment is added, each [B, A]: `assign/pos` / `assign/neg`
            bool (DeFeat's decoupled dense KD), `assign/label_weight` float32 (1 on positive
            and negative anchors, 0 on ignored and invalid ones) and `assign/valid` bool
            (anchors inside each real image's padded size), for CrossKD.
        Returns:
          (total loss, {'loss_cls', 'loss_bbox'}) float32 scalars.
        """
        cfg = self.cfg
        anchors = jnp.asarray(np.concatenate(self.priors(self.canvas_of(outputs))))
        valid = self.valid_priors(outputs, batch)
        gt_valid = self.gt_valid(batch)
        assign = jax.vmap(
            lambda v, g, gv: assign_ops.max_iou_assign(
                anchors,
                v,
                g,
                gv,
                pos_iou_thr=cfg.pos_iou_thr,
                neg_iou_thr=cfg.neg_iou_thr,
                min_pos_iou=cfg.min_pos_iou,
            )[0]
        )
        assigned = assign(valid, batch["boxes"], gt_valid)  # [B, A]
        pos, matched_boxes, matched_labels = self.match(assigned, batch)
        onehot = jax.nn.one_hot(matched_labels, self.num_classes) * pos[..., None]
        label_w = (assigned >= 0).astype(jnp.float32)
        if taps is not None:
            taps.update(
                {
                    "assign/pos": pos,
                    "assign/neg": assigned == 0,
                    "assign/label_weight": label_w,
                    "assign/valid": valid,
                }
            )

        cls_logits = self.flat(outputs, "cls_logits", self.num_classes)
        deltas = self.flat(outputs, "box_deltas", 4)
        focal = det_losses.sigmoid_focal_loss(
            cls_logits, onehot, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma
        ).sum(-1)
        targets = box_ops.encode_deltas(anchors[None], matched_boxes)
        targets = jnp.where(pos[..., None], targets, 0.0)
        l1 = det_losses.l1_loss(deltas, targets).sum(-1) * pos

        g = cfg.loss_group_size
        num_pos = jnp.maximum(pos.sum(1), 1) * batch["image_valid"]
        avg = det_losses.grouped_sum(num_pos.astype(jnp.float32), g) + dense.AVG_EPS
        loss_cls = jnp.mean(det_losses.grouped_sum(focal * label_w, g) / avg)
        loss_bbox = jnp.mean(det_losses.grouped_sum(l1, g) / avg)
        loss_cls = loss_cls * cfg.cls_loss_weight
        loss_bbox = loss_bbox * cfg.bbox_loss_weight
        return loss_cls + loss_bbox, {"loss_cls": loss_cls, "loss_bbox": loss_bbox}

    def decode_level(self, level, priors, raw, prior_idx, img_shape):
        """Boxes of the kept priors of one level: DeltaXYWH decode, clipped to the image."""
        d = raw["box_deltas"].reshape(-1, 4)[prior_idx]
        return box_ops.decode_deltas(priors[prior_idx], d, max_shape=img_shape)


def defaults(depth=50):
    """mmdetection retinanet_r{depth}_fpn: ResNet + FPN (P6 on C5) + RetinaHead, COCO settings."""
    return dense.model_defaults(
        "retinanet",
        depth,
        octave_base_scale=4,
        scales_per_octave=3,
        anchor_ratios=(0.5, 1.0, 2.0),
        pos_iou_thr=0.5,
        neg_iou_thr=0.4,
        min_pos_iou=0.0,
        focal_alpha=0.25,
        focal_gamma=2.0,
        cls_loss_weight=1.0,
        bbox_loss_weight=1.0,
    )
