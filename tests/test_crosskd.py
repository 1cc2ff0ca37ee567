"""CrossKD (`jdistill/distill/crosskd.py`, the view `dense.DenseDetector.cross_head`) against
loop-by-loop transcriptions of jbwang1997/CrossKD `crosskd_gfl.py` / `crosskd_retinanet.py`.

The original, per GPU of 2 images, per level (NCHW):
- `align_scale(stu, tea)`: per channel over (N, H, W), s' = (s - mean_s) / (std_s + 1e-6) *
  std_t + mean_t, torch's unbiased std, no eps on the teacher's std; then ReLU (the cut is after
  conv 3 of 4, `reused_teacher_head_idx=3`), the teacher's 4th tower conv, gfl_cls / gfl_reg and
  the level's Scale (RetinaNet: retina_cls / retina_reg).
- `pred_mimicking_loss_single`: rows are (n, h, w[, a]) after permute(0, 2, 3, 1);
  KDQualityFocalLoss(beta 1) of the cross logits against sigmoid(teacher logits), weighted by
  the label weights, / (avg_factor + eps); reg weights sigmoid(max_k teacher logit), 0 where the
  label weight is 0.
  GFL: KnowledgeDistillationKLDivLoss(class_reduction 'sum', T 1, loss_weight 4) per side,
  avg_factor 4 (+ eps), each level then divided by `kd_avg_factor` = the sum over ALL levels of
  the reg weights of this GPU (neither reduce_mean-ed nor clamped); avg_factor for the cls term
  is reduce_mean(sum_img max(num_pos, 1)) (the mean over GPUs).
  RetinaNet: GIoULoss(loss_weight 1) of the boxes both deltas decode to on the anchors
  (DeltaXYWH, wh_ratio_clip 16/1000), weight the reg weights, / (avg_factor + eps), avg_factor
  = this GPU's sum_img max(num_pos, 1).
DDP averages the GPUs' losses (their gradients).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers.batches import crafted_batch
from helpers.distill import check_before_training, distiller_config
from helpers.paths import load_config

from jdistill import train
from jdistill.distill import api, crosskd, plan, registry
from jdistill.models import dense, layers
from jdistill.models import detector as detector_lib
from jdistill.models import gfl as gfl_lib
from jdistill.models import retinanet as retina_lib

EPS = float(np.finfo(np.float32).eps)
LEVELS = ("p3", "p4", "p5", "p6", "p7")
STRIDES = (8, 16, 32, 64, 128)
CANVAS = (64, 64)
K = 3


def tiny(family, stacked_convs=2, dtype="float32"):
    """A tiny detector of `family` (width 0.125; GFL's GroupNorm(32) needs 32 neck channels)."""
    cfg = (gfl_lib if family == "gfl" else retina_lib).defaults(50)
    cfg.width = 0.125
    cfg.neck_channels = 32 if family == "gfl" else 16
    cfg.stacked_convs = stacked_convs
    cfg.dtype = dtype
    return detector_lib.build(cfg, K)


def config(**overrides):
    return distiller_config("crosskd", **overrides)


def level_hw(stride):
    return (math.ceil(CANVAS[0] / stride), math.ceil(CANVAS[1] / stride))


# ---------------------------------------------------------------- the transcription (NCHW)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def ref_align_scale(stu, tea, valid=None):
    """align_scale over [N, C, H, W] float64; with `valid` [N, H, W], the statistics over the
    valid cells only (our padding rule; None: every cell, the original)."""
    n, c, h, w = stu.shape
    valid = np.ones((n, h, w)) if valid is None else valid
    out = np.zeros_like(stu)

    def stats(x, ch):
        vals = [
            x[b, ch, i, j] for b in range(n) for i in range(h) for j in range(w) if valid[b, i, j]
        ]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
        return mean, math.sqrt(var)

    for ch in range(c):
        s_mean, s_std = stats(stu, ch)
        t_mean, t_std = stats(tea, ch)
        for b in range(n):
            for i in range(h):
                for j in range(w):
                    z = (stu[b, ch, i, j] - s_mean) / (s_std + 1e-6)
                    out[b, ch, i, j] = z * t_std + t_mean
    return out


def rows(x):
    """[N, C, H, W] -> [N * H * W, C], the original's permute(0, 2, 3, 1).reshape(-1, C)."""
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def ref_kd_qfl(pred, target, weight, avg_factor, beta=1.0):
    """KDQualityFocalLoss: pred/target [M, K] logits, weight [M] (repeated over classes)."""
    total = 0.0
    for m in range(pred.shape[0]):
        for k in range(pred.shape[1]):
            x, t = pred[m, k], sigmoid(target[m, k])
            bce = max(x, 0.0) - x * t + math.log1p(math.exp(-abs(x)))
            total += weight[m] * bce * abs(sigmoid(x) - t) ** beta
    return total / (avg_factor + EPS)


def ref_kl_sum(pred, soft, temp):
    """knowledge_distillation_kl_div_loss, class_reduction 'sum', for one row of bins."""
    t = np.exp(soft / temp - np.max(soft / temp))
    t = t / t.sum()
    logq = pred / temp - np.max(pred / temp)
    logq = logq - math.log(np.exp(logq).sum())
    return sum(t[b] * (math.log(t[b]) - logq[b]) for b in range(len(t)) if t[b] > 0) * temp**2


def ref_gfl_gpu(tea_cls, tea_bbox, x_cls, x_bbox, label_weights, avg_factor, reg_max, temp=1.0):
    """CrossKDGFL's KD losses of one GPU: lists over levels of NCHW logits and [N, H*W] label
    weights. Returns (sum of loss_cls_kd, sum of loss_reg_kd) with loss weights 1 and 4."""
    losses_cls, losses_reg, kd_avg = [], [], 0.0
    for tc, tb, xc, xb, lw in zip(tea_cls, tea_bbox, x_cls, x_bbox, label_weights, strict=True):
        tc, xc, lw = rows(tc), rows(xc), lw.reshape(-1)
        losses_cls.append(ref_kd_qfl(xc, tc, lw, avg_factor))
        tb = rows(tb).reshape(-1, reg_max + 1)
        xb = rows(xb).reshape(-1, reg_max + 1)
        reg_w = np.array([sigmoid(tc[m].max()) for m in range(tc.shape[0])])
        reg_w[lw == 0] = 0
        w4 = np.repeat(reg_w, 4)
        s = sum(w4[j] * ref_kl_sum(xb[j], tb[j], temp) for j in range(tb.shape[0]))
        losses_reg.append(4.0 * s / (4.0 + EPS))
        kd_avg += reg_w.sum()
    return sum(losses_cls), sum(x / kd_avg for x in losses_reg)


def ref_anchors(hw, stride, octave_base_scale=4, scales_per_octave=3, ratios=(0.5, 1.0, 2.0)):
    """mmdetection AnchorGenerator: base = stride, ratio-major (a = r * S + s), rows (h, w, a)."""
    scales = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
    base = []
    for r in ratios:
        h_ratio = math.sqrt(r)
        w_ratio = 1 / h_ratio
        for s in scales:
            ws, hs = stride * w_ratio * s, stride * h_ratio * s
            base.append((-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs))
    out = []
    for i in range(hw[0]):
        for j in range(hw[1]):
            for b in base:
                out.append(
                    (b[0] + j * stride, b[1] + i * stride, b[2] + j * stride, b[3] + i * stride)
                )
    return np.array(out)


def ref_decode(anchor, delta, wh_ratio_clip=16 / 1000):
    """delta2bbox (means 0, stds 1, no max_shape) for one anchor."""
    max_ratio = abs(math.log(wh_ratio_clip))
    px, py = (anchor[0] + anchor[2]) * 0.5, (anchor[1] + anchor[3]) * 0.5
    pw, ph = anchor[2] - anchor[0], anchor[3] - anchor[1]
    dw = min(max(delta[2], -max_ratio), max_ratio)
    dh = min(max(delta[3], -max_ratio), max_ratio)
    gx, gy = px + pw * delta[0], py + ph * delta[1]
    gw, gh = pw * math.exp(dw), ph * math.exp(dh)
    return (gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5)


def ref_giou_loss(a, b, eps=1e-6):
    """1 - bbox_overlaps(a, b, mode='giou', is_aligned=True) for one pair."""
    area1 = (a[2] - a[0]) * (a[3] - a[1])
    area2 = (b[2] - b[0]) * (b[3] - b[1])
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    overlap = iw * ih
    union = max(area1 + area2 - overlap, eps)
    ew = max(max(a[2], b[2]) - min(a[0], b[0]), 0.0)
    eh = max(max(a[3], b[3]) - min(a[1], b[1]), 0.0)
    enclose = max(ew * eh, eps)
    return 1.0 - (overlap / union - (enclose - union) / enclose)


def ref_retina_gpu(tea_cls, tea_bbox, x_cls, x_bbox, label_weights, avg_factor, anchors):
    """CrossKDRetinaNet's KD losses of one GPU (loss weights 1): lists over levels of NCHW
    maps ([N, A*K, H, W], [N, A*4, H, W]), [N, H*W*A] label weights, [H*W*A, 4] anchors."""
    loss_cls = loss_reg = 0.0
    for tc, tb, xc, xb, lw, anc in zip(
        tea_cls, tea_bbox, x_cls, x_bbox, label_weights, anchors, strict=True
    ):
        n = tc.shape[0]
        tc, xc = rows(tc).reshape(-1, K), rows(xc).reshape(-1, K)
        lw = lw.reshape(-1)
        loss_cls += ref_kd_qfl(xc, tc, lw, avg_factor)
        tb, xb = rows(tb).reshape(-1, 4), rows(xb).reshape(-1, 4)
        anc = np.tile(anc, (n, 1))  # the anchors of every image, image after image
        total = 0.0
        for m in range(tb.shape[0]):
            w = 0.0 if lw[m] == 0 else sigmoid(tc[m].max())
            if w:
                total += w * ref_giou_loss(ref_decode(anc[m], xb[m]), ref_decode(anc[m], tb[m]))
        loss_reg += total / (avg_factor + EPS)
    return loss_cls, loss_reg


# ---------------------------------------------------------------- random heads


def random_heads(rng, family, n, reg_max=4):
    """Teacher and cross predictions ({level: NCHW}), label weights and positives [N, A_total]."""
    a = 9 if family == "retinanet" else 1
    d = 4 if family == "retinanet" else 4 * (reg_max + 1)
    maps = {"tc": {}, "tb": {}, "xc": {}, "xb": {}}
    for lvl, stride in zip(LEVELS, STRIDES, strict=True):
        h, w = level_hw(stride)
        maps["tc"][lvl] = rng.normal(-2.0, 1.5, size=(n, a * K, h, w))
        maps["xc"][lvl] = maps["tc"][lvl] + rng.normal(0.0, 1.0, size=(n, a * K, h, w))
        scale = 0.3 if family == "retinanet" else 2.0
        maps["tb"][lvl] = rng.normal(0.0, scale, size=(n, a * d, h, w))
        # each image further from the teacher than the last, so that per-GPU normalisers
        # differ from global ones
        spread = (1.0 + np.arange(n))[:, None, None, None]
        maps["xb"][lvl] = rng.normal(0.0, scale, size=(n, a * d, h, w)) * spread
    total = sum(level_hw(s)[0] * level_hw(s)[1] * a for s in STRIDES)
    lw = (rng.uniform(size=(n, total)) > 0.2).astype(np.float64)
    pos = (rng.uniform(size=(n, total)) > 0.9) & (lw > 0)
    pos[0] = False  # an image without positives: max(num_pos, 1)
    return maps, lw, pos


def taps_of(maps, lw, pos, family):
    reg = "bbox_dist" if family == "gfl" else "box_deltas"
    nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)  # noqa: E731
    teacher = {}
    for lvl in LEVELS:
        teacher[f"head/cls_logits/{lvl}"] = nhwc(maps["tc"][lvl])
        teacher[f"head/{reg}/{lvl}"] = nhwc(maps["tb"][lvl])
        teacher[f"cross/cls_logits/{lvl}"] = nhwc(maps["xc"][lvl])
        teacher[f"cross/{reg}/{lvl}"] = nhwc(maps["xb"][lvl])
    student = {
        "assign/label_weight": jnp.asarray(lw, jnp.float32),
        "assign/pos": jnp.asarray(pos),
    }
    return student, teacher


