import math

import jax.numpy as jnp
import numpy as np

from jdistill.ops import anchors


def test_base_anchors_ratio_major_and_centred_on_grid_point():
    scales = [4 * 2 ** (i / 3) for i in range(3)]
    base = anchors.base_anchors(8, scales, [0.5, 1.0, 2.0])
    assert base.shape == (9, 4)
    # a = ratio_idx * 3 + scale_idx; ratio 0.5 (h/w), scale 4: w = 32 / sqrt(.5), h = 32 * sqrt(.5)
    w, h = 32 / math.sqrt(0.5), 32 * math.sqrt(0.5)
    np.testing.assert_allclose(base[0], [-w / 2, -h / 2, w / 2, h / 2], rtol=1e-6)
    # ratio 1, scale 4 * 2^(1/3): a square centred on (0, 0)
    s = 32 * 2 ** (1 / 3)
    np.testing.assert_allclose(base[4], [-s / 2, -s / 2, s / 2, s / 2], rtol=1e-6)


def test_grid_order_is_y_x_anchor():
    base = anchors.base_anchors(16, [1.0], [1.0, 2.0])
    grid = anchors.grid_anchors((2, 3), 16, base)
    assert grid.shape == (2 * 3 * 2, 4)
    # index (y=1, x=2, a=1) = (1 * 3 + 2) * 2 + 1 = 11: centre (32, 16)
    c = (grid[11, :2] + grid[11, 2:]) / 2
    np.testing.assert_allclose(c, [32.0, 16.0])


def test_feature_size_is_repeated_ceil():
    assert anchors.feature_size(800, 8) == 100
    assert anchors.feature_size(800, 64) == 13  # 800 -> 400 -> 200 -> 100 -> 50 -> 25 -> 13
    assert anchors.feature_size(800, 128) == 7
    assert anchors.feature_size(1344, 128) == 11


def test_valid_flags_follow_pad_shape():
    flags = anchors.valid_flags(jnp.array([[64, 96], [32, 32]]), (4, 6), 16, 2)
    assert flags.shape == (2, 4 * 6 * 2)
    f = np.asarray(flags).reshape(2, 4, 6, 2)
    assert f[0].all()
    assert f[1, :2, :2].all() and not f[1, 2:].any() and not f[1, :, 2:].any()
