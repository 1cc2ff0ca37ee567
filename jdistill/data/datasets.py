"""The one way into the data: `open(config)` gives the splits, the sampler and the class list a
run needs, and `device_batch` turns a host batch into the device's global arrays.

Training, evaluation, prediction, the benchmark and the multi-device check all go through here,
so the split loading, the eval subset and the host/device split of a batch are written once.
"""

import dataclasses

import jax
import numpy as np
from absl import logging

from jdistill import parallel
from jdistill.data import pipeline, sources

# Batch entries the device needs; the rest (orig_shape, dropped_boxes, file names) stay on the
# host.
DEVICE_KEYS = (
    "image",
    "boxes",
    "labels",
    "box_valid",
    "img_shape",
    "pad_shape",
    "scale_factor",
    "image_valid",
    "image_id",
)


@dataclasses.dataclass(frozen=True)
class Data:
    """A config's data: the training split (None when not asked for), the evaluated part of the
    eval split (its first `config.eval_max_images`), the training sampler and the classes."""

    train: sources.Split | None
    eval: sources.Split
    sampler: pipeline.TrainSampler | None
    class_names: tuple
    category_ids: tuple

    @property
    def num_classes(self):
        return len(self.class_names)


def open(config, *, train=True):  # noqa: A001 (the package's entry point: `data.open`)
    """Loads (preparing on first use) the config's splits.

    Args:
      config: a run's config (`data`, `batch_size`, `seed`, `eval_max_images`).
      train: also the training split and its sampler; the classes then come from it, as a run
        records them (else from the eval split).
    Returns:
      `Data`.
    """
    train_split = sources.load_split(config.data, config.data.train_split) if train else None
    eval_split = sources.load_split(config.data, config.data.eval_split).head(
        config.eval_max_images
    )
    sampler = None
    classes = eval_split
    if train:
        sampler = pipeline.TrainSampler(train_split, config.data, config.batch_size, config.seed)
        classes = train_split
        logging.info(
            "data: %d training images (%d steps/epoch of %d), %d eval images, %d classes",
            sampler.num_images,
            sampler.steps_per_epoch,
            config.batch_size,
            len(eval_split),
            len(train_split.class_names),
        )
    return Data(
        train=train_split,
        eval=eval_split,
        sampler=sampler,
        class_names=tuple(classes.class_names),
        category_ids=tuple(classes.category_ids),
    )


def device_part(local_batch):
    """The entries of a host batch that go to the device: dict of [B_local, ...] arrays."""
    return {k: local_batch[k] for k in DEVICE_KEYS}


def abstract_batch(batch_size, canvas, max_boxes, mesh):
    """What `device_batch` gives for a global batch of `batch_size` images on `canvas` (H, W)
    with `max_boxes` box slots, as `jax.ShapeDtypeStruct`s sharded over the mesh's `data` axis:
    for compiling a step without data (`scripts/aot_compile.py`). Shapes and dtypes are
    `pipeline.process_example`'s, stacked."""
    h, w = canvas
    shapes = {
        "image": ((h, w, 3), np.uint8),
        "boxes": ((max_boxes, 4), np.float32),
        "labels": ((max_boxes,), np.int32),
        "box_valid": ((max_boxes,), np.bool_),
        "img_shape": ((2,), np.int32),
        "pad_shape": ((2,), np.int32),
        "scale_factor": ((2,), np.float32),
        "image_valid": ((), np.bool_),
        "image_id": ((), np.int32),
    }
    sharding = parallel.batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=sharding)
        for k, (shape, dtype) in shapes.items()
    }


def device_batch(local_batch, mesh):
    """This host's batch -> the device entries as global arrays sharded over the mesh's `data`
    axis: dict of [B_global, ...] jax.Array."""
    return parallel.global_batch(device_part(local_batch), mesh)
