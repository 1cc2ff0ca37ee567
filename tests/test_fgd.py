"""FGD against a loop-by-loop numpy transcription of yzd-v/FGD's `FeatureLoss`.

The transcription (`_original_level`) follows yzd-v/FGD `mmdet/distillation/losses/fgd.py`
(`forward`, `get_attention`, `get_fea_loss`, `get_mask_loss`, `spatial_pool`, `get_rela_loss`),
NCHW like the original, one FeatureLoss per FPN level, summed. Quirks of the original that the
transcription keeps and the port reproduces:
- boxes are scaled by x / size * W, floored at x1/y1 and CEILED at x2/y2 with an INCLUSIVE end
  (`hmin:hmax+1`), so a box marks one row and column more than it touches; the area
  1 / ((hmax + 1 - hmin)(wmax + 1 - wmin)) counts cells beyond the map edge that the slice clips;
- Mask_bg is divided by its sum only when the sum is non-zero;
- the fg/bg terms weight both features by sqrt of the TEACHER's attentions and mask, squared by
  the sum-MSE (the student's attentions only enter the mask (attention) loss);
- spatial_pool's softmax runs over all H * W cells; LayerNorm([C/2, 1, 1]) normalises the C/2
  context values with the biased variance and eps 1e-5;
- every term is divided by the batch size len(preds) only.
One deliberate difference: `size` is the padded input (mmrazor's `batch_input_shape`, as the spec
asks), not the original's unpadded `img_shape`, which stretched boxes on padded images.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers.distill import (
    as_jnp,
    assert_gradients,
    assert_jit_and_bfloat16,
    junk_padding,
    mse_sum_per_image,
    neck_case,
    random_leaves,
    registered,
    spec_pair,
    to_nchw,
)

from jdistill.distill import fgd

LEVELS, STRIDES = ("p3", "p4"), (8, 16)
TERMS = ("fg", "bg", "at", "rela")


def _spec(cs, ct, levels=LEVELS, strides=STRIDES):
    fields = dict(family="gfl", num_classes=3, reg_max=16, provides=("neck",))
    return spec_pair(levels, strides, channels=cs, teacher_channels=ct, **fields)


def _cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(fgd.DEFAULTS))
    cfg.update(overrides)
    return cfg


# Distinct weights, so a swapped term shows.
WEIGHTS = dict(alpha_fgd=1.0, beta_fgd=2.0, gamma_fgd=3.0, lambda_fgd=0.5)


# ------------------------------------------------------------------- the original, in numpy


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _get_attention(preds, temp):
    n_img, c, h, w = preds.shape
    value = np.abs(preds)
    fea_map = value.mean(axis=1)  # N, H, W
    s_att = np.zeros((n_img, h, w))
    c_att = np.zeros((n_img, c))
    channel_map = value.mean(axis=2).mean(axis=2)  # N, C
    for n in range(n_img):
        s_att[n] = (h * w * _softmax((fea_map[n] / temp).reshape(-1))).reshape(h, w)
        c_att[n] = c * _softmax(channel_map[n] / temp)
    return s_att, c_att


def _masks(gt_bboxes, size, h, w):
    """Mask_fg, Mask_bg of `forward`: gt_bboxes a list of [nt, 4] per image; size (H_in, W_in)."""
    n_img = len(gt_bboxes)
    mask_fg = np.zeros((n_img, h, w), np.float32)
    mask_bg = np.ones((n_img, h, w), np.float32)
    f32 = np.float32
    for i in range(n_img):
        boxes = np.asarray(gt_bboxes[i], np.float32).reshape(-1, 4)
        for j in range(len(boxes)):
            # float32 as torch computes it, in the same order (x / size * W)
            wmin = int(np.floor(boxes[j, 0] / f32(size[1]) * f32(w)))
            wmax = int(np.ceil(boxes[j, 2] / f32(size[1]) * f32(w)))
            hmin = int(np.floor(boxes[j, 1] / f32(size[0]) * f32(h)))
            hmax = int(np.ceil(boxes[j, 3] / f32(size[0]) * f32(h)))
            area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
            # Mask_fg[i][hmin:hmax+1, wmin:wmax+1] = max(..., area): the slice clips at H, W
            for y in range(hmin, min(hmax + 1, h)):
                for x in range(wmin, min(wmax + 1, w)):
                    mask_fg[i, y, x] = max(mask_fg[i, y, x], area)
        mask_bg[i] = np.where(mask_fg[i] > 0, 0, 1)
        if mask_bg[i].sum():
            mask_bg[i] /= mask_bg[i].sum()
    return mask_fg, mask_bg


def _conv1x1(x, kernel, bias):
    """torch 1x1 Conv2d from our [C_in, C_out] matrix: x [N, C_in, H, W]."""
    weight = np.asarray(kernel, np.float64).T  # [C_out, C_in]
    n_img, _, h, w = x.shape
    out = np.zeros((n_img, weight.shape[0], h, w))
    for n in range(n_img):
        for o in range(weight.shape[0]):
            for y in range(h):
                for xx in range(w):
                    out[n, o, y, xx] = weight[o] @ x[n, :, y, xx] + float(bias[o])
    return out


def _gc_block(x, gc):
    """`spatial_pool` + `channel_add_conv` + residual of one side. x [N, C, H, W]."""
    n_img, c, h, w = x.shape
    context_mask = _conv1x1(x, gc["mask"]["kernel"], gc["mask"]["bias"])  # N, 1, H, W
    out = x.copy()
    for n in range(n_img):
        p = _softmax(context_mask[n, 0].reshape(-1))  # over H * W
        context = x[n].reshape(c, h * w) @ p  # [C]
        y = np.asarray(gc["add1"]["kernel"], np.float64).T @ context + gc["add1"]["bias"]
        mu, var = y.mean(), ((y - y.mean()) ** 2).mean()
        y = (y - mu) / np.sqrt(var + 1e-5) * gc["ln"]["scale"] + gc["ln"]["bias"]
        y = np.maximum(y, 0.0)
        add = np.asarray(gc["add2"]["kernel"], np.float64).T @ y + gc["add2"]["bias"]
        out[n] = x[n] + add[:, None, None]
    return out


def _original_level(preds_s, preds_t, gt_bboxes, size, level_params, temp, w):
    """One FeatureLoss call: returns {'fg', 'bg', 'at', 'rela'} already weighted."""
    if "align" in level_params:
        p = level_params["align"]
        preds_s = _conv1x1(preds_s, p["kernel"], p["bias"])
    n_img, c, h, wd = preds_s.shape
    s_att_t, c_att_t = _get_attention(preds_t, temp)
    s_att_s, c_att_s = _get_attention(preds_s, temp)
    mask_fg, mask_bg = _masks(gt_bboxes, size, h, wd)

    fg_loss = bg_loss = 0.0
    for n in range(n_img):
        for ch in range(c):
            for y in range(h):
                for x in range(wd):
                    scale = math.sqrt(s_att_t[n, y, x]) * math.sqrt(c_att_t[n, ch])
                    fea_t, fea_s = preds_t[n, ch, y, x] * scale, preds_s[n, ch, y, x] * scale
                    fg = math.sqrt(mask_fg[n, y, x])
                    bg = math.sqrt(mask_bg[n, y, x])
                    fg_loss += (fea_s * fg - fea_t * fg) ** 2
                    bg_loss += (fea_s * bg - fea_t * bg) ** 2
    fg_loss /= n_img
    bg_loss /= n_img
    mask_loss = np.abs(c_att_s - c_att_t).sum() / n_img + np.abs(s_att_s - s_att_t).sum() / n_img
    out_s = _gc_block(preds_s, level_params["gc_s"])
    out_t = _gc_block(preds_t, level_params["gc_t"])
    rela_loss = mse_sum_per_image(out_s, out_t)
    return {
        "fg": w["alpha_fgd"] * fg_loss,
        "bg": w["beta_fgd"] * bg_loss,
        "at": w["gamma_fgd"] * mask_loss,
        "rela": w["lambda_fgd"] * rela_loss,
    }


# ------------------------------------------------------------------------------- fixtures


def _random_params(spec, seed):
    """`init`'s structure with every leaf random (the zero-init last conv would hide GC)."""
    params = fgd.init(jax.random.PRNGKey(seed), cfg=_cfg(), spec=spec)
    return random_leaves(np.random.default_rng(seed), params, 0.5)


