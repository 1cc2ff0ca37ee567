"""Fixed-size NMS (greedy reference and an exact tiled version) and mmdetection's post-processing.

Greedy NMS keeps boxes in descending score order and drops every later box whose IoU with a
kept one is > iou_threshold (strictly, as mmcv's kernel). Keeping at most `max_output` boxes, the
kept set is exactly the first `max_output` picks of full greedy NMS.

Two implementations with bit-identical outputs (indices and valid flags):

- `greedy_nms`: the reference, `max_output` sequential picks over N candidates: O(K * N) work in
  K small steps, no N x N IoU matrix.
- `tiled_nms`: sort once, then walk the sorted candidates in tiles of T (the TF Model Garden /
  axlearn scheme): each tile is suppressed by the boxes already kept, then resolved within itself
  by iterating its [T, T] IoU block to a fixed point. Few large steps instead of K tiny ones, and
  it stops as soon as K boxes are kept or only padding is left.

`nms` (used by `batched_nms`, hence by every caller) picks one of them by `method`, by default
`DEFAULT_METHOD`: "tiled" on every backend. It was the faster on CPU at every size the detectors
use (scripts/bench_nms.py, batch 8: 6-13x for RPN proposals, 1.3-3x at test time), and its few
wide steps are what GPUs and TPUs want (not measured here), so the default is not per backend.
"""

import jax
import jax.numpy as jnp

from jdistill.ops import boxes as box_ops

# What `nms` runs when no method is given. Read at trace time: set it before the first jit.
DEFAULT_METHOD = "tiled"
METHODS = ("greedy", "tiled")
# On CPU 128 and 256 are within 20% of each other at every benchmarked size (512 is slower);
# 256 halves the sequential tile steps, which is what GPUs and TPUs pay for.
TILE_SIZE = 256


def greedy_nms(boxes, scores, *, iou_threshold, max_output):
    """Greedy NMS of one set of boxes, fixed size.

    Args:
      boxes: [N, 4].
      scores: [N]; candidates with score -inf are padding and never kept (a NaN score is
        argmax's first pick and stops the loop: every slot invalid).
      iou_threshold: a box is suppressed when its IoU with a kept box is > this.
      max_output: K, the number of boxes returned.
    Returns:
      indices: [K] int32 into the N candidates, in descending score order (ties: lower index
        first, as argmax), 0 in invalid slots.
      valid: [K] bool, False for slots past the last kept box.
    """
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)

    def body(i, carry):
        live, idx, valid = carry
        best = jnp.argmax(live)
        ok = live[best] > -jnp.inf
        iou = box_ops.pairwise_iou(boxes[best][None], boxes)[0]
        suppress = (iou > iou_threshold) | (jnp.arange(live.shape[0]) == best)
        live = jnp.where(ok & suppress, -jnp.inf, live)
        idx = idx.at[i].set(jnp.where(ok, best, 0))
        valid = valid.at[i].set(ok)
        return live, idx, valid

    init = (
        scores,
        jnp.zeros((max_output,), jnp.int32),
        jnp.zeros((max_output,), bool),
    )
    _, idx, valid = jax.lax.fori_loop(0, max_output, body, init)
    return idx, valid


def _pick_order(scores):
    """Greedy's pick order: descending score, ties by ascending index (argmax takes the first).

    Sorting on the pair (-score, index) needs no stable sort; lax.sort compares -0.0 equal to
    0.0, as argmax does.

    Args:
      scores: [N].
    Returns:
      [N] int32 permutation.
    """
    iota = jnp.arange(scores.shape[0], dtype=jnp.int32)
    _, order = jax.lax.sort((-scores, iota), num_keys=2)
    return order


