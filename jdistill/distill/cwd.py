"""CWD: channel-wise distillation (Shu et al., ICCV 2021), as mmrazor
`mmrazor/models/losses/cwd.py` computes it (`specs/distillers.md`, CWD).

Every channel c of every image n becomes a spatial distribution, and the student's is pulled
towards the teacher's by KL divergence, per level pair:

    P_T[n, :, c] = softmax_{h,w}(T[n, :, :, c] / tau)
    L = tau^2 * sum_{n,c,h,w} P_T (log P_T - log_softmax_{h,w}(S / tau)) / (N * C)

summed over level pairs, returned without `weight` (the trainer applies it and the warm-up).

Two registered names, one formula:
- 'cwd' on the FPN features `neck/p{l}` (mmrazor's Faster R-CNN / RetinaNet configs: weight 10
  on all 5 levels, the defaults here; pppppM/mmdetection-distiller's RetinaNet X-101 -> R50 row,
  40.5 AP, used weight 5 on P3..P6). A student neck narrower than the teacher's gets a 1x1
  adapter (`adapter`), as mmdetection-distiller's `align` conv (mmrazor has none).
- 'cwd_logits' on the classification logits `head/cls_logits/p{l}` [N, H, W, A*K] (mmrazor
  v0.x's GFL row on `bbox_head.gfl_cls`: weight 5 on all 5 levels, 40.2 -> 41.9 AP). Channels
  pair one to one, so the two heads must have the same anchors per cell and classes (`check`).

Settings (`defaults`): `tau` 1; `levels` (student strides) picks exactly those pairs, else the
first `max_levels` pairs (0: all); pairs by stride (`api.paired_levels`) and the two maps
must have one size (the original asserts it; we raise).

Padding (`count_padding` False): only cells inside each image's padded size count
(`api.level_valid`), and only `image_valid` images. Both spatial softmaxes run over the counted
cells of their image (uncounted cells get probability 0 and add nothing), and N in the
normaliser is the number of counted images. `count_padding=True` takes every cell, as the
original does with its batch padding (mmdetection pads each GPU's images to the largest).

Quirks of the originals:
- mmrazor's N and C are per GPU: sum / (N C) per GPU, averaged over GPUs by DDP, equals the
  global sum / (N C) for equal per-GPU batches, so no grouping is needed.
- mmdetection-distiller's version drops the teacher's entropy (sum -P_T log P_S): a constant
  offset with the same student gradient. We compute mmrazor's KL (0 when S == T).
- The original views [N, C, H, W] as [N * C, H * W]; channel order does not matter as long as
  both sides share it, which is why the logits variant requires equal (A, K).
"""

import jax
import jax.numpy as jnp

from jdistill.distill import adapters, api, pkd

# Fill for uncounted cells before the softmax: finite, so that no inf or NaN reaches a gradient,
# and low enough that exp(fill - max) is exactly 0 in float32.
_MASKED = -1e30


def masked_log_softmax(x, counted):
    """log_softmax over (H, W) of x [N, H, W, C] restricted to `counted` [N, H, W, 1] bool.

    Uncounted cells get a very negative (finite) value; an image without counted cells gives
    a uniform, finite result that its caller masks out.
    """
    return jax.nn.log_softmax(jnp.where(counted, x, _MASKED), axis=(1, 2))


def spatial_log_softmax(x, valid, tau):
    """log P = log softmax_{h,w}(x / tau) of every (image, channel) over its image's counted
    cells. x: [N, H, W, C] float32; valid: [N, H, W] float32 counted cells -> [N, H, W, C]
    (uncounted cells: P exactly 0, where the image has a counted cell)."""
    return masked_log_softmax(x / tau, (valid > 0)[..., None])


