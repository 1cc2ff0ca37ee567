"""What every dense (one-stage) detector shares: ResNet + FPN + a head shared across levels,
returning `(outputs, taps)`, and mmdetection's dense-head test-time post-processing.

A head is a flax module called as `head(features, level)` that returns a dict of per-level
maps ({'cls_logits': [N, H, W, A*K], ...}); `DenseModule` collects them into
`outputs[name] = [level maps]` and taps `head/{name}/p{l}`.

Mixed precision (`model.dtype='bfloat16'`): backbone, FPN and head convs compute in bfloat16 on
float32 params. A head casts its outputs to float32 as its last op, so `outputs` and the
`head/*` taps, everything the losses, the assigners and the box coding read, are float32. The
`backbone/*` and `neck/*` taps stay in the compute dtype (they are the activations the backward
pass keeps anyway; a float32 copy would double them): their readers, the distillers and their
adapters, cast them to float32 first.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from jdistill.models import fpn as fpn_lib
from jdistill.models import layers
from jdistill.models import resnet as resnet_lib
from jdistill.ops import anchors as anchor_ops
from jdistill.ops import nms as nms_ops

# torch's float32 eps, added to avg_factor by mmdetection >= 2.21 `weight_reduce_loss`.
AVG_EPS = float(np.finfo(np.float32).eps)


class DenseModule(nn.Module):
    """ResNet backbone + FPN (P3..P7) + `bbox_head`, mmdetection's SingleStageDetector."""

    bbox_head: nn.Module
    depth: int = 50
    style: str = "pytorch"
    frozen_stages: int = 1
    width: float = 1.0
    norm_eval: bool = True
    neck_channels: int = 256
    add_extra_convs: bool | str = "on_input"
    relu_before_extra_convs: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train=False):
        """images: [N, H, W, 3] normalised -> (outputs, taps).

        `train` puts BN in training mode when norm_eval is False (see `resnet.ResNet`).
        taps: `backbone/c{2..5}`, `neck/p{3..7}` (compute dtype), `head/{output name}/p{l}`
        (float32, as `outputs`).
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
            relu_before_extra_convs=self.relu_before_extra_convs,
            dtype=self.dtype,
            name="neck",
        )(feats)
        taps = {f"backbone/{k}": v for k, v in feats.items()}
        outputs = {}
        for level, (name, p) in enumerate(pyramid.items()):
            taps[f"neck/{name}"] = p
            for key, value in self.bbox_head(p, level).items():
                taps[f"head/{key}/{name}"] = value
                outputs.setdefault(key, []).append(value)
        return outputs, taps


def backbone_kwargs(cfg):
    """DenseModule's backbone/neck fields from a model config block."""
    return dict(
        depth=cfg.depth,
        style=cfg.style,
        frozen_stages=cfg.frozen_stages,
        width=cfg.width,
        norm_eval=cfg.norm_eval,
        neck_channels=cfg.neck_channels,
        dtype=layers.compute_dtype(cfg.dtype),
    )


def model_defaults(family, depth, **family_fields):
    """The `model` config fields every detector block shares (ResNet + FPN + head,
    mmdetection COCO), plus the family's own."""
    fields = dict(
        family=family,
        depth=depth,
        style="pytorch",
        frozen_stages=1,
        norm_trainable=True,  # BN affine params train (requires_grad=True)
        norm_eval=True,  # BN on running statistics (False: batch statistics, for scratch)
        width=1.0,
        neck_channels=256,
        stacked_convs=4,
        # Images per normalisation group: mmdetection normalises per GPU of 2 images.
        loss_group_size=2,
        test_score_thr=0.05,
        test_nms_pre=1000,
        test_nms_iou=0.5,
        test_max_per_img=100,
        dtype="float32",  # compute dtype of convs; 'bfloat16' for mixed precision
    )
    fields.update(family_fields)
    return ml_collections.ConfigDict(fields)


