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
from jdistill.models import fpn as fpn_lib
from jdistill.models import layers
from jdistill.models import resnet as resnet_lib
from jdistill.ops import anchors as anchor_ops
from jdistill.ops import assign as assign_ops
from jdistill.ops import boxes as box_ops
from jdistill.ops import nms as nms_ops

# torch's float32 eps, added to avg_factor by mmdetection >= 2.21 `weight_reduce_loss`.
AVG_EPS = float(np.finfo(np.float32).eps)


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
    def __call__(self, x):
        """x: [N, H, W, C] -> (cls [N, H, W, A*K], reg [N, H, W, A*4]) float32 logits."""
        conv = lambda f, name, **kw: layers.Conv(  # noqa: E731
            f, 3, kernel_init=layers.normal_001, dtype=self.dtype, name=name, **kw
        )
        c = r = x
        for i in range(self.stacked_convs):
            c = nn.relu(conv(self.feat_channels, f"cls_convs_{i}")(c))
            r = nn.relu(conv(self.feat_channels, f"reg_convs_{i}")(r))
        cls = conv(
            self.num_anchors * self.num_classes,
            "retina_cls",
            bias_init=layers.prior_bias(self.prior_prob),
        )(c)
        reg = conv(self.num_anchors * 4, "retina_reg")(r)
        return cls.astype(jnp.float32), reg.astype(jnp.float32)


class RetinaNetModule(nn.Module):
    """ResNet + FPN (P3..P7, P6 on C5) + RetinaHead."""

    num_classes: int
    depth: int = 50
    style: str = "pytorch"
    frozen_stages: int = 1
    width: float = 1.0
    norm_eval: bool = True
    neck_channels: int = 256
    add_extra_convs: bool | str = "on_input"
    stacked_convs: int = 4
    num_anchors: int = 9
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train=False):
        """images: [N, H, W, 3] normalised -> (outputs, taps).

        `train` puts BN in training mode when norm_eval is False (see `resnet.ResNet`).

        outputs: {'cls_logits': list of [N, H_l, W_l, A*K], 'box_deltas': list of
        [N, H_l, W_l, A*4]} for P3..P7. taps: `backbone/c{2..5}`, `neck/p{3..7}`,
        `head/cls_logits/p{l}`, `head/box_deltas/p{l}`.
        """
        feats = resnet_lib.ResNet(
            self.depth,
            self.style,
            self.frozen_stages,
            self.width,
            self.norm_eval,
            self.dtype,
            name="backbone",
        )(images, train)
        pyramid = fpn_lib.FPN(
            self.neck_channels,
            start_level=1,
            num_outs=5,
            add_extra_convs=self.add_extra_convs,
            dtype=self.dtype,
            name="neck",
        )(feats)
        head = RetinaHead(
            self.num_classes,
            self.num_anchors,
            self.neck_channels,
            self.stacked_convs,
            dtype=self.dtype,
            name="bbox_head",
        )
        taps = {f"backbone/{k}": v for k, v in feats.items()}
        outputs = {"cls_logits": [], "box_deltas": []}
        for name, p in pyramid.items():
            cls, reg = head(p)
            taps[f"neck/{name}"] = p
            taps[f"head/cls_logits/{name}"] = cls
            taps[f"head/box_deltas/{name}"] = reg
            outputs["cls_logits"].append(cls)
            outputs["box_deltas"].append(reg)
        return outputs, taps


def level_hw(outputs):
    """Static (H, W) of every level of a head output."""
    return [tuple(x.shape[1:3]) for x in outputs["cls_logits"]]


