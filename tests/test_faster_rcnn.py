"""Faster R-CNN pieces with fixed shapes: proposals, RoI sampling, losses, prediction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import config_lib
from jdistill.models import detector as detector_lib
from jdistill.models import rpn


def test_proposals_have_fixed_shape_and_per_level_nms():
    a0 = jnp.asarray([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 40, 60]], jnp.float32)
    a1 = jnp.asarray([[0, 0, 10, 10]], jnp.float32)
    cls = [jnp.asarray([3.0, 2.0, 5.0]), jnp.asarray([1.0])]
    deltas = [jnp.zeros((3, 4)), jnp.zeros((1, 4))]
    boxes, scores, valid = jax.jit(
        lambda c, d: rpn.rpn_proposals(
            c, d, [a0, a1], jnp.asarray([8, 9]), nms_pre=3, max_num=4, iou_threshold=0.7
        )
    )(cls, deltas)
    assert boxes.shape == (4, 4) and scores.shape == (4,) and valid.shape == (4,)
    # Anchor 2 has negative width (dropped); anchor 1 overlaps anchor 0 by 0.91 on the same
    # level (suppressed); level 1's identical box survives: NMS never crosses levels.
    np.testing.assert_array_equal(valid, [True, True, False, False])
    np.testing.assert_allclose(boxes[:2], [[0, 0, 9, 8], [0, 0, 9, 8]])  # clipped to 8 x 9
    np.testing.assert_allclose(scores[:2], jax.nn.sigmoid(jnp.asarray([3.0, 1.0])), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    cfg = config_lib.faster_rcnn(18)
    cfg.update(
        width=0.125,
        neck_channels=16,
        fc_channels=32,
        rpn_train_nms_pre=100,
        rpn_train_max_num=50,
        rpn_test_nms_pre=100,
        rpn_test_max_num=50,
        roi_num=32,
        test_max_per_img=10,
        loss_group_size=0,
    )
    det = detector_lib.build(cfg, 3)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
    variables = det.module.init(jax.random.PRNGKey(1), images)
    batch = dict(
        image=images,
        boxes=jnp.asarray([[[4, 4, 30, 40], [20, 10, 60, 50], [0, 0, 0, 0]]] * 2, jnp.float32),
        labels=jnp.asarray([[2, 0, 0]] * 2),
        box_valid=jnp.asarray([[True, True, False], [True, False, False]]),
        img_shape=jnp.asarray([[64, 64], [64, 48]]),
        pad_shape=jnp.asarray([[64, 64], [64, 64]]),
        image_valid=jnp.asarray([True, True]),
        scale_factor=jnp.ones((2, 2)),
    )
    return det, variables, batch


@pytest.mark.slow
def test_roi_sampling_adds_gts_and_keeps_exact_counts(tiny):
    det, variables, batch = tiny
    outputs, _ = det.module.apply(variables, batch["image"])
    props, _, pv = det.proposals(outputs, batch, train=True)
    assert props.shape == (2, 50, 4)
    rois, labels, targets, pos, ok = jax.jit(det.sample_rois)(
        props, pv, batch, jax.random.split(jax.random.PRNGKey(2), 2)
    )
    assert rois.shape == (2, 32, 4) and labels.shape == (2, 32)
    for i in range(2):
        assert 1 <= int(pos[i].sum()) <= 8  # at most 25 % of 32
        assert np.all(np.asarray(labels[i])[np.asarray(pos[i])] < 3)
        assert np.all(np.asarray(labels[i])[np.asarray(ok[i] & ~pos[i])] == 3)  # background K
        np.testing.assert_array_equal(np.asarray(targets[i])[~np.asarray(pos[i])], 0.0)
        assert int(ok[i].sum()) == 32
    # With every proposal invalid, the only candidates are the gts added as proposals: each is
    # its own positive (IoU 1, zero regression target) and nothing else is sampled.
    rois, labels, targets, pos, ok = jax.jit(det.sample_rois)(
        props, jnp.zeros_like(pv), batch, jax.random.split(jax.random.PRNGKey(3), 2)
    )
    np.testing.assert_array_equal(pos.sum(1), [2, 1])
    np.testing.assert_array_equal(ok, pos)
    got = {
        tuple(np.asarray(r).tolist()) + (int(lab),)
        for r, lab in zip(rois[0][pos[0]], labels[0][pos[0]], strict=True)
    }
    assert got == {(4.0, 4.0, 30.0, 40.0, 2), (20.0, 10.0, 60.0, 50.0, 0)}
    np.testing.assert_allclose(targets[0][pos[0]], 0.0, atol=1e-6)


@pytest.mark.slow
def test_losses_are_finite_and_predictions_fixed_size(tiny):
    det, variables, batch = tiny

    def f(v):
        outputs, _ = det.module.apply(v, batch["image"])
        taps = {}
        total, metrics = det.loss(outputs, batch, variables=v, rng=jax.random.PRNGKey(3), taps=taps)
        return total, (metrics, taps, det.predict(outputs, batch, variables=v))

    (total, (metrics, taps, dets)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(variables)
    assert np.isfinite(float(total))
    # Untrained: RPN BCE ~ ln 2, RoI CE ~ ln(K + 1).
    assert float(metrics["loss_rpn_cls"]) == pytest.approx(np.log(2), abs=0.05)
    assert float(metrics["loss_cls"]) == pytest.approx(np.log(4), abs=0.3)
    assert taps["roi/cls_logits"].shape == (2, 32, 4)
    assert dets["boxes"].shape == (2, 10, 4) and dets["valid"].dtype == jnp.bool_
    # Gradients reach the RoI head, the RPN and the backbone.
    for path in (
        ("bbox_head", "fc_cls"),
        ("rpn_head", "rpn_conv", "conv"),
        ("neck", "fpn_convs_0", "conv"),
    ):
        g = grads["params"]
        for k in path:
            g = g[k]
        g = g["kernel"]
        assert float(jnp.abs(g).sum()) > 0, path
