"""Writes scalars to `workdir/metrics.jsonl` and TensorBoard event files (process 0 only).

A resumed run calls `rewind(step)` first: a run killed after its last checkpoint wrote rows and
events for steps it trains again, and they would otherwise show twice.
"""

import json
import os
import time

import jax
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.summary.writer import event_file_writer

from jdistill import paths


class MetricWriter:
    """Appends one JSON line per write and mirrors every scalar to TensorBoard.

    The events are written with the tensorboard package's own writer (the same scalar summaries
    as `tf.summary.scalar`) because it can also write the raw `SessionLog` event `rewind` needs,
    which `tf.summary` has no API for.

    Args:
      workdir: run directory; lines go to `metrics.jsonl`, events to `tensorboard/`.
      tensorboard: also write TensorBoard events.
    """

    def __init__(self, workdir, tensorboard=True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active and tensorboard:
            self._tb = event_file_writer.EventFileWriter(os.path.join(workdir, "tensorboard"))

    def rewind(self, step):
        """Forgets what earlier runs wrote after `step`: the run goes on from there.

        metrics.jsonl keeps its rows with step <= `step`, rewritten atomically (a kill never
        leaves it half written); a line a kill cut short is dropped. TensorBoard gets a
        SessionLog START event at step + 1, on which it purges every event of step >= step + 1
        it read from the earlier files (its default `--purge_orphaned_data`). A fresh run passes
        step=-1 and so drops everything a run killed before its first checkpoint wrote.

        Returns:
          the kept rows (dicts), in order. Every process reads them; only process 0 writes.
        """
        kept = [r for r in read_rows(self.path) if r["step"] <= step]
        if self.active and paths.path(self.path).exists():
            paths.write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        if self._tb is not None:
            # TensorBoard takes the first START of a run directory for the start of its first
            # session and purges on the later ones. Every session writes one here, so a second
            # one is only needed for a directory whose earlier sessions wrote none (written
            # before this writer did this); a purge that finds nothing to drop is harmless.
            start = event_pb2.Event(
                wall_time=time.time(),
                step=step + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
            )
            for _ in range(2):
                self._tb.add_event(start)
            self._tb.flush()
        return kept

    def write(self, step, scalars):
        """Writes {name: float} at `step`."""
        if not self.active:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with paths.path(self.path).open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            now = time.time()
            for k, v in scalars.items():
                summary = scalar_summary.scalar_pb(k, float(v))
                self._tb.add_event(event_pb2.Event(wall_time=now, step=int(step), summary=summary))
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_rows(path):
    """The rows of a metrics.jsonl (none when it is absent), skipping a line cut short."""
    if not paths.path(path).exists():
        return []
    rows = []
    with paths.path(path).open() as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run killed while writing it
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows
