"""What every dense (one-stage) detector shares: ResNet + FPN + a head shared across levels,
returning `(outputs, taps)`, and mmdetection's dense-head test-time post-processing.

A head is a flax module called as `head(features, level)` that returns a dict of per-level
maps ({'cls_logits': [N, H, W, A*K], ...}); `DenseModule` collects them into
`outputs[name] = [level maps]` and taps `head/{name}/p{l}`. Entries named `tower/*` (GFL's and
RetinaNet's tower features for CrossKD) are taps only: `tower/cls/p{l}`, `tower/reg/p{l}`.

Mixed precision (`model.dtype='bfloat16'`): backbone, FPN and head convs compute in bfloat16 on
float32 params. A head casts its outputs to float32 as its last op, so `outputs` and the
`head/*` taps, everything the losses, the assigners and the box coding read, are float32. The
`backbone/*`, `neck/*` and `tower/*` taps stay in the compute dtype (they are the activations
the backward pass keeps anyway; a float32 copy would double them): their readers, the
distillers, their adapters and CrossKD's view, cast them to float32 first.
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
from jdistill.ops import groups
from jdistill.ops import nms as nms_ops

# torch's float32 eps, added to avg_factor by mmdetection >= 2.21 `weight_reduce_loss`.
AVG_EPS = float(np.finfo(np.float32).eps)

# The teacher-on-student view of CrossKD (`teacher_head_on_student_towers`).
CROSS_VIEW = "teacher_head_on_student_towers"
_CROSS_STD_EPS = 1e-6  # added to the student's std only, as CrossKD's `align_scale`


def tower_depth(stacked_convs):
    """Where CrossKD cuts a head's towers: after conv `stacked_convs - 1` (its
    `reused_teacher_head_idx=3` of 4), so one tower conv of the teacher's runs on the student's
    features; 0 (the towers' input, the neck) with a single conv."""
    return max(stacked_convs - 1, 0)


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
    fold_bn: bool = False
    # The backbone's variables were folded ahead of time (models/prefold.py: a teacher's).
    prefolded: bool = False

    @nn.compact
    def __call__(self, images, train=False):
        """images: [N, H, W, 3] normalised -> (outputs, taps).

        `train` puts BN in training mode when norm_eval is False (see `resnet.ResNet`).
        taps: `backbone/c{2..5}`, `neck/p{3..7}` (compute dtype), `head/{output name}/p{l}`
        (float32, as `outputs`).
        """
        feats = resnet_lib.ResNet.of(self, name="backbone")(images, train)
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
                if key.startswith("tower/"):
                    taps[f"{key}/{name}"] = value
                    continue
                taps[f"head/{key}/{name}"] = value
                outputs.setdefault(key, []).append(value)
        return outputs, taps

    def head_from_towers(self, towers):
        """The head from given tower features on (CrossKD's cross head), every level.

        towers: per level, a (cls, reg) pair [N, H_l, W_l, feat_channels] at the point the
        head taps as `tower/*` (see the head's `tower` argument). Returns per level the head's
        output dict ({'cls_logits': .., 'bbox_dist' | 'box_deltas': ..}, float32).
        """
        return [self.bbox_head(None, level, tower=pair) for level, pair in enumerate(towers)]


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
        fold_bn=cfg.fold_bn,
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
        # BN on running statistics folded into the conv before it: the same function with less
        # memory traffic (resnet.ResNet; scripts/aot_compile.py measures it)
        fold_bn=True,
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

    def view(self, name, variables, outputs, taps, student_taps, *, count_padding=False):
        """A teacher-on-student computation `name` (one of `VIEWS`): extra teacher taps.

        Its result reaches the distillers as it is: a view stops whatever gradient must not
        flow (the trainer does not, since CrossKD's must flow to the student). GFL and
        RetinaNet compute `CROSS_VIEW` (`cross_head`); `count_padding` is the reading terms'
        setting (`plan.views`).
        """
        del outputs
        if name == CROSS_VIEW and name in self.VIEWS:
            return self.cross_head(variables, taps, student_taps, count_padding=count_padding)
        raise ValueError(f"{type(self).__name__} computes no teacher view {name!r}")

    def cross_head(self, variables, taps, student_taps, *, group_size=None, count_padding=False):
        """CrossKD's view: this (teacher) head run on the student's tower features.

        Per level and tower (cls, reg), the student's `tower/*` features are re-standardised
        per channel to the teacher's statistics at the same point (CrossKD's `align_scale`):

            s' = (s - mean_s) / (std_s + 1e-6) * std_t + mean_t

        mean and std per channel over (the images of a group, H, W), std unbiased (torch's
        `.std()`), the eps on the student's std only. Then the teacher's rest of the head runs
        on s' (ReLU unless cut at the neck, its remaining tower convs, its output convs and
        Scale): `DenseModule.head_from_towers`.

        Gradients: the teacher's variables and features are constants (stopped here); the
        result is differentiable w.r.t. the student's tower features, through the teacher's
        layers and through the student's mean and std, as in the original.

        Padding: statistics run over the cells of `student_taps['assign/valid']` (the student
        loss's valid priors: inside each real image's padded size), for both models; with
        `count_padding` or without that tap, over every cell, as the original does with its
        batch padding. Groups:
        `group_size` images (default this model's `loss_group_size`: mmdetection's per-GPU
        batch, over which the original's statistics run). A channel with no spread gets std 0
        (torch: NaN for a single cell).

        Args:
          variables: this detector's {'params', ...}.
          taps: this detector's own taps (`tower/{cls,reg}/p{l}` [N, H, W, C]).
          student_taps: the student's, with `tower/{cls,reg}/p{l}` of the same shapes and
            optionally `assign/valid` [N, A_total] bool.
          group_size: images per statistics group (0: the whole batch).
          count_padding: take the statistics over every cell (the original's rule).
        Returns:
          {'cross/{output}/p{l}': [N, H, W, ...] float32} for this head's outputs
          (`cls_logits` and `bbox_dist` or `box_deltas`).
        """
        variables = jax.lax.stop_gradient(variables)
        if group_size is None:
            group_size = self.cfg.loss_group_size
        masks = {} if count_padding else cell_masks(student_taps, self.levels)
        towers = []
        for lvl in self.levels:
            pair = []
            for tower in ("cls", "reg"):
                s = student_taps[f"tower/{tower}/{lvl}"].astype(jnp.float32)
                t = jax.lax.stop_gradient(taps[f"tower/{tower}/{lvl}"]).astype(jnp.float32)
                if s.shape != t.shape:
                    raise ValueError(
                        f"CrossKD: the student's tower/{tower}/{lvl} is {s.shape}, the "
                        f"teacher's {t.shape} (widths must match)"
                    )
                mask = masks[lvl] if masks else jnp.ones(s.shape[:3], jnp.float32)
                pair.append(align_scale(s, t, mask, group_size).astype(self.module.dtype))
            towers.append(tuple(pair))
        outs = self.module.apply(variables, towers, method=DenseModule.head_from_towers)
        return {
            f"cross/{key}/{lvl}": value
            for lvl, out in zip(self.levels, outs, strict=True)
            for key, value in out.items()
        }

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


def cell_masks(student_taps, levels):
    """{level: [N, H, W] float32} cells holding a valid prior of `student_taps['assign/valid']`
    ([N, sum_l H_l W_l A] bool, level after level, location-major, A priors per location;
    sizes from the `tower/cls/*` taps), or {} without that tap."""
    if "assign/valid" not in student_taps:
        return {}
    valid = student_taps["assign/valid"]
    shapes = [student_taps[f"tower/cls/{lvl}"].shape[:3] for lvl in levels]
    num_anchors = valid.shape[1] // sum(h * w for _, h, w in shapes)
    out, start = {}, 0
    for lvl, (n, h, w) in zip(levels, shapes, strict=True):
        size = h * w * num_anchors
        cells = valid[:, start : start + size].reshape(n, h, w, num_anchors).any(-1)
        out[lvl] = cells.astype(jnp.float32)
        start += size
    return out


def align_scale(student, teacher, mask, group_size):
    """CrossKD's `align_scale`: the student standardised per channel, then given the teacher's
    mean and std, per group of images.

    student, teacher: [N, H, W, C] float32; mask: [N, H, W] float32 cells that count.
    Returns [N, H, W, C]: (s - mean_s) / (std_s + 1e-6) * std_t + mean_t. (Both stds count the
    same cells, so unbiased or biased differ only through the 1e-6: the original's unbiased
    std is kept anyway.)
    """
    s = groups.split(student, group_size)
    t = groups.split(teacher, group_size)
    m = groups.split(mask, group_size)[..., None]
    s_mean, s_std = groups.channel_stats(s, m)
    t_mean, t_std = groups.channel_stats(t, m)
    out = (s - s_mean) / (s_std + _CROSS_STD_EPS) * t_std + t_mean
    return out.reshape(student.shape)