def split_levels(x, a):
    """[N, A_total] -> {level: [N, H*W*a]}."""
    out, start = {}, 0
    for lvl, stride in zip(LEVELS, STRIDES, strict=True):
        h, w = level_hw(stride)
        out[lvl] = x[:, start : start + h * w * a]
        start += h * w * a
    return out


def ref_crosskd(maps, lw, pos, family, group_size, reg_max=4):
    """(cls, reg) as the original computes them, averaged over GPUs of `group_size` images
    (loss weights 1 for both, so they compare with the unweighted metrics)."""
    n = lw.shape[0]
    a = 9 if family == "retinanet" else 1
    lws = split_levels(lw, a)
    gpus = [slice(i, i + group_size) for i in range(0, n, group_size)]
    per_gpu_avg = [sum(max(int(pos[i].sum()), 1) for i in range(n)[g]) for g in gpus]
    cls, reg = [], []
    for g, gpu_avg in zip(gpus, per_gpu_avg, strict=True):
        lists = [[maps[k][lvl][g] for lvl in LEVELS] for k in ("tc", "tb", "xc", "xb")]
        lw_g = [lws[lvl][g] for lvl in LEVELS]
        if family == "gfl":
            avg = float(np.mean(per_gpu_avg))  # reduce_mean
            c, r = ref_gfl_gpu(*lists, lw_g, avg, reg_max)
            r = r / 4.0  # back to loss weight 1
        else:
            anchors = [ref_anchors(level_hw(s), s) for s in STRIDES]
            c, r = ref_retina_gpu(*lists, lw_g, gpu_avg, anchors)
        cls.append(c)
        reg.append(r)
    return float(np.mean(cls)), float(np.mean(reg))


