"""PKD: Pearson-correlation feature distillation (Cao et al., NeurIPS 2022), as mmrazor
`mmrazor/models/losses/pkd_loss.py` computes it (`specs/distillers.md`, PKD).

Per distilled FPN level, every channel of the student S and of the teacher T is standardised
over (N, H, W) with the unbiased std, and the two are compared by a halved MSE:

    norm(F)[n, h, w, c] = (F - mean_{n,h,w} F[.., c]) / (std_{n,h,w} F[.., c] + 1e-6)
    L = sum_levels mean_{n,h,w,c} (norm(S) - norm(T))^2 / 2

which is (1 - Pearson r) per channel, up to the (n - 1) / n of the unbiased std. The loss is
returned without `weight` (the trainer applies it and the warm-up).

Settings (`defaults`, overlaid by the config block):
- `weight` 6: mmrazor's base PKD config (Faster R-CNN R101 -> R50, Swin Mask R-CNN -> RetinaNet)
  and CrossKD + PKD on GFL; mmrazor's RetinaNet / FCOS -> RetinaNet rows use 10 (configs say so).
- Levels: `levels` (a tuple of student strides) picks exactly those pairs; without it the first
  `max_levels` pairs are kept (default 4: mmrazor distils neck outputs 0-3 only; 0: all).
- `pair` 'stride' (default): levels pair by stride (`api.paired_levels`), so a Faster R-CNN
  teacher's P3..P6 meet a RetinaNet student's P3..P6. 'index': the i-th student level meets the
  i-th teacher level, as mmrazor's `data_idx` mapping does: a Mask R-CNN teacher's P2 then
  meets the student's P3, which is resized to P2's size (the published Swin -> RetinaNet row).
- When the maps' sizes differ, S is resized to T's size with bilinear interpolation,
  half-pixel centres, no antialiasing: torch `F.interpolate(mode='bilinear')`, which is what
  the original calls (`resize_stu=True`; the `resize_stu=False` direction is not offered).
- Channels: the original needs C_s == C_t. Otherwise (our extension) a per-level adapter
  (`adapter`, default 'conv1x1', `adapters.py`) maps S onto T's channels before the resize.
- `group_size` 2: the statistics and the mean run per group of that many images, and the
  group losses are averaged: the original normalises per GPU of 2 images (mmdetection's
  samples_per_gpu) and DDP averages the GPUs. 0: one group of the whole batch.
- Padding (`count_padding` False): a cell counts only inside its image's padded size
  (`api.level_valid` at the teacher's grid and stride) and only for `image_valid` images. The
  per-channel mean and std run over counted cells only (std's n - 1 is counted cells - 1), and
  the MSE is the sum over counted cells and channels / (counted cells * C). `count_padding=True`
  counts every cell, as the original does with its batch padding. When S is resized, it is
  resized as a whole map first: near the edge of the valid region the interpolation still reads
  the student's padding cells, as in the original.

Quirks of the original, and what we do:
- torch `.std()` is unbiased (ddof 1): kept. With a single counted cell torch gives NaN; we give
  std 0 (a zero-variance channel normalises to 0 and passes a zero, not NaN, gradient).
- It resizes only when the heights differ (`size_S[0] != size_T[0]`) and then asserts equal
  shapes; we resize when either side differs.
- The teacher runs backbone + neck only in mmrazor's `FpnTeacherDistill`: we read only `neck`.
"""

import jax
import jax.numpy as jnp

from jdistill.distill import adapters, api
from jdistill.ops import groups

PAIRINGS = ("stride", "index")
_EPS = 1e-6  # added to the std, as the original


def select_pairs(cfg, spec, pairing=None):
    """The distilled level pairs: [(i, student level, teacher level, student stride, teacher
    stride)], i the adapter index (position in this list).

    `pairing` ('stride' | 'index', default `cfg.pair`), `cfg.levels` (student strides, or
    empty) and `cfg.max_levels` (first k pairs when `levels` is empty; 0: all) as in the
    module docstring (`api.selected_levels`).
    """
    return api.selected_levels(cfg, spec, _candidates(spec, pairing or cfg.get("pair", "stride")))


def _candidates(spec, pairing):
    """Every level pair of a pairing, as (position, student level, teacher level, student
    stride, teacher stride)."""
    if pairing == "stride":
        return [(*p, p[3]) for p in api.paired_levels(spec)]
    if pairing == "index":
        s, t = spec.student, spec.teacher
        pairs = zip(s.levels, t.levels, s.strides, t.strides, strict=False)
        return [(j, *p) for j, p in enumerate(pairs)]
    raise ValueError(f"pair={pairing!r}: use one of {PAIRINGS}")


def valid_cells(batch, hw, stride, cfg):
    """[N, H, W] float32: 1 where a cell counts (module docstring), 0 elsewhere.

    `api.level_valid` (inside each image's padded size unless `cfg.count_padding`), times
    `batch['image_valid']` when the batch has it (padding examples never count).
    """
    valid = api.level_valid(batch, hw, stride, cfg)
    if "image_valid" in batch:
        valid = valid * batch["image_valid"].astype(jnp.float32)[:, None, None]
    return valid


def resize_like_torch(x, hw):
    """Bilinear resize of x [N, H, W, C] to [N, *hw, C], equal to torch
    `F.interpolate(x, hw, mode='bilinear', align_corners=False)` (half-pixel centres, edge
    clamping); antialiasing off so that downsampling matches torch too. Same size: x."""
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), "bilinear", antialias=False)


