"""Times the compiled train step of a config on synthetic input at its real resolution.

  python scripts/benchmark.py --config=configs/frs_retinanet.py [--batch_size=2] [--steps=10]
      [--peak_tflops=989]   # e.g. H100 dense bf16; utilisation = achieved / peak

Reports step time, images/s, compile time, XLA's FLOP estimate per step and, given
--peak_tflops, the utilisation. Runs on whatever devices exist (the batch is sharded over all
of them), so the same command serves a CPU, a GPU box or a TPU slice. The teacher (if any) is
randomly initialised: speed does not depend on its weights.
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jdistill import parallel, train
from jdistill.models import detector as detector_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0: the config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after one warm-up step.")
_CLASSES = flags.DEFINE_integer("num_classes", 80, "Classes of the synthetic task.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device, for utilisation.")
flags.mark_flags_as_required(["config"])


def synthetic_batch(batch, canvas, max_boxes, num_classes, seed=0):
    """A batch shaped like the pipeline's: full-canvas images with a few random boxes each."""
    rng = np.random.default_rng(seed)
    h, w = canvas
    xy = rng.uniform(0, 0.7, (batch, max_boxes, 2)) * [w, h]
    wh = rng.uniform(0.05, 0.3, (batch, max_boxes, 2)) * [w, h]
    n = max(1, max_boxes // 10)
    valid = np.zeros((batch, max_boxes), bool)
    valid[:, :n] = True
    return {
        "image": rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8),
        "boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
        "labels": rng.integers(0, num_classes, (batch, max_boxes)).astype(np.int32),
        "box_valid": valid,
        "img_shape": np.tile(np.array([h, w], np.int32), (batch, 1)),
        "pad_shape": np.tile(np.array([h, w], np.int32), (batch, 1)),
        "scale_factor": np.ones((batch, 2), np.float32),
        "image_valid": np.ones(batch, bool),
        "image_id": np.arange(batch, dtype=np.int32),
    }


def main(argv):
    del argv
    config = _CONFIG.value
    batch_size = _BATCH.value or config.batch_size
    canvas = tuple(config.data.canvases[0])
    mesh = parallel.make_mesh()
    student = detector_lib.build(config.model, _CLASSES.value)
    teacher = teacher_vars = None
    if train.distill_losses(config):
        teacher = detector_lib.build(config.teacher.model, _CLASSES.value)
        teacher_vars = jax.device_put(
            train.init_variables(teacher, canvas, 1), parallel.replicated(mesh)
        )
    schedule, _ = train.lr_schedule(config.optimizer, config.schedule, 1000)
    tx_builder = lambda p: train.make_optimizer(config.optimizer, config.model, p, schedule)  # noqa: E731
    teacher_neck = config.teacher.model.neck_channels if teacher is not None else 0
    state, tx = train.init_state(config, student, teacher_neck, canvas, tx_builder)
    state_sh = parallel.param_shardings(state, mesh, config.param_sharding)
    state = jax.device_put(state, state_sh)
    local = synthetic_batch(batch_size, canvas, config.data.max_boxes, _CLASSES.value)
    batch = parallel.global_batch({k: local[k] for k in train.DEVICE_KEYS}, mesh)
    step = jax.jit(
        train.make_train_step(config, student, teacher, tx, schedule),
        in_shardings=(state_sh, parallel.replicated(mesh), parallel.batch_sharding(mesh)),
        out_shardings=(state_sh, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, teacher_vars, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    state, metrics = compiled(state, teacher_vars, batch)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
        state, metrics = compiled(state, teacher_vars, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / _STEPS.value
    n_dev = jax.device_count()
    rows = [
        ("config", config_flags.get_config_filename(flags.FLAGS["config"])),
        ("devices", f"{n_dev} x {jax.devices()[0].device_kind}"),
        ("canvas (H x W)", f"{canvas[0]} x {canvas[1]}"),
        ("global batch", f"{batch_size}"),
        ("compile time", f"{compile_s:.1f} s"),
        ("step time", f"{1000 * step_s:.1f} ms"),
        ("images/s", f"{batch_size / step_s:.2f}"),
        ("XLA FLOPs/step", f"{flops / 1e12:.3f} TFLOP"),
        ("achieved", f"{flops / step_s / 1e12:.3f} TFLOP/s"),
        ("loss (sanity)", f"{float(metrics['loss']):.4f}"),
    ]
    if _PEAK.value > 0:
        util = flops / step_s / 1e12 / (_PEAK.value * n_dev)
        rows.append(("utilisation", f"{100 * util:.1f} % of {_PEAK.value} TFLOP/s x {n_dev}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    app.run(main)