# ---------------------------------------------------------------- tests: the losses


@pytest.mark.parametrize("family", ["gfl", "retinanet"])
@pytest.mark.parametrize("group_size", [2, 0])
def test_losses_match_the_transcription(family, group_size):
    rng = np.random.default_rng(0)
    det = tiny(family)
    spec = api.Pair(det.spec, det.spec)
    reg_max = 4
    if family == "gfl":
        one = dataclasses.replace(det.spec, reg_max=reg_max)
        spec = api.Pair(one, one)
    n = 4
    maps, lw, pos = random_heads(rng, family, n, reg_max)
    student, teacher = taps_of(maps, lw, pos, family)
    batch = {"image_valid": jnp.ones((n,), bool)}
    cfg = config(group_size=group_size)
    total, metrics = crosskd.crosskd(student, teacher, batch, None, cfg=cfg, spec=spec)
    want_cls, want_reg = ref_crosskd(maps, lw, pos, family, group_size or n, reg_max)
    np.testing.assert_allclose(metrics["cls"], want_cls, rtol=1e-5)
    np.testing.assert_allclose(metrics["reg"], want_reg, rtol=1e-5)
    reg_w = 4.0 if family == "gfl" else 1.0
    np.testing.assert_allclose(total, want_cls + reg_w * want_reg, rtol=1e-5)
    # the grouping matters (so the test can tell per-GPU normalisers from global ones)
    other = ref_crosskd(maps, lw, pos, family, 4 if group_size == 2 else 2, reg_max)
    assert abs(other[0] - want_cls) + abs(other[1] - want_reg) > 1e-4 * (want_cls + want_reg)