class DenseDetector:
    """Shared machinery of RetinaNet, GFL and FCOS (subclasses define the head and losses).

    Subclasses set `self.module`, `self.num_anchors` and implement `priors(canvas_hw)` (a list of
    per-level [H_l * W_l * A, 4] numpy boxes), `loss`, and `decode_level(level, priors, raw,
    img_shape)` for the test-time decode. `loss` and `predict` take the two-stage detectors' extra
    keywords (variables, rng, taps) and ignore them: a dense detector needs only its outputs.
    """

    levels = ("p3", "p4", "p5", "p6", "p7")
    strides = (8, 16, 32, 64, 128)
    # Tap groups for distillers (`distill/api.py`): the forward pass's, the loss's, and the
    # teacher-on-student views `view` computes.
    TAPS = ("backbone", "neck", "head/cls_logits")
    LOSS_TAPS = ()
    VIEWS = ()

    def __init__(self, cfg, num_classes):
        self.cfg = cfg
        self.num_classes = num_classes

    @staticmethod
    def canvas_of(outputs):
        """The input canvas (H, W) behind a set of head outputs (P3 has stride 8)."""
        x = outputs["cls_logits"][0]
        return x.shape[1] * 8, x.shape[2] * 8

    @staticmethod
    def level_hw(outputs):
        return [tuple(x.shape[1:3]) for x in outputs["cls_logits"]]

    def valid_priors(self, outputs, batch):
        """[B, A_total] bool: priors inside each image's 32-padded size, of real examples."""
        valid = jnp.concatenate(
            [
                anchor_ops.valid_flags(batch["pad_shape"], hw, s, self.num_anchors)
                for hw, s in zip(self.level_hw(outputs), self.strides, strict=True)
            ],
            axis=1,
        )
        return valid & batch["image_valid"][:, None]

    @staticmethod
    def gt_valid(batch):
        """[B, G] ground truth that counts: real boxes of real (not padding) examples."""
        return batch["box_valid"] & batch["image_valid"][:, None]

    @staticmethod
    def match(assigned, batch):
        """Gathers each prior's assigned ground truth.

        Args:
          assigned: [B, A] int (0 negative, i + 1 for gt i, -1 ignored).
          batch: `boxes` [B, G, 4], `labels` [B, G].
        Returns:
          pos [B, A] bool, boxes [B, A, 4] and labels [B, A] of the matched gts (gt 0's where
          not positive: mask with `pos`).
        """
        gt_idx = jnp.maximum(assigned - 1, 0)
        boxes = jnp.take_along_axis(batch["boxes"], gt_idx[..., None], axis=1)
        labels = jnp.take_along_axis(batch["labels"], gt_idx, axis=1)
        return assigned > 0, boxes, labels

    def flat(self, outputs, name, channels):
        """Concatenates a per-level output over levels: [B, A_total, channels] float32.

        The heads already return float32; the cast guards the losses against any future output
        left in a bfloat16 compute dtype (a no-op otherwise).
        """
        b = outputs[name][0].shape[0]
        flat = jnp.concatenate([x.reshape(b, -1, channels) for x in outputs[name]], axis=1)
        return flat.astype(jnp.float32)

    def view(self, name, variables, outputs, taps, student_taps):
        """A teacher-on-student computation `name` (one of `VIEWS`): extra teacher taps."""
        raise ValueError(f"{type(self).__name__} computes no teacher view {name!r}")

    def score_factors(self, outputs, level):
        """Per-level [B, H*W*A] factors multiplied into the final scores (FCOS centerness)."""
        del outputs, level
        return None

    def predict(self, outputs, batch, **unused):
        """mmdetection >= 2.18 dense-head post-processing (`specs/detectors.md` §6).

        Per level: the top `test_nms_pre` (prior, class) pairs with score > test_score_thr,
        decoded with clipping to the resized image; then class-wise NMS over all levels,
        `test_max_per_img` kept, boxes divided by the scale factor back to original pixels.

        Args:
          outputs: the module's outputs.
          batch: `img_shape` [B, 2] int32 and `scale_factor` [B, 2] float32 (x, y).
        Returns:
          dict boxes [B, D, 4], scores [B, D], labels [B, D] int32, valid [B, D] bool.
        """
        cfg = self.cfg
        priors = [jnp.asarray(p) for p in self.priors(self.canvas_of(outputs))]
        names = [k for k in outputs if k != "cls_logits"]
        factors = [self.score_factors(outputs, lvl) for lvl in range(len(priors))]

        def one_image(cls, raws, facs, img_shape, scale):
            boxes, scores, labels = [], [], []
            for lvl, lvl_priors in enumerate(priors):
                s = jax.nn.sigmoid(cls[lvl].reshape(-1, self.num_classes))
                top, prior, lab = nms_ops.dense_topk_per_level(
                    s, score_thr=cfg.test_score_thr, nms_pre=cfg.test_nms_pre
                )
                raw = {k: v[lvl] for k, v in raws.items()}
                boxes.append(self.decode_level(lvl, lvl_priors, raw, prior, img_shape))
                if facs[lvl] is not None:
                    top = top * facs[lvl][prior]  # after the threshold, as mmdetection
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

        raws = {k: outputs[k] for k in names}
        boxes, scores, labels, ok = jax.vmap(one_image)(
            outputs["cls_logits"], raws, factors, batch["img_shape"], batch["scale_factor"]
        )
        return {"boxes": boxes, "scores": scores, "labels": labels.astype(jnp.int32), "valid": ok}