def _case(seed=0, cs=4, ct=6, n=2, hw3=(6, 8)):
    """Random taps on P3 (hw3) and P4, random params, padded boxes (one slot invalid)."""
    rng = np.random.default_rng(seed)
    spec = _spec(cs, ct)
    # Larger magnitudes than N(0, 1) make the attentions far from uniform.
    s, t, batch = neck_case(rng, spec, n, hw3, 2.0)
    canvas_h, canvas_w = hw3[0] * 8, hw3[1] * 8
    boxes = [
        # random boxes, one reaching the bottom-right corner (its ceil end leaves the map)
        [[3.3, 5.1, 20.7, 17.2], [10.2, 2.9, 14.6, 30.5], [30.1, 22.3, canvas_w, canvas_h]],
        [[1.5, 1.7, 9.9, 13.4]],
    ]
    g = 4
    padded = np.zeros((n, g, 4), np.float32)
    valid = np.zeros((n, g), bool)
    for i, bx in enumerate(boxes):
        padded[i, : len(bx)] = bx
        valid[i, : len(bx)] = True
    padded[1, 3] = [0.0, 0.0, 40.0, 40.0]  # an invalid slot holding a real-looking box
    batch.update(boxes=jnp.asarray(padded), box_valid=jnp.asarray(valid))
    return spec, s, t, _random_params(spec, seed), boxes, batch