def test_gfl_loss_by_hand():
    # one image, one prior, one class, reg_max 1: cls = BCE(x, sigmoid(t)) |sig(x) - sig(t)| /
    # (max(0 pos, 1) + eps); reg = w * sum_sides KL / (4 + eps) / w with identical sides.
    det = tiny("gfl")
    one = dataclasses.replace(det.spec, levels=("p3",), strides=(8,), num_classes=1, reg_max=1)
    spec = api.Pair(one, one)
    x, t = 0.5, -1.0
    xd, td = np.array([0.0, 1.0]), np.array([2.0, 0.0])
    teacher = {
        "head/cls_logits/p3": jnp.full((1, 1, 1, 1), t),
        "cross/cls_logits/p3": jnp.full((1, 1, 1, 1), x),
        "head/bbox_dist/p3": jnp.asarray(np.tile(td, 4).reshape(1, 1, 1, 8), jnp.float32),
        "cross/bbox_dist/p3": jnp.asarray(np.tile(xd, 4).reshape(1, 1, 1, 8), jnp.float32),
    }
    student = {"assign/label_weight": jnp.ones((1, 1)), "assign/pos": jnp.zeros((1, 1), bool)}
    _, m = crosskd.crosskd(student, teacher, {}, None, cfg=config(), spec=spec)
    st = sigmoid(t)
    bce = max(x, 0) - x * st + math.log1p(math.exp(-abs(x)))
    np.testing.assert_allclose(m["cls"], bce * abs(sigmoid(x) - st) / (1 + EPS), rtol=1e-6)
    p = np.exp(td) / np.exp(td).sum()
    q = np.exp(xd) / np.exp(xd).sum()
    kl = float((p * np.log(p / q)).sum())
    np.testing.assert_allclose(m["reg"], 4 * kl / (4 + EPS), rtol=1e-5)


