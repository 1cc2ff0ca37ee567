"""LD (`jdistill/distill/ld.py`) against a loop-by-loop transcription of mmdetection's
`LDHead.loss_by_feat_single` (`mmdet/models/dense_heads/ld_head.py`) and
`KnowledgeDistillationKLDivLoss` (`mmdet/models/losses/kd_loss.py`).

The original, per GPU of 2 images, per level (NCHW, rows (n, h, w) after permute(0, 2, 3, 1)):
pos_inds are the rows whose ATSS label is a class; weight_targets = max_k sigmoid(student cls
score) at them (detached); pred_corners / soft_corners are the student's / teacher's
bbox_pred rows at the positives, reshaped to [P * 4, reg_max + 1];
loss_ld = 0.25 * sum_j w_j * T^2 * mean_bins softmax(t_j / T) (log softmax(t_j / T) -
log_softmax(s_j / T)) / (4.0 + eps), with w repeated over the 4 sides; summed over levels; no
other normaliser. DDP averages the GPUs.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.batches import crafted_batch
from helpers.distill import check_before_training, distiller_config
from helpers.paths import load_config

from jdistill import train
from jdistill.distill import api, ld, registry
from jdistill.models import detector as detector_lib
from jdistill.models import gfl as gfl_lib

EPS = float(np.finfo(np.float32).eps)
LEVELS = ("p3", "p4", "p5", "p6", "p7")
STRIDES = (8, 16, 32, 64, 128)
CANVAS = (64, 48)
K = 3
REG_MAX = 4


def spec_pair(reg_max=REG_MAX):
    cfg = gfl_lib.defaults(50)
    cfg.reg_max = reg_max
    spec = detector_lib.build(cfg, K).spec
    return api.Pair(spec, spec)


def config(**overrides):
    return distiller_config("ld", **overrides)


def level_hw(stride):
    return (math.ceil(CANVAS[0] / stride), math.ceil(CANVAS[1] / stride))


# ---------------------------------------------------------------- the transcription (NCHW)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def log_softmax(x):
    m = max(x)
    lse = m + math.log(sum(math.exp(v - m) for v in x))
    return [v - lse for v in x]


def ref_ld_level(cls_score, bbox_pred, soft_targets, labels, temp, reg_max, num_classes):
    """LDHead's loss_ld of one level (loss_weight 1): NCHW maps, labels [N, H*W] (K: bg)."""
    n, k, h, w = cls_score.shape
    cls = cls_score.transpose(0, 2, 3, 1).reshape(-1, k)
    pred = bbox_pred.transpose(0, 2, 3, 1).reshape(-1, 4 * (reg_max + 1))
    soft = soft_targets.transpose(0, 2, 3, 1).reshape(-1, 4 * (reg_max + 1))
    labels = labels.reshape(-1)
    pos_inds = [i for i in range(len(labels)) if 0 <= labels[i] < num_classes]
    if not pos_inds:
        return 0.0  # bbox_pred.sum() * 0
    total = 0.0
    for i in pos_inds:
        weight = max(sigmoid(cls[i, c]) for c in range(k))
        for side in range(4):
            bins = slice(side * (reg_max + 1), (side + 1) * (reg_max + 1))
            logq = log_softmax(list(pred[i, bins] / temp))
            logp = log_softmax(list(soft[i, bins] / temp))
            kl = sum(math.exp(lp) * (lp - lq) for lp, lq in zip(logp, logq, strict=True))
            total += weight * kl / (reg_max + 1) * temp * temp
    return total / (4.0 + EPS)


def ref_ld(maps, labels, temp, reg_max, group_size):
    """Sum over levels per GPU of `group_size` images, averaged over the GPUs (DDP)."""
    n = labels.shape[0]
    per_level, start = {}, 0
    for lvl, stride in zip(LEVELS, STRIDES, strict=True):
        size = level_hw(stride)[0] * level_hw(stride)[1]
        per_level[lvl] = labels[:, start : start + size]
        start += size
    gpus = [slice(i, i + group_size) for i in range(0, n, group_size)]
    losses = []
    for g in gpus:
        losses.append(
            sum(
                ref_ld_level(
                    maps["s_cls"][lvl][g],
                    maps["s_dist"][lvl][g],
                    maps["t_dist"][lvl][g],
                    per_level[lvl][g],
                    temp,
                    reg_max,
                    K,
                )
                for lvl in LEVELS
            )
        )
    return float(np.mean(losses))


