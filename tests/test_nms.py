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


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_greedy_nms_matches_numpy(seed, thr):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 200)
    scores = rng.permutation(200).astype(np.float32) / 200  # distinct scores
    ref = numpy_nms(boxes, scores, thr)
    k = 300  # more slots than boxes: the tail must be invalid
    idx, valid = jax.jit(nms.greedy_nms, static_argnames=("iou_threshold", "max_output"))(
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
