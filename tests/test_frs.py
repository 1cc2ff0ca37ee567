import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from helpers.distill import spec_pair

from jdistill.distill import adapters, frs, registry

CFG = ml_collections.ConfigDict(dict(adapter="conv1x1"))
SPEC = spec_pair()


def identity_adapter(channels):
    return {"level_0": {"kernel": jnp.eye(channels)[None, None], "bias": jnp.zeros(channels)}}


def zero_adapter(channels):
    return {
        "level_0": {"kernel": jnp.zeros((1, 1, channels, channels)), "bias": jnp.zeros(channels)}
    }


def taps(feat, logits):
    return {"neck/p3": feat, "head/cls_logits/p3": logits}


def test_spec_test_vector():
    # specs/frs.md: N=1, 2x2, C=K=1, teacher logits 0 (mask .5), T=1, A(S)=0, student logits 0.
    t = taps(jnp.ones((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)))
    s = taps(jnp.ones((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)))
    targets = {"pad_shape": jnp.array([[16, 16]])}
    l_feat, _ = frs.frs_feat(s, t, targets, zero_adapter(1), cfg=CFG, spec=SPEC)
    l_cls, _ = frs.frs_cls(s, t, targets, None, cfg=CFG, spec=SPEC)
    np.testing.assert_allclose(l_feat, 1.0, rtol=1e-6)
    np.testing.assert_allclose(l_cls, math.log(2), rtol=1e-6)


def test_hand_case_with_uneven_mask_and_channels():
    # Two pixels, teacher logits 0 and ln 3 on K=2 channels: M = max sigmoid = (.5, .75).
    t_logits = jnp.array([[[[0.0, -5.0], [math.log(3.0), 0.0]]]])  # [1, 1, 2, 2]
    t_feat = jnp.array([[[[1.0, 2.0], [3.0, 0.0]]]])  # C = 2
    s_feat = jnp.zeros((1, 1, 2, 2))
    targets = {"pad_shape": jnp.array([[8, 16]])}
    l_feat, _ = frs.frs_feat(
        taps(s_feat, None), taps(t_feat, t_logits), targets, identity_adapter(2), cfg=CFG, spec=SPEC
    )
    # sum_c (T - 0)^2 = 5 and 9; weighted (.5*5 + .75*9) / 1.25
    np.testing.assert_allclose(l_feat, (0.5 * 5 + 0.75 * 9) / 1.25, rtol=1e-6)
    s_logits = jnp.zeros((1, 1, 2, 2))
    l_cls, _ = frs.frs_cls(
        taps(None, s_logits), taps(None, t_logits), targets, None, cfg=CFG, spec=SPEC
    )
    # student logit 0: BCE(.5, q) = ln 2 for any q, per channel: 2 ln 2 per pixel
    np.testing.assert_allclose(l_cls, 2 * math.log(2), rtol=1e-6)


def test_padding_pixels_do_not_count():
    t_feat = jnp.ones((1, 2, 2, 1))
    t_logits = jnp.zeros((1, 2, 2, 1))
    s_feat = jnp.zeros((1, 2, 2, 1)).at[0, :, 1].set(100.0)  # garbage in column 1
    # the image is 8 px wide at stride 8: only column 0 is valid
    targets = {"pad_shape": jnp.array([[16, 8]])}
    l_feat, _ = frs.frs_feat(
        taps(s_feat, None), taps(t_feat, t_logits), targets, identity_adapter(1), cfg=CFG, spec=SPEC
    )
    np.testing.assert_allclose(l_feat, 1.0, rtol=1e-6)
    cfg = CFG.copy_and_resolve_references()
    cfg.count_padding = True
    l_all, _ = frs.frs_feat(
        taps(s_feat, None), taps(t_feat, t_logits), targets, identity_adapter(1), cfg=cfg, spec=SPEC
    )
    np.testing.assert_allclose(l_all, (2 * 1 + 2 * 99**2) / 4, rtol=1e-6)


