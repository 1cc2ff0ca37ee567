"""The distiller API: what a distillation method declares, and what a detector offers it.

A method is one module in `jdistill/distill/` with a module-level `DISTILLERS` dict of
`Distiller`s, each registered under the name configs give as `distill.losses.<key>.fn`; the
registry finds the modules itself, so a new method touches its module, a config and a test.

A distiller's loss is a pure function

    loss(student_taps, teacher_taps, batch, params, *, cfg, spec) -> (scalar, {name: scalar})

- `student_taps`, `teacher_taps`: flat dicts of the detectors' taps (`neck/p3`,
  `head/cls_logits/p3`, `roi/labels`, ...). The teacher's also hold the teacher-on-student
  views the distiller asked for. The teacher's own taps carry no gradient (its forward runs
  under stop_gradient); a view stops what it must itself (CrossKD's cross-head predictions
  differentiate the student's tower features through the frozen teacher layers).
- `batch`: the device batch (`boxes` [N, G, 4], `box_valid`, `image_valid`, `pad_shape`, ...).
- `params`: the distiller's own trainable pytree from `init` (None without one).
- `cfg`: the distiller's `defaults` overlaid with the config's `distill.losses.<key>` block.
- `spec`: a `Pair` of the student's and the teacher's `DetectorSpec`.

It returns the unweighted loss (the trainer multiplies by `cfg.weight` and the warm-up) and
metrics to log under `distill/<key>/<name>`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
    """What a detector offers distillers, frozen at build time.

    Attributes:
      family: 'retinanet' | 'gfl' | 'fcos' | 'faster_rcnn'.
      levels: FPN output names, e.g. ('p3', ..., 'p7').
      strides: their strides, e.g. (8, ..., 128).
      channels: neck (FPN) channels.
      num_classes: foreground classes K.
      num_anchors: priors per location A (1 for GFL and FCOS).
      anchors: anchor settings of the detector's config (scales, ratios), {} when point-based.
      reg_max: GFL's distribution bins - 1 (0 for other families).
      provides: tap groups of its forward pass (`backbone`, `neck`, `head/cls_logits`, ...),
        which it offers as student and as teacher.
      loss_taps: tap groups its loss adds (`assign`, `roi`): a student's only, since a teacher
        runs no loss.
      views: teacher-on-student computations it can run as a teacher (`Detector.view`).
      stacked_convs: convs in each dense-head tower (0 without one), which CrossKD's cut of
        the student's towers must match.
    """

    family: str
    levels: tuple[str, ...]
    strides: tuple[int, ...]
    channels: int
    num_classes: int
    num_anchors: int
    anchors: Mapping[str, Any]
    reg_max: int
    provides: tuple[str, ...]
    loss_taps: tuple[str, ...]
    views: tuple[str, ...]
    stacked_convs: int = 0


@dataclasses.dataclass(frozen=True)
class Pair:
    """The student's and the teacher's specs, as a distiller sees them."""

    student: DetectorSpec
    teacher: DetectorSpec


@dataclasses.dataclass(frozen=True)
class Distiller:
    """One distillation method, as the trainer drives it.

    Attributes:
      loss: the pure loss described in the module docstring.
      student_taps: tap groups it reads from the student.
      teacher_taps: tap groups it reads from the teacher.
      views: teacher-on-student views it reads (computed by the teacher's detector).
      init: optional `init(rng, *, cfg, spec) -> pytree` of its own trainable parameters
        (adapters, generation blocks); trained with the student, never exported.
      defaults: config values the config block may override.
      same_family: the method compares heads, so teacher and student must be one family; the
        string says why, for the error message ('' for feature-level methods).
      check: optional `check(cfg, spec) -> str | None`, an error for a pair or settings the
        method cannot take (None: fine).
      maps: optional `maps(student_taps, teacher_taps, batch, *, cfg, spec) -> {name: {level:
        array}}`, what the method weighs or masks locations by, for pictures
        (`jdistill/evaluate/distill_maps.py`): per map `name` (e.g. 'richness (teacher)') and
        student level (e.g. 'p3'), an [N, H, W] float32 map on that level's grid (drawn over
        the images) or an [N, C] per-channel vector (drawn as bars). Its inputs are the loss's,
        from an evaluation batch (`batch['rng']` a fixed key), without the method's own
        parameters: a map shows what the method computes from the two detectors and the
        labels, not what it has learnt.
    """

    loss: Callable
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    views: tuple[str, ...] = ()
    init: Callable | None = None
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    same_family: str = ""
    check: Callable | None = None
    maps: Callable | None = None


def paired_levels(spec, strides=None):
    """Student and teacher levels paired by stride: [(index, student level, teacher level,
    stride)], in the student's order, over the strides both have (or the `strides` given).

    Index i is the pair's position, the one adapters are keyed by. A Faster R-CNN teacher's
    P3..P6 pair with a RetinaNet student's P3..P6 this way; same-family pairs pair every level.
    """
    teacher = dict(zip(spec.teacher.strides, spec.teacher.levels, strict=True))
    pairs = []
    for lvl, stride in zip(spec.student.levels, spec.student.strides, strict=True):
        if stride in teacher and (strides is None or stride in strides):
            pairs.append((len(pairs), lvl, teacher[stride], stride))
    return pairs


def selected_levels(cfg, spec, candidates=None):
    """The level pairs a method distils: [(index, student level, teacher level, stride)].

    `cfg.levels` (student strides) keeps exactly those pairs; without it (empty, None or
    absent) the first `cfg.max_levels` pairs are kept (0, None or absent: all). Configs use ()
    and 0, which the command line can override (it cannot set a key whose value is None).
    `candidates` are the pairs to choose from, (index, student level, teacher level, student
    stride, ...) as `paired_levels` gives them (the default), any further fields kept. Index i
    is the pair's position in the returned list, the one adapters and params are keyed by
    (`level_{i}`).
    """
    pairs = paired_levels(spec) if candidates is None else candidates
    levels = cfg.get("levels")
    if levels:
        pairs = [p for p in pairs if p[3] in tuple(levels)]
    elif cfg.get("max_levels"):
        pairs = pairs[: cfg.get("max_levels")]
    return [(i, *p[1:]) for i, p in enumerate(pairs)]


def check_levels(cfg, spec, candidates=None):
    """An error string for a level selection `selected_levels` cannot honour, else None: no
    stride in common, `cfg.levels` naming strides that are not paired, or nothing selected."""
    pairs = paired_levels(spec) if candidates is None else candidates
    if not pairs:
        return (
            f"no FPN strides in common (student {spec.student.strides}, teacher "
            f"{spec.teacher.strides})"
        )
    paired = [p[3] for p in pairs]
    missing = [x for x in cfg.get("levels") or () if x not in paired]
    if missing:
        return f"levels {missing} are not student strides paired with the teacher ({paired})"
    if not selected_levels(cfg, spec, candidates):
        return "no level pair selected"
    return None


def init_levels(rng, cfg, spec, init_level):
    """{'level_{i}': init_level(key_i)} over the pairs of `selected_levels(cfg, spec)`, one key
    per pair split off `rng` in pair order: a method's per-level trainable parameters."""
    pairs = selected_levels(cfg, spec)
    keys = jax.random.split(rng, len(pairs))
    return {f"level_{i}": init_level(key) for (i, *_), key in zip(pairs, keys, strict=True)}