def random_case(rng, n, reg_max=REG_MAX):
    maps = {"s_cls": {}, "s_dist": {}, "t_dist": {}}
    d = 4 * (reg_max + 1)
    for lvl, stride in zip(LEVELS, STRIDES, strict=True):
        h, w = level_hw(stride)
        maps["s_cls"][lvl] = rng.normal(-1.0, 2.0, size=(n, K, h, w))
        maps["s_dist"][lvl] = rng.normal(0.0, 3.0, size=(n, d, h, w))
        maps["t_dist"][lvl] = rng.normal(0.0, 3.0, size=(n, d, h, w))
    total = sum(level_hw(s)[0] * level_hw(s)[1] for s in STRIDES)
    labels = np.where(rng.uniform(size=(n, total)) > 0.8, rng.integers(0, K, (n, total)), K)
    labels[1] = K  # an image without positives
    return maps, labels


def taps_of(maps, labels):
    nhwc = lambda x: jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)  # noqa: E731
    student = {"assign/pos": jnp.asarray(labels < K)}
    teacher = {}
    for lvl in LEVELS:
        student[f"head/cls_logits/{lvl}"] = nhwc(maps["s_cls"][lvl])
        student[f"head/bbox_dist/{lvl}"] = nhwc(maps["s_dist"][lvl])
        teacher[f"head/bbox_dist/{lvl}"] = nhwc(maps["t_dist"][lvl])
    return student, teacher


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("group_size,tau", [(2, 10.0), (0, 10.0), (2, 1.0)])
def test_matches_the_mmdetection_transcription(group_size, tau):
    rng = np.random.default_rng(0)
    maps, labels = random_case(rng, 4)
    s, t = taps_of(maps, labels)
    cfg = config(group_size=group_size, tau=tau)
    got, metrics = ld.ld(s, t, {}, None, cfg=cfg, spec=spec_pair())
    want = ref_ld(maps, labels, tau, REG_MAX, group_size or 4)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert sorted(metrics) == sorted(LEVELS)
    np.testing.assert_allclose(sum(metrics.values()), got, rtol=1e-6)
    # no normaliser but the GPU count: with one group the loss doubles (4 images, 2 per GPU)
    other = ref_ld(maps, labels, tau, REG_MAX, 4 if group_size == 2 else 2)
    np.testing.assert_allclose(other, want * (2.0 if group_size == 2 else 0.5), rtol=1e-6)


def test_hand_computed_case():
    # one positive, reg_max 1, tau 1: teacher sides (2, 0), student sides (0, 1), cls logit 0
    # (w = 0.5): KL per side = sum_b p_b log(p_b / q_b), mean over the 2 bins.
    spec = spec_pair(1)
    one = dataclasses.replace(spec.student, levels=("p3",), strides=(8,), num_classes=1)
    spec = api.Pair(one, one)
    s = {
        "head/cls_logits/p3": jnp.zeros((1, 1, 1, 1)),
        "head/bbox_dist/p3": jnp.tile(jnp.array([0.0, 1.0]), 4).reshape(1, 1, 1, 8),
        "assign/pos": jnp.ones((1, 1), bool),
    }
    t = {"head/bbox_dist/p3": jnp.tile(jnp.array([2.0, 0.0]), 4).reshape(1, 1, 1, 8)}
    got, _ = ld.ld(s, t, {}, None, cfg=config(tau=1.0, group_size=0), spec=spec)
    p = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
    q = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    kl = float((p * np.log(p / q)).mean())
    np.testing.assert_allclose(got, 0.5 * 4 * kl / (4 + EPS), rtol=1e-5)


