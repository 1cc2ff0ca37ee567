"""FCOS losses against a numpy transcription of mmdetection 2.x `FCOSHead.loss` (per GPU of 2
images, num_pos and the centerness sum reduce_mean'd, gradients averaged over GPUs)."""

import jax.numpy as jnp
import numpy as np
from helpers.batches import crafted_batch
from test_gfl_reference import LEVELS, STRIDES, aligned_iou, bce, sigmoid

from jdistill import config_lib
from jdistill.models import detector

K = 3
RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8))


def np_targets(gts, labels):
    pts, rng = [], []
    for (h, w), s, r in zip(LEVELS, STRIDES, RANGES, strict=True):
        ys, xs = np.mgrid[0:h, 0:w]
        pts.append(
            np.stack([xs.ravel() * s + s // 2, ys.ravel() * s + s // 2], 1).astype(np.float32)
        )
        rng.append(np.tile(r, (h * w, 1)))
    pts, rng = np.concatenate(pts), np.concatenate(rng)
    n = len(pts)
    lab = np.full(n, K)
    tgt = np.zeros((n, 4), np.float32)
    if len(gts) == 0:
        return pts, lab, tgt
    area = (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    for p in range(n):
        x, y = pts[p]
        best, best_area = -1, np.inf
        for j, g in enumerate(gts):
            ltrb = np.array([x - g[0], y - g[1], g[2] - x, g[3] - y])
            if ltrb.min() > 0 and rng[p, 0] <= ltrb.max() <= rng[p, 1] and area[j] < best_area:
                best, best_area = j, area[j]
        if best >= 0:
            g = gts[best]
            lab[p] = labels[best]
            tgt[p] = [x - g[0], y - g[1], g[2] - x, g[3] - y]
    return pts, lab, tgt


def test_fcos_loss_matches_mmdetection_transcription():
    cfg = config_lib.fcos(18)
    cfg.width, cfg.neck_channels, cfg.stacked_convs = 0.125, 32, 1
    det = detector.build(cfg, K)
    rng = np.random.default_rng(0)
    b = 4
    cls = [rng.normal(-2, 1, size=(b, h, w, K)).astype(np.float32) for h, w in LEVELS]
    reg = [np.exp(rng.normal(2, 0.5, size=(b, h, w, 4))).astype(np.float32) for h, w in LEVELS]
    ctr = [rng.normal(size=(b, h, w, 1)).astype(np.float32) for h, w in LEVELS]
    per_image = [
        [[4, 6, 40, 30], [50, 10, 90, 60]],
        [[10, 10, 26, 30]],
        [],
        [[0, 0, 96, 64], [30, 20, 70, 50]],
    ]
    batch, boxes, labels, valid = crafted_batch(per_image, K)
    outputs = {
        "cls_logits": [jnp.asarray(x) for x in cls],
        "bbox_pred": [jnp.asarray(x) for x in reg],
        "centerness": [jnp.asarray(x) for x in ctr],
    }
    _, got = det.loss(outputs, batch)

    flat = lambda xs, i, ch: np.concatenate([x[i].reshape(-1, ch) for x in xs])  # noqa: E731
    per_gpu = []
    for gpu in range(2):
        imgs = range(2 * gpu, 2 * gpu + 2)
        t = [np_targets(boxes[i][valid[i]], labels[i][valid[i]]) for i in imgs]
        c = np.concatenate([flat(cls, i, K) for i in imgs])
        r = np.concatenate([flat(reg, i, 4) for i in imgs])
        z = np.concatenate([flat(ctr, i, 1)[:, 0] for i in imgs])
        pts = np.concatenate([x[0] for x in t])
        lab = np.concatenate([x[1] for x in t])
        tgt = np.concatenate([x[2] for x in t])
        onehot = np.zeros_like(c)
        pos = np.nonzero(lab < K)[0]
        onehot[pos, lab[pos]] = 1
        p = sigmoid(c)
        pt = (1 - p) * onehot + p * (1 - onehot)
        focal = (bce(c, onehot) * (0.25 * onehot + 0.75 * (1 - onehot)) * pt**2).sum()
        lr, tb = tgt[pos][:, [0, 2]], tgt[pos][:, [1, 3]]
        ctr_t = np.sqrt(lr.min(1) / lr.max(1) * tb.min(1) / tb.max(1))
        pp = pts[pos]
        pred_box = np.concatenate([pp - r[pos][:, :2], pp + r[pos][:, 2:]], 1)
        tgt_box = np.concatenate([pp - tgt[pos][:, :2], pp + tgt[pos][:, 2:]], 1)
        iou = -np.log(np.maximum(aligned_iou(pred_box, tgt_box), 1e-6))
        per_gpu.append(
            (len(pos), ctr_t.sum(), focal, (iou * ctr_t).sum(), bce(z[pos], ctr_t).sum())
        )
    num_pos = max(np.mean([g[0] for g in per_gpu]), 1.0)
    denorm = max(np.mean([g[1] for g in per_gpu]), 1e-6)
    want_cls = np.mean([g[2] / num_pos for g in per_gpu])
    want_box = np.mean([g[3] / denorm for g in per_gpu])
    want_ctr = np.mean([g[4] / num_pos for g in per_gpu])
    np.testing.assert_allclose(got["loss_cls"], want_cls, rtol=1e-4)
    np.testing.assert_allclose(got["loss_bbox"], want_box, rtol=1e-4)
    np.testing.assert_allclose(got["loss_centerness"], want_ctr, rtol=1e-4)