def cwd_level(student, teacher, valid, tau):
    """CWD of one level pair, unweighted.

    Args:
      student: [N, H, W, C] float32 (already adapted to the teacher's channels).
      teacher: [N, H, W, C] float32 (gradient already stopped).
      valid: [N, H, W] float32 counted cells.
      tau: temperature.
    Returns:
      scalar: tau^2 * sum_{n,c,counted hw} P_T (log P_T - log P_S) / (counted images * C).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"CWD needs equal maps, got student {student.shape} teacher {teacher.shape}"
        )
    counted = (valid > 0)[..., None]
    log_pt = spatial_log_softmax(teacher, valid, tau)
    log_ps = spatial_log_softmax(student, valid, tau)
    kl = jnp.where(counted, jnp.exp(log_pt) * (log_pt - log_ps), 0.0)
    images = (valid.reshape(valid.shape[0], -1).max(1) > 0).sum().astype(jnp.float32)
    return tau**2 * kl.sum() / (jnp.maximum(images, 1.0) * student.shape[-1])


def _pairs(prefix, student_taps, teacher_taps, batch, params, cfg, spec):
    """Per selected level pair of taps `{prefix}/p{l}`: (student level name, S [N, H, W, C]
    float32 through the pair's adapter when `params` is not None, T [N, H, W, C] float32
    under stop_gradient, valid [N, H, W] float32 counted cells)."""
    for i, s_lvl, t_lvl, stride in api.selected_levels(cfg, spec):
        s = student_taps[f"{prefix}/{s_lvl}"].astype(jnp.float32)
        t = jax.lax.stop_gradient(teacher_taps[f"{prefix}/{t_lvl}"].astype(jnp.float32))
        if params is not None:
            s = adapters.apply_level(params, i, s)
        yield s_lvl, s, t, pkd.valid_cells(batch, t.shape[1:3], stride, cfg)


def _cwd(prefix, student_taps, teacher_taps, batch, params, cfg, spec):
    """Sum of `cwd_level` over the selected level pairs of taps `{prefix}/p{l}`."""
    total = jnp.float32(0.0)
    metrics = {}
    for s_lvl, s, t, valid in _pairs(prefix, student_taps, teacher_taps, batch, params, cfg, spec):
        term = cwd_level(s, t, valid, cfg.get("tau", 1.0))
        metrics[s_lvl] = term
        total = total + term
    return total, metrics


def spatial_softmax_map(x, valid, tau):
    """The per-channel spatial softmax of `cwd_level`, averaged over channels for display:
    mean_c P[..., c] with P = exp(`spatial_log_softmax`(x, valid, tau)), 0 on uncounted cells.

    x: [N, H, W, C] float32; valid: [N, H, W] float32 -> [N, H, W] float32, summing to 1 over
    each image's counted cells (0 everywhere for an image without one).
    """
    p = jnp.where((valid > 0)[..., None], jnp.exp(spatial_log_softmax(x, valid, tau)), 0.0)
    return p.mean(-1)


def _maps(prefix, student_taps, teacher_taps, batch, cfg, spec, student):
    """{'spatial softmax (teacher)', and with `student` '... (student)': {level: [N, H, W]}}."""
    tau = cfg.get("tau", 1.0)
    out = {"spatial softmax (teacher)": {}}
    if student:
        out["spatial softmax (student)"] = {}
    for s_lvl, s, t, valid in _pairs(prefix, student_taps, teacher_taps, batch, None, cfg, spec):
        out["spatial softmax (teacher)"][s_lvl] = spatial_softmax_map(t, valid, tau)
        if student:
            out["spatial softmax (student)"][s_lvl] = spatial_softmax_map(s, valid, tau)
    return out


def cwd(student_taps, teacher_taps, batch, params, *, cfg, spec):
    """CWD on FPN features, before `weight` and warm-up.

    Args:
      student_taps: `neck/p{l}` [N, H, W, C_s], any float dtype (cast to float32).
      teacher_taps: `neck/p{l}` [N, H, W, C_t].
      batch: `pad_shape` [N, 2] int32; `image_valid` [N] bool when present.
      params: `init`'s 1x1 adapters when C_s != C_t, else None.
      cfg: `tau`, `levels`, `max_levels`, `count_padding`.
      spec: the `api.Pair`.
    Returns:
      (scalar float32 sum over level pairs, {student level name: its unweighted term}).
    """
    return _cwd("neck", student_taps, teacher_taps, batch, params, cfg, spec)


def cwd_maps(student_taps, teacher_taps, batch, *, cfg, spec):
    """The spatial distributions `cwd` compares, per selected level pair
    (`api.Distiller.maps`), each the mean over channels of the per-channel spatial softmax
    (`spatial_softmax_map`, temperature `tau`).

    Args: as `cwd`, without `params`.
    Returns:
      {'spatial softmax (teacher)': {student level: [N, H, W] float32}}, plus 'spatial softmax
      (student)' when the neck widths match: otherwise the loss takes the student's softmax of
      its adapter's output, and the adapter is a trained parameter that maps do not get.
    """
    student = spec.student.channels == spec.teacher.channels
    return _maps("neck", student_taps, teacher_taps, batch, cfg, spec, student)


def cwd_logits(student_taps, teacher_taps, batch, params, *, cfg, spec):
    """CWD on classification logits `head/cls_logits/p{l}` [N, H, W, A*K] (float32), one
    spatial distribution per (image, anchor, class) channel. Args and returns as `cwd`."""
    del params
    return _cwd("head/cls_logits", student_taps, teacher_taps, batch, None, cfg, spec)


def cwd_logits_maps(student_taps, teacher_taps, batch, *, cfg, spec):
    """As `cwd_maps`, on `head/cls_logits/p{l}` [N, H, W, A*K]: {'spatial softmax (teacher)',
    'spatial softmax (student)': {student level: [N, H, W] float32}}, each the mean over the
    A*K channels of the per-channel spatial softmax (no adapter: both always shown)."""
    return _maps("head/cls_logits", student_taps, teacher_taps, batch, cfg, spec, True)


def init(rng, *, cfg, spec):
    """A 1x1 adapter per selected level pair when the neck widths differ; None otherwise."""
    return pkd.init_adapters(rng, cfg, spec, len(api.selected_levels(cfg, spec)))


def check(cfg, spec):
    """Errors for a level selection CWD cannot take or an unknown adapter kind."""
    return api.check_levels(cfg, spec) or pkd.check_adapter(cfg, spec) or api.check_settings(cfg)


def check_logits(cfg, spec):
    """Errors for heads whose logit channels do not pair one to one, or a bad selection."""
    s, t = spec.student, spec.teacher
    if (s.num_anchors, s.num_classes) != (t.num_anchors, t.num_classes):
        return (
            f"it compares logit channels one to one: the student has {s.num_anchors} anchors x "
            f"{s.num_classes} classes per cell, the teacher {t.num_anchors} x {t.num_classes}"
        )
    return api.check_levels(cfg, spec) or api.check_settings(cfg)


DISTILLERS = {
    "cwd": api.Distiller(
        cwd,
        student_taps=("neck",),
        teacher_taps=("neck",),
        init=init,
        defaults={
            "weight": 10.0,
            "tau": 1.0,
            "levels": (),
            "max_levels": 0,
            "adapter": "conv1x1",
            "count_padding": False,
        },
        check=check,
        maps=cwd_maps,
    ),
    "cwd_logits": api.Distiller(
        cwd_logits,
        student_taps=("head/cls_logits",),
        teacher_taps=("head/cls_logits",),
        defaults={
            "weight": 5.0,
            "tau": 1.0,
            "levels": (),
            "max_levels": 0,
            "count_padding": False,
        },
        same_family=(
            "it compares classification maps channel by channel, and another family's head "
            "scores other things (GFL's joint class-quality, FCOS's class logits, anchors)"
        ),
        check=check_logits,
        maps=cwd_logits_maps,
    ),
}

# Published CWD recipes, over the defaults (mmrazor's: weight 10 / 5, tau 1, all levels).
PRESETS = {
    # pppppM/mmdetection-distiller cwd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco,
    # 37.4 -> 40.5 from an X-101 teacher: weight 5 on P3..P6 (`fpn_convs.0-3`).
    "cwd_retinanet": {"cwd": {"fn": "cwd", "weight": 5.0, "max_levels": 4}},
    # mmrazor v0.x cwd_cls_head_gfl_r101_fpn_gfl_r50_fpn_1x_coco on `gfl_cls`'s logits,
    # 40.2 -> 41.9: the defaults (weight 5, tau 1, all five levels).
    "cwd_gfl": {"cwd_logits": {"fn": "cwd_logits"}},
}