def test_only_positives_count_so_padding_never_does():
    # Positives are ATSS's, inside each real image's padded size: junk anywhere else (padding
    # cells included) changes nothing, with or without count_padding (which LD does not read).
    rng = np.random.default_rng(1)
    maps, labels = random_case(rng, 2)
    junk = {k: {lvl: v.copy() for lvl, v in maps[k].items()} for k in maps}
    start = 0
    for lvl, stride in zip(LEVELS, STRIDES, strict=True):
        h, w = level_hw(stride)
        neg = (labels[:, start : start + h * w] == K).reshape(2, 1, h, w)
        start += h * w
        for k in junk:
            junk[k][lvl] = np.where(neg, rng.normal(0, 50, junk[k][lvl].shape), junk[k][lvl])
    clean, _ = ld.ld(*taps_of(maps, labels), {}, None, cfg=config(), spec=spec_pair())
    dirty, _ = ld.ld(*taps_of(junk, labels), {}, None, cfg=config(), spec=spec_pair())
    both, _ = ld.ld(
        *taps_of(junk, labels), {}, None, cfg=config(count_padding=True), spec=spec_pair()
    )
    np.testing.assert_allclose(dirty, clean, rtol=1e-6)
    np.testing.assert_allclose(both, clean, rtol=1e-6)
    assert float(clean) > 0


def test_main_region_maps_by_hand():
    # One level of 2 x 3 cells, K = 2; positives at cells (0, 1) and (1, 2).
    spec = spec_pair(1)
    one = dataclasses.replace(spec.student, levels=("p3",), strides=(8,), num_classes=2)
    spec = api.Pair(one, one)
    cls = np.full((1, 2, 3, 2), -9.0, np.float32)
    cls[0, 0, 1] = [0.0, -1.0]  # w = sigmoid(0) = 0.5
    cls[0, 1, 2] = [-2.0, math.log(3.0)]  # w = sigmoid(ln 3) = 0.75
    cls[0, 1, 0] = [5.0, 5.0]  # a confident negative: no weight
    s = {
        "head/cls_logits/p3": jnp.asarray(cls),
        "head/bbox_dist/p3": jnp.zeros((1, 2, 3, 8)),
        "assign/pos": jnp.asarray([[0, 1, 0, 0, 0, 1]], bool),
    }
    batch = {"rng": jax.random.PRNGKey(0)}  # an evaluation batch's; unused
    maps = ld.main_region_maps(s, {}, batch, cfg=config(), spec=spec)
    assert sorted(maps) == ["main region", "weight (student score)"]
    np.testing.assert_array_equal(maps["main region"]["p3"], [[[0, 1, 0], [0, 0, 1]]])
    np.testing.assert_allclose(
        maps["weight (student score)"]["p3"], [[[0, 0.5, 0], [0, 0, 0.75]]], rtol=1e-6
    )
    with pytest.raises(ValueError, match="priors"):
        ld.main_region_maps(
            {**s, "assign/pos": s["assign/pos"][:, :5]}, {}, batch, cfg=config(), spec=spec
        )


@pytest.mark.parametrize("group_size", [2, 0])
def test_loss_is_the_one_its_maps_give(group_size):
    # sum_levels sum_cells weight map * sum_sides KL / (4 + eps) / groups is the loss, and the
    # main region is the student's positives (labels < K), cell by cell.
    rng = np.random.default_rng(4)
    maps_np, labels = random_case(rng, 4)
    s, t = taps_of(maps_np, labels)
    cfg, spec = config(group_size=group_size), spec_pair()
    d = registry.get("ld")
    assert d.maps is ld.main_region_maps
    maps = jax.jit(lambda s, t: d.maps(s, t, {}, cfg=cfg, spec=spec))(s, t)
    got, metrics = d.loss(s, t, {}, None, cfg=cfg, spec=spec)
    groups = 2 if group_size == 2 else 1
    start, want = 0, 0.0
    for lvl, stride in zip(LEVELS, STRIDES, strict=True):
        h, w = level_hw(stride)
        region = (labels[:, start : start + h * w] < K).reshape(4, h, w)
        start += h * w
        np.testing.assert_array_equal(maps["main region"][lvl], region.astype(np.float32))
        weight = np.asarray(maps["weight (student score)"][lvl], np.float64)
        assert weight.shape == (4, h, w) and maps["main region"][lvl].dtype == jnp.float32
        assert not (weight[~region] != 0).any() and (weight[region] > 0).all()
        b = REG_MAX + 1
        sd = s[f"head/bbox_dist/{lvl}"].reshape(4, h, w, 4, b)
        td = t[f"head/bbox_dist/{lvl}"].reshape(4, h, w, 4, b)
        kl = np.asarray(ld.side_kl(sd, td, cfg.tau), np.float64).sum(-1)  # [N, H, W]
        term = (weight * kl).sum() / (4 + EPS) / groups
        np.testing.assert_allclose(metrics[lvl], term, rtol=1e-5)
        want += term
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow
def test_gradient_reaches_the_student_distributions_only_and_jit_agrees():
    rng = np.random.default_rng(2)
    maps, labels = random_case(rng, 2)
    s, t = taps_of(maps, labels)
    cfg, spec = config(), spec_pair()

    pos = s.pop("assign/pos")

    def loss(s_taps, t_taps):
        return ld.ld({**s_taps, "assign/pos": pos}, t_taps, {}, None, cfg=cfg, spec=spec)[0]

    gs, gt = jax.grad(loss, argnums=(0, 1))(s, t)
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in gt.values())
    assert float(jnp.abs(gs["head/bbox_dist/p3"]).sum()) > 0
    # the weight is the student's score under stop_gradient
    assert all(float(jnp.abs(gs[f"head/cls_logits/{lvl}"]).sum()) == 0.0 for lvl in LEVELS)
    np.testing.assert_allclose(jax.jit(loss)(s, t), loss(s, t), rtol=1e-6)