def standardise(x, mask):
    """Per-group, per-channel standardisation over the counted cells.

    Args:
      x: [G, g, H, W, C] float32.
      mask: [G, g, H, W, 1] float32, 1 for counted cells.
    Returns:
      [G, g, H, W, C]: (x - mean) / (std + 1e-6), mean and unbiased std over counted cells of
      each (group, channel); std is 0 where fewer than 2 cells count (torch: NaN).
    """
    mean, std = groups.channel_stats(x, mask)
    return (x - mean) / (std + _EPS)


def pkd_level(student, teacher, valid, group_size=0):
    """PKD on one level pair, unweighted.

    Args:
      student: [N, H, W, C] float32, already adapted and resized to the teacher's grid.
      teacher: [N, H, W, C] float32 (gradient already stopped).
      valid: [N, H, W] float32 counted cells.
      group_size: images per normalisation group (0: the whole batch).
    Returns:
      scalar: mean over groups with counted cells of
      sum_counted (norm(S) - norm(T))^2 / (counted cells * C) / 2.
    """
    s = groups.split(student, group_size)
    t = groups.split(teacher, group_size)
    m = groups.split(valid, group_size)[..., None]
    sq = (m * jnp.square(standardise(s, m) - standardise(t, m))).sum((1, 2, 3, 4))  # [G]
    cnt = m.sum((1, 2, 3, 4))  # [G]
    per_group = sq / (jnp.maximum(cnt, 1.0) * s.shape[-1]) / 2.0
    has = (cnt > 0).astype(jnp.float32)
    return (per_group * has).sum() / jnp.maximum(has.sum(), 1.0)


def pkd(student_taps, teacher_taps, batch, params, *, cfg, spec):
    """The PKD loss over the selected level pairs, before `weight` and warm-up.

    Args:
      student_taps: `neck/p{l}` [N, H_s, W_s, C_s], any float dtype (cast to float32).
      teacher_taps: `neck/p{l}` [N, H_t, W_t, C_t].
      batch: `pad_shape` [N, 2] int32; `image_valid` [N] bool when present.
      params: `init`'s adapters when C_s != C_t, else None.
      cfg: `defaults` overlaid by the config block (module docstring).
      spec: the `api.Pair`.
    Returns:
      (scalar float32 sum over level pairs, {student level name: its unweighted term}).
    """
    total = jnp.float32(0.0)
    metrics = {}
    for i, s_lvl, t_lvl, _, t_stride in select_pairs(cfg, spec):
        s = student_taps[f"neck/{s_lvl}"].astype(jnp.float32)
        t = jax.lax.stop_gradient(teacher_taps[f"neck/{t_lvl}"].astype(jnp.float32))
        if params is not None:
            s = adapters.apply_level(params, i, s)
        elif s.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"PKD: student {s_lvl} has {s.shape[-1]} channels, teacher {t_lvl} has "
                f"{t.shape[-1]}, and no adapter params were given"
            )
        s = resize_like_torch(s, t.shape[1:3])
        valid = valid_cells(batch, t.shape[1:3], t_stride, cfg)
        term = pkd_level(s, t, valid, cfg.get("group_size", 0))
        metrics[s_lvl] = term
        total = total + term
    return total, metrics


def init(rng, *, cfg, spec):
    """A 1x1 adapter (`cfg.adapter`) per selected level pair when the neck widths differ (our
    extension: the original has none); None when they match."""
    return init_adapters(rng, cfg, spec, len(select_pairs(cfg, spec)))


def init_adapters(rng, cfg, spec, num_levels):
    """`num_levels` adapters of kind `cfg.adapter` from the student's neck width to the
    teacher's, or None when the widths match (nothing to adapt)."""
    if spec.student.channels == spec.teacher.channels:
        return None
    return adapters.init(
        rng,
        num_levels=num_levels,
        in_channels=spec.student.channels,
        out_channels=spec.teacher.channels,
        kind=cfg.get("adapter", "conv1x1"),
    )


def check_adapter(cfg, spec):
    """An error for an unknown `cfg.adapter` when the neck widths differ, else None."""
    if spec.student.channels != spec.teacher.channels and (
        cfg.get("adapter") not in adapters.KERNELS
    ):
        return f"adapter must be one of {sorted(adapters.KERNELS)}, not {cfg.get('adapter')!r}"
    return None


def check(cfg, spec):
    """Errors for a level selection PKD cannot take or an unknown adapter kind."""
    pairing = cfg.get("pair", "stride")
    if pairing not in PAIRINGS:
        return f"pair={pairing!r}: use one of {PAIRINGS}"
    return (
        api.check_levels(cfg, spec, _candidates(spec, pairing))
        or check_adapter(cfg, spec)
        or api.check_settings(cfg)
    )


DISTILLERS = {
    "pkd": api.Distiller(
        pkd,
        student_taps=("neck",),
        teacher_taps=("neck",),
        init=init,
        defaults={
            "weight": 6.0,
            "levels": (),
            "max_levels": 4,
            "pair": "stride",
            "group_size": 2,
            "adapter": "conv1x1",
            "count_padding": False,
        },
        check=check,
    ),
}

# Published PKD recipes, over the defaults (CrossKD's weight 6, groups of 2 images).
PRESETS = {
    # mmrazor's RetinaNet-student rows, pkd_fpn_retina_x101_retina_r50_2x_coco (37.4 -> 40.8)
    # and pkd_fpn_fcos_x101_retina_r50_1x_coco (36.5 -> 40.3): weight 10 on neck outputs 0-3.
    "pkd_retinanet": {"pkd": {"fn": "pkd", "weight": 10.0}},
    # The PKD term of jbwang1997/CrossKD's crosskd+pkd_r50_gflv1_r101-2x-ms_fpn_1x_coco
    # (`loss_feat_kd=PKDLoss(loss_weight=6)`) on all five levels: its only use on GFL.
    "pkd_gfl": {"pkd": {"fn": "pkd", "max_levels": 0}},
}
