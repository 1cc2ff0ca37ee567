"""The detector protocol and factory.

A detector object has `module` (flax.linen, `module.apply(variables, images)` ->
`(outputs, taps)`), `levels`/`strides` of its FPN outputs, `loss(outputs, batch, *, variables,
rng, taps)` -> `(total, metrics)` and `predict(outputs, batch, *, variables)` -> fixed-size
detections. `variables`, `rng` and `taps` serve two-stage detectors, whose RoI head runs inside
the loss on sampled RoIs (and adds `roi/*` taps for the distillers); dense ones ignore them.
`preprocess` turns the uint8 canvas the pipeline ships into the network's input on device.
"""

import jax.numpy as jnp

from jdistill.distill import api
from jdistill.models import faster_rcnn, fcos, gfl, retinanet

FAMILIES = {
    "retinanet": retinanet.RetinaNet,
    "gfl": gfl.GFL,
    "fcos": fcos.FCOS,
    "faster_rcnn": faster_rcnn.FasterRCNN,
}

# Each family's `model` block (`models/<family>.py: defaults(depth)`).
DEFAULTS = {
    "retinanet": retinanet.defaults,
    "gfl": gfl.defaults,
    "fcos": fcos.defaults,
    "faster_rcnn": faster_rcnn.defaults,
}


def check_block(model_cfg, where):
    """Refuses a `model` block whose keys are not its family's (ValueError naming `where`).

    A block is built by its family's `defaults`; `family` changed on the command line leaves
    the other family's keys behind, which fails deep in the model with a bare KeyError. Blocks
    are locked, so the new family's keys cannot be added there: the fix is a config file.
    """
    family = model_cfg.get("family")
    if family not in DEFAULTS:
        raise ValueError(f"config.{where}.family={family!r}: known families: {sorted(DEFAULTS)}")
    want = set(DEFAULTS[family](model_cfg.get("depth", 50)).keys())
    missing = sorted(want - set(model_cfg.keys()))
    if missing:
        foreign = sorted(set(model_cfg.keys()) - want)
        raise ValueError(
            f"config.{where}.family={family!r}, but the block lacks {family}'s settings "
            f"({', '.join(missing)})"
            + (f" and holds another family's ({', '.join(foreign)})" if foreign else "")
            + f": a family cannot be changed by an override; write a config whose {where} is "
            f"config_lib.{family}(depth), or use one in configs/ that has it"
        )


# mmdetection's Normalize settings (specs/detectors.md §1.1 step 4).
PIXEL_NORMS = {
    "pytorch": dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), to_rgb=True),
    "caffe": dict(mean=(102.9801, 115.9465, 122.7717), std=(1.0, 1.0, 1.0), to_rgb=False),
}


# Anchor settings a distiller may read (DeFeat's RoI masks, FGD), when the family has them.
_ANCHOR_KEYS = ("octave_base_scale", "scales_per_octave", "anchor_scale", "anchor_ratios")


def build(model_cfg, num_classes):
    """The detector named by `model_cfg.family`, for `num_classes` foreground classes, with its
    `spec` (`distill.api.DetectorSpec`) set."""
    family = model_cfg.family
    if family not in FAMILIES:
        raise ValueError(f"unknown detector family {family!r}; known: {sorted(FAMILIES)}")
    det = FAMILIES[family](model_cfg, num_classes)
    det.spec = api.DetectorSpec(
        family=family,
        levels=tuple(det.levels),
        strides=tuple(det.strides),
        channels=model_cfg.neck_channels,
        num_classes=num_classes,
        num_anchors=det.num_anchors,
        anchors={k: model_cfg[k] for k in _ANCHOR_KEYS if k in model_cfg},
        reg_max=model_cfg.get("reg_max", 0),
        provides=det.TAPS,
        loss_taps=det.LOSS_TAPS,
        views=det.VIEWS,
        stacked_convs=model_cfg.get("stacked_convs", 0) if family != "faster_rcnn" else 0,
    )
    return det


def preprocess(images, img_shape, style, dtype=jnp.float32):
    """Normalises a uint8 RGB canvas and zeroes everything outside each image.

    mmdetection normalises and then pads with 0, so the padding is 0 in normalised space.
    Shipping uint8 and normalising on device moves 4x fewer bytes from the host.

    Args:
      images: [B, H, W, 3] uint8 RGB canvas.
      img_shape: [B, 2] int32 (height, width) of each resized image on the canvas.
      style: 'pytorch' (RGB, mean/std) or 'caffe' (BGR, mean only).
      dtype: output dtype.
    Returns:
      [B, H, W, 3] normalised images.
    """
    norm = PIXEL_NORMS[style]
    x = images.astype(jnp.float32)
    mean = jnp.asarray(norm["mean"], jnp.float32)
    std = jnp.asarray(norm["std"], jnp.float32)
    if not norm["to_rgb"]:
        x = x[..., ::-1]  # the caffe models see BGR; mean/std are given in that order
    x = (x - mean) / std
    h, w = images.shape[1:3]
    inside = (jnp.arange(h)[None, :, None] < img_shape[:, 0, None, None]) & (
        jnp.arange(w)[None, None, :] < img_shape[:, 1, None, None]
    )
    return jnp.where(inside[..., None], x, 0.0).astype(dtype)
