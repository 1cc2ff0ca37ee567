"""Shared test setup: float32 CPU JAX, a per-session tfds data dir, and the shared data path."""

import os
import pathlib

import pytest

# One persistent XLA compilation cache for the whole suite, its xdist workers and the CLI
# subprocesses they start (they inherit the environment): a run that resumes, a re-run after a
# signal and the same detector in another test load their programs instead of compiling them.
# Set before any test module imports jax; entries are keyed by program, options and jax version.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.environ.get("TMPDIR", "/tmp"), f"jdistill-test-xla-cache-{os.getuid()}"),
)

# The small real data sets live beside the project, never inside it.
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def tfds_data_dir(tmp_path_factory):
    """Prepared data sets go to a temporary dir for the whole session (one per xdist worker)."""
    path = os.environ.get("JDISTILL_TEST_TFDS_DIR") or str(tmp_path_factory.mktemp("tfds"))
    os.environ["TFDS_DATA_DIR"] = path
    return path


def shared_data(name):
    """Path of a shared data set, or skip the test with a message saying where it was looked for."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the shared data sets sit beside the project checkout")
    return path


def load_config(name, arg=None):
    """`configs/<name>.py`'s get_config(arg), as the CLI would load it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def cli_env(**extra):
    """Environment for a `python -m jdistill.main` subprocess."""
    env = dict(os.environ)
    env.update(extra)
    return env


def crafted_batch(per_image, num_classes, seed=0, canvas=(64, 96)):
    """A training batch from per-image box lists (padded to the longest; random labels).

    Returns (batch dict of jnp arrays, boxes [B, G, 4] np, labels [B, G] np, valid [B, G] np).
    """
    import jax.numpy as jnp
    import numpy as np

    b, g = len(per_image), max(len(x) for x in per_image)
    boxes = np.zeros((b, g, 4), np.float32)
    valid = np.zeros((b, g), bool)
    labels = np.random.default_rng(seed).integers(0, num_classes, (b, g)).astype(np.int32)
    for i, bx in enumerate(per_image):
        if bx:
            boxes[i, : len(bx)] = bx
            valid[i, : len(bx)] = True
    batch = {
        "boxes": jnp.asarray(boxes),
        "labels": jnp.asarray(labels),
        "box_valid": jnp.asarray(valid),
        "pad_shape": jnp.tile(jnp.array(canvas), (b, 1)),
        "image_valid": jnp.ones(b, bool),
    }
    return batch, boxes, labels, valid


def spec_pair(levels=("p3",), strides=(8,), *, channels=1, num_classes=1, anchors=None):
    """An `api.Pair` of two same-family specs with these levels, for calling losses directly."""
    from jdistill.distill import api

    spec = api.DetectorSpec(
        family="retinanet",
        levels=tuple(levels),
        strides=tuple(strides),
        channels=channels,
        num_classes=num_classes,
        num_anchors=1,
        anchors=anchors or {},
        reg_max=0,
        provides=("neck", "head/cls_logits"),
        loss_taps=(),
        views=(),
    )
    return api.Pair(spec, spec)