@pytest.mark.parametrize("family", ["gfl", "retinanet"])
def test_priors_without_label_weight_do_not_count(family):
    # the original's rule: label weight 0 (invalid: padding, or ignored) priors add nothing
    rng = np.random.default_rng(1)
    det = tiny(family)
    spec = api.Pair(det.spec, det.spec)
    if family == "gfl":
        one = dataclasses.replace(det.spec, reg_max=4)
        spec = api.Pair(one, one)
    maps, lw, pos = random_heads(rng, family, 2)
    a = 9 if family == "retinanet" else 1
    junk = {k: {lvl: v.copy() for lvl, v in maps[k].items()} for k in maps}
    lws = split_levels(lw, a)
    for k in ("tc", "xc", "tb", "xb"):
        for lvl in LEVELS:
            x = junk[k][lvl]
            n, c, h, w = x.shape
            per_a = x.reshape(n, a, c // a, h, w)
            dead = (lws[lvl].reshape(n, h, w, a) == 0).transpose(0, 3, 1, 2)[:, :, None]
            per_a[...] = np.where(dead, rng.normal(0, 30, per_a.shape), per_a)
    b = {"image_valid": jnp.ones((2,), bool)}
    clean = crosskd.crosskd(*taps_of(maps, lw, pos, family), b, None, cfg=config(), spec=spec)
    dirty = crosskd.crosskd(*taps_of(junk, lw, pos, family), b, None, cfg=config(), spec=spec)
    np.testing.assert_allclose(dirty[0], clean[0], rtol=1e-5)
    # a padding example counts no positive: its max(num_pos, 1) leaves the normaliser
    lw2 = lw.copy()
    lw2[1] = 0.0
    pad = {"image_valid": jnp.asarray([True, False])}
    s2, t2 = taps_of(maps, lw2, pos & (lw2 > 0), family)
    got, m = crosskd.crosskd(s2, t2, pad, None, cfg=config(group_size=0), spec=spec)
    alone = crosskd.crosskd(
        {k: v[:1] for k, v in s2.items()},
        {k: v[:1] for k, v in t2.items()},
        {"image_valid": jnp.asarray([True])},
        None,
        cfg=config(group_size=0),
        spec=spec,
    )
    np.testing.assert_allclose(got, alone[0], rtol=1e-5)


# ---------------------------------------------------------------- tests: align_scale


@pytest.mark.parametrize("group_size", [0, 2])
def test_align_scale_matches_the_transcription_and_excludes_padding(group_size):
    rng = np.random.default_rng(2)
    n, c, h, w = 4, 3, 5, 6
    stu = rng.normal(size=(n, c, h, w)) * rng.uniform(0.5, 3, (1, c, 1, 1)) + 2
    tea = rng.normal(size=(n, c, h, w)) * rng.uniform(0.5, 3, (1, c, 1, 1)) - 1
    valid = np.ones((n, h, w))
    valid[0, 3:] = 0  # image 0: rows 0-2 valid
    valid[3, :, 4:] = 0  # image 3: columns 0-3 valid
    g = group_size or n
    nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)  # noqa: E731
    back = lambda x: np.asarray(x).transpose(0, 3, 1, 2)  # noqa: E731
    # every cell: the original
    got = back(dense.align_scale(nhwc(stu), nhwc(tea), jnp.ones((n, h, w)), group_size))
    want = np.concatenate([ref_align_scale(stu[i : i + g], tea[i : i + g]) for i in range(0, n, g)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # valid cells: junk in the padding cells changes nothing at the valid ones
    junk_s = np.where(valid[:, None] > 0, stu, rng.normal(0, 100, stu.shape))
    junk_t = np.where(valid[:, None] > 0, tea, rng.normal(0, 100, tea.shape))
    got_v = back(dense.align_scale(nhwc(junk_s), nhwc(junk_t), jnp.asarray(valid), group_size))
    want_v = np.concatenate(
        [
            ref_align_scale(junk_s[i : i + g], junk_t[i : i + g], valid[i : i + g])
            for i in range(0, n, g)
        ]
    )
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-4)
    clean = back(dense.align_scale(nhwc(stu), nhwc(tea), jnp.asarray(valid), group_size))
    inside = np.broadcast_to(valid[:, None] > 0, stu.shape)
    np.testing.assert_allclose(got_v[inside], clean[inside], rtol=1e-5, atol=1e-5)
    # and counting the padding (the original) differs
    full = back(dense.align_scale(nhwc(junk_s), nhwc(junk_t), jnp.ones((n, h, w)), group_size))
    assert np.abs(full[inside] - got_v[inside]).max() > 1e-2


def test_align_scale_constant_channel_is_finite():
    x = jnp.ones((2, 3, 3, 2)).at[..., 1].set(jnp.arange(18.0).reshape(2, 3, 3))
    t = jnp.arange(36.0).reshape(2, 3, 3, 2)
    g = jax.grad(lambda s: dense.align_scale(s, t, jnp.ones((2, 3, 3)), 0).sum())(x)
    assert bool(jnp.isfinite(g).all())


# ---------------------------------------------------------------- tests: models and view


def variables_of(det, seed):
    x = jnp.zeros((1, *CANVAS, 3))
    v = det.module.init(jax.random.PRNGKey(seed), x)
    # livelier than the init: head output layers 30x, so every conv matters
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (
            a * 30.0 if any(getattr(p, "key", "") in ("gfl_reg", "retina_reg") for p in path) else a
        ),
        v,
    )


def images(n=2, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, *CANVAS, 3))


EXPECTED_HEAD = {
    # mmdetection's state_dict names; the converter and checkpoints depend on them
    "gfl": lambda c, k, r: {
        **{
            f"{t}_convs_{i}": {
                "conv": {"kernel": (3, 3, c, c)},
                "gn": {"scale": (c,), "bias": (c,)},
            }
            for t in ("cls", "reg")
            for i in range(2)
        },
        "gfl_cls": {"conv": {"kernel": (3, 3, c, k), "bias": (k,)}},
        "gfl_reg": {"conv": {"kernel": (3, 3, c, 4 * (r + 1)), "bias": (4 * (r + 1),)}},
        **{f"scales_{i}": () for i in range(5)},
    },
    "retinanet": lambda c, k, r: {
        **{
            f"{t}_convs_{i}": {"conv": {"kernel": (3, 3, c, c), "bias": (c,)}}
            for t in ("cls", "reg")
            for i in range(2)
        },
        "retina_cls": {"conv": {"kernel": (3, 3, c, 9 * k), "bias": (9 * k,)}},
        "retina_reg": {"conv": {"kernel": (3, 3, c, 36), "bias": (36,)}},
    },
}


