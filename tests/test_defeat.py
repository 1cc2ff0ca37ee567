"""DeFeat / FGFI masks and losses against hand-computed values (specs/defeat.md)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers.distill import spec_pair

from jdistill.distill import api, defeat, registry


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
    return defeat.defeat_neck(
        student, teacher, targets, adapter, cfg=cfg, spec=spec_pair(cfg.levels, cfg.strides)
    )


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
    loss, parts = registry.get("defeat_roi_kd").loss(
        student, {"roi/cls_logits": zt}, None, None, cfg=cfg, spec=spec_pair(num_classes=k)
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
    loss, parts = registry.get("defeat_dense_kd").loss(
        taps, {"head/cls_logits/p3": zt}, None, None, cfg=cfg, spec=spec_pair()
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


# ----------------------------------------------------------------------------- reference parity


def _ref_level(box, num_levels=5):
    scale = math.sqrt((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
    return min(max(math.floor(math.log2(scale / 56 + 1e-6)), 0), num_levels - 1)


def _ref_gt_masks(gts, sizes, strides):
    """The reference's get_gt_mask, loop by loop (specs/defeat.md §2.2)."""
    masks = []
    for (h, w), s in zip(sizes, strides, strict=True):
        m = np.zeros((len(gts), h, w))
        for n, boxes in enumerate(gts):
            for b in boxes:
                if _ref_level(b) != strides.index(s):
                    continue
                lx, rx = max(int(b[0] / s), 0), min(int(b[2] / s), w)
                ly, ry = max(int(b[1] / s), 0), min(int(b[3] / s), h)
                if lx == rx or ly == ry:
                    m[n, ly, lx] += 1
                else:
                    m[n, ly:ry, lx:rx] += 1
        masks.append(m > 0)
    return masks