def tiled_nms(boxes, scores, *, iou_threshold, max_output, tile_size=TILE_SIZE):
    """Greedy NMS computed tile by tile; the same outputs as `greedy_nms`, bit for bit.

    The candidates are sorted in greedy's pick order and cut into tiles of T <= tile_size
    (balanced, so N = 300 makes two tiles of 150, not 256 + 44 of padding). For each tile:
      1. drop its boxes whose IoU with a box kept by earlier tiles is > iou_threshold
         (one [T, T] IoU block per T kept boxes, only as many blocks as boxes are kept);
      2. resolve the tile against itself: greedy keeps j iff alive[j] and no box i < j of the
         tile that greedy keeps has IoU(i, j) > thr. Call the right side F(keep)[j]: it reads
         only keep[:j], so greedy's keep is F's only fixed point (induction on j), and iterating
         keep <- F(keep) from keep = alive makes positions [0, r) right after r rounds, so it
         reaches greedy's keep within T rounds and stays. The loop runs until nothing changes:
         one round more than the longest suppression chain needs, at most T + 1;
      3. append the kept boxes, in order, to a [K] buffer: the output.
    The walk stops when K boxes are kept or the next tile starts with padding, so the work is
    about (candidates walked) x (boxes kept) + (candidates walked) x T IoUs, against greedy's
    K x N.

    Args:
      boxes: [N, 4].
      scores: [N]; candidates with score -inf are padding and never kept. As in `greedy_nms`,
        a NaN score anywhere makes every slot invalid (argmax picks the NaN and stops).
      iou_threshold: a box is suppressed when its IoU with a kept box is > this.
      max_output: K, the number of boxes returned (static; may exceed N).
      tile_size: the largest tile (static).
    Returns:
      indices: [K] int32 into the N candidates, in descending score order (ties: lower index
        first), 0 in invalid slots.
      valid: [K] bool, False for slots past the last kept box.
    """
    # the outputs are indices, with no gradient: keep tangents out of the while loops (callers
    # make proposals inside the loss, under value_and_grad)
    boxes = jax.lax.stop_gradient(jnp.asarray(boxes))
    scores = jax.lax.stop_gradient(jnp.asarray(scores))
    n, k = scores.shape[0], max_output
    if k == 0 or n == 0:
        return jnp.zeros((k,), jnp.int32), jnp.zeros((k,), bool)
    num_tiles = -(-n // tile_size)
    t = -(-n // num_tiles)
    n_pad, k_pad = num_tiles * t, -(-k // t) * t

    order = _pick_order(scores)
    pad = n_pad - n
    s_sorted = jnp.pad(scores[order], (0, pad), constant_values=-jnp.inf)
    b_sorted = jnp.pad(boxes[order], ((0, pad), (0, 0)))
    order = jnp.pad(order, (0, pad))
    lane = jnp.arange(t, dtype=jnp.int32)
    earlier = lane[:, None] < lane[None, :]  # [i, j]: i comes before j in pick order

    def suppressed_by_kept(tile_boxes, alive, count, kept_boxes):
        """alive [T] minus the boxes that overlap one of the first `count` kept boxes."""

        def body(carry):
            j, alive = carry
            kb = jax.lax.dynamic_slice_in_dim(kept_boxes, j * t, t)
            filled = j * t + lane < count
            over = box_ops.pairwise_iou(kb, tile_boxes) > iou_threshold  # [kept, tile]
            return j + 1, alive & ~jnp.any(over & filled[:, None], axis=0)

        def cond(carry):
            j, alive = carry
            return (j * t < count) & jnp.any(alive)

        return jax.lax.while_loop(cond, body, (jnp.int32(0), alive))[1]

    def resolve_tile(tile_boxes, alive):
        """Greedy within one tile: the fixed point of keep -> alive & ~(kept earlier overlap)."""
        over = (box_ops.pairwise_iou(tile_boxes, tile_boxes) > iou_threshold) & earlier

        def body(carry):
            keep, _ = carry
            new = alive & ~jnp.any(over & keep[:, None], axis=0)
            return new, jnp.any(new != keep)

        return jax.lax.while_loop(lambda c: c[1], body, (alive, jnp.bool_(True)))[0]

    def body(carry):
        tile, count, kept_boxes, kept_idx = carry
        start = tile * t
        tile_boxes = jax.lax.dynamic_slice_in_dim(b_sorted, start, t)
        alive = jax.lax.dynamic_slice_in_dim(s_sorted, start, t) > -jnp.inf
        alive = suppressed_by_kept(tile_boxes, alive, count, kept_boxes)
        keep = resolve_tile(tile_boxes, alive)
        # kept boxes go to the next free slots in pick order; past the buffer they are dropped
        # (the walk stops then, K being reached)
        slot = jnp.where(keep, count + jnp.cumsum(keep) - 1, k_pad)
        kept_boxes = kept_boxes.at[slot].set(tile_boxes, mode="drop")
        tile_idx = jax.lax.dynamic_slice_in_dim(order, start, t)
        kept_idx = kept_idx.at[slot].set(tile_idx, mode="drop")
        return tile + 1, count + jnp.sum(keep, dtype=jnp.int32), kept_boxes, kept_idx

    def cond(carry):
        tile, count, _, _ = carry
        first = s_sorted[jnp.minimum(tile, num_tiles - 1) * t]
        return (tile < num_tiles) & (count < k) & (first > -jnp.inf)

    init = (
        jnp.int32(0),
        jnp.int32(0),
        jnp.zeros((k_pad, 4), boxes.dtype),
        jnp.zeros((k_pad,), jnp.int32),
    )
    _, count, _, kept_idx = jax.lax.while_loop(cond, body, init)
    valid = (jnp.arange(k) < count) & ~jnp.any(jnp.isnan(scores))
    return jnp.where(valid, kept_idx[:k], 0), valid


def nms(boxes, scores, *, iou_threshold, max_output, method=None):
    """Greedy NMS, fixed size, by `method` ("greedy" or "tiled"; None: `DEFAULT_METHOD`).

    Both methods give identical outputs; see `greedy_nms` for the arguments and results.
    """
    method = method or DEFAULT_METHOD
    if method == "greedy":
        return greedy_nms(boxes, scores, iou_threshold=iou_threshold, max_output=max_output)
    if method == "tiled":
        return tiled_nms(boxes, scores, iou_threshold=iou_threshold, max_output=max_output)
    raise ValueError(f"unknown NMS method {method!r}; expected one of {METHODS}")


def batched_nms(boxes, scores, idxs, *, iou_threshold, max_output, method=None):
    """mmcv `batched_nms`: NMS that never suppresses across groups (classes or levels).

    Boxes of group g are offset by g * (max_coordinate + 1) so groups cannot overlap.

    Args:
      boxes: [N, 4]; scores: [N] (-inf for padding); idxs: [N] int group ids.
      iou_threshold, max_output: as in `greedy_nms`; method: as in `nms`.
    Returns:
      indices: [K] int32; valid: [K] bool.
    """
    finite = scores > -jnp.inf
    max_coord = jnp.max(jnp.where(finite[:, None], boxes, 0.0))
    offset = idxs.astype(boxes.dtype) * (max_coord + 1.0)
    return nms(
        boxes + offset[:, None],
        scores,
        iou_threshold=iou_threshold,
        max_output=max_output,
        method=method,
    )


def dense_topk_per_level(scores, *, score_thr, nms_pre):
    """mmdetection >= 2.18 `filter_scores_and_topk` for one level of one image.

    Keeps the (prior, class) pairs with score > score_thr, sorted descending, at most nms_pre.

    Args:
      scores: [P, C] sigmoid scores of P priors and C classes.
      score_thr: strict lower bound.
      nms_pre: the number of pairs kept (static).
    Returns:
      top_scores: [k] (-inf where fewer than k pairs pass), prior_idx: [k], labels: [k],
      with k = min(nms_pre, P * C).
    """
    num_classes = scores.shape[1]
    flat = jnp.where(scores > score_thr, scores, -jnp.inf).reshape(-1)
    k = min(nms_pre, flat.shape[0])
    top, idx = jax.lax.top_k(flat, k)
    return top, idx // num_classes, idx % num_classes
