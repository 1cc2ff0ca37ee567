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
from helpers.paths import load_config  # noqa: E402

from jdistill import experiment, parallel  # noqa: E402
from jdistill.data import datasets, pipeline, sources  # noqa: E402


def one_step(config, mesh, local_batch, split_classes):
    canvas = local_batch["image"].shape[1:3]
    # The runlocal configs name no teacher checkpoint: setup draws the same random teacher on
    # either mesh (from the config's seed).
    exp = experiment.setup(
        config, mesh, num_classes=split_classes, canvas=canvas, steps_per_epoch=100
    )
    state = exp.state
    batch = parallel.global_batch(local_batch, mesh)
    # two steps: the second runs past the distillation warm-up's zero
    for _ in range(2):
        state, metrics = exp.train_step(state, exp.teacher_vars, batch)
    return jax.device_get(state["params"]), jax.device_get(metrics)


def main():
    name, _, arg = sys.argv[1].partition(":")
    config = load_config(name, ",".join(filter(None, [arg, "runlocal"])))
    assert jax.device_count() == 8, jax.devices()
    split = sources.load_split(config.data, "train")
    sampler = pipeline.TrainSampler(split, config.data, config.batch_size, config.seed)
    local = next(iter(pipeline.train_dataset(split, sampler, config.data, seed=0, num_steps=1)))
    local = datasets.device_part(local)
    k = len(split.class_names)
    p1, m1 = one_step(config, parallel.make_mesh(jax.devices()[:1]), local, k)
    p8, m8 = one_step(config, parallel.make_mesh(jax.devices()), local, k)
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
