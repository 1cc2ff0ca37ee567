"""Faster R-CNN with FPN as mmdetection 2.x (`specs/detectors.md` §5), every shape static.

- RPN over P2..P6 (3 anchors per location); MaxIoU 0.7 / 0.3 / 0.3 with low-quality matches;
  256 anchors sampled per image at 50 % positives; BCE + L1 over the sampled anchors.
- Proposals per image: the top `nms_pre` anchors of each level by objectness, decoded and
  clipped, boxes with w <= 0 or h <= 0 dropped, NMS 0.7 within each level, `max_num` kept by
  score: always `max_num` slots with a valid mask.
- RoI head: ground truth prepended to the proposals, MaxIoU 0.5, 512 RoIs sampled at 25 %
  positives, multi-level RoIAlign 7x7 (`ops/roi_align.py`), Shared2FC (1024), softmax CE and
  L1 on class-specific deltas (stds 0.1, 0.1, 0.2, 0.2), both over the sampled RoIs.
- Test: 1000 proposals, softmax scores, per-class boxes, class-wise NMS 0.5 over pairs with
  score > 0.05, 100 kept.

The RPN head, the proposal step and the assign-then-sample step live in `models/rpn.py`.
Mixed precision (`model.dtype='bfloat16'`): backbone, FPN, RPN convs and the RoI head's fcs
compute in bfloat16; the RPN and RoI head outputs are float32, and RoIAlign interpolates the
neck in float32, so proposals, sampling, box coding and losses see float32 only (`dense.py`).
Losses are normalised per group of `loss_group_size` images (mmdetection's per-GPU
normalisers), as the dense detectors do. The module's `__call__` runs backbone, FPN and RPN
(taps `head/cls_logits/p{l}` are the RPN objectness logits, which FRS reads); the RoI head is
the module method `roi_forward`, which `loss` and `predict` call with sampled RoIs or proposals.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jdistill.losses import detection as det_losses
from jdistill.models import dense, layers, rpn
from jdistill.models import fpn as fpn_lib
from jdistill.models import resnet as resnet_lib
from jdistill.ops import anchors as anchor_ops
from jdistill.ops import boxes as box_ops
from jdistill.ops import nms as nms_ops
from jdistill.ops import roi_align as roi_ops

ROI_STDS = (0.1, 0.1, 0.2, 0.2)


class Shared2FCHead(nn.Module):
    """`shared_fcs_{0,1}` (ReLU) then `fc_cls` (K + 1, background last) and `fc_reg` (4K).

    Inits as mmdetection: xavier-uniform shared fcs, normal 0.01 cls, normal 0.001 reg.
    """

    num_classes: int
    fc_channels: int = 1024
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: [..., 7, 7, C] RoI features -> (cls [..., K + 1], deltas [..., 4K]) float32.

        The flatten is (H, W, C); the converter reorders mmdetection's (C, H, W) weights.
        """
        x = x.reshape(*x.shape[:-3], -1)
        dense_layer = lambda f, init, name: nn.Dense(  # noqa: E731
            f, kernel_init=init, dtype=self.dtype, param_dtype=jnp.float32, name=name
        )
        for i in range(2):
            fc = dense_layer(self.fc_channels, layers.xavier_uniform, f"shared_fcs_{i}")
            x = layers.relu(fc(x))
        cls = dense_layer(self.num_classes + 1, layers.normal_001, "fc_cls")(x)
        reg = dense_layer(4 * self.num_classes, nn.initializers.normal(0.001), "fc_reg")(x)
        return cls.astype(jnp.float32), reg.astype(jnp.float32)