def _original(s, t, boxes, params, sizes, temp, w):
    """Sum over levels of `_original_level`; `sizes[lvl]` the input size the boxes scale by."""
    want = dict.fromkeys(TERMS, 0.0)
    for i, lvl in enumerate(LEVELS):
        terms = _original_level(
            to_nchw(s[f"neck/{lvl}"]),
            to_nchw(t[f"neck/{lvl}"]),
            boxes,
            sizes[lvl],
            params[f"level_{i}"],
            temp,
            w,
        )
        for k in TERMS:
            want[k] += terms[k]
    return want


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "cs, image_canvas",
    [
        (6, None),  # equal widths, the canvas inferred from P3 (48 x 64)
        (4, (46, 62)),  # an align conv; the canvas from batch['image'], not a stride multiple
    ],
)
@pytest.mark.slow
def test_matches_the_original_on_the_full_map(cs, image_canvas):
    spec, s, t, params, boxes, batch = _case(cs=cs)
    batch["pad_shape"] = jnp.asarray([[20, 30], [48, 9]], jnp.int32)  # ignored: count_padding
    size = (48, 64)
    if image_canvas is not None:
        batch["image"] = jnp.zeros((2, *image_canvas, 3), jnp.uint8)
        size = image_canvas
    cfg = _cfg(count_padding=True, temp=0.7, **WEIGHTS)
    got, metrics = fgd.loss(as_jnp(s), as_jnp(t), batch, params, cfg=cfg, spec=spec)
    want = _original(s, t, boxes, params, {"p3": size, "p4": size}, 0.7, WEIGHTS)
    assert ("align" in params["level_0"]) == (cs != 6)
    for k in TERMS:
        np.testing.assert_allclose(metrics[k], want[k], rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(got, sum(want.values()), rtol=1e-5)


def test_foreground_mask_by_hand():
    # 4 x 4 map of a 32 x 32 canvas (stride 8).
    boxes = jnp.asarray(
        [
            [[4, 4, 12, 20], [8, 8, 8, 8], [0, 0, 0, 0]],  # image 0; slot 2 invalid
            [[20, 28, 32, 32], [0, 0, 31, 31], [0, 0, 0, 0]],  # image 1; slot 1 invalid
        ],
        jnp.float32,
    )
    box_valid = jnp.asarray([[True, True, False], [True, False, False]])
    fg = np.asarray(fgd.foreground_mask(boxes, box_valid, (4, 4), (32, 32)))
    want0 = np.zeros((4, 4))
    # x 0.5..1.5 -> cols 0..2 (ceil 2, inclusive); y 0.5..2.5 -> rows 0..3: 12 cells
    want0[0:4, 0:3] = 1 / 12
    want0[1, 1] = 1.0  # the point box at (1, 1): cells 1..1 x 1..1, area 1, the max wins
    # x 2.5..4 -> cols 2..4, y 3.5..4 -> rows 3..4: 3 x 2 = 6 cells counted, 2 x 1 on the map
    want1 = np.zeros((4, 4))
    want1[3, 2:4] = 1 / 6
    np.testing.assert_allclose(fg, np.stack([want0, want1]), rtol=1e-6)
    bg = np.asarray(fgd.background_mask(jnp.asarray(fg), jnp.ones((2, 4, 4))))
    np.testing.assert_allclose(bg[0], np.where(want0 > 0, 0, 1 / 4))  # column 3 is background
    np.testing.assert_allclose(bg[1], np.where(want1 > 0, 0, 1 / 14))
    # a map that is all foreground has no background (and no division by zero)
    full = fgd.background_mask(jnp.ones((1, 2, 2)), jnp.ones((1, 2, 2)))
    np.testing.assert_array_equal(full, np.zeros((1, 2, 2)))


def test_attention_by_hand():
    # |F| averaged over C = 2: cells (1, 3) in a 1 x 2 map; t = 1.
    feat = jnp.asarray([[[[1.0, -1.0], [3.0, -3.0]]]])  # [1, 1, 2, 2]
    sp, ch = fgd.attention(feat, jnp.ones((1, 1, 2)), 1.0)
    e = np.exp([1.0, 3.0])
    np.testing.assert_allclose(sp[0, 0], 2 * e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(ch[0], [1.0, 1.0], rtol=1e-6)  # equal channel means
    # the second cell is padding: all the spatial mass on the first, channel means from it only
    sp, ch = fgd.attention(feat, jnp.asarray([[[1.0, 0.0]]]), 1.0)
    np.testing.assert_allclose(sp[0, 0], [1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(ch[0], [1.0, 1.0], rtol=1e-6)


@pytest.mark.slow
def test_padding_cells_are_excluded_by_default():
    spec, s, t, params, boxes, batch = _case(seed=3)
    # image 1 is 40 x 36 px: P3 cells 5 x 5 of 6 x 8, P4 3 x 3 of 3 x 4; its box fits inside
    batch["pad_shape"] = jnp.asarray([[48, 64], [40, 36]], jnp.int32)
    valid_hw = {"p3": [(6, 8), (5, 5)], "p4": [(3, 4), (3, 3)]}
    cfg = _cfg(temp=0.5, **WEIGHTS)
    clean, m_clean = fgd.loss(as_jnp(s), as_jnp(t), batch, params, cfg=cfg, spec=spec)

    # Equal to the original run on each image alone, cropped to its padded size, with the
    # boxes scaled by the cropped input size (vh * stride, vw * stride), averaged over images.
    want = dict.fromkeys(TERMS, 0.0)
    for n in range(2):
        for i, (lvl, stride) in enumerate(zip(LEVELS, STRIDES, strict=True)):
            vh, vw = valid_hw[lvl][n]
            terms = _original_level(
                to_nchw(s[f"neck/{lvl}"][n : n + 1, :vh, :vw]),
                to_nchw(t[f"neck/{lvl}"][n : n + 1, :vh, :vw]),
                [boxes[n]],
                (vh * stride, vw * stride),
                params[f"level_{i}"],
                0.5,
                WEIGHTS,
            )
            for k in TERMS:
                want[k] += terms[k] / 2
    for k in TERMS:
        np.testing.assert_allclose(m_clean[k], want[k], rtol=1e-5, err_msg=k)

    # Garbage in the padding cells of either side changes nothing.
    dirty_s, dirty_t = junk_padding(np.random.default_rng(9), s, t, valid_hw, 1, 30)
    dirty, _ = fgd.loss(as_jnp(dirty_s), as_jnp(dirty_t), batch, params, cfg=cfg, spec=spec)
    np.testing.assert_allclose(dirty, clean, rtol=1e-6)
    cfg.count_padding = True
    counted, _ = fgd.loss(as_jnp(dirty_s), as_jnp(dirty_t), batch, params, cfg=cfg, spec=spec)
    assert abs(float(counted) - float(clean)) > 0.1 * float(clean)

    # An image marked invalid counts nowhere, not even in N.
    cfg.count_padding = False
    batch["image_valid"] = jnp.asarray([True, False])
    one, _ = fgd.loss(as_jnp(dirty_s), as_jnp(dirty_t), batch, params, cfg=cfg, spec=spec)
    only0 = _original(
        {k: v[:1] for k, v in s.items()},
        {k: v[:1] for k, v in t.items()},
        boxes[:1],
        params,
        {"p3": (48, 64), "p4": (48, 64)},
        0.5,
        WEIGHTS,
    )
    np.testing.assert_allclose(one, sum(only0.values()), rtol=1e-5)


@pytest.mark.slow
def test_gradients_jit_and_bfloat16():
    spec, s, t, _, _, batch = _case(seed=4)
    cfg = _cfg()
    fn = functools.partial(fgd.loss, cfg=cfg, spec=spec)

    def total(s_taps, t_taps, p):
        return fn(s_taps, t_taps, batch, p)[0]

    grad = jax.grad(total, argnums=(0, 1, 2))
    # From init: the zero last conv gets a gradient (and the student, the align conv).
    params = fgd.init(jax.random.PRNGKey(0), cfg=cfg, spec=spec)
    g_s, g_t, g_p = grad(as_jnp(s), as_jnp(t), params)
    assert_gradients(g_t, g_s)
    for i in range(2):
        lvl = g_p[f"level_{i}"]
        for name in ("align",):
            assert float(jnp.abs(lvl[name]["kernel"]).sum()) > 0
        for side in ("gc_s", "gc_t"):
            assert float(jnp.abs(lvl[side]["add2"]["kernel"]).sum()) > 0
    # From random params every leaf, the teacher-side GC included, gets a gradient.
    _, g_t, g_p = grad(as_jnp(s), as_jnp(t), _random_params(spec, 1))
    assert_gradients(g_t, g_p)

    assert_jit_and_bfloat16(fn, s, t, batch, params, TERMS)


def test_init_follows_the_original():
    spec = _spec(8, 64, ("p3", "p4", "p5"), (8, 16, 32))
    p = fgd.init(jax.random.PRNGKey(0), cfg=_cfg(), spec=spec)
    assert sorted(p) == ["level_0", "level_1", "level_2"]
    lvl = p["level_1"]
    assert lvl["align"]["kernel"].shape == (8, 64)
    assert np.abs(lvl["align"]["kernel"]).max() <= 1 / math.sqrt(8)  # PyTorch default
    for side in ("gc_s", "gc_t"):
        gc = lvl[side]
        assert gc["mask"]["kernel"].shape == (64, 1)
        # kaiming_normal fan_in relu: std sqrt(2 / 64) = 0.177 over 64 draws
        assert 0.11 < float(jnp.std(gc["mask"]["kernel"])) < 0.25
        assert float(jnp.abs(gc["mask"]["bias"]).sum()) == 0
        assert gc["add1"]["kernel"].shape == (64, 32)
        assert np.abs(gc["add1"]["kernel"]).max() <= 1 / math.sqrt(64)
        np.testing.assert_array_equal(gc["ln"]["scale"], np.ones(32))
        assert float(jnp.abs(gc["add2"]["kernel"]).sum() + jnp.abs(gc["add2"]["bias"]).sum()) == 0
    assert not np.array_equal(lvl["gc_s"]["mask"]["kernel"], lvl["gc_t"]["mask"]["kernel"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    assert "align" not in fgd.init(jax.random.PRNGKey(0), cfg=_cfg(), spec=_spec(6, 6))["level_0"]


def test_registry_and_check():
    d = registered(fgd, "fgd")
    assert d.init is fgd.init
    # the original's RetinaNet/GFL numbers are the defaults: those presets change nothing
    want = dict(temp=0.5, alpha_fgd=1e-3, beta_fgd=5e-4, gamma_fgd=5e-4, lambda_fgd=5e-6)
    assert {k: d.defaults[k] for k in want} == want
    assert fgd.PRESETS["fgd_gfl"] == fgd.PRESETS["fgd_retinanet"] == {"fgd": {"fn": "fgd"}}
    assert d.check(_cfg(), _spec(6, 6)) is None
    assert "channels" in d.check(_cfg(), _spec(6, 5))


def test_levels_option_selects_pairs():
    spec, s, t, params, boxes, batch = _case(seed=5)
    cfg = _cfg(count_padding=True, levels=(16,), **WEIGHTS)
    assert sorted(fgd.init(jax.random.PRNGKey(0), cfg=cfg, spec=spec)) == ["level_0"]
    # P4 alone, its params at index 0 of the selected pairs
    got, _ = fgd.loss(
        as_jnp(s), as_jnp(t), batch, {"level_0": params["level_1"]}, cfg=cfg, spec=spec
    )
    want = _original_level(
        to_nchw(s["neck/p4"]),
        to_nchw(t["neck/p4"]),
        boxes,
        (48, 64),
        params["level_1"],
        0.5,
        WEIGHTS,
    )
    np.testing.assert_allclose(got, sum(want.values()), rtol=1e-5)
    # the trainer's old `levels` (names) or an unpaired stride is refused, not silently empty
    assert "levels" in fgd.check(_cfg(levels=("p3", "p4")), spec)
    assert "levels" in fgd.check(_cfg(levels=(8, 32)), spec)
    with pytest.raises(ValueError, match="no level"):
        fgd.loss(as_jnp(s), as_jnp(t), batch, params, cfg=_cfg(levels=(32,)), spec=spec)
    assert fgd.PRESETS["fgd_faster_rcnn"]["fgd"]["levels"] == (4, 8, 16, 32)


# ---------------------------------------------------------------------------------- maps

MAP_NAMES = (
    "foreground",
    "background",
    "spatial attention (teacher)",
    "channel attention (teacher)",
    "spatial attention (student)",
    "channel attention (student)",
)


def test_maps_by_hand():
    # One image, P3 only: 4 x 4 cells of a 32 x 32 canvas, C = 2, temp 0.5.
    spec = _spec(2, 2, ("p3",), (8,))
    v = math.log(17.0)
    t = jnp.zeros((1, 4, 4, 2)).at[0, 0, 0, 0].set(v)  # mean_c |T| = v / 2 at (0, 0)
    s = jnp.zeros((1, 4, 4, 2))
    batch = {
        # x, y 8..15 -> cells floor(1) .. ceil(1.875) = 1..2 (inclusive): 2 x 2 cells
        "boxes": jnp.asarray([[[8.0, 8.0, 15.0, 15.0], [0.0, 0.0, 32.0, 32.0]]]),
        "box_valid": jnp.asarray([[True, False]]),
        "pad_shape": jnp.asarray([[32, 32]], jnp.int32),
        "image_valid": jnp.asarray([True]),
        "image": jnp.zeros((1, 32, 32, 3), jnp.uint8),
    }
    got = fgd.fgd_maps({"neck/p3": s}, {"neck/p3": t}, batch, cfg=_cfg(), spec=spec)
    assert sorted(got) == sorted(MAP_NAMES)
    box = np.zeros((4, 4), bool)
    box[1:3, 1:3] = True
    np.testing.assert_allclose(got["foreground"]["p3"][0], np.where(box, 1 / 4, 0.0))
    np.testing.assert_allclose(got["background"]["p3"][0], np.where(box, 0.0, 1 / 12), rtol=1e-6)
    # A_S(T) = 16 softmax(v / 0.5 at (0, 0), 0 elsewhere) = 16 (17, 1, ...) / 32
    want_sp = np.full((4, 4), 0.5)
    want_sp[0, 0] = 8.5
    np.testing.assert_allclose(got["spatial attention (teacher)"]["p3"][0], want_sp, rtol=1e-6)
    # A_C(T) = 2 softmax((v / 16, 0) / 0.5)
    e = math.exp(v / 8)
    want_ch = [2 * e / (e + 1), 2 / (e + 1)]
    np.testing.assert_allclose(got["channel attention (teacher)"]["p3"][0], want_ch, rtol=1e-6)
    # S = 0: uniform attentions
    np.testing.assert_allclose(got["spatial attention (student)"]["p3"], np.ones((1, 4, 4)))
    np.testing.assert_allclose(got["channel attention (student)"]["p3"], np.ones((1, 2)))


def test_maps_are_the_masks_and_attentions_of_the_loss():
    # equal widths (no align), image 1 padded to 40 x 36 px of the 48 x 64 canvas
    spec, s, t, params, _, batch = _case(seed=6, cs=6)
    batch["pad_shape"] = jnp.asarray([[48, 64], [40, 36]], jnp.int32)
    cfg = _cfg(temp=0.7, **WEIGHTS)
    _, metrics = fgd.loss(as_jnp(s), as_jnp(t), batch, params, cfg=cfg, spec=spec)
    m = fgd.fgd_maps(as_jnp(s), as_jnp(t), batch, cfg=cfg, spec=spec)
    want = dict.fromkeys(("fg", "bg", "at"), 0.0)
    for lvl in LEVELS:
        sq = (s[f"neck/{lvl}"].astype(np.float64) - t[f"neck/{lvl}"]) ** 2
        sp_t = np.asarray(m["spatial attention (teacher)"][lvl], np.float64)
        ch_t = np.asarray(m["channel attention (teacher)"][lvl], np.float64)
        err = sq * sp_t[..., None] * ch_t[:, None, None, :]
        want["fg"] += WEIGHTS["alpha_fgd"] * (err * m["foreground"][lvl][..., None]).sum() / 2
        want["bg"] += WEIGHTS["beta_fgd"] * (err * m["background"][lvl][..., None]).sum() / 2
        d_sp = np.abs(m["spatial attention (student)"][lvl] - sp_t).sum()
        d_ch = np.abs(m["channel attention (student)"][lvl] - ch_t).sum()
        want["at"] += WEIGHTS["gamma_fgd"] * (d_sp + d_ch) / 2
        assert float(m["foreground"][lvl][1].max()) > 0  # image 1's box shows
    for k in want:
        np.testing.assert_allclose(metrics[k], want[k], rtol=1e-5, err_msg=k)
    # padding cells of image 1 carry no mask or attention (P3: 5 x 5 of 6 x 8 valid)
    for name in MAP_NAMES[:3]:
        assert (
            float(jnp.abs(m[name]["p3"][1, 5:]).sum() + jnp.abs(m[name]["p3"][1, :, 5:]).sum()) == 0
        )


def test_maps_keys_levels_shapes_and_jit():
    spec, s, t, _, _, batch = _case(seed=7)  # student 4 channels, teacher 6: an align conv
    assert registered(fgd, "fgd").maps is fgd.fgd_maps
    fn = functools.partial(fgd.fgd_maps, cfg=_cfg(), spec=spec)
    got = fn(as_jnp(s), as_jnp(t), batch)
    # the student's attentions need the align conv (a parameter): only the teacher's show
    assert sorted(got) == sorted(MAP_NAMES[:4])
    for name, by_level in got.items():
        assert sorted(by_level) == list(LEVELS)
        for lvl in LEVELS:
            n, h, w, c = t[f"neck/{lvl}"].shape
            want = (n, c) if name.startswith("channel") else (n, h, w)
            assert by_level[lvl].shape == want and by_level[lvl].dtype == jnp.float32, name
    jitted = jax.jit(fn)(as_jnp(s), as_jnp(t), batch)
    for name in got:
        for lvl in LEVELS:
            np.testing.assert_allclose(jitted[name][lvl], got[name][lvl], rtol=1e-6, atol=1e-7)
    # equal widths: all six; `levels` keeps P4 alone
    spec6, s6, t6, _, _, batch6 = _case(seed=7, cs=6)
    got = fgd.fgd_maps(as_jnp(s6), as_jnp(t6), batch6, cfg=_cfg(levels=(16,)), spec=spec6)
    assert sorted(got) == sorted(MAP_NAMES)
    assert all(sorted(v) == ["p4"] for v in got.values())
    assert got["channel attention (student)"]["p4"].shape == (2, 6)
