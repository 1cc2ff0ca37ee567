"""GFL losses against a numpy transcription of mmdetection 2.x `GFLHead.loss` (per level, per
GPU of 2 images, reduce_mean'd normalisers, gradients averaged over GPUs)."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.batches import crafted_batch
from test_atss import np_atss

from jdistill import config_lib
from jdistill.models import detector

K, R = 3, 16
LEVELS = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
STRIDES = (8, 16, 32, 64, 128)


def np_anchors():
    out = []
    for (h, w), s in zip(LEVELS, STRIDES, strict=True):
        ys, xs = np.mgrid[0:h, 0:w]
        c = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32) * s
        out.append(np.concatenate([c - 4 * s, c + 4 * s], 1))
    return out


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def bce(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def aligned_iou(a, b, giou=False):
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    wh = np.clip(rb - lt, 0, None)
    ov = wh[:, 0] * wh[:, 1]
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = np.maximum(area(a) + area(b) - ov, 1e-6)
    iou = ov / union
    if not giou:
        return iou
    ewh = np.clip(np.maximum(a[:, 2:], b[:, 2:]) - np.minimum(a[:, :2], b[:, :2]), 0, None)
    enc = np.maximum(ewh[:, 0] * ewh[:, 1], 1e-6)
    return iou - (enc - union) / enc


def gpu_loss(cls_imgs, reg_imgs, gts, labels, num_total_samples_mean, avg_factor_mean):
    """One GPU's (loss_cls, loss_bbox, loss_dfl), given the reduce_mean'd normalisers."""
    anchors = np_anchors()
    sizes = [len(a) for a in anchors]
    flat = np.concatenate(anchors)
    lc = lb = ld = 0.0
    for cls, reg, g, lab in zip(cls_imgs, reg_imgs, gts, labels, strict=True):
        assigned = np_atss(flat, sizes, g, 9)
        start = 0
        for lvl, n in enumerate(sizes):
            s = STRIDES[lvl]
            a = assigned[start : start + n]
            c, r, an = cls[start : start + n], reg[start : start + n], flat[start : start + n]
            start += n
            pos = np.nonzero(a > 0)[0]
            score = np.zeros(n)
            t = np.zeros((n, K))
            if len(pos):
                centers = (an[pos, :2] + an[pos, 2:]) / 2 / s
                logits = r[pos].reshape(-1, 4, R + 1)
                p = np.exp(logits - logits.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                dist = p @ np.arange(R + 1)
                pred = np.concatenate([centers - dist[:, :2], centers + dist[:, 2:]], 1)
                tgt = g[a[pos] - 1] / s
                score[pos] = aligned_iou(pred, tgt)
                w = sigmoid(c[pos]).max(1)
                lb += 2.0 * (w * (1 - aligned_iou(pred, tgt, giou=True))).sum()
                td = np.clip(
                    np.concatenate([centers - tgt[:, :2], tgt[:, 2:] - centers], 1), 0, R - 0.1
                ).reshape(-1)
                lo = np.floor(td).astype(int)
                logp = logits.reshape(-1, R + 1) - np.log(
                    np.exp(logits.reshape(-1, R + 1)).sum(-1, keepdims=True)
                )
                rows = np.arange(len(td))
                dfl = -logp[rows, lo] * (lo + 1 - td) - logp[rows, lo + 1] * (td - lo)
                ld += 0.25 * (np.repeat(w, 4) * dfl).sum() / 4.0
                t[pos, lab[a[pos] - 1]] = 1
            sg = sigmoid(c)
            q = np.where(t > 0, score[:, None], 0.0)
            qfl = np.where(t > 0, bce(c, q) * np.abs(q - sg) ** 2, bce(c, 0) * sg**2)
            lc += qfl.sum() / num_total_samples_mean
    return lc, lb / avg_factor_mean, ld / avg_factor_mean


@pytest.mark.slow
def test_gfl_loss_matches_mmdetection_transcription():
    cfg = config_lib.gfl(18)
    cfg.width, cfg.neck_channels, cfg.stacked_convs = 0.125, 32, 1
    det = detector.build(cfg, K)
    rng = np.random.default_rng(0)
    b = 4
    cls = [rng.normal(-2, 1, size=(b, h, w, K)).astype(np.float32) for h, w in LEVELS]
    reg = [rng.normal(size=(b, h, w, 4 * (R + 1))).astype(np.float32) for h, w in LEVELS]
    per_image = [
        [[4, 6, 40, 30], [50, 10, 90, 60]],
        [[10, 10, 26, 30]],
        [],
        [[0, 0, 96, 64], [30, 20, 70, 50]],
    ]
    batch, boxes, labels, valid = crafted_batch(per_image, K)
    outputs = {
        "cls_logits": [jnp.asarray(x) for x in cls],
        "bbox_dist": [jnp.asarray(x) for x in reg],
    }
    _, got = det.loss(outputs, batch)

    flat = lambda xs, i, ch: np.concatenate([x[i].reshape(-1, ch) for x in xs])  # noqa: E731
    cls_i = [flat(cls, i, K) for i in range(b)]
    reg_i = [flat(reg, i, 4 * (R + 1)) for i in range(b)]
    gts = [boxes[i][valid[i]] for i in range(b)]
    labs = [labels[i][valid[i]] for i in range(b)]
    # the normalisers, reduce_mean'd over the two GPUs of 2 images
    anchors = np.concatenate(np_anchors())
    sizes = [len(a) for a in np_anchors()]
    npos, wsum = [], []
    for gpu in range(2):
        n = w = 0.0
        for i in (2 * gpu, 2 * gpu + 1):
            a = np_atss(anchors, sizes, gts[i], 9)
            n += max((a > 0).sum(), 1)
            w += sigmoid(cls_i[i][a > 0]).max(1).sum() if (a > 0).any() else 0.0
        npos.append(n)
        wsum.append(w)
    nts = max(np.mean(npos), 1.0)
    avg = max(np.mean(wsum), 1.0)
    want = np.zeros(3)
    for gpu in range(2):
        sl = slice(2 * gpu, 2 * gpu + 2)
        want += np.array(gpu_loss(cls_i[sl], reg_i[sl], gts[sl], labs[sl], nts, avg)) / 2
    np.testing.assert_allclose(got["loss_cls"], want[0], rtol=1e-4)
    np.testing.assert_allclose(got["loss_bbox"], want[1], rtol=1e-4)
    np.testing.assert_allclose(got["loss_dfl"], want[2], rtol=1e-4)