def old_head(family, params, p, level, dtype=jnp.float32):
    """The head as it was computed before the tower taps: ConvModules with their ReLU inside
    (`layers.Conv(norm='gn')`, activate=True) or conv + ReLU, then the output convs."""
    c = r = p
    norm = "gn" if family == "gfl" else None
    for i in range(2):
        outs = []
        for tower, x in (("cls", c), ("reg", r)):
            conv = layers.Conv(p.shape[-1], 3, norm=norm, dtype=dtype)
            y = conv.apply({"params": params[f"{tower}_convs_{i}"]}, x)
            outs.append(y if norm else jax.nn.relu(y))
        c, r = outs
    names = ("gfl_cls", "gfl_reg") if family == "gfl" else ("retina_cls", "retina_reg")
    cls_p, reg_p = params[names[0]], params[names[1]]
    cls = layers.Conv(cls_p["conv"]["bias"].shape[0], 3, dtype=dtype).apply({"params": cls_p}, c)
    reg = layers.Conv(reg_p["conv"]["bias"].shape[0], 3, dtype=dtype).apply({"params": reg_p}, r)
    reg = reg.astype(jnp.float32)
    if family == "gfl":
        reg = reg * params[f"scales_{level}"]
    return cls.astype(jnp.float32), reg


@pytest.mark.parametrize("family", ["gfl", "retinanet"])
@pytest.mark.slow
def test_param_tree_and_forward_are_unchanged(family):
    det = tiny(family)
    v = variables_of(det, 0)
    head = v["params"]["bbox_head"]
    shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), head)
    c = det.cfg.neck_channels
    assert shapes == EXPECTED_HEAD[family](c, K, det.cfg.get("reg_max", 0))
    assert set(v["params"]) == {"backbone", "neck", "bbox_head"}
    _, taps = det.module.apply(v, images())
    reg = "bbox_dist" if family == "gfl" else "box_deltas"
    for level, lvl in enumerate(LEVELS):
        cls, box = old_head(family, head, taps[f"neck/{lvl}"], level)
        np.testing.assert_array_equal(taps[f"head/cls_logits/{lvl}"], cls)
        np.testing.assert_array_equal(taps[f"head/{reg}/{lvl}"], box)
        # the tower taps: after conv 1 of 2, before its ReLU
        norm = "gn" if family == "gfl" else None
        for tower in ("cls", "reg"):
            conv = layers.Conv(c, 3, norm=norm, activate=False)
            want = conv.apply({"params": head[f"{tower}_convs_0"]}, taps[f"neck/{lvl}"])
            np.testing.assert_array_equal(taps[f"tower/{tower}/{lvl}"], want)
    assert "tower" in det.TAPS and det.VIEWS == ("teacher_head_on_student_towers",)


def cross_case(family, stacked_convs=2, pad=None):
    """Student and teacher taps on the same images, as the trainer has them."""
    det = tiny(family, stacked_convs)
    sv, tv = variables_of(det, 1), variables_of(det, 2)
    x = images(4)
    _, s_taps = det.module.apply(sv, x)
    t_out, t_taps = det.module.apply(tv, x)
    s_taps = dict(s_taps)
    if pad is not None:
        b, *_ = crafted_batch([[[4.0, 4.0, 30.0, 40.0]]] * 4, K, canvas=CANVAS)
        b["pad_shape"] = jnp.asarray(pad, jnp.int32)
        s_taps["assign/valid"] = det.valid_priors(
            {"cls_logits": [s_taps[f"head/cls_logits/{lvl}"] for lvl in LEVELS]}, b
        )
    return det, sv, tv, x, s_taps, t_out, t_taps


def hand_cross(family, tv, s_taps, t_taps, stacked_convs=2, valid=None, group=2):
    """The teacher's head on the aligned student features, composed by hand from
    `ref_align_scale` and the teacher's parameters (`old_head`'s layers)."""
    head = tv["params"]["bbox_head"]
    norm = "gn" if family == "gfl" else None
    depth = stacked_convs - 1
    out = {}
    for level, lvl in enumerate(LEVELS):
        towers = []
        for tower in ("cls", "reg"):
            s = np.asarray(s_taps[f"tower/{tower}/{lvl}"], np.float64).transpose(0, 3, 1, 2)
            t = np.asarray(t_taps[f"tower/{tower}/{lvl}"], np.float64).transpose(0, 3, 1, 2)
            aligned = np.concatenate(
                [
                    ref_align_scale(
                        s[i : i + group],
                        t[i : i + group],
                        None if valid is None else valid[lvl][i : i + group],
                    )
                    for i in range(0, s.shape[0], group)
                ]
            )
            y = jnp.asarray(aligned.transpose(0, 2, 3, 1), jnp.float32)
            if depth:
                y = jax.nn.relu(y)
            for i in range(depth, stacked_convs):
                conv = layers.Conv(y.shape[-1], 3, norm=norm)
                y = conv.apply({"params": head[f"{tower}_convs_{i}"]}, y)
                y = y if norm else jax.nn.relu(y)
            towers.append(y)
        names = ("gfl_cls", "gfl_reg") if family == "gfl" else ("retina_cls", "retina_reg")
        cls_p, reg_p = head[names[0]], head[names[1]]
        cls = layers.Conv(cls_p["conv"]["bias"].shape[0], 3).apply({"params": cls_p}, towers[0])
        reg = layers.Conv(reg_p["conv"]["bias"].shape[0], 3).apply({"params": reg_p}, towers[1])
        if family == "gfl":
            reg = reg * head[f"scales_{level}"]
        reg_name = "bbox_dist" if family == "gfl" else "box_deltas"
        out[f"cross/cls_logits/{lvl}"] = np.asarray(cls)
        out[f"cross/{reg_name}/{lvl}"] = np.asarray(reg)
    return out