class FasterRCNNModule(nn.Module):
    """ResNet + FPN (P2..P6, P6 by max-pool) + RPN head + Shared2FC RoI head."""

    num_classes: int
    depth: int = 50
    style: str = "pytorch"
    frozen_stages: int = 1
    width: float = 1.0
    norm_eval: bool = True
    neck_channels: int = 256
    fc_channels: int = 1024
    num_anchors: int = 3
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    roi_aligned: bool = True
    dtype: jnp.dtype = jnp.float32
    fold_bn: bool = False
    # The backbone's variables were folded ahead of time (models/prefold.py: a teacher's).
    prefolded: bool = False

    def setup(self):
        self.backbone = resnet_lib.ResNet.of(self)
        self.neck = fpn_lib.FPN(
            self.neck_channels, start_level=0, num_outs=5, add_extra_convs=False, dtype=self.dtype
        )
        self.rpn_head = rpn.RPNHead(self.num_anchors, self.neck_channels, self.dtype)
        self.bbox_head = Shared2FCHead(self.num_classes, self.fc_channels, self.dtype)

    def __call__(self, images, train=False):
        """images: [N, H, W, 3] normalised -> (outputs, taps).

        outputs: `cls_logits` / `box_deltas`: per-level RPN maps [N, H_l, W_l, A] / [.., 4A]
        float32; `neck`: the P2..P6 features (compute dtype). taps: `backbone/c{2..5}`,
        `neck/p{2..6}` (compute dtype), `head/cls_logits/p{l}` (RPN objectness),
        `head/box_deltas/p{l}` (float32).
        """
        feats = self.backbone(images, train)
        pyramid = self.neck(feats)
        taps = {f"backbone/{k}": v for k, v in feats.items()}
        outputs = {"cls_logits": [], "box_deltas": [], "neck": []}
        for name, p in pyramid.items():
            cls, reg = self.rpn_head(p)
            taps[f"neck/{name}"] = p
            taps[f"head/cls_logits/{name}"] = cls
            taps[f"head/box_deltas/{name}"] = reg
            outputs["cls_logits"].append(cls)
            outputs["box_deltas"].append(reg)
            outputs["neck"].append(p)
        if self.is_initializing():  # create the RoI head's params
            self.roi_forward(outputs["neck"], jnp.zeros((images.shape[0], 1, 4), jnp.float32))
        return outputs, taps

    def roi_forward(self, neck, rois):
        """RoI head on given RoIs.

        Args:
          neck: the P2..P6 features (P2..P5 are pooled), each [N, H_l, W_l, C].
          rois: [N, R, 4] canvas pixels (constants: no gradient flows to them).
        Returns:
          cls [N, R, K + 1] and deltas [N, R, 4K] float32.
        """
        strides = FasterRCNN.strides[:4]
        # Bilinear weights and the bin means in float32 (bfloat16 would round every weight to
        # 8 bits); the pooled features go back to the compute dtype for the fcs.
        neck = [f.astype(jnp.float32) for f in neck[:4]]
        pooled = jax.vmap(
            lambda f, r: roi_ops.roi_align(
                list(f),
                strides,
                r,
                output_size=self.roi_output_size,
                sampling_ratio=self.roi_sampling_ratio,
                aligned=self.roi_aligned,
            )
        )(tuple(neck), rois)
        return self.bbox_head(pooled.astype(self.dtype))