class RetinaNet:
    """The RetinaNet detector: module plus its targets, losses and test-time decode.

    Args:
      cfg: the `model` config block (see `configs/retinanet_r50_coco.py`).
      num_classes: K, foreground classes.
    """

    levels = ("p3", "p4", "p5", "p6", "p7")
    strides = (8, 16, 32, 64, 128)

    def __init__(self, cfg, num_classes):
        self.cfg = cfg
        self.num_classes = num_classes
        self.ratios = tuple(cfg.anchor_ratios)
        self.scales_per_octave = cfg.scales_per_octave
        self.num_anchors = len(self.ratios) * self.scales_per_octave
        self.module = RetinaNetModule(
            num_classes=num_classes,
            depth=cfg.depth,
            style=cfg.style,
            frozen_stages=cfg.frozen_stages,
            width=cfg.width,
            norm_eval=cfg.norm_eval,
            neck_channels=cfg.neck_channels,
            add_extra_convs="on_input",
            stacked_convs=cfg.stacked_convs,
            num_anchors=self.num_anchors,
            dtype=jnp.dtype(cfg.dtype),
        )

    # ---------------------------------------------------------------- priors
    def anchors(self, canvas_hw):
        """Per-level anchors for a canvas: list of [H_l * W_l * A, 4] numpy constants."""
        return anchor_ops.multilevel_anchors(
            canvas_hw, self.strides, self.cfg.octave_base_scale, self.scales_per_octave, self.ratios
        )

    def _flatten(self, outputs, batch_size):
        cls = jnp.concatenate(
            [x.reshape(batch_size, -1, self.num_classes) for x in outputs["cls_logits"]], axis=1
        )
        reg = jnp.concatenate([x.reshape(batch_size, -1, 4) for x in outputs["box_deltas"]], 1)
        return cls, reg

    # ---------------------------------------------------------------- training
    def loss(self, outputs, batch):
        """Detection losses of a batch.

        Args:
          outputs: from the module.
          batch: `boxes` [B, G, 4] canvas pixels, `labels` [B, G] int32, `box_valid` [B, G],
            `pad_shape` [B, 2] int32, `image_valid` [B] (padding examples contribute nothing).
        Returns:
          (total loss, {'loss_cls', 'loss_bbox'}) float32 scalars.
        """
        cfg = self.cfg
        b = batch["boxes"].shape[0]
        canvas = (
            outputs["cls_logits"][0].shape[1] * self.strides[0],
            outputs["cls_logits"][0].shape[2] * self.strides[0],
        )
        anchors = jnp.asarray(np.concatenate(self.anchors(canvas)))
        valid = jnp.concatenate(
            [
                anchor_ops.valid_flags(batch["pad_shape"], hw, s, self.num_anchors)
                for hw, s in zip(level_hw(outputs), self.strides, strict=True)
            ],
            axis=1,
        )
        valid = valid & batch["image_valid"][:, None]
        gt_valid = batch["box_valid"] & batch["image_valid"][:, None]
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
        pos = assigned > 0
        gt_idx = jnp.maximum(assigned - 1, 0)
        matched_boxes = jnp.take_along_axis(batch["boxes"], gt_idx[..., None], axis=1)
        matched_labels = jnp.take_along_axis(batch["labels"], gt_idx, axis=1)
        onehot = jax.nn.one_hot(matched_labels, self.num_classes) * pos[..., None]
        label_w = (assigned >= 0).astype(jnp.float32)

        cls_logits, deltas = self._flatten(outputs, b)
        focal = det_losses.sigmoid_focal_loss(
            cls_logits, onehot, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma
        ).sum(-1)
        targets = box_ops.encode_deltas(anchors[None], matched_boxes)
        targets = jnp.where(pos[..., None], targets, 0.0)
        l1 = det_losses.l1_loss(deltas, targets).sum(-1) * pos

        g = cfg.loss_group_size
        num_pos = jnp.maximum(pos.sum(1), 1) * batch["image_valid"]
        avg = det_losses.grouped_sum(num_pos.astype(jnp.float32), g) + AVG_EPS
        loss_cls = jnp.mean(det_losses.grouped_sum(focal * label_w, g) / avg)
        loss_bbox = jnp.mean(det_losses.grouped_sum(l1, g) / avg)
        loss_cls = loss_cls * cfg.cls_loss_weight
        loss_bbox = loss_bbox * cfg.bbox_loss_weight
        return loss_cls + loss_bbox, {"loss_cls": loss_cls, "loss_bbox": loss_bbox}

    # ---------------------------------------------------------------- inference
    def predict(self, outputs, batch):
        """mmdetection >= 2.18 dense-head post-processing (`specs/detectors.md` §6).

        Per level: the top `nms_pre` (anchor, class) pairs with score > score_thr; decode with
        clipping to the resized image; class-wise NMS; `max_per_img` kept; boxes divided by
        the scale factor back to original-image pixels.

        Args:
          outputs: from the module.
          batch: `img_shape` [B, 2] int32 and `scale_factor` [B, 2] float32 (x, y).
        Returns:
          dict boxes [B, D, 4], scores [B, D], labels [B, D] int32, valid [B, D] bool with
          D = max_per_img, boxes in original-image pixels.
        """
        cfg = self.cfg
        canvas = (
            outputs["cls_logits"][0].shape[1] * self.strides[0],
            outputs["cls_logits"][0].shape[2] * self.strides[0],
        )
        anchors = [jnp.asarray(a) for a in self.anchors(canvas)]

        def one_image(i_cls, i_reg, img_shape, scale):
            boxes, scores, labels = [], [], []
            for lvl_anchors, c, r in zip(anchors, i_cls, i_reg, strict=True):
                s = jax.nn.sigmoid(c.reshape(-1, self.num_classes))
                top, prior, lab = nms_ops.dense_topk_per_level(
                    s, score_thr=cfg.test_score_thr, nms_pre=cfg.test_nms_pre
                )
                d = r.reshape(-1, 4)[prior]
                boxes.append(box_ops.decode_deltas(lvl_anchors[prior], d, max_shape=img_shape))
                scores.append(top)
                labels.append(lab)
            boxes = jnp.concatenate(boxes)
            scores = jnp.concatenate(scores)
            labels = jnp.concatenate(labels)
            keep, ok = nms_ops.batched_nms(
                boxes,
                scores,
                labels,
                iou_threshold=cfg.test_nms_iou,
                max_output=cfg.test_max_per_img,
            )
            out_boxes = boxes[keep] / jnp.concatenate([scale, scale])[None]
            return out_boxes, jnp.where(ok, scores[keep], 0.0), labels[keep], ok

        boxes, scores, labels, ok = jax.vmap(one_image)(
            outputs["cls_logits"], outputs["box_deltas"], batch["img_shape"], batch["scale_factor"]
        )
        return {"boxes": boxes, "scores": scores, "labels": labels.astype(jnp.int32), "valid": ok}
