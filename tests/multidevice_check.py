"""Run in a subprocess with 8 simulated CPU devices: one train step of a config on a 1-device
mesh and on an 8-device mesh must give the same loss and the same updated parameters.

Prints one JSON line: {"loss_1": ..., "loss_8": ..., "max_param_diff": ..., ...}.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import load_config  # noqa: E402

from jdistill import parallel, train  # noqa: E402
from jdistill.data import pipeline  # noqa: E402
from jdistill.models import detector as detector_lib  # noqa: E402


def one_step(config, mesh, local_batch, teacher_vars_host, split_classes):
    canvas = local_batch["image"].shape[1:3]
    student = detector_lib.build(config.model, split_classes)
    teacher = None
    if train.distill_losses(config):
        teacher = detector_lib.build(config.teacher.model, split_classes)
    schedule, _ = train.lr_schedule(config.optimizer, config.schedule, 100)
    tx_builder = lambda p: train.make_optimizer(config.optimizer, config.model, p, schedule)  # noqa: E731
    t_neck = config.teacher.model.neck_channels if teacher is not None else 0
    state, tx = train.init_state(config, student, t_neck, canvas, tx_builder)
    state_sh = parallel.param_shardings(state, mesh)
    state = jax.device_put(state, state_sh)
    t_vars = jax.device_put(teacher_vars_host, parallel.replicated(mesh))
    step = jax.jit(
        train.make_train_step(config, student, teacher, tx, schedule),
        in_shardings=(state_sh, parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(state_sh, parallel.replicated(mesh)),
    )
    batch = parallel.global_batch(local_batch, mesh)
    # two steps: the second runs past the distillation warm-up's zero
    for _ in range(2):
        state, metrics = step(state, t_vars, batch)
    return jax.device_get(state["params"]), jax.device_get(metrics)


def main():
    name, _, arg = sys.argv[1].partition(":")
    config = load_config(name, ",".join(filter(None, [arg, "runlocal"])))
    assert jax.device_count() == 8, jax.devices()
    split = pipeline.load_split(config.data, "train")
    sampler = pipeline.TrainSampler(split, config.data, config.batch_size, config.seed)
    local = next(iter(pipeline.train_dataset(split, sampler, config.data, seed=0, num_steps=1)))
    local = {k: local[k] for k in train.DEVICE_KEYS}
    teacher_vars = None
    if train.distill_losses(config):
        teacher = detector_lib.build(config.teacher.model, len(split.class_names))
        teacher_vars = jax.device_get(train.init_variables(teacher, local["image"].shape[1:3], 7))
    k = len(split.class_names)
    p1, m1 = one_step(config, parallel.make_mesh(jax.devices()[:1]), local, teacher_vars, k)
    p8, m8 = one_step(config, parallel.make_mesh(jax.devices()), local, teacher_vars, k)
    diffs = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), p1, p8)
    )
    print(
        json.dumps(
            {
                "loss_1": float(m1["loss"]),
                "loss_8": float(m8["loss"]),
                "grad_norm_1": float(m1["grad_norm"]),
                "grad_norm_8": float(m8["grad_norm"]),
                "metrics_1": {k: float(v) for k, v in m1.items()},
                "metrics_8": {k: float(v) for k, v in m8.items()},
                "max_param_diff": max(diffs),
            }
        )
    )


if __name__ == "__main__":
    main()