@pytest.mark.parametrize("family,stacked_convs", [("gfl", 2), ("retinanet", 2), ("gfl", 1)])
@pytest.mark.slow
def test_view_is_the_teacher_head_on_aligned_student_features(family, stacked_convs):
    det, sv, tv, x, s_taps, t_out, t_taps = cross_case(family, stacked_convs)
    view = det.view("teacher_head_on_student_towers", tv, t_out, t_taps, s_taps)
    want = hand_cross(family, tv, s_taps, t_taps, stacked_convs)
    assert sorted(view) == sorted(want)
    for k, v in want.items():
        assert view[k].dtype == jnp.float32
        np.testing.assert_allclose(view[k], v, rtol=1e-4, atol=1e-4 * np.abs(v).max())
    if stacked_convs == 1:  # cut at the neck: the tap is the FPN output itself
        np.testing.assert_array_equal(s_taps["tower/cls/p3"], s_taps["neck/p3"])
    # the student's features aligned to the teacher's own: the teacher's own predictions
    own = det.view("teacher_head_on_student_towers", tv, t_out, t_taps, dict(t_taps))
    for k in want:
        ref = t_taps[k.replace("cross/", "head/")]
        np.testing.assert_allclose(own[k], ref, rtol=1e-3, atol=2e-3 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("family", ["gfl", "retinanet"])
@pytest.mark.slow
def test_view_statistics_skip_padding_cells(family):
    # images 0 and 3 padded to 32 x 64 and 64 x 40 pixels of the 64 x 64 canvas
    pad = [[32, 64], [64, 64], [64, 64], [64, 40]]
    det, sv, tv, x, s_taps, t_out, t_taps = cross_case(family, 2, pad=pad)
    valid = {
        lvl: np.asarray(api.pixel_valid(jnp.asarray(pad), level_hw(st), st))
        for lvl, st in zip(LEVELS, STRIDES, strict=True)
    }
    view = det.cross_head(tv, t_taps, s_taps)
    want = hand_cross(family, tv, s_taps, t_taps, valid=valid)
    for k, v in want.items():
        np.testing.assert_allclose(view[k], v, rtol=1e-4, atol=1e-4 * np.abs(v).max())
    # without `assign/valid`: every cell counts, the original's rule, and the result differs
    s_all = {k: v for k, v in s_taps.items() if k != "assign/valid"}
    full = det.cross_head(tv, t_taps, s_all)
    want_full = hand_cross(family, tv, s_taps, t_taps)
    k = "cross/bbox_dist/p3" if family == "gfl" else "cross/box_deltas/p3"  # the lively output
    np.testing.assert_allclose(
        full[k], want_full[k], rtol=1e-4, atol=1e-4 * np.abs(want_full[k]).max()
    )
    assert float(jnp.abs(full[k] - view[k]).max()) > 1e-2 * float(jnp.abs(view[k]).max())
    # count_padding=True, as the trainer passes it: the original's rule despite the tap
    restored = det.view(
        "teacher_head_on_student_towers", tv, t_out, t_taps, s_taps, count_padding=True
    )
    for key in full:
        np.testing.assert_array_equal(restored[key], full[key])


def full_loss(det, batch, cfg):
    """(student params, teacher params) -> CrossKD loss, composed as `make_train_step` does."""
    x = detector_lib.preprocess(batch["image"], batch["img_shape"], "pytorch")
    pair = api.Pair(det.spec, det.spec)

    def loss(s_params, s_stats, t_vars):
        t_out, t_taps = jax.lax.stop_gradient(det.module.apply(t_vars, x))
        out, taps = det.module.apply({"params": s_params, "batch_stats": s_stats}, x)
        taps = dict(taps)
        det.loss(out, batch, variables=None, rng=None, taps=taps)
        view = dict(t_taps)
        view.update(det.view("teacher_head_on_student_towers", t_vars, t_out, t_taps, taps))
        return crosskd.crosskd(taps, view, batch, None, cfg=cfg, spec=pair)[0]

    return loss


def train_batch():
    per_image = [[[4.0, 6.0, 40.0, 50.0]], [[10.0, 10.0, 60.0, 34.0], [0.0, 30.0, 20.0, 60.0]]]
    batch, *_ = crafted_batch(per_image, K, canvas=CANVAS)
    batch["image"] = jnp.asarray(
        np.random.default_rng(3).integers(0, 255, (2, *CANVAS, 3)), jnp.uint8
    )
    batch["img_shape"] = jnp.asarray([CANVAS, (48, 64)], jnp.int32)
    batch["pad_shape"] = jnp.asarray([CANVAS, (64, 64)], jnp.int32)
    return batch


@pytest.mark.parametrize("family", ["gfl", "retinanet"])
@pytest.mark.slow
def test_gradients_reach_the_student_towers_not_the_teacher_and_jit_agrees(family):
    det = tiny(family)
    sv, tv = variables_of(det, 1), variables_of(det, 2)
    loss = full_loss(det, train_batch(), config())
    # compiled, not op by op: a whole detector's gradient is slow to run eagerly
    value, (g_s, g_t) = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))(
        sv["params"], sv["batch_stats"], tv
    )
    norm = lambda t: float(sum(jnp.abs(a).sum() for a in jax.tree_util.tree_leaves(t)))  # noqa: E731
    head = g_s["bbox_head"]
    # the student's layers up to the cut learn from CrossKD ...
    assert norm(head["cls_convs_0"]) > 0 and norm(head["reg_convs_0"]) > 0
    assert norm(g_s["neck"]) > 0 and norm(g_s["backbone"]) > 0
    # ... its layers after the cut and its output convs do not (ground truth only) ...
    after = [k for k in head if not k.endswith("_convs_0")]
    assert after and all(norm(head[k]) == 0.0 for k in after), after
    # ... and the teacher is data
    assert norm(g_t) == 0.0
    # the forward program alone gives the gradient program's value
    np.testing.assert_allclose(jax.jit(loss)(sv["params"], sv["batch_stats"], tv), value, rtol=1e-5)
    assert float(value) > 0