def test_no_gradient_reaches_the_teacher():
    rng = np.random.default_rng(0)
    t_feat = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
    t_logits = jnp.asarray(rng.normal(size=(2, 3, 3, 5)), jnp.float32)
    s_feat = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
    s_logits = jnp.asarray(rng.normal(size=(2, 3, 3, 5)), jnp.float32)
    targets = {"pad_shape": jnp.array([[24, 24], [24, 24]])}
    a = identity_adapter(4)

    def total(tf, tl, sf, sl):
        f, _ = frs.frs_feat(taps(sf, sl), taps(tf, tl), targets, a, cfg=CFG, spec=SPEC)
        c, _ = frs.frs_cls(taps(sf, sl), taps(tf, tl), targets, a, cfg=CFG, spec=SPEC)
        return f + c

    g = jax.grad(total, argnums=(0, 1, 2, 3))(t_feat, t_logits, s_feat, s_logits)
    assert float(jnp.abs(g[0]).sum()) == 0.0 and float(jnp.abs(g[1]).sum()) == 0.0
    assert float(jnp.abs(g[2]).sum()) > 0 and float(jnp.abs(g[3]).sum()) > 0


def test_adapters_init_shapes_and_torch_bounds():
    p = adapters.init(
        jax.random.PRNGKey(0), num_levels=5, in_channels=8, out_channels=16, kind="conv3x3"
    )
    assert sorted(p) == [f"level_{i}" for i in range(5)]
    k = np.asarray(p["level_0"]["kernel"])
    assert k.shape == (3, 3, 8, 16)
    bound = 1 / math.sqrt(3 * 3 * 8)  # kaiming_uniform(a=sqrt 5) bound
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.8 * bound
    y = adapters.apply_level(p, 2, jnp.ones((1, 5, 5, 8)))
    assert y.shape == (1, 5, 5, 16)


def test_registry_and_warmup():
    assert (
        registry.get("frs_feat").init is frs.init_adapters and registry.get("frs_cls").init is None
    )
    np.testing.assert_allclose(registry.warmup_factor(jnp.int32(250), 500), 0.5)
    np.testing.assert_allclose(registry.warmup_factor(jnp.int32(900), 500), 1.0)
    np.testing.assert_allclose(registry.warmup_factor(jnp.int32(3), 0), 1.0)
    try:
        registry.get("frs")
    except KeyError as e:
        assert "frs_feat" in str(e)
    else:
        raise AssertionError("unknown loss name must raise")


def test_richness_map_is_the_mask_both_terms_weigh_by():
    # Teacher logits 0 and ln 3 (K=2 max) on a 1x2 grid, the image one cell wide: the map is
    # M = (.5, .75) times the pixel mask (1, 0), the weights of both terms.
    t_logits = jnp.array([[[[0.0, -5.0], [math.log(3.0), 0.0]]]])
    batch = {"pad_shape": jnp.array([[8, 8]])}
    for name in ("frs_feat", "frs_cls"):
        maps = registry.get(name).maps(None, taps(None, t_logits), batch, cfg=CFG, spec=SPEC)
        assert list(maps) == ["richness (teacher)"] and list(maps["richness (teacher)"]) == ["p3"]
        np.testing.assert_allclose(maps["richness (teacher)"]["p3"], [[[0.5, 0.0]]], rtol=1e-6)
    # The loss divides by the map's mass: T^2 = 5 at the one counted cell, weight .5.
    t_feat = jnp.array([[[[1.0, 2.0], [3.0, 0.0]]]])
    l_feat, _ = frs.frs_feat(
        taps(jnp.zeros((1, 1, 2, 2)), None),
        taps(t_feat, t_logits),
        batch,
        identity_adapter(2),
        cfg=CFG,
        spec=SPEC,
    )
    np.testing.assert_allclose(l_feat, 0.5 * 5 / 0.5, rtol=1e-6)
