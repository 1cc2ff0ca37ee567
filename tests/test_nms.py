import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.ops import nms


def numpy_nms(boxes, scores, thr):
    """Plain greedy NMS: the reference."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    suppressed = np.zeros(len(boxes), bool)
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        x1 = np.maximum(boxes[i, 0], boxes[:, 0])
        y1 = np.maximum(boxes[i, 1], boxes[:, 1])
        x2 = np.minimum(boxes[i, 2], boxes[:, 2])
        y2 = np.minimum(boxes[i, 3], boxes[:, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        iou = inter / np.maximum(area[i] + area - inter, 1e-6)
        suppressed |= iou > thr
    return np.asarray(keep)


def random_boxes(rng, n, span=100.0):
    xy = rng.uniform(0, span, (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("method", ["greedy_nms", "tiled_nms"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_greedy_nms_matches_numpy(seed, thr, method):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 200)
    scores = rng.permutation(200).astype(np.float32) / 200  # distinct scores
    ref = numpy_nms(boxes, scores, thr)
    k = 300  # more slots than boxes: the tail must be invalid
    idx, valid = jax.jit(getattr(nms, method), static_argnames=("iou_threshold", "max_output"))(
        jnp.asarray(boxes), jnp.asarray(scores), iou_threshold=thr, max_output=k
    )
    idx, valid = np.asarray(idx), np.asarray(valid)
    assert valid.sum() == len(ref)
    np.testing.assert_array_equal(idx[: len(ref)], ref)


def test_truncated_output_is_prefix_of_full_nms():
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, 300, span=60)
    scores = rng.uniform(size=300).astype(np.float32)
    ref = numpy_nms(boxes, scores, 0.5)
    idx, valid = nms.greedy_nms(boxes, scores, iou_threshold=0.5, max_output=10)
    assert bool(valid.all())
    np.testing.assert_array_equal(np.asarray(idx), ref[:10])


def test_padding_scores_are_never_kept():
    boxes = jnp.asarray(random_boxes(np.random.default_rng(4), 5))
    scores = jnp.array([0.9, -jnp.inf, 0.5, -jnp.inf, 0.1])
    idx, valid = nms.greedy_nms(boxes, scores, iou_threshold=1.0, max_output=5)
    assert int(valid.sum()) == 3
    np.testing.assert_array_equal(np.asarray(idx)[:3], [0, 2, 4])


def test_iou_equal_to_threshold_is_kept():
    # IoU exactly 0.5: mmcv suppresses only IoU > thr
    boxes = jnp.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0]])
    _, valid = nms.greedy_nms(boxes, jnp.array([0.9, 0.8]), iou_threshold=0.5, max_output=2)
    assert bool(valid.all())


def test_batched_nms_never_suppresses_across_classes():
    rng = np.random.default_rng(5)
    boxes = random_boxes(rng, 120, span=50)
    scores = rng.permutation(120).astype(np.float32) / 120
    labels = rng.integers(0, 3, 120)
    ref = []
    for c in range(3):
        sel = np.nonzero(labels == c)[0]
        ref += [sel[i] for i in numpy_nms(boxes[sel], scores[sel], 0.5)]
    ref = sorted(ref, key=lambda i: -scores[i])
    idx, valid = nms.batched_nms(
        jnp.asarray(boxes),
        jnp.asarray(scores),
        jnp.asarray(labels),
        iou_threshold=0.5,
        max_output=200,
    )
    assert int(valid.sum()) == len(ref)
    np.testing.assert_array_equal(np.asarray(idx)[: len(ref)], ref)


def test_dense_topk_keeps_pairs_above_threshold():
    scores = jnp.array([[0.9, 0.01], [0.2, 0.6], [0.04, 0.05]])
    top, prior, label = nms.dense_topk_per_level(scores, score_thr=0.05, nms_pre=4)
    np.testing.assert_allclose(np.asarray(top), [0.9, 0.6, 0.2, -np.inf])  # 0.05 is not > 0.05
    np.testing.assert_array_equal(np.asarray(prior)[:3], [0, 1, 1])
    np.testing.assert_array_equal(np.asarray(label)[:3], [0, 1, 0])


# ---------------------------------------------------------------- tiled NMS == greedy NMS


@functools.partial(jax.jit, static_argnames=("method", "max_output", "tile_size"))
def run_nms(boxes, scores, thr, *, method, max_output, tile_size):
    """One NMS per row, vmapped: boxes [S, N, 4], scores [S, N], thr [S] -> [S, K] idx, valid.

    The threshold is traced, so each (N, K) compiles once for all seeds and thresholds.
    """

    def one(b, s, t):
        if method == "greedy":
            return nms.greedy_nms(b, s, iou_threshold=t, max_output=max_output)
        return nms.tiled_nms(b, s, iou_threshold=t, max_output=max_output, tile_size=tile_size)

    return jax.vmap(one)(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(thr, jnp.float32))


def assert_tiled_is_greedy(boxes, scores, thr, max_output, tile_size=64):
    """Tiled NMS must return greedy's indices and valid flags exactly; returns greedy's."""
    kw = dict(max_output=max_output, tile_size=tile_size)
    g_idx, g_valid = map(np.asarray, run_nms(boxes, scores, thr, method="greedy", **kw))
    t_idx, t_valid = map(np.asarray, run_nms(boxes, scores, thr, method="tiled", **kw))
    np.testing.assert_array_equal(t_valid, g_valid)
    np.testing.assert_array_equal(t_idx, g_idx)
    return g_idx, g_valid


def grid_case(n, seeds=(0, 1, 2), thresholds=(0.3, 0.5, 0.7)):
    """Rows of (boxes, scores, thr): per seed, distinct scores; tied scores on duplicated
    boxes; tied scores with -inf padding scattered; each at every threshold."""
    boxes, scores, thr = [], [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        b = random_boxes(rng, n, span=100)
        dup = b.copy()
        dup[rng.uniform(size=n) < 0.3] = b[rng.integers(0, n)]  # exact duplicates
        ties = (rng.integers(0, 5, n) / 4).astype(np.float32)  # 5 distinct scores
        padded = np.where(rng.uniform(size=n) < 0.3, -np.inf, ties).astype(np.float32)
        distinct = (rng.permutation(n) / n).astype(np.float32)
        for bb, ss in [(b, distinct), (dup, ties), (b, padded)]:
            for t in thresholds:
                boxes.append(bb)
                scores.append(ss)
                thr.append(t)
    return np.stack(boxes), np.stack(scores), np.asarray(thr, np.float32)


@pytest.mark.parametrize("n", [1, 7, 300, 2000])
@pytest.mark.parametrize("k", [1, 100, 1000, "n+5"])
def test_tiled_nms_equals_greedy_random(n, k):
    k = n + 5 if k == "n+5" else k
    boxes, scores, thr = grid_case(n)
    _, valid = assert_tiled_is_greedy(boxes, scores, thr, k)
    kept = valid.sum(1)
    assert kept.min() >= 1 or n == 1  # only a lone padding box leaves nothing
    if n >= 300:  # dense boxes: every row suppresses some; K = 100 cuts some rows short
        assert (kept < n).all() and ((kept == k).any() or k > 100)


def test_tiled_nms_iou_equal_to_threshold_is_kept():
    # integer boxes on a small grid: many IoUs are exactly 1/2, 1/3, 1/4 (> is strict)
    rng = np.random.default_rng(7)
    xy = rng.integers(0, 12, (300, 2))
    wh = rng.integers(1, 5, (300, 2))
    b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    iou = np.asarray(nms.box_ops.pairwise_iou(b, b))
    for t in (0.5, 1 / 3, 0.25):
        assert (iou == np.float32(t)).sum() > 100
    s = (rng.integers(0, 10, 300) / 9).astype(np.float32)
    thr = np.asarray([0.5, 1 / 3, 0.25], np.float32)
    boxes, scores = np.stack([b] * 3), np.stack([s] * 3)
    _, valid = assert_tiled_is_greedy(boxes, scores, thr, 300)
    kept = valid.sum(1)
    assert (kept < 300).all() and (np.diff(kept) < 0).all()  # lower thresholds keep fewer


def test_tiled_nms_degenerate_boxes():
    rng = np.random.default_rng(8)
    b = random_boxes(rng, 200, span=30)
    b[0::4, 2] = b[0::4, 0]  # zero width
    b[1::8] = 0.0  # all-zero boxes, duplicated
    b[2::8, 2:] = b[2::8, :2] - 3.0  # inverted: negative width and height
    s = (rng.integers(0, 6, 200) / 5).astype(np.float32)
    thr = np.asarray([0.0, 0.5], np.float32)
    idx, valid = assert_tiled_is_greedy(np.stack([b] * 2), np.stack([s] * 2), thr, 200)
    # a box of zero or negative area has IoU 0 with everything: kept even at threshold 0
    flat = np.nonzero((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))[0]
    assert set(flat) <= set(idx[0][valid[0]])


@pytest.mark.parametrize("tile_size", [64, 256])
def test_tiled_nms_long_suppression_chain(tile_size):
    # box i overlaps i + 1 (IoU 9/11 > 0.7) but not i + 2 (8/12 < 0.7): greedy keeps every
    # other box, which takes the within-tile fixed point one round per box of the tile
    b = np.asarray([[i, 0, i + 10, 10] for i in range(200)], np.float32)
    s = np.linspace(1, 0, 200, dtype=np.float32)
    idx, valid = assert_tiled_is_greedy(b[None], s[None], [0.7], 150, tile_size=tile_size)
    np.testing.assert_array_equal(idx[0][valid[0]], np.arange(0, 200, 2))


def test_tiled_nms_padding_ties_and_nan():
    rng = np.random.default_rng(9)
    b = random_boxes(rng, 50)
    pad = np.full(50, -np.inf, np.float32)
    signed_zero = np.where(np.arange(50) % 2 == 0, 0.0, -0.0).astype(np.float32)  # ties
    with_inf = rng.uniform(size=50).astype(np.float32)
    with_inf[[3, 30]] = np.inf
    with_nan = with_inf.copy()
    with_nan[20] = np.nan
    scores = np.stack([pad, signed_zero, with_inf, with_nan])
    idx, valid = assert_tiled_is_greedy(np.stack([b] * 4), scores, [0.5] * 4, 60)
    assert not valid[0].any() and not idx[0].any()  # all padding: nothing, indices 0
    assert valid[1].sum() > 1 and (np.diff(idx[1][valid[1]]) > 0).all()  # ties: index order
    np.testing.assert_array_equal(idx[2][:2], [3, 30])
    assert not valid[3].any()  # greedy's argmax takes the NaN first and stops


def test_tiled_batched_nms_under_vmap_and_jit():
    # four images of test-time NMS (class offsets) with the default tile size, jitted and
    # vmapped, against greedy run image by image outside vmap
    rng = np.random.default_rng(10)
    boxes = np.stack([random_boxes(rng, 1000, span=60) for _ in range(4)])
    scores = rng.uniform(size=(4, 1000)).astype(np.float32)
    scores[rng.uniform(size=scores.shape) < 0.2] = -np.inf
    labels = rng.integers(0, 5, (4, 1000)).astype(np.int32)

    @jax.jit
    def batch(b, s, c):
        fn = functools.partial(nms.batched_nms, iou_threshold=0.5, max_output=540, method="tiled")
        return jax.vmap(fn)(b, s, c)

    idx, valid = map(np.asarray, batch(boxes, scores, labels))
    for i in range(4):
        g_idx, g_valid = nms.batched_nms(
            boxes[i], scores[i], labels[i], iou_threshold=0.5, max_output=540, method="greedy"
        )
        np.testing.assert_array_equal(valid[i], np.asarray(g_valid))
        np.testing.assert_array_equal(idx[i], np.asarray(g_idx))
    np.testing.assert_array_equal(valid.sum(1), [534, 540, 540, 540])  # suppressed; truncated


@pytest.mark.parametrize("method", nms.METHODS)
def test_gradient_flows_around_nms(method):
    # proposals are made inside the loss: value_and_grad must trace through NMS, and the kept
    # boxes' gradient reaches exactly the kept candidates
    rng = np.random.default_rng(11)
    b = jnp.asarray(random_boxes(rng, 40, span=30))
    s = jnp.asarray(rng.uniform(size=40).astype(np.float32))

    def loss(b, s):
        idx, valid = jax.vmap(
            lambda b, s: nms.nms(b, s, iou_threshold=0.5, max_output=40, method=method)
        )(b[None], s[None])
        kept = jnp.where(valid[0], s[idx[0]] + b[idx[0]].sum(1), 0.0)
        return jnp.sum(kept), (idx[0], valid[0])

    (g_b, g_s), (idx, valid) = jax.grad(loss, argnums=(0, 1), has_aux=True)(b, s)
    expected = np.zeros(40, np.float32)
    expected[np.asarray(idx)[np.asarray(valid)]] = 1.0
    assert 0 < expected.sum() < 40  # some boxes suppressed, fewer kept than slots
    np.testing.assert_array_equal(np.asarray(g_s), expected)
    np.testing.assert_array_equal(np.asarray(g_b), np.repeat(expected[:, None], 4, 1))


def test_nms_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(nms, "tiled_nms", lambda *a, **kw: calls.append("tiled"))
    monkeypatch.setattr(nms, "greedy_nms", lambda *a, **kw: calls.append("greedy"))
    b, s = jnp.zeros((3, 4)), jnp.zeros(3)
    nms.nms(b, s, iou_threshold=0.5, max_output=2)
    nms.nms(b, s, iou_threshold=0.5, max_output=2, method="greedy")
    assert calls == [nms.DEFAULT_METHOD, "greedy"]
    monkeypatch.setattr(nms, "DEFAULT_METHOD", "greedy")
    nms.batched_nms(b, s, jnp.zeros(3, jnp.int32), iou_threshold=0.5, max_output=2)
    assert calls[-1] == "greedy"
    with pytest.raises(ValueError, match="unknown NMS method"):
        nms.nms(b, s, iou_threshold=0.5, max_output=2, method="fast")