# ---------------------------------------------------------------- tests: declarations, configs


def test_registry_and_declarations():
    d = registry.get("crosskd")
    assert d is crosskd.DISTILLERS["crosskd"]
    assert d.views == ("teacher_head_on_student_towers",)
    assert "tower" in d.student_taps and "assign" in d.student_taps
    assert "prior by prior" in d.same_family
    for family in ("gfl", "retinanet"):
        det = tiny(family)
        pair = api.Pair(det.spec, det.spec)
        assert d.check(config(), pair) is None
        assert not [v for v in d.views if v not in det.spec.views]
    # another width: the teacher's conv cannot take the student's features
    g = tiny("gfl")
    other = dataclasses.replace(g.spec, channels=64)
    assert "channels" in d.check(config(), api.Pair(g.spec, other))


@pytest.mark.parametrize("name", ["crosskd_gfl", "crosskd_pkd_gfl", "crosskd_retinanet"])
def test_configs_pass_check_config(name):
    config_ = load_config(name, "runlocal")
    check_before_training(config_)
    losses = config_.distill.losses
    assert losses.crosskd.fn == "crosskd"
    if name == "crosskd_pkd_gfl":
        assert losses.pkd.weight == 6.0 and losses.pkd.max_levels == 0


@pytest.mark.parametrize("teacher", ["fcos_r50_caffe_coco", "faster_rcnn_r50_coco"])
def test_check_config_refuses_a_teacher_of_another_family(teacher):
    config_ = load_config("crosskd_gfl", "runlocal")
    config_.teacher.model = load_config(teacher, "runlocal").model
    with pytest.raises(train.ConfigError, match="prior by prior"):
        check_before_training(config_)


def test_view_readers_share_one_count_padding():
    d = registry.get("crosskd")
    det = tiny("gfl")
    pair = api.Pair(det.spec, det.spec)

    def term(key, count_padding):
        cfg = ml_collections.ConfigDict({"fn": "crosskd", "weight": 1.0, **d.defaults})
        cfg.count_padding = count_padding
        return plan.Term(key, d, cfg)

    # the trainer computes the view once, with its readers' setting
    assert plan.views([term("a", True)]) == {"teacher_head_on_student_towers": True}
    assert plan.views([term("a", False), term("b", False)]) == {
        "teacher_head_on_student_towers": False
    }
    assert plan.problems([term("a", False), term("b", False)], pair) == []
    (msg,) = plan.problems([term("a", False), term("b", True)], pair)
    assert "distill.losses.b" in msg and "distill.losses.a's" in msg and "count_padding" in msg


def test_towers_of_different_depth_are_refused():
    config = load_config("crosskd_gfl", "runlocal")
    config.unlock()
    config.teacher.model.stacked_convs = config.model.stacked_convs + 1
    with pytest.raises(train.ConfigError, match="stacked_convs"):
        check_before_training(config)
