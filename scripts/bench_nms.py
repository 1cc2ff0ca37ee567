"""Times greedy vs tiled NMS (`jdistill.ops.nms`) at the sizes the detectors use.

  python scripts/bench_nms.py [--repeats=5] [--tile_sizes=128,256,512] [--cases=rpn_level,...]

Each case is one `batched_nms` call per image, vmapped over the batch and jitted, as the models
call it; the boxes are synthetic but clustered like real proposals (most candidates pile up on a
few objects, which is what makes suppression chains long). Compilation and one warm-up run are
excluded; the table gives the median of --repeats runs, and checks that every method returns
the same indices and valid flags as greedy.

Cases (batch x candidates -> kept, IoU threshold):
  rpn_level  8 x 2000 -> 1000 @ 0.7: one FPN level of Faster R-CNN training proposals.
  rpn_all    8 x 8819 -> 1000 @ 0.7: what `rpn.rpn_proposals` runs, the five levels of a
             1344 x 800 canvas (2000 + 2000 + 2000 + 2000 + 819 anchors) in one call with level
             offsets.
  rpn_crowd  as rpn_all, all candidates packed tightly on 20 objects per level: fewer than
             1000 survive, so the tiled walk cannot stop early (its worst case).
  test_1k    8 x 1000 -> 100 @ 0.5, 80 classes: test-time NMS of one level's top pairs.
  test_dense 8 x 5000 -> 100 @ 0.6, 80 classes, half of them below the score threshold (-inf):
             dense-head test time, five levels of 1000 pairs.
  test_rcnn  8 x 80000 -> 100 @ 0.5, 80 classes, 2% of pairs above the score threshold:
             Faster R-CNN's test (1000 proposals x 80 classes, test_nms_pre=-1).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jdistill.ops import nms

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per method and case (median shown).")
_TILES = flags.DEFINE_list("tile_sizes", ["256"], "Tile sizes of the tiled method.")
_CASES = flags.DEFINE_list(
    "cases",
    ["rpn_level", "rpn_all", "rpn_crowd", "test_1k", "test_dense", "test_rcnn"],
    "Cases to run.",
)
_BATCH = flags.DEFINE_integer("batch", 8, "Images per call.")

CANVAS = (800, 1344)  # (h, w)
FPN = ([2000, 2000, 2000, 2000, 819], [32, 64, 128, 256, 512])
# name: (candidates per level, anchor size per level, kept, IoU threshold, classes,
#        fraction of candidates above the score threshold, fraction of boxes off the objects,
#        spread of the boxes around their objects)
CASES = {
    "rpn_level": ([2000], [32], 1000, 0.7, 1, 1.0, 0.3, 1.0),
    "rpn_all": (*FPN, 1000, 0.7, 1, 1.0, 0.3, 1.0),
    "rpn_crowd": (*FPN, 1000, 0.7, 1, 1.0, 0.0, 0.25),
    "test_1k": ([1000], [96], 100, 0.5, 80, 1.0, 0.3, 1.0),
    "test_dense": ([1000] * 5, [32, 64, 128, 256, 512], 100, 0.6, 80, 0.5, 0.3, 1.0),
    "test_rcnn": ([80000], [96], 100, 0.5, 80, 0.02, 0.3, 1.0),
}


def clustered_boxes(rng, n, size, num_objects=20, background=0.3, spread=1.0):
    """[n, 4] boxes of about `size` pixels: most jittered around a few objects (by `spread`
    times 15% of their size in position, 20% in scale), a `background` fraction anywhere."""
    h, w = CANVAS
    obj_c = rng.uniform([0, 0], [w, h], (num_objects, 2))
    obj_wh = size * np.exp(rng.normal(0.0, 0.5, (num_objects, 2)))
    which = rng.integers(0, num_objects, n)
    c = obj_c[which] + rng.normal(0.0, 0.15 * spread, (n, 2)) * obj_wh[which]
    wh = obj_wh[which] * np.exp(rng.normal(0.0, 0.2 * spread, (n, 2)))
    anywhere = rng.uniform(size=n) < background
    c[anywhere] = rng.uniform([0, 0], [w, h], (anywhere.sum(), 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], 1)
    return np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)


def make_case(rng, batch, sizes, anchor_sizes, num_classes, kept_fraction, background, spread):
    """boxes [B, N, 4], scores [B, N] (-inf for candidates below the threshold), ids [B, N]."""
    boxes, scores, ids = [], [], []
    for _ in range(batch):
        b = [
            clustered_boxes(rng, n, a, background=background, spread=spread)
            for n, a in zip(sizes, anchor_sizes, strict=True)
        ]
        s = rng.uniform(size=sum(sizes)).astype(np.float32)
        s[rng.uniform(size=s.shape) >= kept_fraction] = -np.inf
        if num_classes > 1:
            g = rng.integers(0, num_classes, s.shape)
        else:  # RPN: the group is the level
            g = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
        boxes.append(np.concatenate(b))
        scores.append(s)
        ids.append(g.astype(np.int32))
    return jnp.asarray(np.stack(boxes)), jnp.asarray(np.stack(scores)), jnp.asarray(np.stack(ids))


def timed(fn, args, repeats):
    """Median wall time of fn(*args) in ms, after one warm-up run; and the warm-up's result."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), out


def method_fn(method, tile_size, iou_threshold, max_output):
    """The jitted, vmapped batched NMS of one method."""

    def one(boxes, scores, ids):
        boxes = boxes + (ids.astype(boxes.dtype) * (CANVAS[1] + 1.0))[:, None]  # batched_nms
        if method == "greedy":
            return nms.greedy_nms(boxes, scores, iou_threshold=iou_threshold, max_output=max_output)
        return nms.tiled_nms(
            boxes, scores, iou_threshold=iou_threshold, max_output=max_output, tile_size=tile_size
        )

    return jax.jit(jax.vmap(one))


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    methods = [("greedy", 0)] + [("tiled", int(t)) for t in _TILES.value]
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), batch {_BATCH.value}")
    header = f"{'case':<11} {'N -> K @ thr':<19}" + "".join(
        f"{m if m == 'greedy' else f'tiled/{t}':>12}" for m, t in methods
    )
    print(header + f"{'kept':>7}")
    for name in _CASES.value:
        sizes, anchor_sizes, k, thr, num_classes, *rest = CASES[name]
        args = make_case(rng, _BATCH.value, sizes, anchor_sizes, num_classes, *rest)
        row = f"{name:<11} {f'{sum(sizes)} -> {k} @ {thr}':<19}"
        ref = None
        for method, tile in methods:
            ms, (idx, valid) = timed(method_fn(method, tile, thr, k), args, _REPEATS.value)
            if ref is None:
                ref = (np.asarray(idx), np.asarray(valid))
            elif not (np.array_equal(ref[0], idx) and np.array_equal(ref[1], valid)):
                raise SystemExit(f"{name}: {method}/{tile} differs from greedy")
            row += f"{ms:>10.1f}ms"
        print(row + f"{ref[1].sum(1).mean():>7.0f}", flush=True)


if __name__ == "__main__":
    app.run(main)
