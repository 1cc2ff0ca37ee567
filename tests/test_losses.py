import math

import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.losses import detection


def test_focal_loss_hand_values():
    # logit 0: p = .5. Target 1: .25 * .5^2 * ln 2; target 0: .75 * .5^2 * ln 2.
    out = np.asarray(detection.sigmoid_focal_loss(jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]])))
    np.testing.assert_allclose(
        out, [[0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)]], rtol=1e-6
    )
    # logit ln 3: p = .75. Target 1: .25 * .25^2 * -ln .75; target 0: .75 * .75^2 * -ln .25
    x = jnp.full((1, 2), math.log(3.0))
    out = np.asarray(detection.sigmoid_focal_loss(x, jnp.array([[1.0, 0.0]])))
    want = [0.25 * 0.0625 * -math.log(0.75), 0.75 * 0.5625 * -math.log(0.25)]
    np.testing.assert_allclose(out[0], want, rtol=1e-5)


def test_focal_loss_is_finite_for_extreme_logits():
    x = jnp.array([[-200.0, 200.0]])
    out = detection.sigmoid_focal_loss(x, jnp.array([[1.0, 0.0]]))
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out[0, 0], 0.25 * 200.0, rtol=1e-5)  # (1-p)^2 ~ 1, -log p = 200


def test_bce_with_logits_matches_definition():
    x = jnp.array([-2.0, 0.3, 4.0])
    t = jnp.array([0.2, 0.5, 1.0])
    p = 1 / (1 + np.exp(-np.asarray(x)))
    ref = -(np.asarray(t) * np.log(p) + (1 - np.asarray(t)) * np.log(1 - p))
    np.testing.assert_allclose(detection.bce_with_logits(x, t), ref, rtol=1e-5)


def test_grouped_sum():
    x = jnp.arange(8.0).reshape(4, 2)
    np.testing.assert_allclose(detection.grouped_sum(x, 2), [0 + 1 + 2 + 3, 4 + 5 + 6 + 7])
    np.testing.assert_allclose(detection.grouped_sum(x, 0), [28.0])
    with pytest.raises(ValueError, match="does not split"):
        detection.grouped_sum(jnp.ones((3, 2)), 2)
