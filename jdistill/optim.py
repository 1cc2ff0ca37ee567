"""mmdetection's optimizer and learning-rate schedule as optax: SGD with momentum and decoupled
weight decay applied as torch does, frozen parameters, bias multipliers, gradient clipping, and
linear or constant warm-up followed by step decay.
"""

import re

import jax
import jax.numpy as jnp
import optax

from jdistill.models import resnet as resnet_lib


def lr_schedule(opt_cfg, sched_cfg, steps_per_epoch):
    """mmdetection's warm-up + step LR as an optax schedule of the global iteration index.

    Returns (schedule fn, total steps). Linear warm-up: base * (1 - (1 - i / W) * (1 - ratio));
    constant: base * ratio; then base * 0.1^k with k = milestones passed (in epochs, or scaled
    to `num_steps` when that overrides the epoch count).
    """
    base = opt_cfg.lr
    if sched_cfg.num_steps > 0:
        total = int(sched_cfg.num_steps)
        milestones = [round(m / sched_cfg.epochs * total) for m in sched_cfg.milestones]
    else:
        total = int(sched_cfg.epochs * steps_per_epoch)
        milestones = [int(m * steps_per_epoch) for m in sched_cfg.milestones]
    warm = int(sched_cfg.warmup_steps)
    ratio = float(sched_cfg.warmup_ratio)
    kind = sched_cfg.warmup
    if kind not in ("linear", "constant", "none"):
        raise ValueError(f"schedule.warmup={kind!r}: use 'linear', 'constant' or 'none'")

    def schedule(i):
        i = jnp.asarray(i, jnp.float32)
        k = sum((i >= m).astype(jnp.float32) for m in milestones) if milestones else 0.0
        lr = base * 0.1**k
        if kind == "linear" and warm > 0:
            # = 1 - (1 - i / W) * (1 - ratio), mmcv's form, rearranged to keep float32 precision
            lr = jnp.where(i < warm, lr * (ratio + (1 - ratio) * i / warm), lr)
        elif kind == "constant" and warm > 0:
            lr = jnp.where(i < warm, lr * ratio, lr)
        return lr

    return schedule, total


def trainable_labels(params, model_cfg, opt_cfg=None):
    """Per param: 'frozen' (frozen stages, frozen BN: no update at all), 'bias' (a conv or
    linear bias, which mmcv's paramwise_cfg treats apart) or 'train'."""
    frozen = resnet_lib.frozen_prefixes(model_cfg.frozen_stages)
    split_bias = opt_cfg is not None and (
        opt_cfg.get("bias_lr_mult", 1.0) != 1.0 or opt_cfg.get("bias_decay_mult", 1.0) != 1.0
    )

    def label(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[0] == "student" and len(names) > 2 and names[1] == "backbone":
            if any(names[2] == f or (f.endswith("_") and names[2].startswith(f)) for f in frozen):
                return "frozen"
        is_norm = any(re.match(r"(bn\d*|downsample_bn|gn)$", n) for n in names)
        if not model_cfg.norm_trainable and is_norm and names[1] == "backbone":
            return "frozen"
        if split_bias and names[-1] == "bias" and not is_norm:
            return "bias"  # norm layers keep lr x1 and decay x1 (norm_decay_mult defaults to 1)
        return "train"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(opt_cfg, model_cfg, params, schedule):
    """SGD as mmdetection/torch: [clip] -> + wd * p -> momentum trace -> * -lr.

    Frozen params get no update; with bias_lr_mult / bias_decay_mult (FCOS: 2 and 0) conv
    biases get their own lr and weight decay. Clipping is over all gradients, before decay.
    """

    def sgd(lr_mult, decay_mult):
        lr = schedule if lr_mult == 1.0 else (lambda i: lr_mult * schedule(i))
        return optax.chain(
            optax.add_decayed_weights(opt_cfg.weight_decay * decay_mult),
            optax.trace(decay=opt_cfg.momentum, nesterov=False),
            optax.scale_by_learning_rate(lr),
        )

    labels = trainable_labels(params, model_cfg, opt_cfg)
    tx = optax.multi_transform(
        {
            "train": sgd(1.0, 1.0),
            "bias": sgd(opt_cfg.get("bias_lr_mult", 1.0), opt_cfg.get("bias_decay_mult", 1.0)),
            "frozen": optax.set_to_zero(),
        },
        labels,
    )
    if opt_cfg.grad_clip > 0:
        # Frozen params have requires_grad=False in the reference: not part of the clip norm.
        frozen = jax.tree_util.tree_map(lambda lab: lab == "frozen", labels)
        tx = optax.chain(
            optax.masked(optax.set_to_zero(), frozen),
            optax.clip_by_global_norm(opt_cfg.grad_clip),
            tx,
        )
    return tx
