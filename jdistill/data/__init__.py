"""Data sets, their preparation and the input pipeline. `open(config)` is the entry point."""


def open(config, *, train=True):  # noqa: A001 (`data.open(config)`, as a file is opened)
    """`datasets.open`: imported on call, so that importing a submodule (decode, transforms)
    does not import TensorFlow and tfds."""
    from jdistill.data import datasets  # noqa: PLC0415

    return datasets.open(config, train=train)