def _ref_roi_masks(gts, sizes, strides, phi=0.5):
    """The reference's get_roi_mask, loop by loop (specs/defeat.md §2.3)."""
    masks = []
    for lvl, ((h, w), s) in enumerate(zip(sizes, strides, strict=True)):
        m = np.zeros((len(gts), h, w), bool)
        anchors = []
        for i in range(h):
            for j in range(w):
                for r in (0.5, 1.0, 2.0):
                    aw, ah = 8 * s / math.sqrt(r), 8 * s * math.sqrt(r)
                    anchors.append([j * s - aw / 2, i * s - ah / 2, j * s + aw / 2, i * s + ah / 2])
        anchors = np.asarray(anchors)
        for n, boxes in enumerate(gts):
            mine = [b for b in boxes if _ref_level(b) == lvl]
            for b in mine:
                ix = np.clip(
                    np.minimum(anchors[:, 2], b[2]) - np.maximum(anchors[:, 0], b[0]), 0, None
                )
                iy = np.clip(
                    np.minimum(anchors[:, 3], b[3]) - np.maximum(anchors[:, 1], b[1]), 0, None
                )
                inter = ix * iy
                union = (
                    (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
                    + (b[2] - b[0]) * (b[3] - b[1])
                    - inter
                )
                iou = inter / union
                m[n] |= (iou > phi * iou.max()).reshape(h, w, 3).any(-1)
        masks.append(m)
    return masks


def _ref_neck_loss(s, t, masks, decoupled, fg_w=3.0, bg_w=12.0):
    fg_total = bg_total = 0.0
    for sl, tl, m in zip(s, t, masks, strict=True):
        d2 = ((sl - tl) ** 2).sum(-1)
        c = sl.shape[-1]
        fg_total += (d2 * m).sum() / max(1.0, 2 * c * m.sum())
        bg_total += (d2 * ~m).sum() / max(1.0, 2 * c * (~m).sum())
    n = len(s)
    return fg_w * fg_total / n + (bg_w * bg_total / n if decoupled else 0.0)


def _reference_case(mask, scale=1):
    """Random gt boxes (a degenerate one, padded gts) and neck taps on P2..P6 of a 128 x 192
    canvas whose images are 96 x 128, all `scale` times larger (1: every box on P2): (spec,
    targets, s_taps, t_taps, adapter, s, t, ref_masks) with identity adapters and the
    reference's masks of kind `mask` (padding as image)."""
    rng = np.random.default_rng(3)
    strides = (4, 8, 16, 32, 64)
    canvas = (128 * scale, 192 * scale)
    sizes = [(-(-canvas[0] // s), -(-canvas[1] // s)) for s in strides]
    n, g, c = 2, 5, 3
    xy = rng.uniform(0, 1, (n, g, 2)) * np.asarray([150, 90]) * scale
    wh = rng.uniform(2, 140 * scale, (n, g, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    boxes[..., 2] = np.minimum(boxes[..., 2], canvas[1] - 1)
    boxes[..., 3] = np.minimum(boxes[..., 3], canvas[0] - 1)
    boxes[0, 0] = [10, 10, 10.5, 60]  # a degenerate one
    valid = np.ones((n, g), bool)
    valid[1, 3:] = False  # padded gts
    s = [rng.normal(size=(n, h, w, c)).astype(np.float32) for h, w in sizes]
    t = [rng.normal(size=(n, h, w, c)).astype(np.float32) for h, w in sizes]
    gts = [[b for b, v in zip(boxes[i], valid[i], strict=True) if v] for i in range(n)]
    ref_masks = (_ref_gt_masks if mask == "gt" else _ref_roi_masks)(gts, sizes, list(strides))
    identity = np.zeros((3, 3, c, c), np.float32)
    identity[1, 1] = np.eye(c)
    adapter = {
        f"level_{i}": {"kernel": jnp.asarray(identity), "bias": jnp.zeros(c)} for i in range(5)
    }
    levels = ("p2", "p3", "p4", "p5", "p6")
    targets = {
        "boxes": jnp.asarray(boxes),
        "box_valid": jnp.asarray(valid),
        "image_valid": jnp.ones(n, bool),
        "pad_shape": jnp.asarray([[96 * scale, 128 * scale]] * n),
    }
    s_taps = {f"neck/{lvl}": jnp.asarray(x) for lvl, x in zip(levels, s, strict=True)}
    t_taps = {f"neck/{lvl}": jnp.asarray(x) for lvl, x in zip(levels, t, strict=True)}
    # Faster R-CNN's anchors (scale 8, ratios 0.5 / 1 / 2), which the FGFI masks are made of.
    spec = spec_pair(levels, strides, anchors={"anchor_scale": 8, "anchor_ratios": (0.5, 1, 2)})
    return spec, targets, s_taps, t_taps, adapter, s, t, ref_masks


def _neck_cfg(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(
            mask="gt",
            decoupled=True,
            fg_weight=3.0,
            bg_weight=12.0,
            group_size=0,
            count_padding=False,
            roi_phi=0.5,
        )
    )
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("mask", ["gt", "roi"])
def test_neck_loss_matches_reference_with_padding_as_background(mask):
    spec, targets, s_taps, t_taps, adapter, s, t, ref_masks = _reference_case(mask)
    for decoupled in (True, False):
        cfg = _neck_cfg(mask=mask, decoupled=decoupled, count_padding=True)
        got, _ = defeat.defeat_neck(s_taps, t_taps, targets, adapter, cfg=cfg, spec=spec)
        want = _ref_neck_loss(s, t, ref_masks, decoupled)
        assert float(got) == pytest.approx(want, rel=1e-5), (mask, decoupled)
    # Our default leaves the padding (beyond the 96 x 128 padded image) out of the background.
    cfg.update(count_padding=False, decoupled=True)
    ours, _ = defeat.defeat_neck(s_taps, t_taps, targets, adapter, cfg=cfg, spec=spec)
    assert float(ours) != pytest.approx(_ref_neck_loss(s, t, ref_masks, True), rel=1e-3)


# ----------------------------------------------------------------------------- maps


def test_neck_maps_by_hand():
    # _neck_case's: one gt box marks P2's cell (0, 0) of a 2 x 2 map.
    targets = {
        "boxes": jnp.asarray([[[0.0, 0.0, 4.0, 4.0]]]),
        "box_valid": jnp.asarray([[True]]),
        "image_valid": jnp.asarray([True]),
        "pad_shape": jnp.asarray([[8, 8]]),
        "rng": jax.random.PRNGKey(0),  # an evaluation batch carries one; unused
    }
    spec = spec_pair(("p2",), (4,))
    t_taps = {"neck/p2": jnp.zeros((1, 2, 2, 1))}
    maps = defeat.neck_maps(
        {"neck/p2": jnp.zeros((1, 2, 2, 1))}, t_taps, targets, cfg=_neck_cfg(), spec=spec
    )
    np.testing.assert_array_equal(maps["foreground"]["p2"], [[[1, 0], [0, 0]]])
    np.testing.assert_array_equal(maps["background"]["p2"], [[[0, 1], [1, 1]]])
    # A 4 x 4 px image: the other three cells are padding, neither foreground nor background...
    small = {**targets, "pad_shape": jnp.asarray([[4, 4]])}
    maps = defeat.neck_maps({}, t_taps, small, cfg=_neck_cfg(), spec=spec)
    np.testing.assert_array_equal(maps["background"]["p2"], np.zeros((1, 2, 2)))
    # ...unless padding counts as image (the reference's).
    maps = defeat.neck_maps({}, t_taps, small, cfg=_neck_cfg(count_padding=True), spec=spec)
    np.testing.assert_array_equal(maps["background"]["p2"], [[[0, 1], [1, 1]]])
    # FGFI (no background term): the foreground only; an invalid image has none.
    maps = defeat.neck_maps({}, t_taps, targets, cfg=_neck_cfg(decoupled=False), spec=spec)
    assert list(maps) == ["foreground"]
    gone = {**targets, "image_valid": jnp.asarray([False])}
    maps = defeat.neck_maps({}, t_taps, gone, cfg=_neck_cfg(), spec=spec)
    assert float(maps["foreground"]["p2"].sum() + maps["background"]["p2"].sum()) == 0.0


@pytest.mark.parametrize("mask", ["gt", "roi"])
def test_neck_maps_are_the_reference_masks(mask):
    # With padding as image, the foreground is the reference's get_gt_mask / get_roi_mask
    # (FGFI) loop by loop, and the background its complement.
    spec, targets, _, t_taps, _, _, _, ref_masks = _reference_case(mask, scale=4)
    assert sum(ref.any() for ref in ref_masks) >= 3  # boxes on several levels
    cfg = _neck_cfg(mask=mask, count_padding=True)
    maps = defeat.neck_maps({}, t_taps, targets, cfg=cfg, spec=spec)
    for lvl, ref in zip(spec.student.levels, ref_masks, strict=True):
        np.testing.assert_array_equal(maps["foreground"][lvl], ref.astype(np.float32), lvl)
        np.testing.assert_array_equal(maps["background"][lvl], (~ref).astype(np.float32), lvl)


@pytest.mark.parametrize("mask,group_size", [("gt", 0), ("roi", 1), ("all", 0)])
def test_neck_loss_is_the_one_its_maps_give(mask, group_size):
    # The loss recomputed from the maps (identity adapters: D = S - T), per group of images:
    # fg_w * mean_l mean_g sum F D^2 / max(1, 2 C sum F) + bg_w * (the same with B).
    spec, targets, s_taps, t_taps, adapter, s, t, _ = _reference_case(mask, scale=2)
    cfg = _neck_cfg(mask=mask, group_size=group_size)
    maps = defeat.neck_maps(s_taps, t_taps, targets, cfg=cfg, spec=spec)
    n, c = s[0].shape[0], s[0].shape[-1]
    groups = [slice(0, n)] if group_size == 0 else [slice(i, i + 1) for i in range(n)]
    terms = {}
    for name, weight in (("foreground", 3.0), ("background", 12.0)):
        per_level = []
        for lvl, sl, tl in zip(spec.student.levels, s, t, strict=True):
            m = np.asarray(maps[name][lvl], np.float64)
            d2 = ((sl.astype(np.float64) - tl) ** 2).sum(-1)
            per_level.append(
                np.mean([(m[g] * d2[g]).sum() / max(1.0, 2 * c * m[g].sum()) for g in groups])
            )
        terms[name] = weight * np.mean(per_level)
    got, parts = defeat.defeat_neck(s_taps, t_taps, targets, adapter, cfg=cfg, spec=spec)
    assert float(parts["fg"]) == pytest.approx(terms["foreground"], rel=1e-5)
    assert float(parts["bg"]) == pytest.approx(terms["background"], rel=1e-5)
    assert float(got) == pytest.approx(terms["foreground"] + terms["background"], rel=1e-5)
    assert float(parts["fg_cells"]) == pytest.approx(
        sum(float(m.sum()) for m in maps["foreground"].values())
    )
    if mask == "all":  # every valid cell is foreground: padding is still left out
        valid = api.pixel_valid(targets["pad_shape"], s[0].shape[1:3], 4)
        assert 0 < float(valid.mean()) < 1
        np.testing.assert_array_equal(maps["foreground"]["p2"], valid)
        assert float(sum(m.sum() for m in maps["background"].values())) == 0.0


def test_neck_maps_keys_shapes_levels_and_jit():
    spec, targets, s_taps, t_taps, *_ = _reference_case("roi")
    # The teacher's levels under other names: the maps are keyed by the student's.
    teacher = dataclasses.replace(spec.teacher, levels=("t2", "t3", "t4", "t5", "t6"))
    spec = api.Pair(spec.student, teacher)
    t_taps = {f"neck/t{k[-1]}": v for k, v in t_taps.items()}
    d = registry.get("defeat_neck")
    assert d.maps is defeat.neck_maps
    cfg = _neck_cfg(mask="roi")
    fn = jax.jit(lambda s, t, b: d.maps(s, t, b, cfg=cfg, spec=spec))
    maps = fn(s_taps, t_taps, targets)
    assert sorted(maps) == ["background", "foreground"]
    for name in maps:
        assert tuple(maps[name]) == spec.student.levels
        for lvl, m in maps[name].items():
            assert m.dtype == jnp.float32 and m.shape == s_taps[f"neck/{lvl}"].shape[:3]
    eager = d.maps(s_taps, t_taps, targets, cfg=cfg, spec=spec)
    np.testing.assert_array_equal(maps["foreground"]["p3"], eager["foreground"]["p3"])


def _dense_case(rng, anchors, n=2, k=2, hws=((2, 3), (1, 2))):
    """Random logits on P3, P4 (`hws`), `anchors` priors x k classes a cell, and random
    positives / negatives (disjoint): (spec, student taps, teacher taps)."""
    levels = ("p3", "p4")[: len(hws)]
    spec = spec_pair(levels, (8, 16)[: len(hws)], num_classes=k, num_anchors=anchors)
    s, t = {}, {}
    for lvl, (h, w) in zip(levels, hws, strict=True):
        s[f"head/cls_logits/{lvl}"] = jnp.asarray(rng.normal(size=(n, h, w, anchors * k)) * 2)
        t[f"head/cls_logits/{lvl}"] = jnp.asarray(rng.normal(size=(n, h, w, anchors * k)) * 2)
    total = sum(h * w * anchors for h, w in hws)
    u = rng.uniform(size=(n, total))
    s["assign/pos"] = jnp.asarray(u < 0.3)
    s["assign/neg"] = jnp.asarray(u > 0.5)
    return spec, s, t


def test_dense_maps_count_each_cells_priors_by_hand():
    # P3 1 x 2 and P4 1 x 1, 3 anchors x 1 class: priors (cell, anchor) location-major.
    spec = spec_pair(("p3", "p4"), (8, 16), num_anchors=3)
    taps = {
        "head/cls_logits/p3": jnp.zeros((1, 1, 2, 3)),
        "head/cls_logits/p4": jnp.zeros((1, 1, 1, 3)),
        #                        p3 (0, 0) | p3 (0, 1)  | p4 (0, 0)
        "assign/pos": jnp.asarray([[1, 0, 0, 1, 1, 0, 0, 0, 0]], bool),
        "assign/neg": jnp.asarray([[0, 1, 1, 0, 0, 0, 1, 1, 1]], bool),
    }
    maps = defeat.dense_maps(taps, {}, {}, cfg=None, spec=spec)
    assert sorted(maps) == ["negative", "positive"]
    np.testing.assert_array_equal(maps["positive"]["p3"], [[[1, 2]]])
    np.testing.assert_array_equal(maps["negative"]["p3"], [[[2, 0]]])
    np.testing.assert_array_equal(maps["positive"]["p4"], [[[0]]])
    np.testing.assert_array_equal(maps["negative"]["p4"], [[[3]]])
    bad = {**taps, "assign/pos": taps["assign/pos"][:, :6]}
    with pytest.raises(ValueError, match="priors"):
        defeat.dense_maps(bad, {}, {}, cfg=None, spec=spec)


@pytest.mark.parametrize("group_size", [0, 1])
def test_dense_kd_is_the_one_its_maps_give(group_size):
    # One prior a cell (GFL's case): the loss recomputed from the maps,
    # w * mean_g sum map kd / max(1, sum map), kd = sum_k softplus(z_s) - sigmoid(z_t) z_s.
    spec, s, t = _dense_case(np.random.default_rng(5), anchors=1)
    cfg = ml_collections.ConfigDict(
        dict(pos_weight=2.0, neg_weight=0.5, temperature=1.0, group_size=group_size)
    )
    d = registry.get("defeat_dense_kd")
    assert d.maps is defeat.dense_maps
    maps = jax.jit(lambda s, t: d.maps(s, t, {}, cfg=cfg, spec=spec))(s, t)
    _, parts = d.loss(s, t, {}, None, cfg=cfg, spec=spec)
    groups = [slice(0, 2)] if group_size == 0 else [slice(0, 1), slice(1, 2)]
    for name, key, weight in (("positive", "pos", 2.0), ("negative", "neg", 0.5)):
        num = np.zeros(len(groups))
        den = np.zeros(len(groups))
        for lvl in spec.student.levels:
            zs = np.asarray(s[f"head/cls_logits/{lvl}"], np.float64)
            q = 1 / (1 + np.exp(-np.asarray(t[f"head/cls_logits/{lvl}"], np.float64)))
            kd = (np.logaddexp(0, zs) - q * zs).sum(-1)  # [N, H, W]
            m = np.asarray(maps[name][lvl], np.float64)
            assert m.shape == zs.shape[:3] and maps[name][lvl].dtype == jnp.float32
            num += [(m[g] * kd[g]).sum() for g in groups]
            den += [m[g].sum() for g in groups]
        assert den.sum() > 0
        want = weight * np.mean(num / np.maximum(1.0, den))
        assert float(parts[key]) == pytest.approx(want, rel=1e-5), name


def test_dense_maps_shapes_with_several_anchors():
    spec, s, t = _dense_case(np.random.default_rng(6), anchors=3)
    maps = defeat.dense_maps(s, t, {}, cfg=None, spec=spec)
    for name, key in (("positive", "pos"), ("negative", "neg")):
        assert tuple(maps[name]) == ("p3", "p4")
        assert maps[name]["p3"].shape == (2, 2, 3) and maps[name]["p4"].shape == (2, 1, 2)
        assert float(sum(m.sum() for m in maps[name].values())) == float(s[f"assign/{key}"].sum())
        assert float(max(m.max() for m in maps[name].values())) <= 3
