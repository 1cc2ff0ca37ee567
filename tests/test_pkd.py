"""PKD (`jdistill/distill/pkd.py`) against a loop-by-loop transcription of mmrazor's
`mmrazor/models/losses/pkd_loss.py`.

The original, per level (NCHW): if the heights differ, S = F.interpolate(S, T's size,
mode='bilinear') (align_corners False: half-pixel centres, source index clamped at 0, no
antialiasing); norm(F) standardises each channel over (N, H, W) with torch's unbiased std
(ddof 1) plus 1e-6; the level term is F.mse_loss(norm S, norm T) / 2, a mean over N*C*H*W;
levels are summed, and mmrazor's configs distil neck outputs 0-3 only. It runs per GPU of 2
images (DDP averages the GPUs), which `group_size` reproduces.
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

from jdistill.distill import api, pkd

RETINA_LEVELS, RETINA_STRIDES = ("p3", "p4", "p5", "p6", "p7"), (8, 16, 32, 64, 128)
RCNN_LEVELS = ("p2", "p3", "p4", "p5", "p6")
RCNN_STRIDES = (4, 8, 16, 32, 64)
# per-channel offsets and scales, so that the standardisation matters
random_maps = functools.partial(nchw_maps, affine=True)


def pair(student=None, teacher=None):
    return api.Pair(student=student or det_spec(), teacher=teacher or det_spec())


def config(**overrides):
    cfg = ml_collections.ConfigDict({"weight": 1.0, **dict(pkd.DISTILLERS["pkd"].defaults)})
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------- the transcription (NCHW)


def ref_resize_bilinear(x, out_h, out_w):
    """torch F.interpolate(x, (out_h, out_w), mode='bilinear', align_corners=False), in loops."""
    n, c, h, w = x.shape
    y = np.zeros((n, c, out_h, out_w))

    def source(dst, size_in, size_out):
        src = max((dst + 0.5) * size_in / size_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, size_in - 1)
        return i0, i1, src - i0

    for b in range(n):
        for ch in range(c):
            for i in range(out_h):
                y0, y1, ly = source(i, h, out_h)
                for j in range(out_w):
                    x0, x1, lx = source(j, w, out_w)
                    top = (1 - lx) * x[b, ch, y0, x0] + lx * x[b, ch, y0, x1]
                    bottom = (1 - lx) * x[b, ch, y1, x0] + lx * x[b, ch, y1, x1]
                    y[b, ch, i, j] = (1 - ly) * top + ly * bottom
    return y


def ref_norm(feat, valid=None):
    """pkd_loss.norm: per channel, (F - mean) / (unbiased std + 1e-6) over (N, H, W); with
    `valid` [N, H, W], mean and std over valid cells only (our padding rule)."""
    n, c, h, w = feat.shape
    valid = np.ones((n, h, w)) if valid is None else valid
    out = np.zeros_like(feat)
    for ch in range(c):
        total, count = 0.0, 0
        for b in range(n):
            for i in range(h):
                for j in range(w):
                    if valid[b, i, j]:
                        total += feat[b, ch, i, j]
                        count += 1
        mean = total / count
        sq = 0.0
        for b in range(n):
            for i in range(h):
                for j in range(w):
                    if valid[b, i, j]:
                        sq += (feat[b, ch, i, j] - mean) ** 2
        std = math.sqrt(sq / (count - 1))
        for b in range(n):
            for i in range(h):
                for j in range(w):
                    out[b, ch, i, j] = (feat[b, ch, i, j] - mean) / (std + 1e-6)
    return out


def ref_level(s, t, valid=None):
    """One level of PKDLoss.forward: resize S when the size differs, norm both, MSE / 2."""
    if s.shape[2:] != t.shape[2:]:
        s = ref_resize_bilinear(s, *t.shape[2:])
    n, c, h, w = t.shape
    valid = np.ones((n, h, w)) if valid is None else valid
    ns, nt = ref_norm(s, valid), ref_norm(t, valid)
    total, count = 0.0, 0
    for b in range(n):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    if valid[b, i, j]:
                        total += (ns[b, ch, i, j] - nt[b, ch, i, j]) ** 2
                        count += 1
    return total / count / 2


def ref_pkd(s_maps, t_maps, pairs, group_size=0):
    """Sum over (student level, teacher level) pairs; with group_size, the mean over groups of
    that many images of the per-group loss (one GPU each)."""
    n = next(iter(s_maps.values())).shape[0]
    g = group_size or n
    groups = [slice(k, k + g) for k in range(0, n, g)]
    total = 0.0
    for s_lvl, t_lvl in pairs:
        total += np.mean([ref_level(s_maps[s_lvl][sl], t_maps[t_lvl][sl]) for sl in groups])
    return total


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("group_size", [0, 2])
def test_matches_the_mmrazor_transcription(group_size):
    rng = np.random.default_rng(0)
    s = random_maps(rng, 4, 3, RETINA_LEVELS, RETINA_STRIDES)
    t = random_maps(rng, 4, 3, RETINA_LEVELS, RETINA_STRIDES)
    cfg = config(group_size=group_size, count_padding=True)
    got, metrics = pkd.pkd(to_taps(s), to_taps(t), batch_of(4), None, cfg=cfg, spec=pair())
    # defaults: the first 4 levels, as mmrazor's configs
    want = ref_pkd(s, t, [(lvl, lvl) for lvl in RETINA_LEVELS[:4]], group_size)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(metrics) == ["p3", "p4", "p5", "p6"]
    np.testing.assert_allclose(sum(metrics.values()), got, rtol=1e-6)
    # all five levels; and the per-GPU grouping changes the value (so the test can tell)
    cfg_all = config(group_size=group_size, max_levels=0)
    got_all, _ = pkd.pkd(to_taps(s), to_taps(t), batch_of(4), None, cfg=cfg_all, spec=pair())
    want_all = ref_pkd(s, t, [(lvl, lvl) for lvl in RETINA_LEVELS], group_size)
    np.testing.assert_allclose(got_all, want_all, rtol=1e-5, atol=1e-5)
    other = ref_pkd(s, t, [(lvl, lvl) for lvl in RETINA_LEVELS], 2 if group_size == 0 else 0)
    assert abs(other - want_all) > 1e-3


def test_hand_computed_case():
    # one image, one channel, three cells. S = (0, 1, 2): mean 1, unbiased std 1, norm (-1, 0, 1)
    # / (1 + 1e-6). T = (2, 1, 0): the mirror image. Squared differences (4, 0, 4) / (1+1e-6)^2,
    # mean 8/3, halved: 4/3 / (1 + 1e-6)^2 (= (1 - r) (n - 1) / n with r = -1).
    s = {"neck/p3": jnp.array([0.0, 1.0, 2.0]).reshape(1, 1, 3, 1)}
    t = {"neck/p3": jnp.array([2.0, 1.0, 0.0]).reshape(1, 1, 3, 1)}
    spec = pair(det_spec("gfl", ("p3",), (8,), 1), det_spec("gfl", ("p3",), (8,), 1))
    b = {"pad_shape": jnp.array([[8, 24]])}
    got, _ = pkd.pkd(s, t, b, None, cfg=config(), spec=spec)
    np.testing.assert_allclose(got, (4 / 3) / (1 + 1e-6) ** 2, rtol=1e-6)
    # Pearson: any positive affine map of S is a perfect match
    t2 = {"neck/p3": s["neck/p3"] * 7.0 - 3.0}
    got2, _ = pkd.pkd(s, t2, b, None, cfg=config(), spec=spec)
    np.testing.assert_allclose(got2, 0.0, atol=1e-6)


def test_padding_cells_are_excluded_by_default():
    # image 0: 32 x 48 px (P3 rows 0-3 valid), image 1: 64 x 24 px (P3 columns 0-2 valid)
    spec, b, s, t, valid, s_bad, t_bad = padded_maps(np.random.default_rng(1), random_maps, 1e3)
    levels = spec.student.levels
    cfg = config(group_size=0)
    clean, _ = pkd.pkd(to_taps(s), to_taps(t), b, None, cfg=cfg, spec=spec)
    dirty, _ = pkd.pkd(to_taps(s_bad), to_taps(t_bad), b, None, cfg=cfg, spec=spec)
    np.testing.assert_allclose(dirty, clean, rtol=1e-5)
    # exclusion = statistics and mean over the valid cells only
    want = sum(ref_level(s_bad[lvl], t_bad[lvl], valid[lvl]) for lvl in levels)
    np.testing.assert_allclose(dirty, want, rtol=1e-5, atol=1e-5)
    # count_padding: the original, which sees the whole padded map
    cfg_all = config(group_size=0, count_padding=True)
    full, _ = pkd.pkd(to_taps(s_bad), to_taps(t_bad), b, None, cfg=cfg_all, spec=spec)
    np.testing.assert_allclose(full, ref_pkd(s_bad, t_bad, [(lv, lv) for lv in levels]), rtol=1e-5)
    assert abs(float(full) - float(dirty)) > 1e-2


def test_single_image_padding_equals_the_transcription_on_the_cropped_map():
    rng = np.random.default_rng(2)
    spec = pair(det_spec("gfl", ("p3",), (8,), 2), det_spec("gfl", ("p3",), (8,), 2))
    s = random_maps(rng, 1, 2, ("p3",), (8,))
    t = random_maps(rng, 1, 2, ("p3",), (8,))
    b = batch_of(1, np.array([[40, 24]], np.int32))  # 5 x 3 valid cells of 8 x 6
    got, _ = pkd.pkd(to_taps(s), to_taps(t), b, None, cfg=config(), spec=spec)
    want = ref_level(s["p3"][:, :, :5, :3], t["p3"][:, :, :5, :3])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_gradient_reaches_the_student_not_the_teacher_and_jit_agrees():
    rng = np.random.default_rng(3)
    s = to_taps(random_maps(rng, 2, 3, RETINA_LEVELS, RETINA_STRIDES))
    t = to_taps(random_maps(rng, 2, 3, RETINA_LEVELS, RETINA_STRIDES))
    b, cfg, spec = batch_of(2), config(), pair()

    def loss(s_taps, t_taps):
        return pkd.pkd(s_taps, t_taps, b, None, cfg=cfg, spec=spec)[0]

    gs, gt = jax.grad(loss, argnums=(0, 1))(s, t)
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in gt.values())
    assert all(float(jnp.abs(gs[f"neck/{lvl}"]).sum()) > 0 for lvl in RETINA_LEVELS[:4])
    assert float(jnp.abs(gs["neck/p7"]).sum()) == 0.0  # not distilled by default
    np.testing.assert_allclose(jax.jit(loss)(s, t), loss(s, t), rtol=1e-6)


def test_constant_channel_and_bfloat16_inputs_stay_finite():
    rng = np.random.default_rng(4)
    levels, strides = ("p3",), (8,)
    spec = pair(det_spec("gfl", levels, strides, 3), det_spec("gfl", levels, strides, 3))
    s = random_maps(rng, 2, 3, levels, strides)
    s["p3"][:, 1] = 0.5  # a dead student channel: std 0
    t = to_taps(random_maps(rng, 2, 3, levels, strides))
    b = batch_of(2)
    g = jax.grad(lambda x: pkd.pkd(x, t, b, None, cfg=config(), spec=spec)[0])(to_taps(s))
    assert bool(jnp.isfinite(g["neck/p3"]).all())
    s16 = {k: v.astype(jnp.bfloat16) for k, v in to_taps(s).items()}
    f32, _ = pkd.pkd(to_taps(s), t, b, None, cfg=config(), spec=spec)
    b16, _ = pkd.pkd(s16, t, b, None, cfg=config(), spec=spec)
    np.testing.assert_allclose(b16, f32, rtol=2e-2)


def test_registry_and_declarations():
    d = registered(pkd, "pkd")
    assert d.defaults["max_levels"] == 4 and d.defaults["weight"] == 6.0
    assert d.defaults["group_size"] == 2  # per GPU of 2 images, as the original
    assert d.init(jax.random.PRNGKey(0), cfg=config(), spec=pair()) is None
    assert d.check(config(), pair()) is None
    assert "1024" in d.check(config(levels=(8, 1024)), pair())
    assert "pair" in d.check(config(pair="nearest"), pair())


def test_cross_family_pairs_by_stride():
    # Faster R-CNN teacher P2..P6 (strides 4..64) -> RetinaNet student P3..P7 (8..128):
    # P3..P6 pair; the teacher's P2 and the student's P7 are not read.
    rng = np.random.default_rng(5)
    spec = pair(
        det_spec("retinanet", RETINA_LEVELS, RETINA_STRIDES, 3),
        det_spec("faster_rcnn", RCNN_LEVELS, RCNN_STRIDES, 3),
    )
    assert [p[1:3] for p in pkd.select_pairs(config(), spec)] == [
        ("p3", "p3"),
        ("p4", "p4"),
        ("p5", "p5"),
        ("p6", "p6"),
    ]
    s = random_maps(rng, 2, 3, RETINA_LEVELS, RETINA_STRIDES)
    t = random_maps(rng, 2, 3, RCNN_LEVELS, RCNN_STRIDES)
    cfg = config(group_size=0)
    got, _ = pkd.pkd(to_taps(s), to_taps(t), batch_of(2), None, cfg=cfg, spec=spec)
    want = ref_pkd(s, t, [(lvl, lvl) for lvl in ("p3", "p4", "p5", "p6")])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # cfg.levels: exactly the strides named
    got2, m2 = pkd.pkd(
        to_taps(s), to_taps(t), batch_of(2), None, cfg=config(levels=(16, 64)), spec=spec
    )
    assert sorted(m2) == ["p4", "p6"]
    np.testing.assert_allclose(got2, ref_pkd(s, t, [("p4", "p4"), ("p6", "p6")], 2), rtol=1e-5)


@pytest.mark.parametrize("student_is_rcnn", [False, True])
def test_index_pairing_resizes_the_student(student_is_rcnn):
    # mmrazor's data_idx pairing: the i-th levels meet whatever their strides. A RetinaNet
    # student's P3 is upsampled to a Mask R-CNN teacher's P2; a Faster R-CNN student's P2 is
    # downsampled to a RetinaNet teacher's P3.
    rng = np.random.default_rng(6)
    retina = det_spec("retinanet", RETINA_LEVELS, RETINA_STRIDES, 3)
    rcnn = det_spec("faster_rcnn", RCNN_LEVELS, RCNN_STRIDES, 3)
    s_spec, t_spec = (rcnn, retina) if student_is_rcnn else (retina, rcnn)
    spec = pair(s_spec, t_spec)
    s = random_maps(rng, 2, 3, s_spec.levels, s_spec.strides)
    t = random_maps(rng, 2, 3, t_spec.levels, t_spec.strides)
    cfg = config(pair="index", group_size=0)
    got, metrics = pkd.pkd(to_taps(s), to_taps(t), batch_of(2), None, cfg=cfg, spec=spec)
    pairs = list(zip(s_spec.levels[:4], t_spec.levels[:4], strict=True))
    np.testing.assert_allclose(got, ref_pkd(s, t, pairs), rtol=1e-5, atol=1e-5)
    assert sorted(metrics) == sorted(s_spec.levels[:4])


def test_odd_size_resize_under_stride_pairing():
    # same stride, one cell more on the student's side (e.g. another rounding of P6)
    rng = np.random.default_rng(7)
    spec = pair(det_spec("gfl", ("p3",), (8,), 2), det_spec("gfl", ("p3",), (8,), 2))
    s = {"p3": rng.normal(size=(2, 2, 9, 7))}
    t = {"p3": rng.normal(size=(2, 2, 8, 6))}
    got, _ = pkd.pkd(to_taps(s), to_taps(t), batch_of(2), None, cfg=config(), spec=spec)
    np.testing.assert_allclose(got, ref_pkd(s, t, [("p3", "p3")]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "hw_in,hw_out", [((5, 7), (10, 14)), ((10, 14), (5, 7)), ((7, 9), (3, 13))]
)
def test_resize_matches_torch_interpolate(hw_in, hw_out):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(8).normal(size=(2, 3, *hw_in)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.tensor(x), hw_out, mode="bilinear").numpy()
    got = pkd.resize_like_torch(jnp.asarray(x.transpose(0, 2, 3, 1)), hw_out)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-5)
    np.testing.assert_allclose(ref_resize_bilinear(x.astype(np.float64), *hw_out), want, atol=1e-5)


def test_adapter_when_the_widths_differ():
    rng = np.random.default_rng(9)
    spec = pair(
        det_spec("retinanet", RETINA_LEVELS, RETINA_STRIDES, 3),
        det_spec("retinanet", RETINA_LEVELS, RETINA_STRIDES, 5),
    )
    cfg = config(group_size=0)
    params = pkd.init(jax.random.PRNGKey(1), cfg=cfg, spec=spec)
    assert sorted(params) == [f"level_{i}" for i in range(4)]
    assert params["level_0"]["kernel"].shape == (1, 1, 3, 5)
    s = random_maps(rng, 2, 3, RETINA_LEVELS, RETINA_STRIDES)
    t = random_maps(rng, 2, 5, RETINA_LEVELS, RETINA_STRIDES)
    got, _ = pkd.pkd(to_taps(s), to_taps(t), batch_of(2), params, cfg=cfg, spec=spec)
    adapted = {}
    for i, lvl in enumerate(RETINA_LEVELS[:4]):
        k = np.asarray(params[f"level_{i}"]["kernel"], np.float64)[0, 0]  # [C_s, C_t]
        bias = np.asarray(params[f"level_{i}"]["bias"], np.float64)
        adapted[lvl] = np.einsum("nchw,cd->ndhw", s[lvl], k) + bias[None, :, None, None]
    want = ref_pkd(adapted, t, [(lvl, lvl) for lvl in RETINA_LEVELS[:4]])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="adapter"):
        pkd.pkd(to_taps(s), to_taps(t), batch_of(2), None, cfg=cfg, spec=spec)
