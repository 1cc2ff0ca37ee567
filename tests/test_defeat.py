"""DeFeat / FGFI masks and losses against hand-computed values (specs/defeat.md)."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jdistill.distill import defeat, registry


def test_gt_level_rule_uses_the_legacy_plus_one():
    boxes = jnp.asarray(
        [[0, 0, 110, 110], [0, 0, 111, 111], [0, 0, 223, 223], [0, 0, 895, 895]], jnp.float32
    )
    # sqrt((w + 1)(h + 1)): 111 -> P2, 112 -> P3, 224 -> P4, 896 -> P6 (5 levels)
    np.testing.assert_array_equal(defeat.gt_levels(boxes, 5), [0, 1, 2, 4])


def test_gt_mask_is_half_open_with_degenerate_and_clipped_boxes():
    boxes = jnp.asarray(
        [
            [5, 9, 20, 16],  # cells rows [2, 4) x cols [1, 5): the cell holding x2/y2 is not in
            [6, 6, 7, 30],  # lx == rx: only the cell (floor(6/4), floor(6/4)) = (1, 1)
            [26, 26, 100, 100],  # clipped at the map edge: rows/cols [6, 8)
            [0, 0, 31, 31],  # not on this level: never marked
        ],
        jnp.float32,
    )
    on = jnp.asarray([True, True, True, False])
    got = np.asarray(defeat.gt_mask_level(boxes, on, (8, 8), 4))
    want = np.zeros((8, 8))
    want[2:4, 1:5] = 1
    want[1, 1] = 1
    want[6:8, 6:8] = 1
    np.testing.assert_array_equal(got, want)


def test_fgfi_roi_mask_by_hand():
    # One 16x16 anchor per cell of a 2x2 map, centred on the cell's top-left corner.
    anchors = jnp.asarray(
        [[-8, -8, 8, 8], [8, -8, 24, 8], [-8, 8, 8, 24], [8, 8, 24, 24]], jnp.float32
    )
    # gt A: IoU 0.25 with anchor 0, 0 elsewhere -> only cell (0, 0).
    # gt B: IoUs 16/496, 48/464, 48/464, 144/368 -> threshold 0.5 * 0.391 keeps only cell (1, 1).
    gts = jnp.asarray([[0, 0, 8, 8], [4, 4, 20, 20]], jnp.float32)
    m = defeat.roi_mask_level(gts, jnp.asarray([True, True]), anchors, (2, 2), 1, 0.5)
    np.testing.assert_array_equal(m, [[1, 0], [0, 1]])
    # phi 0.25: gt B's threshold drops to 0.098 and both 0.103 cells join.
    m = defeat.roi_mask_level(gts[1:], jnp.asarray([True]), anchors, (2, 2), 1, 0.25)
    np.testing.assert_array_equal(m, [[0, 1], [1, 1]])


def _neck_case(pad, **overrides):
    identity = np.zeros((3, 3, 1, 1), np.float32)
    identity[1, 1] = 1.0
    adapter = {"level_0": {"kernel": jnp.asarray(identity), "bias": jnp.zeros(1)}}
    teacher = {"neck/p2": jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)}
    student = {"neck/p2": jnp.zeros((1, 2, 2, 1))}
    targets = {
        "boxes": jnp.asarray([[[0.0, 0.0, 4.0, 4.0]]]),  # marks cell (0, 0) of P2
        "box_valid": jnp.asarray([[True]]),
        "image_valid": jnp.asarray([True]),
        "pad_shape": jnp.asarray([pad]),
    }
    cfg = ml_collections.ConfigDict(
        dict(
            levels=("p2",),
            strides=(4,),
            mask="gt",
            decoupled=True,
            fg_weight=3.0,
            bg_weight=12.0,
            group_size=0,
            count_padding=False,
        )
    )
    cfg.update(overrides)
    return defeat.defeat_neck(student, teacher, targets, adapter, cfg=cfg)


def test_decoupled_neck_loss_by_hand():
    # fg: D^2 = 1 over 2*C*1 = 2 -> 0.5; bg: (4 + 9 + 16) / (2*C*3) = 29/6; 3 * 0.5 + 12 * 29/6
    loss, parts = _neck_case([8, 8])
    assert float(parts["fg"]) == pytest.approx(1.5)
    assert float(parts["bg"]) == pytest.approx(58.0)
    assert float(loss) == pytest.approx(59.5)
    # FGFI: no background term.
    assert float(_neck_case([8, 8], decoupled=False)[0]) == pytest.approx(1.5)


def test_padding_is_not_background_unless_asked():
    # The image is 4x4 pixels: only P2's cell (0, 0) is inside; the other 3 cells are padding.
    loss, parts = _neck_case([4, 4])
    assert float(parts["bg"]) == 0.0 and float(loss) == pytest.approx(1.5)
    # The reference's behaviour: padding counts as background.
    assert float(_neck_case([4, 4], count_padding=True)[0]) == pytest.approx(59.5)


def _kl(zs, zt, t):
    p = np.exp(np.asarray(zs) / t) / np.exp(np.asarray(zs) / t).sum()
    q = np.exp(np.asarray(zt) / t) / np.exp(np.asarray(zt) / t).sum()
    return t * t * float((q * (np.log(q) - np.log(p))).sum())


def test_temperature_kl_by_hand():
    zs = jnp.asarray([[[0.0, 0.0]]])
    zt = jnp.asarray([[[math.log(3.0), 0.0]]])
    rows = jnp.asarray([[True]])
    # q = (3/4, 1/4), p = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    want = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(defeat.temperature_kl(zs, zt, rows, 1.0)) == pytest.approx(want, rel=1e-5)
    assert float(defeat.temperature_kl(zs, zt, rows, 2.0)) == pytest.approx(
        _kl([0, 0], [math.log(3), 0], 2.0), rel=1e-5
    )
    assert float(defeat.temperature_kl(zs, zt, ~rows, 1.0)) == 0.0  # no rows -> 0


def test_roi_kd_splits_by_label_with_separate_temperatures():
    k = 2  # classes 0, 1; background 2
    zs = jnp.asarray([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [5.0, 5.0, 5.0]]])
    zt = jnp.asarray([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 9.0]]])
    student = {
        "roi/cls_logits": zs,
        "roi/labels": jnp.asarray([[0, 1, 2, 2]]),
        "roi/valid": jnp.asarray([[True, True, True, False]]),
    }  # the last row is padding
    cfg = ml_collections.ConfigDict(
        dict(
            num_classes=k,
            fg_weight=2.0,
            bg_weight=3.0,
            fg_temperature=1.0,
            bg_temperature=4.0,
            group_size=0,
        )
    )
    loss, parts = registry.get("defeat_roi_kd").fn(
        student, {"roi/cls_logits": zt}, None, None, cfg=cfg
    )
    fg = 2.0 * (_kl(zs[0, 0], zt[0, 0], 1.0) + _kl(zs[0, 1], zt[0, 1], 1.0)) / 2
    bg = 3.0 * _kl(zs[0, 2], zt[0, 2], 4.0)
    assert float(parts["fg"]) == pytest.approx(fg, rel=1e-5)
    assert float(parts["bg"]) == pytest.approx(bg, rel=1e-5)
    assert float(loss) == pytest.approx(fg + bg, rel=1e-5)


def test_dense_kd_averages_positives_and_negatives_apart():
    # One image, one level, 1x1 map, 3 anchors x 1 class; anchor 0 positive, 1 negative,
    # 2 ignored. kd = softplus(z_s) - sigmoid(z_t) z_s.
    zs = jnp.asarray([1.0, -2.0, 3.0]).reshape(1, 1, 1, 3)
    zt = jnp.asarray([0.0, 0.0, 0.0]).reshape(1, 1, 1, 3)
    taps = {
        "head/cls_logits/p3": zs,
        "assign/pos": jnp.asarray([[True, False, False]]),
        "assign/neg": jnp.asarray([[False, True, False]]),
    }
    cfg = ml_collections.ConfigDict(dict(levels=("p3",), pos_weight=2.0, neg_weight=0.5))
    loss, parts = registry.get("defeat_dense_kd").fn(
        taps, {"head/cls_logits/p3": zt}, None, None, cfg=cfg
    )
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert float(parts["pos"]) == pytest.approx(2.0 * (sp(1.0) - 0.5))
    assert float(parts["neg"]) == pytest.approx(0.5 * (sp(-2.0) + 1.0))


def test_decay_schedules_and_unknown_names():
    step = jnp.int32(60)
    assert float(registry.decay_factor(step, 100, "linear")) == pytest.approx(0.5)  # stage 2/4
    assert float(registry.decay_factor(step, 100, "cos")) == pytest.approx(0.5)
    assert float(registry.decay_factor(step, 100, "none")) == 1.0
    with pytest.raises(ValueError, match="decay"):
        registry.decay_factor(step, 100, "exp")
