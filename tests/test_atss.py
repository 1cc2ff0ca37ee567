"""ATSS assignment: a hand-worked case and a loop-by-loop transcription of mmdetection's
`ATSSAssigner.assign` on random boxes."""

import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.ops import assign

ROW = np.array([[10 * i, 0, 10 * i + 10, 10] for i in range(5)], np.float32)  # centres x=5..45


def test_hand_worked_case():
    # gt0 = [8,0,22,10] (centre 15): top-3 by distance are priors 1, 0, 2 with IoU 100/140,
    # 20/220, 20/220 -> mean .2987 + std .3599 = .6586: only prior 1 passes.
    # gt1 = [10,0,21,10]: IoU(prior1) = 100/110 = .909, candidates' threshold .8307: prior 1
    # is positive for both gts and goes to gt1, the higher IoU. gt2 is padding.
    gts = jnp.array([[8.0, 0, 22, 10], [10.0, 0, 21, 10], [8.0, 0, 22, 10]])
    assigned, iou = assign.atss_assign(
        jnp.asarray(ROW), jnp.ones(5, bool), [5], gts, jnp.array([True, True, False]), topk=3
    )
    np.testing.assert_array_equal(np.asarray(assigned), [0, 2, 0, 0, 0])
    np.testing.assert_allclose(float(iou[1]), 100 / 110, rtol=1e-6)


def test_only_gt0_and_invalid_prior():
    gts = jnp.array([[8.0, 0, 22, 10]])
    assigned, _ = assign.atss_assign(
        jnp.asarray(ROW),
        jnp.array([True, True, True, True, False]),
        [5],
        gts,
        jnp.ones(1, bool),
        topk=3,
    )
    np.testing.assert_array_equal(np.asarray(assigned), [0, 1, 0, 0, -1])


def test_empty_gt_is_all_negative():
    assigned, _ = assign.atss_assign(
        jnp.asarray(ROW), jnp.ones(5, bool), [5], jnp.zeros((2, 4)), jnp.zeros(2, bool), topk=3
    )
    np.testing.assert_array_equal(np.asarray(assigned), [0] * 5)


def np_atss(priors, level_sizes, gts, topk):
    """mmdetection ATSSAssigner.assign, transcribed with numpy (float32 IoU)."""
    n_gt, n_p = len(gts), len(priors)
    if n_gt == 0:
        return np.zeros(n_p, int)
    p = priors.astype(np.float32)
    g = gts.astype(np.float32)
    iw = np.clip(
        np.minimum(p[:, None, 2], g[None, :, 2]) - np.maximum(p[:, None, 0], g[None, :, 0]), 0, None
    )
    ih = np.clip(
        np.minimum(p[:, None, 3], g[None, :, 3]) - np.maximum(p[:, None, 1], g[None, :, 1]), 0, None
    )
    inter = iw * ih
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    ov = inter / np.maximum(area(p)[:, None] + area(g)[None] - inter, 1e-6)
    pc = (p[:, :2] + p[:, 2:]) / 2
    gc = (g[:, :2] + g[:, 2:]) / 2
    dist = np.sqrt(((pc[:, None] - gc[None]) ** 2).sum(-1))
    cands, start = [], 0
    for n in level_sizes:
        k = min(topk, n)
        cands.append(np.argsort(dist[start : start + n], axis=0, kind="stable")[:k] + start)
        start += n
    cand = np.concatenate(cands, 0)  # [K, G]
    cov = ov[cand, np.arange(n_gt)]
    thr = cov.mean(0) + cov.std(0, ddof=1)
    is_pos = cov >= thr[None]
    cx, cy = pc[cand, 0], pc[cand, 1]
    m = np.minimum.reduce([cx - g[:, 0], cy - g[:, 1], g[:, 2] - cx, g[:, 3] - cy])
    is_pos &= m > 0.01
    inf = np.full((n_p, n_gt), -np.inf)
    for k_ in range(cand.shape[0]):
        for j in range(n_gt):
            if is_pos[k_, j]:
                inf[cand[k_, j], j] = ov[cand[k_, j], j]
    best, arg = inf.max(1), inf.argmax(1)
    return np.where(best > -np.inf, arg + 1, 0)


@pytest.mark.parametrize("seed", range(4))
def test_matches_mmdetection_transcription(seed):
    rng = np.random.default_rng(seed)
    levels, priors = [], []
    for stride, (h, w) in zip((8, 16, 32), ((8, 10), (4, 5), (2, 3)), strict=True):
        ys, xs = np.mgrid[0:h, 0:w]
        c = np.stack([xs.ravel(), ys.ravel()], 1) * stride
        priors.append(np.concatenate([c - 4 * stride, c + 4 * stride], 1))
        levels.append(h * w)
    priors = np.concatenate(priors).astype(np.float32)
    n_gt = 4
    xy = rng.uniform(0, 60, (n_gt, 2))
    gts = np.concatenate([xy, xy + rng.uniform(8, 40, (n_gt, 2))], 1).astype(np.float32)
    want = np_atss(priors, levels, gts, 9)
    got, _ = assign.atss_assign(
        jnp.asarray(priors),
        jnp.ones(len(priors), bool),
        levels,
        jnp.asarray(np.concatenate([gts, np.zeros((2, 4), np.float32)])),
        jnp.array([True] * n_gt + [False] * 2),
        topk=9,
    )
    assert (want > 0).sum() > 0
    np.testing.assert_array_equal(np.asarray(got), want)
