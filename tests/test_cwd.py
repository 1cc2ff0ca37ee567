"""CWD (`jdistill/distill/cwd.py`) against a loop-by-loop transcription of mmrazor's
`mmrazor/models/losses/cwd.py`.

The original, per level (NCHW, shapes asserted equal): view both as [N*C, H*W]; P_T =
softmax(T / tau) over H*W; loss = sum(P_T log_softmax(T / tau) - P_T log_softmax(S / tau))
* tau^2, then loss_weight * loss / (C * N). Summed over levels (one loss entry per level,
summed by mmdetection). mmrazor v0.x's GFL row applies it to `bbox_head.gfl_cls` on every
level, weight 5; mmdetection-distiller's variant drops the teacher's entropy term (same
student gradient), which is not reproduced here.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers.batches import batch_of
from helpers.distill import det_spec, nchw_maps, padded_maps, registered, to_taps

from jdistill.distill import api, cwd, registry

LEVELS, STRIDES = ("p3", "p4", "p5", "p6", "p7"), (8, 16, 32, 64, 128)
random_maps = functools.partial(nchw_maps, scale=2.0)


def pair(student=None, teacher=None):
    return api.Pair(student=student or det_spec("gfl"), teacher=teacher or det_spec("gfl"))


def config(name="cwd", **overrides):
    cfg = ml_collections.ConfigDict({"weight": 1.0, **dict(cwd.DISTILLERS[name].defaults)})
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------- the transcription (NCHW)


def ref_level(s, t, tau, valid=None):
    """ChannelWiseDivergence.forward (loss_weight 1) in loops; with `valid` [N, H, W], both
    softmaxes over valid cells only and N = images with a valid cell (our padding rule)."""
    n, c, h, w = s.shape
    valid = np.ones((n, h, w)) if valid is None else valid
    cells = [[(i, j) for i in range(h) for j in range(w) if valid[b, i, j]] for b in range(n)]
    total = 0.0
    for b in range(n):
        if not cells[b]:
            continue
        for ch in range(c):
            zt = [t[b, ch, i, j] / tau for i, j in cells[b]]
            zs = [s[b, ch, i, j] / tau for i, j in cells[b]]
            lse_t = max(zt) + math.log(sum(math.exp(z - max(zt)) for z in zt))
            lse_s = max(zs) + math.log(sum(math.exp(z - max(zs)) for z in zs))
            for k in range(len(zt)):
                log_pt, log_ps = zt[k] - lse_t, zs[k] - lse_s
                total += math.exp(log_pt) * log_pt - math.exp(log_pt) * log_ps
    images = sum(1 for b in range(n) if cells[b])
    return total * tau**2 / (c * images)


def ref_cwd(s_maps, t_maps, levels, tau):
    return sum(ref_level(s_maps[lvl], t_maps[lvl], tau) for lvl in levels)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("count_padding", [False, True])
def test_matches_the_mmrazor_transcription(tau, count_padding):
    rng = np.random.default_rng(0)
    s, t = random_maps(rng, 2, 3), random_maps(rng, 2, 3)
    cfg = config(tau=tau, count_padding=count_padding)
    got, metrics = cwd.cwd(to_taps(s), to_taps(t), batch_of(2), None, cfg=cfg, spec=pair())
    np.testing.assert_allclose(got, ref_cwd(s, t, LEVELS, tau), rtol=1e-5, atol=1e-5)
    assert sorted(metrics) == sorted(LEVELS)
    # the first four levels (mmdetection-distiller's RetinaNet setting)
    got4, _ = cwd.cwd(
        to_taps(s), to_taps(t), batch_of(2), None, cfg=config(tau=tau, max_levels=4), spec=pair()
    )
    np.testing.assert_allclose(got4, ref_cwd(s, t, LEVELS[:4], tau), rtol=1e-5, atol=1e-5)


def test_hand_computed_case():
    # one image, one channel, two cells. T = (0, 0): P_T = (1/2, 1/2). S = (0, ln 3): P_S = (1/4,
    # 3/4). KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3).
    spec = pair(det_spec("gfl", ("p3",), (8,), 1), det_spec("gfl", ("p3",), (8,), 1))
    s = {"neck/p3": jnp.array([0.0, math.log(3.0)]).reshape(1, 1, 2, 1)}
    t = {"neck/p3": jnp.zeros((1, 1, 2, 1))}
    b = {"pad_shape": jnp.array([[8, 16]])}
    got, _ = cwd.cwd(s, t, b, None, cfg=config(), spec=spec)
    np.testing.assert_allclose(got, 0.5 * math.log(4 / 3), rtol=1e-6)
    # tau 2: S / 2 = (0, ln 3 / 2), P_S = (1, r) / (1 + r) with r = sqrt 3; times tau^2 = 4
    r = math.sqrt(3.0)
    want = 4 * (0.5 * math.log(0.5 * (1 + r)) + 0.5 * math.log(0.5 * (1 + r) / r))
    got2, _ = cwd.cwd(s, t, b, None, cfg=config(tau=2.0), spec=spec)
    np.testing.assert_allclose(got2, want, rtol=1e-6)
    # the normaliser is N * C: two images with two identical channels give the same value
    s4 = {"neck/p3": jnp.tile(s["neck/p3"], (2, 1, 1, 2))}
    t4 = {"neck/p3": jnp.tile(t["neck/p3"], (2, 1, 1, 2))}
    b2 = {"pad_shape": jnp.array([[8, 16], [8, 16]])}
    spec2 = pair(det_spec("gfl", ("p3",), (8,), 2), det_spec("gfl", ("p3",), (8,), 2))
    got4, _ = cwd.cwd(s4, t4, b2, None, cfg=config(), spec=spec2)
    np.testing.assert_allclose(got4, 0.5 * math.log(4 / 3), rtol=1e-6)
    # S == T: zero
    same, _ = cwd.cwd(t, t, b, None, cfg=config(), spec=spec)
    np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_padding_cells_are_excluded_by_default():
    # rows 0-3 / columns 0-2 of P3 are inside the images
    spec, b, s, t, valid, s_bad, t_bad = padded_maps(np.random.default_rng(1), random_maps, 30)
    levels = spec.student.levels
    clean, _ = cwd.cwd(to_taps(s), to_taps(t), b, None, cfg=config(), spec=spec)
    dirty, _ = cwd.cwd(to_taps(s_bad), to_taps(t_bad), b, None, cfg=config(), spec=spec)
    np.testing.assert_allclose(dirty, clean, rtol=1e-5)
    # exclusion = both softmaxes over the valid cells of each image only
    want = sum(ref_level(s_bad[lvl], t_bad[lvl], 1.0, valid[lvl]) for lvl in levels)
    np.testing.assert_allclose(dirty, want, rtol=1e-5, atol=1e-5)
    # one image: the transcription on the cropped map
    one, _ = cwd.cwd(
        to_taps({k: v[:1] for k, v in s_bad.items()}),
        to_taps({k: v[:1] for k, v in t_bad.items()}),
        batch_of(1, b["pad_shape"][:1]),
        None,
        cfg=config(),
        spec=spec,
    )
    crop = {"p3": (4, 6), "p4": (2, 3)}
    want_one = 0.0
    for k in levels:
        h, w = crop[k]
        want_one += ref_level(s_bad[k][:1, :, :h, :w], t_bad[k][:1, :, :h, :w], 1.0)
    np.testing.assert_allclose(one, want_one, rtol=1e-5, atol=1e-5)
    # count_padding: the original on the whole padded map
    full, _ = cwd.cwd(
        to_taps(s_bad), to_taps(t_bad), b, None, cfg=config(count_padding=True), spec=spec
    )
    np.testing.assert_allclose(full, ref_cwd(s_bad, t_bad, levels, 1.0), rtol=1e-5, atol=1e-5)
    assert abs(float(full) - float(dirty)) > 1e-2


def test_gradient_reaches_the_student_not_the_teacher_and_jit_agrees():
    rng = np.random.default_rng(2)
    s, t = to_taps(random_maps(rng, 2, 3)), to_taps(random_maps(rng, 2, 3))
    b = batch_of(2, np.array([[40, 48], [64, 16]], np.int32))
    cfg, spec = config(), pair()

    def loss(s_taps, t_taps):
        return cwd.cwd(s_taps, t_taps, b, None, cfg=cfg, spec=spec)[0]

    gs, gt = jax.grad(loss, argnums=(0, 1))(s, t)
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in gt.values())
    # P6, P7 are 1 x 1 here: a one-cell softmax is constant, so only P3..P5 get a gradient
    assert all(float(jnp.abs(gs[f"neck/{lvl}"]).sum()) > 0 for lvl in ("p3", "p4", "p5"))
    assert all(bool(jnp.isfinite(g).all()) for g in gs.values())
    # padding cells get no gradient
    assert float(jnp.abs(gs["neck/p3"][0, 5:]).sum()) == 0.0
    np.testing.assert_allclose(jax.jit(loss)(s, t), loss(s, t), rtol=1e-6)
    s16 = {k: v.astype(jnp.bfloat16) for k, v in s.items()}
    np.testing.assert_allclose(loss(s16, t), loss(s, t), rtol=2e-2)


def test_logits_variant_reads_class_logits_and_needs_equal_heads():
    # RetinaNet-like heads: A = 2 anchors x K = 3 classes = 6 channels per cell
    rng = np.random.default_rng(3)
    head = det_spec("retinanet", num_classes=3, num_anchors=2)
    spec = pair(head, head)
    s, t = random_maps(rng, 2, 6), random_maps(rng, 2, 6)
    prefix = "head/cls_logits"
    cfg = config("cwd_logits")
    got, _ = cwd.cwd_logits(
        to_taps(s, prefix), to_taps(t, prefix), batch_of(2), None, cfg=cfg, spec=spec
    )
    np.testing.assert_allclose(got, ref_cwd(s, t, LEVELS, 1.0), rtol=1e-5, atol=1e-5)
    d = registered(cwd, "cwd_logits", (prefix,), any_family=False)
    assert d.init is None
    assert d.defaults["weight"] == 5.0
    assert d.check(cfg, spec) is None
    gfl = det_spec("gfl", num_classes=3, num_anchors=1)
    assert "anchors" in d.check(cfg, pair(gfl, head))
    assert "classes" in d.check(cfg, pair(det_spec("gfl", num_classes=4), gfl))
    # FCOS and GFL heads both have one prior of K classes per cell, but score different things:
    # the family rule refuses the pair (plan.problems), before the check would pass it
    assert d.check(cfg, pair(det_spec("fcos", num_classes=3), gfl)) is None
    assert "FCOS's class logits" in d.same_family


def test_registry_levels_and_adapter():
    d = registered(cwd, "cwd")
    assert d is not registry.get("cwd_logits")
    assert d.defaults["weight"] == 10.0 and d.defaults["tau"] == 1.0
    assert d.init(jax.random.PRNGKey(0), cfg=config(), spec=pair()) is None
    assert "2048" in d.check(config(levels=(8, 2048)), pair())
    assert "tau" in d.check(config(tau=0.0), pair())
    # a Faster R-CNN teacher (P2..P6) pairs with a GFL student by stride: P3..P6
    rcnn = det_spec("faster_rcnn", ("p2", "p3", "p4", "p5", "p6"), (4, 8, 16, 32, 64))
    rng = np.random.default_rng(4)
    s = random_maps(rng, 2, 4)
    t = random_maps(rng, 2, 4, rcnn.levels, rcnn.strides)
    got, metrics = cwd.cwd(
        to_taps(s), to_taps(t), batch_of(2), None, cfg=config(), spec=pair(teacher=rcnn)
    )
    assert sorted(metrics) == ["p3", "p4", "p5", "p6"]
    np.testing.assert_allclose(got, ref_cwd(s, t, ("p3", "p4", "p5", "p6"), 1.0), rtol=1e-5)
    # a narrower student neck gets 1x1 adapters
    narrow = det_spec("gfl", channels=3)
    spec = pair(narrow, det_spec("gfl", channels=5))
    params = d.init(jax.random.PRNGKey(1), cfg=config(), spec=spec)
    assert params["level_4"]["kernel"].shape == (1, 1, 3, 5)
    s3, t5 = random_maps(rng, 2, 3), random_maps(rng, 2, 5)
    got, _ = cwd.cwd(to_taps(s3), to_taps(t5), batch_of(2), params, cfg=config(), spec=spec)
    adapted = {}
    for i, lvl in enumerate(LEVELS):
        k = np.asarray(params[f"level_{i}"]["kernel"], np.float64)[0, 0]
        bias = np.asarray(params[f"level_{i}"]["bias"], np.float64)
        adapted[lvl] = np.einsum("nchw,cd->ndhw", s3[lvl], k) + bias[None, :, None, None]
    np.testing.assert_allclose(got, ref_cwd(adapted, t5, LEVELS, 1.0), rtol=1e-5, atol=1e-5)


def test_maps_of_different_sizes_are_refused():
    spec = pair(det_spec("gfl", ("p3",), (8,), 2), det_spec("gfl", ("p3",), (8,), 2))
    s = {"neck/p3": jnp.zeros((1, 8, 6, 2))}
    t = {"neck/p3": jnp.zeros((1, 7, 6, 2))}
    with pytest.raises(ValueError, match="equal maps"):
        cwd.cwd(s, t, batch_of(1), None, cfg=config(), spec=spec)


# ---------------------------------------------------------------- maps

TEACHER, STUDENT = "spatial softmax (teacher)", "spatial softmax (student)"


def test_maps_by_hand():
    # one image, a 2 x 2 map, C = 2: channel 0 peaks at cell (0, 0) with T = ln 5, channel 1 is
    # flat. Softmaxes (5, 1, 1, 1) / 8 and 1/4 each: mean (7, 3, 3, 3) / 16. S = 0: uniform.
    spec = pair(det_spec("gfl", ("p3",), (8,), 2), det_spec("gfl", ("p3",), (8,), 2))
    t = {"neck/p3": jnp.zeros((1, 2, 2, 2)).at[0, 0, 0, 0].set(math.log(5.0))}
    s = {"neck/p3": jnp.zeros((1, 2, 2, 2))}
    b = batch_of(1, np.array([[16, 16]], np.int32))
    got = cwd.cwd_maps(s, t, b, cfg=config(), spec=spec)
    assert sorted(got) == sorted([TEACHER, STUDENT])
    np.testing.assert_allclose(got[TEACHER]["p3"][0], [[7 / 16, 3 / 16], [3 / 16, 3 / 16]])
    np.testing.assert_allclose(got[STUDENT]["p3"][0], np.full((2, 2), 0.25))
    # tau 2: channel 0 becomes (sqrt 5, 1, 1, 1) / (sqrt 5 + 3)
    r = math.sqrt(5.0)
    got = cwd.cwd_maps(s, t, b, cfg=config(tau=2.0), spec=spec)
    want = (np.array([[r, 1], [1, 1]]) / (r + 3) + 0.25) / 2
    np.testing.assert_allclose(got[TEACHER]["p3"][0], want, rtol=1e-6)
    # the image is 8 px wide: column 1 is padding. Over cells (0, 0), (1, 0): channel 0
    # (5, 1) / 6, channel 1 (1, 1) / 2: mean (2/3, 1/3); padding 0
    b = batch_of(1, np.array([[16, 8]], np.int32))
    got = cwd.cwd_maps(s, t, b, cfg=config(), spec=spec)
    np.testing.assert_allclose(got[TEACHER]["p3"][0], [[2 / 3, 0.0], [1 / 3, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(got[STUDENT]["p3"][0], [[0.5, 0.0], [0.5, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("name", ["cwd", "cwd_logits"])
def test_maps_are_the_distributions_of_the_loss(name):
    # one channel: the map is P itself, and the loss is tau^2 sum P_T (log P_T - log P_S) / N
    # over the counted cells of the maps' own values
    spec, b, s, t, valid, s_bad, t_bad = padded_maps(
        np.random.default_rng(5), lambda *a: random_maps(*a[:2], 1, *a[3:]), 30
    )
    prefix = "neck" if name == "cwd" else "head/cls_logits"
    s_taps, t_taps = to_taps(s_bad, prefix), to_taps(t_bad, prefix)
    d = registry.get(name)
    cfg = config(name, tau=1.7)
    got, metrics = d.loss(s_taps, t_taps, b, None, cfg=cfg, spec=spec)
    m = d.maps(s_taps, t_taps, b, cfg=cfg, spec=spec)
    for lvl in spec.student.levels:
        pt = np.asarray(m[TEACHER][lvl], np.float64)
        ps = np.asarray(m[STUDENT][lvl], np.float64)
        assert np.all(pt[valid[lvl] == 0] == 0) and np.all(ps[valid[lvl] == 0] == 0)
        np.testing.assert_allclose(pt.sum((1, 2)), 1.0, rtol=1e-5)
        on = valid[lvl] > 0
        kl = (pt[on] * (np.log(pt[on]) - np.log(ps[on]))).sum()
        np.testing.assert_allclose(metrics[lvl], 1.7**2 * kl / 2, rtol=1e-4, atol=1e-6)
    # the student's map is the student's: swapping the sides changes it
    swapped = d.maps(t_taps, s_taps, b, cfg=cfg, spec=spec)
    np.testing.assert_allclose(swapped[STUDENT]["p3"], m[TEACHER]["p3"], rtol=1e-6)
    assert not np.allclose(m[STUDENT]["p3"], m[TEACHER]["p3"], atol=1e-3)


def test_maps_keys_levels_shapes_and_jit():
    assert registered(cwd, "cwd").maps is cwd.cwd_maps
    assert registry.get("cwd_logits").maps is cwd.cwd_logits_maps
    rng = np.random.default_rng(6)
    s, t = to_taps(random_maps(rng, 2, 3)), to_taps(random_maps(rng, 2, 5))
    # a narrower student: its softmax is of the adapter's output (a parameter): teacher only
    spec = pair(det_spec("gfl", channels=3), det_spec("gfl", channels=5))
    fn = functools.partial(cwd.cwd_maps, cfg=config(), spec=spec)
    got = fn(s, t, batch_of(2))
    assert list(got) == [TEACHER] and sorted(got[TEACHER]) == sorted(LEVELS)
    jitted = jax.jit(fn)(s, t, batch_of(2))
    for lvl in LEVELS:
        assert got[TEACHER][lvl].shape == t[f"neck/{lvl}"].shape[:3]
        assert got[TEACHER][lvl].dtype == jnp.float32
        np.testing.assert_allclose(jitted[TEACHER][lvl], got[TEACHER][lvl], rtol=1e-6)
    # logits: both sides always; `max_levels` keeps P3, P4
    prefix = "head/cls_logits"
    s6, t6 = to_taps(random_maps(rng, 2, 6), prefix), to_taps(random_maps(rng, 2, 6), prefix)
    head = det_spec("retinanet", num_classes=3, num_anchors=2)
    got = cwd.cwd_logits_maps(
        s6, t6, batch_of(2), cfg=config("cwd_logits", max_levels=2), spec=pair(head, head)
    )
    assert sorted(got) == sorted([TEACHER, STUDENT])
    assert all(sorted(v) == ["p3", "p4"] for v in got.values())
    assert got[STUDENT]["p4"].shape == (2, 4, 3)
