"""Distillation losses by name, for configs.

A loss is a pure function `fn(student_taps, teacher_taps, targets, adapter_params, *, cfg)
-> (scalar, metrics)`. `adapter` says whether the loss owns student-side adapters
(`cfg.adapter` names the kind); `teacher_taps` lists the teacher taps it reads, so the trainer
knows which parts of the teacher it needs.
"""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from jdistill.distill import defeat, frs


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    fn: Callable
    uses_adapter: bool
    teacher_taps: tuple[str, ...]
    # The loss reads the teacher's RoI head on the student's sampled RoIs (`roi/cls_logits` in
    # the teacher taps); the trainer computes it when any configured loss asks.
    teacher_roi_head: bool = False


LOSSES = {
    "frs_feat": DistillLoss(frs.frs_feat, True, ("neck", "head/cls_logits")),
    "frs_cls": DistillLoss(frs.frs_cls, False, ("head/cls_logits",)),
    "defeat_neck": DistillLoss(defeat.defeat_neck, True, ("neck",)),
    "defeat_roi_kd": DistillLoss(defeat.defeat_roi_kd, False, ("neck",), teacher_roi_head=True),
    "defeat_dense_kd": DistillLoss(defeat.defeat_dense_kd, False, ("head/cls_logits",)),
}


def get(name):
    """The `DistillLoss` registered as `name`; a clear error listing the known names."""
    if name not in LOSSES:
        raise KeyError(f"unknown distillation loss {name!r}; registered: {sorted(LOSSES)}")
    return LOSSES[name]


def warmup_factor(step, warmup_steps):
    """w(step) = min(1, step / warmup_steps), 1 when warmup_steps <= 0. step: int32 scalar."""
    if warmup_steps <= 0:
        return jnp.float32(1.0)
    return jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


DECAYS = ("none", "linear", "cos")


def decay_factor(step, total_steps, kind, stages=4):
    """DeFeat's `kd_decay`, made an explicit option: constant per stage e of `stages` equal parts
    of training (the reference's 4 runner epochs): 'linear' 1 - e / E, 'cos' 0.5 cos(pi e / E) +
    0.5, 'none' 1. step: int32 scalar."""
    if kind not in DECAYS:
        raise ValueError(f"distill.decay={kind!r}: use one of {DECAYS}")
    if kind == "none" or not total_steps:
        return jnp.float32(1.0)
    e = jnp.floor(step.astype(jnp.float32) * stages / total_steps)
    if kind == "linear":
        return 1.0 - e / stages
    return 0.5 * jnp.cos(jnp.pi * e / stages) + 0.5
