"""MGD against a loop-by-loop numpy transcription of mmrazor's MGDConnector + MGDLoss.

The transcription (`_original_level`) follows mmrazor `mmrazor/models/architectures/connectors/
mgd_connector.py` and `mmrazor/models/losses/mgd_loss.py`, NCHW like the original:
  mat = where(rand(N, 1, H, W) > 1 - lambda, 0, 1); new = generation(align(S) * mat),
  generation = Conv3x3(pad 1, bias) -> ReLU -> Conv3x3(pad 1, bias);
  loss = alpha * MSELoss(reduction='sum')(new, T) / N, one loss per FPN level, summed.
Quirks of the original, kept by the port: the mask is applied after the align conv; masked cells
are zeros (no mask token); the loss is a sum over channels and cells divided by the batch only;
the batch padding counts as image (our `count_padding=True`). Both sides get the same mask here:
the mask is an explicit input of `mgd.loss_with_masks`, and the drawing is tested on its own.
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

from jdistill.distill import api, mgd

LEVELS, STRIDES = ("p3", "p4"), (8, 16)


def _spec(cs, ct, levels=LEVELS, strides=STRIDES):
    fields = dict(num_classes=3, num_anchors=9, provides=("neck",))
    return spec_pair(levels, strides, channels=cs, teacher_channels=ct, **fields)


def _cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(mgd.DEFAULTS))
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------- the original, in numpy


def _conv_nchw(x, weight, bias):
    """torch Conv2d(stride 1, padding k // 2): x [N, Ci, H, W], weight [Co, Ci, k, k]."""
    n_img, ci, h, w = x.shape
    co, _, k, _ = weight.shape
    p = k // 2
    xp = np.zeros((n_img, ci, h + 2 * p, w + 2 * p))
    xp[:, :, p : p + h, p : p + w] = x
    out = np.zeros((n_img, co, h, w))
    for n in range(n_img):
        for o in range(co):
            for i in range(h):
                for j in range(w):
                    out[n, o, i, j] = np.sum(xp[n, :, i : i + k, j : j + k] * weight[o]) + bias[o]
    return out


def _torch_weight(p):
    """Our HWIO kernel -> torch's OIHW weight, and the bias, as float64 numpy."""
    return np.asarray(p["kernel"], np.float64).transpose(3, 2, 0, 1), np.asarray(p["bias"])


def _original_level(preds_s, preds_t, level_params, mat, alpha):
    """One level of mmrazor's MGD. preds_s [N, Cs, H, W], preds_t [N, Ct, H, W], mat
    [N, 1, H, W] in {0, 1} (the connector's `mat`)."""
    feature = preds_s
    if "align" in level_params:
        feature = _conv_nchw(feature, *_torch_weight(level_params["align"]))
    masked = feature * mat
    hidden = np.maximum(_conv_nchw(masked, *_torch_weight(level_params["gen1"])), 0.0)
    new = _conv_nchw(hidden, *_torch_weight(level_params["gen2"]))
    return alpha * mse_sum_per_image(new, preds_t)


# ------------------------------------------------------------------------------- fixtures


def _case(seed=0, cs=3, ct=4, n=2, hw3=(5, 6)):
    """Random student/teacher taps on P3, P4, random params (all leaves), NCHW copies."""
    rng = np.random.default_rng(seed)
    spec = _spec(cs, ct)
    s, t, batch = neck_case(rng, spec, n, hw3)
    params = random_leaves(rng, mgd.init(jax.random.PRNGKey(seed), cfg=_cfg(), spec=spec), 0.3)
    mats = {
        i: (rng.random((n, 1, *s[f"neck/{lvl}"].shape[1:3])) <= 1 - 0.65).astype(np.float32)
        for i, lvl in enumerate(LEVELS)
    }
    return spec, s, t, params, mats, batch


def _masks_nhwc(mats):
    return {i: jnp.asarray(m.transpose(0, 2, 3, 1)) for i, m in mats.items()}


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("cs", [4, 3])  # equal widths (no align) and an align conv
def test_matches_the_original_on_the_full_map(cs):
    spec, s, t, params, mats, batch = _case(cs=cs)
    # Smaller padded sizes must not matter with count_padding: the original sees everything.
    batch["pad_shape"] = jnp.asarray([[24, 24], [9, 30]], jnp.int32)
    cfg = _cfg(count_padding=True, alpha_mgd=0.37)
    got, metrics = mgd.loss_with_masks(
        as_jnp(s), as_jnp(t), batch, params, _masks_nhwc(mats), cfg=cfg, spec=spec
    )
    want = {
        lvl: _original_level(
            to_nchw(s[f"neck/{lvl}"]),
            to_nchw(t[f"neck/{lvl}"]),
            params[f"level_{i}"],
            mats[i],
            0.37,
        )
        for i, lvl in enumerate(LEVELS)
    }
    assert ("align" in params["level_0"]) == (cs != 4)
    for lvl in LEVELS:
        np.testing.assert_allclose(metrics[lvl], want[lvl], rtol=1e-5)
    np.testing.assert_allclose(got, sum(want.values()), rtol=1e-5)


def test_hand_computed_case():
    # 1 x 3 map, C = 1, centre-only kernels: gen1 = x, gen2 = 2 x + 1, T = 0, alpha 1.
    centre = lambda v: jnp.zeros((3, 3, 1, 1)).at[1, 1, 0, 0].set(v)  # noqa: E731
    params = {
        "level_0": {
            "gen1": {"kernel": centre(1.0), "bias": jnp.zeros(1)},
            "gen2": {"kernel": centre(2.0), "bias": jnp.ones(1)},
        }
    }
    spec = _spec(1, 1, ("p3",), (8,))
    s = {"neck/p3": jnp.asarray([1.0, -2.0, 3.0]).reshape(1, 1, 3, 1)}
    t = {"neck/p3": jnp.zeros((1, 1, 3, 1))}
    batch = {"pad_shape": jnp.asarray([[8, 24]]), "image_valid": jnp.asarray([True])}
    cfg = _cfg(alpha_mgd=1.0)
    keep = {0: jnp.ones((1, 1, 3, 1))}
    # relu(1, -2, 3) = (1, 0, 3) -> (3, 1, 7): 9 + 1 + 49
    got, _ = mgd.loss_with_masks(s, t, batch, params, keep, cfg=cfg, spec=spec)
    np.testing.assert_allclose(got, 59.0, rtol=1e-6)
    # masking the first cell: (0, 0, 3) -> (1, 1, 7): 1 + 1 + 49
    first = {0: jnp.asarray([0.0, 1.0, 1.0]).reshape(1, 1, 3, 1)}
    got, _ = mgd.loss_with_masks(s, t, batch, params, first, cfg=cfg, spec=spec)
    np.testing.assert_allclose(got, 51.0, rtol=1e-6)
    # the image is 16 px wide: the third cell is padding, zeroed before the convs and not summed
    batch["pad_shape"] = jnp.asarray([[8, 16]])
    got, _ = mgd.loss_with_masks(s, t, batch, params, keep, cfg=cfg, spec=spec)
    np.testing.assert_allclose(got, 9.0 + 1.0, rtol=1e-6)


def test_drawn_mask_rate_and_keys():
    shape = (4, 64, 64, 8)
    key = jax.random.PRNGKey(3)
    m = np.asarray(mgd.draw_mask(key, shape, 0.65))
    assert m.shape == (4, 64, 64, 1) and set(np.unique(m)) == {0.0, 1.0}
    assert abs((1 - m).mean() - 0.65) < 0.02  # 16384 draws: std 0.004
    assert np.array_equal(m, np.asarray(mgd.draw_mask(key, shape, 0.65)))  # a function of the key
    other = np.asarray(mgd.draw_mask(jax.random.PRNGKey(4), shape, 0.65))
    assert (other != m).mean() > 0.3
    assert np.asarray(mgd.draw_mask(key, shape, 0.0)).min() == 1.0
    ch = np.asarray(mgd.draw_mask(key, (64, 5, 5, 32), 0.65, mask_on_channel=True))
    assert ch.shape == (64, 1, 1, 32) and abs((1 - ch).mean() - 0.65) < 0.04
    # levels get different masks from one step key, and the step key changes them all
    pairs = api.paired_levels(_spec(4, 4))
    k1 = mgd.level_keys(jax.random.PRNGKey(0), pairs)
    k2 = mgd.level_keys(jax.random.PRNGKey(1), pairs)
    draw = lambda k: np.asarray(mgd.draw_mask(k, (2, 16, 16, 4), 0.65))  # noqa: E731
    assert not np.array_equal(draw(k1[0]), draw(k1[1]))
    assert not np.array_equal(draw(k1[0]), draw(k2[0]))


def test_loss_draws_from_batch_rng():
    spec, s, t, params, _, batch = _case(seed=1)
    cfg = _cfg()
    batch = dict(batch, rng=jax.random.fold_in(jax.random.PRNGKey(7), 12))
    got, _ = mgd.loss(as_jnp(s), as_jnp(t), batch, params, cfg=cfg, spec=spec)
    keys = mgd.level_keys(batch["rng"], api.paired_levels(spec))
    masks = {
        i: mgd.draw_mask(keys[i], (*s[f"neck/{lvl}"].shape[:3], 4), 0.65)
        for i, lvl in enumerate(LEVELS)
    }
    want, _ = mgd.loss_with_masks(as_jnp(s), as_jnp(t), batch, params, masks, cfg=cfg, spec=spec)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    batch2 = dict(batch, rng=jax.random.fold_in(jax.random.PRNGKey(7), 13))
    other, _ = mgd.loss(as_jnp(s), as_jnp(t), batch2, params, cfg=cfg, spec=spec)
    assert abs(float(other) - float(got)) > 1e-4 * abs(float(got))  # a new step, a new mask
    del batch["rng"]
    with pytest.raises(KeyError, match="rng"):
        mgd.loss(as_jnp(s), as_jnp(t), batch, params, cfg=cfg, spec=spec)


def test_padding_cells_are_excluded_by_default():
    spec, s, t, params, mats, batch = _case(seed=2, hw3=(6, 8))
    # image 1 is 40 x 36 px: P3 cells 5 x 5 of 6 x 8, P4 3 x 3 of 3 x 4
    batch["pad_shape"] = jnp.asarray([[48, 64], [40, 36]], jnp.int32)
    valid_hw = {"p3": [(6, 8), (5, 5)], "p4": [(3, 4), (3, 3)]}
    cfg = _cfg(alpha_mgd=1.0)
    masks = _masks_nhwc(mats)
    clean, _ = mgd.loss_with_masks(as_jnp(s), as_jnp(t), batch, params, masks, cfg=cfg, spec=spec)

    # Equal to the original run on each image alone, cropped to its padded size (the zero
    # padding of its generation convs then falls at the image edge), averaged over images.
    want = 0.0
    for n in range(2):
        for i, lvl in enumerate(LEVELS):
            vh, vw = valid_hw[lvl][n]
            crop = lambda x: to_nchw(x[n : n + 1, :vh, :vw])  # noqa: B023, E731
            want += _original_level(
                crop(s[f"neck/{lvl}"]),
                crop(t[f"neck/{lvl}"]),
                params[f"level_{i}"],
                mats[i][n : n + 1, :, :vh, :vw],
                1.0,
            )
    np.testing.assert_allclose(clean, want / 2, rtol=1e-5)

    # Garbage in the padding cells of either side changes nothing.
    dirty_s, dirty_t = junk_padding(np.random.default_rng(9), s, t, valid_hw, 1, 1e3)
    dirty, _ = mgd.loss_with_masks(
        as_jnp(dirty_s), as_jnp(dirty_t), batch, params, masks, cfg=cfg, spec=spec
    )
    np.testing.assert_allclose(dirty, clean, rtol=1e-6)
    cfg_all = _cfg(alpha_mgd=1.0, count_padding=True)
    counted, _ = mgd.loss_with_masks(
        as_jnp(dirty_s), as_jnp(dirty_t), batch, params, masks, cfg=cfg_all, spec=spec
    )
    assert float(counted) > 10 * float(clean)

    # An image marked invalid counts nowhere, not even in N.
    batch["image_valid"] = jnp.asarray([True, False])
    one, _ = mgd.loss_with_masks(
        as_jnp(dirty_s), as_jnp(dirty_t), batch, params, masks, cfg=cfg, spec=spec
    )
    only0 = sum(
        _original_level(
            to_nchw(s[f"neck/{lvl}"][:1]),
            to_nchw(t[f"neck/{lvl}"][:1]),
            params[f"level_{i}"],
            mats[i][:1],
            1.0,
        )
        for i, lvl in enumerate(LEVELS)
    )
    np.testing.assert_allclose(one, only0, rtol=1e-5)


@pytest.mark.slow
def test_gradients_jit_and_bfloat16():
    spec, s, t, _, _, batch = _case(seed=4)
    cfg = _cfg()
    params = mgd.init(jax.random.PRNGKey(0), cfg=cfg, spec=spec)
    batch = dict(batch, rng=jax.random.PRNGKey(5))
    fn = functools.partial(mgd.loss, cfg=cfg, spec=spec)

    def total(s_taps, t_taps, p):
        return fn(s_taps, t_taps, batch, p)[0]

    g_s, g_t, g_p = jax.grad(total, argnums=(0, 1, 2))(as_jnp(s), as_jnp(t), params)
    assert_gradients(g_t, g_s, g_p)
    # bfloat16 taps are cast to float32: the same as float32 taps holding the rounded values
    assert_jit_and_bfloat16(fn, s, t, batch, params, LEVELS)


def test_init_is_torch_default():
    spec = _spec(8, 16, ("p3", "p4", "p5"), (8, 16, 32))
    p = mgd.init(jax.random.PRNGKey(0), cfg=_cfg(), spec=spec)
    assert sorted(p) == ["level_0", "level_1", "level_2"]
    assert p["level_0"]["align"]["kernel"].shape == (1, 1, 8, 16)
    for name, fan_in in (("align", 8), ("gen1", 9 * 16), ("gen2", 9 * 16)):
        k = np.asarray(p["level_1"][name]["kernel"])
        b = np.asarray(p["level_1"][name]["bias"])
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a = sqrt 5) and the default bias
        assert np.abs(k).max() <= bound and np.abs(k).max() > 0.8 * bound
        assert np.abs(b).max() <= bound
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    assert "align" not in mgd.init(jax.random.PRNGKey(0), cfg=_cfg(), spec=_spec(4, 4))["level_0"]


