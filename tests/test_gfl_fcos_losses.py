"""GFL and FCOS losses, decode and targets against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.losses import detection
from jdistill.models import fcos, gfl


def test_quality_focal_loss_hand_values():
    x = jnp.zeros((2, 2))
    loss = detection.quality_focal_loss(x, jnp.array([0, -1]), jnp.array([0.8, 0.0]), beta=2.0)
    # positive: BCE(0, .8) * |.8 - .5|^2 + BCE(0, 0) * .5^2 = ln2 * (.09 + .25)
    np.testing.assert_allclose(loss[0], math.log(2) * 0.34, rtol=1e-6)
    np.testing.assert_allclose(loss[1], math.log(2) * 0.5, rtol=1e-6)  # negative: 2 * .25 ln 2
    # a label past the last class is a negative too (mmdetection's background index)
    bg = detection.quality_focal_loss(x[:1], jnp.array([2]), jnp.array([0.9]))
    np.testing.assert_allclose(bg, loss[1:], rtol=1e-6)


def test_distribution_focal_loss_hand_value():
    logits = jnp.array([[0.0, math.log(3.0), 0.0]])  # softmax (.2, .6, .2)
    got = detection.distribution_focal_loss(logits, jnp.array([0.25]))
    np.testing.assert_allclose(got, [0.75 * -math.log(0.2) + 0.25 * -math.log(0.6)], rtol=1e-6)


def test_giou_and_iou_losses_hand_values():
    p = jnp.array([0.0, 0.0, 2.0, 2.0])
    t = jnp.array([1.0, 1.0, 3.0, 3.0])
    # IoU 1/7; enclosing 3x3 = 9: GIoU = 1/7 - 2/9
    np.testing.assert_allclose(detection.giou_loss(p, t), 1 - (1 / 7 - 2 / 9), rtol=1e-6)
    np.testing.assert_allclose(detection.iou_log_loss(p, t), math.log(7), rtol=1e-6)
    far = jnp.array([10.0, 10.0, 11.0, 11.0])
    np.testing.assert_allclose(detection.iou_log_loss(p, far), -math.log(1e-6), rtol=1e-6)
    np.testing.assert_allclose(detection.giou_loss(p, p), 0.0, atol=1e-7)


def test_integral_decode():
    uniform = jnp.zeros((1, 4 * 17))
    np.testing.assert_allclose(gfl.integral(uniform, 16), [[8.0] * 4], rtol=1e-6)
    peaked = jnp.full((1, 4, 17), -50.0).at[0, :, 3].set(50.0).reshape(1, -1)
    np.testing.assert_allclose(gfl.integral(peaked, 16), [[3.0] * 4], atol=1e-4)
    # two bins with equal mass: the expectation sits between them
    half = jnp.full((4, 17), -50.0).at[:, 5].set(0.0).at[:, 6].set(0.0).reshape(1, -1)
    np.testing.assert_allclose(gfl.integral(half, 16), [[5.5] * 4], atol=1e-4)


PTS = jnp.array([[10.0, 10.0], [30.0, 10.0], [100.0, 100.0], [5.0, 5.0]])
GTS = jnp.array([[0.0, 0.0, 40.0, 40.0], [5.0, 5.0, 20.0, 20.0], [0.0, 0.0, 99.0, 99.0]])
GT_VALID = jnp.array([True, True, False])


def test_fcos_targets_smallest_area_wins_and_ranges():
    ranges = jnp.tile(jnp.array([[-1.0, 64.0]]), (4, 1))
    assigned, ltrb = fcos.fcos_targets(
        PTS, ranges, jnp.full(4, 8.0), GTS, GT_VALID, center_sampling=False, radius=1.5
    )
    # (10,10) is inside both gts: B (area 225) beats A (1600); (30,10) only in A;
    # (100,100) in nothing (the padded gt would cover it); (5,5) lies on B's corner: not inside.
    np.testing.assert_array_equal(np.asarray(assigned), [2, 1, 0, 1])
    np.testing.assert_allclose(ltrb[0], [5, 5, 10, 10])
    np.testing.assert_allclose(ltrb[1], [30, 10, 10, 30])
    out_of_range = jnp.tile(jnp.array([[64.0, 128.0]]), (4, 1))
    assigned, _ = fcos.fcos_targets(
        PTS, out_of_range, jnp.full(4, 8.0), GTS, GT_VALID, center_sampling=False, radius=1.5
    )
    np.testing.assert_array_equal(np.asarray(assigned), [0, 0, 0, 0])


def test_fcos_centre_sampling():
    ranges = jnp.tile(jnp.array([[-1.0, 64.0]]), (4, 1))
    gts = GTS[:1]
    # radius 1.5 x stride 8 = 12 around A's centre (20, 20): the box [8, 8, 32, 32]
    assigned, _ = fcos.fcos_targets(
        PTS, ranges, jnp.full(4, 8.0), gts, GT_VALID[:1], center_sampling=True, radius=1.5
    )
    np.testing.assert_array_equal(np.asarray(assigned), [1, 1, 0, 0])


def test_centerness_target():
    got = fcos.centerness_target(jnp.array([[5.0, 5.0, 10.0, 10.0], [30.0, 10.0, 10.0, 30.0]]))
    np.testing.assert_allclose(got, [0.5, 1 / 3], rtol=1e-6)


def test_fcos_points_follow_offset_half():
    pts = fcos.points((64, 96), (8, 16))
    assert pts[0].shape == (8 * 12, 2) and pts[1].shape == (4 * 6, 2)
    np.testing.assert_allclose(pts[0][:2], [[4, 4], [12, 4]])
    np.testing.assert_allclose(pts[1][6], [8, 24])  # row 1, column 0 at stride 16


@pytest.mark.parametrize("family", ["gfl", "fcos"])
@pytest.mark.slow
def test_losses_finite_with_empty_and_padded_images(family):
    from jdistill import config_lib
    from jdistill.models import detector

    cfg = getattr(config_lib, family)(18)
    cfg.width, cfg.neck_channels, cfg.stacked_convs = 0.125, 32, 1
    det = detector.build(cfg, 3)
    x = jnp.zeros((2, 64, 96, 3))
    v = jax.jit(det.module.init)(jax.random.PRNGKey(0), x)  # one compile, not op by op
    batch = {
        "boxes": jnp.array([[[4.0, 6, 40, 30]], [[0.0, 0, 0, 0]]]),
        "labels": jnp.zeros((2, 1), jnp.int32),
        "box_valid": jnp.array([[True], [False]]),
        "pad_shape": jnp.tile(jnp.array([64, 96]), (2, 1)),
        "image_valid": jnp.array([True, True]),
    }

    def f(params):
        out, _ = det.module.apply({**v, "params": params}, x)
        return det.loss(out, batch)

    (total, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(v["params"])
    assert np.isfinite(float(total)) and all(np.isfinite(float(m)) for m in metrics.values())
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert float(metrics["loss_bbox"]) > 0  # the one box found positives