@pytest.mark.slow
def test_gfl_loss_adds_the_assignment_taps_and_is_unchanged():
    cfg = gfl_lib.defaults(50)
    cfg.update(width=0.125, neck_channels=32, stacked_convs=1)
    det = detector_lib.build(cfg, K)
    per_image = [[[4.0, 6.0, 40.0, 30.0]], [[10.0, 10.0, 44.0, 60.0], [0.0, 30.0, 20.0, 60.0]]]
    batch, *_ = crafted_batch(per_image, K, canvas=CANVAS)
    batch["pad_shape"] = jnp.asarray([CANVAS, (32, 48)], jnp.int32)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, *CANVAS, 3))
    # compiled, not op by op: a whole detector is slow to run eagerly
    v = jax.jit(det.module.init)(jax.random.PRNGKey(1), x)
    out, _ = jax.jit(det.module.apply)(v, x)

    def loss_and_taps(out):
        taps = {}
        return det.loss(out, batch, taps=taps), taps

    with_taps, taps = jax.jit(loss_and_taps)(out)
    without = jax.jit(lambda out: det.loss(out, batch))(out)
    np.testing.assert_allclose(with_taps[0], without[0], rtol=1e-6)
    total = sum(level_hw(s)[0] * level_hw(s)[1] for s in STRIDES)
    assert sorted(taps) == ["assign/label_weight", "assign/neg", "assign/pos", "assign/valid"]
    assert all(v.shape == (2, total) for v in taps.values())
    valid = np.asarray(det.valid_priors(out, batch))
    np.testing.assert_array_equal(taps["assign/valid"], valid)
    np.testing.assert_array_equal(np.asarray(taps["assign/label_weight"]) > 0, valid)  # ATSS
    pos = np.asarray(taps["assign/pos"])
    assert pos.sum() > 0 and not (pos & ~valid).any()
    assert not (pos & np.asarray(taps["assign/neg"])).any()
    assert det.LOSS_TAPS == ("assign",)


def test_registry_declarations_and_check():
    d = registry.get("ld")
    assert d is ld.DISTILLERS["ld"]
    assert d.defaults["tau"] == 10.0 and d.defaults["weight"] == 0.25
    assert "GFL" in d.same_family and "distribution" in d.same_family
    assert d.check(config(), spec_pair()) is None
    other = api.Pair(spec_pair(16).student, spec_pair(8).teacher)
    assert "reg_max" in d.check(config(), other)
    retina = dataclasses.replace(spec_pair().student, family="retinanet")
    assert "GFL" in d.check(config(), api.Pair(retina, retina))


def test_config_passes_check_config_and_other_families_are_refused():
    config_ = load_config("ld_gfl", "runlocal")
    check_before_training(config_)
    assert config_.distill.losses.ld.weight == 0.25 and config_.distill.losses.ld.tau == 10.0
    for teacher in ("fcos_r50_caffe_coco", "faster_rcnn_r50_coco"):
        config_ = load_config("ld_gfl", "runlocal")
        config_.teacher.model = load_config(teacher, "runlocal").model
        with pytest.raises(train.ConfigError, match="box-side distributions"):
            check_before_training(config_)
    config_ = load_config("ld_gfl", "runlocal")
    config_.teacher.model.reg_max = 8
    with pytest.raises(train.ConfigError, match="reg_max"):
        check_before_training(config_)