def test_registry_and_check():
    d = registered(mgd, "mgd")
    assert d.init is mgd.init and d.defaults["lambda_mgd"] == 0.65
    assert d.defaults["alpha_mgd"] == 2e-5
    assert d.check(_cfg(), _spec(4, 4)) is None
    assert "lambda_mgd" in d.check(_cfg(lambda_mgd=1.0), _spec(4, 4))
    # A Faster R-CNN teacher (P2..P6) pairs with a RetinaNet student (P3..P7) on P3..P6.
    cross = api.Pair(
        student=_spec(4, 4, ("p3", "p4", "p5", "p6", "p7"), (8, 16, 32, 64, 128)).student,
        teacher=_spec(4, 4, ("p2", "p3", "p4", "p5", "p6"), (4, 8, 16, 32, 64)).teacher,
    )
    assert sorted(mgd.init(jax.random.PRNGKey(0), cfg=_cfg(), spec=cross)) == [
        f"level_{i}" for i in range(4)
    ]
    disjoint = api.Pair(
        student=_spec(4, 4, ("p3",), (8,)).student, teacher=_spec(4, 4, ("p4",), (16,)).teacher
    )
    assert "strides" in d.check(_cfg(), disjoint)


def test_levels_option_selects_pairs():
    spec, s, t, params, mats, batch = _case(seed=5)
    cfg = _cfg(count_padding=True, alpha_mgd=1.0, levels=(16,))
    assert sorted(mgd.init(jax.random.PRNGKey(0), cfg=cfg, spec=spec)) == ["level_0"]
    masks = {0: _masks_nhwc(mats)[1]}
    p4 = {"level_0": params["level_1"]}
    got, metrics = mgd.loss_with_masks(as_jnp(s), as_jnp(t), batch, p4, masks, cfg=cfg, spec=spec)
    want = _original_level(
        to_nchw(s["neck/p4"]), to_nchw(t["neck/p4"]), params["level_1"], mats[1], 1.0
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert sorted(metrics) == ["p4"]
    assert "levels" in mgd.check(_cfg(levels=("p3",)), spec)
    with pytest.raises(ValueError, match="no level"):
        mgd.loss_with_masks(
            as_jnp(s), as_jnp(t), batch, params, {}, cfg=_cfg(levels=(32,)), spec=spec
        )


# ---------------------------------------------------------------------------------- maps


def test_maps_by_hand():
    # the documented rule, by hand: key = fold_in(fold_in(rng, "MGD"), pair index);
    # u ~ U[0, 1) of shape [N, H, W, 1]; kept (1) where u <= 1 - lambda
    spec, s, t, _, _, batch = _case(seed=3)
    rng = jax.random.PRNGKey(11)
    batch = dict(batch, rng=rng)
    got = mgd.mgd_maps(as_jnp(s), as_jnp(t), batch, cfg=_cfg(lambda_mgd=0.4), spec=spec)
    for i, lvl in enumerate(LEVELS):
        key = jax.random.fold_in(jax.random.fold_in(rng, 0x4D4744), i)
        u = np.asarray(jax.random.uniform(key, (*s[f"neck/{lvl}"].shape[:3], 1)))[..., 0]
        np.testing.assert_array_equal(got["random mask"][lvl], (u <= 0.6).astype(np.float32))
        assert 0 < float(got["random mask"][lvl].mean()) < 1
    # lambda 0 masks nothing
    none = mgd.mgd_maps(as_jnp(s), as_jnp(t), batch, cfg=_cfg(lambda_mgd=0.0), spec=spec)
    assert all(float(m.min()) == 1.0 for m in none["random mask"].values())


def test_maps_are_the_masks_of_the_loss():
    spec, s, t, params, _, batch = _case(seed=4)
    batch = dict(batch, rng=jax.random.fold_in(jax.random.PRNGKey(5), 3))
    batch["pad_shape"] = jnp.asarray([[40, 48], [24, 32]], jnp.int32)
    for cfg in (_cfg(alpha_mgd=1.0), _cfg(alpha_mgd=1.0, mask_on_channel=True)):
        got, _ = mgd.loss(as_jnp(s), as_jnp(t), batch, params, cfg=cfg, spec=spec)
        m = mgd.mgd_maps(as_jnp(s), as_jnp(t), batch, cfg=cfg, spec=spec)["random mask"]
        if cfg.mask_on_channel:
            masks = {i: m[lvl][:, None, None, :] for i, lvl in enumerate(LEVELS)}
        else:
            masks = {i: m[lvl][..., None] for i, lvl in enumerate(LEVELS)}
        want, _ = mgd.loss_with_masks(
            as_jnp(s), as_jnp(t), batch, params, masks, cfg=cfg, spec=spec
        )
        np.testing.assert_allclose(got, want, rtol=1e-6)
        # and not any mask: another key's gives another loss
        other = mgd.mgd_maps(
            as_jnp(s), as_jnp(t), dict(batch, rng=jax.random.PRNGKey(6)), cfg=cfg, spec=spec
        )["random mask"]
        assert not np.array_equal(other["p3"], m["p3"])
    del batch["rng"]
    with pytest.raises(KeyError, match="rng"):
        mgd.mgd_maps(as_jnp(s), as_jnp(t), batch, cfg=_cfg(), spec=spec)


def test_maps_keys_levels_shapes_and_jit():
    assert registered(mgd, "mgd").maps is mgd.mgd_maps
    spec, s, t, _, _, batch = _case(seed=5)  # student 3 channels, teacher 4
    batch = dict(batch, rng=jax.random.PRNGKey(2))
    fn = functools.partial(mgd.mgd_maps, cfg=_cfg(), spec=spec)
    got = fn(as_jnp(s), as_jnp(t), batch)
    assert list(got) == ["random mask"] and sorted(got["random mask"]) == list(LEVELS)
    for lvl in LEVELS:
        m = got["random mask"][lvl]
        assert m.shape == s[f"neck/{lvl}"].shape[:3] and m.dtype == jnp.float32
    jitted = jax.jit(fn)(as_jnp(s), as_jnp(t), batch)
    for lvl in LEVELS:
        np.testing.assert_array_equal(jitted["random mask"][lvl], got["random mask"][lvl])
    # per channel: [N, C_t]; `levels` keeps P4 alone
    cfg = _cfg(mask_on_channel=True, levels=(16,))
    got = mgd.mgd_maps(as_jnp(s), as_jnp(t), batch, cfg=cfg, spec=spec)
    assert sorted(got["random mask"]) == ["p4"] and got["random mask"]["p4"].shape == (2, 4)