def pixel_valid(pad_shape, feat_hw, stride):
    """[N, H, W] float mask of cells inside ceil(pad_shape / stride). pad_shape: [N, 2]."""
    h, w = feat_hw
    vh = (pad_shape[:, 0] + stride - 1) // stride
    vw = (pad_shape[:, 1] + stride - 1) // stride
    ys = jnp.arange(h)[None, :, None] < vh[:, None, None]
    xs = jnp.arange(w)[None, None, :] < vw[:, None, None]
    return (ys & xs).astype(jnp.float32)


def level_valid(batch, feat_hw, stride, cfg):
    """[N, H, W] float: cells inside each real image's padded size, or all ones with
    `cfg.count_padding` (the originals' behaviour: they see their batch padding as image)."""
    n = batch["pad_shape"].shape[0]
    if cfg.get("count_padding", False):
        return jnp.ones((n, *feat_hw), jnp.float32)
    return pixel_valid(batch["pad_shape"], feat_hw, stride)


def check_settings(cfg):
    """An error string for the shared settings a method's block may carry, else None:
    `group_size` (images per normalisation group) >= 0 and a temperature `tau` > 0."""
    if cfg.get("group_size", 0) < 0:
        return f"group_size must be >= 0, not {cfg.get('group_size')}"
    if cfg.get("tau", 1.0) <= 0:
        return f"tau must be > 0, not {cfg.get('tau')}"
    return None
