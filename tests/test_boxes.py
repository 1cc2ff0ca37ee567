import math

import jax.numpy as jnp
import numpy as np

from jdistill.ops import boxes


def test_pairwise_iou_hand_values():
    a = jnp.array([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    b = jnp.array([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    iou = np.asarray(boxes.pairwise_iou(a, b))
    # overlap of [0,10]^2 and [5,15]x[0,10] is 5x10 = 50; union 150.
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0], rtol=1e-6)
    # [5,15]^2 vs [0,10]^2: 25 / 175; vs [5,15]x[0,10]: 50 / 150.
    np.testing.assert_allclose(iou[1], [25 / 175, 50 / 150, 0.0], rtol=1e-6)


def test_iou_degenerate_boxes_use_eps_union():
    z = jnp.zeros((1, 4))
    assert float(boxes.pairwise_iou(z, z)[0, 0]) == 0.0
    assert float(boxes.aligned_iou(z[0], z[0])) == 0.0


def test_aligned_iou_matches_pairwise_diagonal():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (6, 2))
    a = jnp.asarray(np.concatenate([xy, xy + rng.uniform(1, 30, (6, 2))], 1), jnp.float32)
    xy = rng.uniform(0, 50, (6, 2))
    b = jnp.asarray(np.concatenate([xy, xy + rng.uniform(1, 30, (6, 2))], 1), jnp.float32)
    np.testing.assert_allclose(
        boxes.aligned_iou(a, b), np.diag(np.asarray(boxes.pairwise_iou(a, b))), rtol=1e-6
    )


def test_encode_hand_values():
    prior = jnp.array([0.0, 0.0, 10.0, 20.0])
    gt = jnp.array([5.0, 10.0, 25.0, 30.0])
    d = np.asarray(boxes.encode_deltas(prior, gt))
    # centres (5,10) -> (15,20); sizes (10,20) -> (20,20)
    np.testing.assert_allclose(d, [1.0, 0.5, math.log(2.0), 0.0], rtol=1e-6)
    d = np.asarray(boxes.encode_deltas(prior, gt, stds=(0.1, 0.1, 0.2, 0.2)))
    np.testing.assert_allclose(d, [10.0, 5.0, math.log(2.0) / 0.2, 0.0], rtol=1e-6)


def test_coder_round_trip():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (50, 2))
    priors = np.concatenate([xy, xy + rng.uniform(4, 60, (50, 2))], 1).astype(np.float32)
    xy = rng.uniform(0, 100, (50, 2))
    gts = np.concatenate([xy, xy + rng.uniform(4, 60, (50, 2))], 1).astype(np.float32)
    for stds in [(1.0,) * 4, (0.1, 0.1, 0.2, 0.2)]:
        d = boxes.encode_deltas(priors, gts, stds=stds)
        np.testing.assert_allclose(boxes.decode_deltas(priors, d, stds=stds), gts, atol=1e-3)


def test_decode_clamps_log_ratio_and_clips():
    prior = jnp.array([[10.0, 10.0, 20.0, 20.0]])
    out = np.asarray(boxes.decode_deltas(prior, jnp.array([[0.0, 0.0, 100.0, 0.0]])))
    w = out[0, 2] - out[0, 0]
    np.testing.assert_allclose(w, 10.0 * 1000 / 16, rtol=1e-5)  # exp(|log(16/1000)|) = 62.5
    out = boxes.decode_deltas(
        prior, jnp.array([[0.0, 0.0, 3.0, 3.0]]), max_shape=jnp.array([[25, 30]])
    )
    np.testing.assert_allclose(out, [[0.0, 0.0, 30.0, 25.0]])
