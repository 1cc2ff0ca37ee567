"""Writes scalars to `workdir/metrics.jsonl` and TensorBoard event files (process 0 only)."""

import json
import os

import jax


class MetricWriter:
    """Appends one JSON line per write and mirrors every scalar to TensorBoard.

    Args:
      workdir: run directory; lines go to `metrics.jsonl`, events to `tensorboard/`.
      tensorboard: also write TensorBoard events (needs tensorflow, already a tfds dependency).
    """

    def __init__(self, workdir, tensorboard=True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active and tensorboard:
            import tensorflow as tf  # noqa: PLC0415 (heavy; only the writing process needs it)

            self._tf = tf
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step, scalars):
        """Writes {name: float} at `step`."""
        if not self.active:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            with self._tb.as_default(step=int(step)):
                for k, v in scalars.items():
                    self._tf.summary.scalar(k, float(v))
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()