class FasterRCNN:
    """The Faster R-CNN detector: module plus targets, sampling, losses and test-time decode.

    Args:
      cfg: the `model` config block (see `config_lib.faster_rcnn`).
      num_classes: K, foreground classes (background is index K).
    """

    levels = ("p2", "p3", "p4", "p5", "p6")
    strides = (4, 8, 16, 32, 64)
    # Tap groups for distillers (`distill/api.py`). `head/*` are the RPN's; the loss adds the
    # sampled RoIs and the RoI head's outputs on them (`roi/*`).
    TAPS = ("backbone", "neck", "head/cls_logits", "head/box_deltas")
    LOSS_TAPS = ("roi",)
    VIEWS = ("teacher_roi_head_on_student_rois",)

    def __init__(self, cfg, num_classes):
        self.cfg = cfg
        self.num_classes = num_classes
        self.ratios = tuple(cfg.anchor_ratios)
        self.num_anchors = len(self.ratios)
        self.module = FasterRCNNModule(
            num_classes,
            fc_channels=cfg.fc_channels,
            num_anchors=self.num_anchors,
            roi_output_size=cfg.roi_output_size,
            roi_sampling_ratio=cfg.roi_sampling_ratio,
            roi_aligned=cfg.roi_aligned,
            **dense.backbone_kwargs(cfg),
        )

    def priors(self, canvas_hw):
        """Per-level RPN anchors (scale 8, ratios 0.5/1/2): list of [H_l * W_l * 3, 4] numpy."""
        return anchor_ops.multilevel_anchors(
            canvas_hw, self.strides, self.cfg.anchor_scale, 1, self.ratios
        )

    @staticmethod
    def canvas_of(outputs):
        x = outputs["cls_logits"][0]
        return x.shape[1] * 4, x.shape[2] * 4

    def _flat(self, outputs, name, channels):
        """Per-level [B, A_l, channels] float32 (a no-op cast: the RPN head returns float32)."""
        b = outputs[name][0].shape[0]
        return [x.reshape(b, -1, channels).astype(jnp.float32) for x in outputs[name]]

    def proposals(self, outputs, batch, *, train):
        """Fixed-size proposals of every image: boxes [B, P, 4], scores [B, P], valid [B, P]."""
        cfg = self.cfg
        anchors = [jnp.asarray(a) for a in self.priors(self.canvas_of(outputs))]
        cls = self._flat(outputs, "cls_logits", 1)
        deltas = self._flat(outputs, "box_deltas", 4)
        nms_pre, max_num = (
            (cfg.rpn_train_nms_pre, cfg.rpn_train_max_num)
            if train
            else (cfg.rpn_test_nms_pre, cfg.rpn_test_max_num)
        )

        def one(c, d, img_shape):
            return rpn.rpn_proposals(
                [x[:, 0] for x in c],
                d,
                anchors,
                img_shape,
                nms_pre=nms_pre,
                max_num=max_num,
                iou_threshold=cfg.rpn_nms_iou,
            )

        boxes, scores, valid = jax.vmap(one)(cls, deltas, batch["img_shape"])
        boxes = jax.lax.stop_gradient(boxes)  # proposals are detached, as mmdetection's
        return boxes, scores, valid & batch["image_valid"][:, None]

    # ------------------------------------------------------------------------ training

    def _rpn_loss(self, outputs, batch, keys):
        cfg = self.cfg
        anchors = jnp.asarray(np.concatenate(self.priors(self.canvas_of(outputs))))
        valid = (
            jnp.concatenate(
                [
                    anchor_ops.valid_flags(batch["pad_shape"], x.shape[1:3], s, self.num_anchors)
                    for x, s in zip(outputs["cls_logits"], self.strides, strict=True)
                ],
                axis=1,
            )
            & batch["image_valid"][:, None]
        )
        cls = jnp.concatenate(self._flat(outputs, "cls_logits", 1), axis=1)[..., 0]
        deltas = jnp.concatenate(self._flat(outputs, "box_deltas", 4), axis=1)
        gt_valid = dense.DenseDetector.gt_valid(batch)

        def one(key, v, gts, gv, c, d):
            assigned, idx, is_pos, ok = rpn.assign_and_sample(
                key,
                anchors,
                v,
                gts,
                gv,
                cfg.rpn_pos_iou,
                cfg.rpn_neg_iou,
                cfg.rpn_min_pos_iou,
                True,
                cfg.rpn_num,
                cfg.rpn_pos_fraction,
            )
            bce = det_losses.bce_with_logits(c[idx], is_pos.astype(jnp.float32)) * ok
            gt = gts[jnp.maximum(assigned[idx] - 1, 0)]
            target = box_ops.encode_deltas(anchors[idx], gt)
            target = jnp.where(is_pos[:, None], target, 0.0)
            l1 = det_losses.l1_loss(d[idx], target).sum(-1) * is_pos
            n_pos = is_pos.sum()
            n_neg = (ok & ~is_pos).sum()
            avg = jnp.maximum(n_pos, 1) + jnp.maximum(n_neg, 1)
            return bce.sum(), l1.sum(), avg

        bce, l1, avg = jax.vmap(one)(keys, valid, batch["boxes"], gt_valid, cls, deltas)
        avg = avg * batch["image_valid"]
        return self._group_mean(bce, avg), self._group_mean(l1, avg)

    def _group_mean(self, per_image, per_image_count):
        g = self.cfg.loss_group_size
        num = det_losses.grouped_sum(per_image, g)
        den = det_losses.grouped_sum(per_image_count.astype(jnp.float32), g) + dense.AVG_EPS
        return jnp.mean(num / den)

    def sample_rois(self, proposals, prop_valid, batch, keys):
        """RoI assignment and sampling with the ground truth added as proposals.

        Returns rois [B, R, 4], labels [B, R] (K for background), targets [B, R, 4] (encoded
        with ROI_STDS; 0 unless positive), pos [B, R] and valid [B, R] bool.
        """
        cfg = self.cfg
        gt_valid = dense.DenseDetector.gt_valid(batch)

        def one(key, props, pv, gts, gv, labels):
            cands = jnp.concatenate([gts, props])
            cv = jnp.concatenate([gv, pv])
            thr = cfg.roi_pos_iou
            assigned, idx, is_pos, ok = rpn.assign_and_sample(
                key, cands, cv, gts, gv, thr, thr, thr, False, cfg.roi_num, cfg.roi_pos_fraction
            )
            gt_idx = jnp.maximum(assigned[idx] - 1, 0)
            rois = cands[idx]
            lab = jnp.where(is_pos, labels[gt_idx], self.num_classes)
            target = box_ops.encode_deltas(rois, gts[gt_idx], stds=ROI_STDS)
            target = jnp.where(is_pos[:, None], target, 0.0)
            return rois, lab.astype(jnp.int32), target, is_pos, ok

        return jax.vmap(one)(keys, proposals, prop_valid, batch["boxes"], gt_valid, batch["labels"])

    def roi_logits(self, variables, outputs, rois):
        """The RoI head of `variables` on `rois` [B, R, 4]: cls [B, R, K + 1], deltas."""
        return self.module.apply(
            variables, outputs["neck"], rois, method=FasterRCNNModule.roi_forward
        )

    def view(self, name, variables, outputs, taps, student_taps, *, count_padding=False):
        """A teacher-on-student computation, with this detector as the teacher.

        'teacher_roi_head_on_student_rois': this RoI head on the student's sampled RoIs
        (`roi/rois` [B, R, 4] in the student taps) -> {'roi/cls_logits': [B, R, K + 1]}, so
        DeFeat's proposal KD compares both heads on the same RoIs. A constant: the RoIs and the
        result are stopped (the trainer leaves stopping to the view). `count_padding` changes
        nothing: the RoIs are the student's sampled boxes, which padding does not hold.
        """
        del taps, count_padding
        if name != "teacher_roi_head_on_student_rois":
            raise ValueError(f"Faster R-CNN computes no teacher view {name!r}")
        rois = jax.lax.stop_gradient(student_taps["roi/rois"])
        cls, _ = self.roi_logits(variables, outputs, rois)
        return {"roi/cls_logits": jax.lax.stop_gradient(cls)}

    def loss(self, outputs, batch, *, variables, rng, taps=None):
        """Detection losses of a batch.

        Args:
          outputs: from the module.
          batch: `boxes` [B, G, 4], `labels` [B, G], `box_valid` [B, G], `img_shape` /
            `pad_shape` [B, 2], `image_valid` [B].
          variables: the student's {'params', 'batch_stats'} (the RoI head runs on them).
          rng: PRNG key for the samplers.
          taps: if given, `roi/rois` [B, R, 4], `roi/labels` [B, R], `roi/valid` [B, R] and
            `roi/cls_logits` [B, R, K + 1] are added, for the distillers.
        Returns:
          (total, {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'acc'}).
        """
        b = batch["image"].shape[0]
        k_rpn, k_roi = jax.random.split(rng)
        loss_rpn_cls, loss_rpn_bbox = self._rpn_loss(outputs, batch, jax.random.split(k_rpn, b))
        props, _, pv = self.proposals(outputs, batch, train=True)
        rois, labels, targets, pos, ok = self.sample_rois(
            props, pv, batch, jax.random.split(k_roi, b)
        )
        ok = ok & batch["image_valid"][:, None]
        cls, deltas = self.roi_logits(variables, outputs, rois)
        logp = jax.nn.log_softmax(cls, axis=-1)
        ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0] * ok
        d = deltas.reshape(*deltas.shape[:2], self.num_classes, 4)
        d = jnp.take_along_axis(
            d, jnp.minimum(labels, self.num_classes - 1)[..., None, None], axis=2
        )[:, :, 0]
        l1 = det_losses.l1_loss(d, targets).sum(-1) * (pos & ok)
        count = ok.sum(1)
        loss_cls = self._group_mean(ce.sum(1), count) * self.cfg.cls_loss_weight
        loss_bbox = self._group_mean(l1.sum(1), count) * self.cfg.bbox_loss_weight
        acc = ((cls.argmax(-1) == labels) & ok).sum() / jnp.maximum(ok.sum(), 1)
        if taps is not None:
            taps.update(
                {"roi/rois": rois, "roi/labels": labels, "roi/valid": ok, "roi/cls_logits": cls}
            )
        total = loss_rpn_cls + loss_rpn_bbox + loss_cls + loss_bbox
        return total, {
            "loss_rpn_cls": loss_rpn_cls,
            "loss_rpn_bbox": loss_rpn_bbox,
            "loss_cls": loss_cls,
            "loss_bbox": loss_bbox,
            "acc": 100.0 * acc,
        }

    # ------------------------------------------------------------------------ test

    def predict(self, outputs, batch, *, variables):
        """mmdetection's two-stage test: proposals, RoI head, per-class boxes, class-wise NMS.

        Returns dict boxes [B, D, 4] (original pixels), scores [B, D], labels [B, D] int32,
        valid [B, D] bool, with D = test_max_per_img.
        """
        cfg = self.cfg
        k = self.num_classes
        props, _, pv = self.proposals(outputs, batch, train=False)
        cls, deltas = self.roi_logits(variables, outputs, props)
        scores = jax.nn.softmax(cls, axis=-1)[..., :k]

        def one(p, v, s, d, img_shape, scale):
            boxes = box_ops.decode_deltas(
                p[:, None], d.reshape(-1, k, 4), stds=ROI_STDS, max_shape=img_shape
            ).reshape(-1, 4)
            s = jnp.where(v[:, None] & (s > cfg.test_score_thr), s, -jnp.inf).reshape(-1)
            n = s.shape[0] if cfg.test_nms_pre <= 0 else min(cfg.test_nms_pre, s.shape[0])
            top, idx = jax.lax.top_k(s, n)
            labels = idx % k
            keep, ok = nms_ops.batched_nms(
                boxes[idx],
                top,
                labels,
                iou_threshold=cfg.test_nms_iou,
                max_output=cfg.test_max_per_img,
            )
            out = boxes[idx][keep] / jnp.concatenate([scale, scale])[None]
            return out, jnp.where(ok, top[keep], 0.0), labels[keep], ok

        boxes, scores, labels, ok = jax.vmap(one)(
            props, pv, scores, deltas, batch["img_shape"], batch["scale_factor"]
        )
        return {"boxes": boxes, "scores": scores, "labels": labels.astype(jnp.int32), "valid": ok}


def defaults(depth=50):
    """mmdetection faster_rcnn_r{depth}_fpn: ResNet + FPN (P2..P6) + RPN + Shared2FC RoI head."""
    return dense.model_defaults(
        "faster_rcnn",
        depth,
        anchor_scale=8,
        anchor_ratios=(0.5, 1.0, 2.0),
        rpn_pos_iou=0.7,
        rpn_neg_iou=0.3,
        rpn_min_pos_iou=0.3,
        rpn_num=256,
        rpn_pos_fraction=0.5,
        rpn_train_nms_pre=2000,
        rpn_train_max_num=1000,
        rpn_test_nms_pre=1000,
        rpn_test_max_num=1000,
        rpn_nms_iou=0.7,
        roi_pos_iou=0.5,
        roi_num=512,
        roi_pos_fraction=0.25,
        roi_output_size=7,
        # Samples per RoIAlign bin along each axis. mmcv's 0 (adaptive) cannot be static;
        # tests/test_roi_align.py measures what a fixed 2 x 2 grid changes.
        roi_sampling_ratio=2,
        roi_aligned=True,
        fc_channels=1024,
        cls_loss_weight=1.0,
        bbox_loss_weight=1.0,
        test_nms_pre=-1,  # (proposal, class) pairs entering the final NMS; -1: all of them
    )
