"""RetinaNet targets and losses against a loop-by-loop numpy transcription of mmdetection's
`AnchorHead.loss` (anchor generator, MaxIoUAssigner with its per-gt low-quality loop, focal
loss, L1, avg_factor = sum of max(num_pos, 1) per GPU of 2 images)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.batches import crafted_batch

from jdistill import config_lib
from jdistill.models import detector as detector_lib
from jdistill.ops import assign as assign_ops


def np_anchors(canvas, strides, octave=4, per_octave=3, ratios=(0.5, 1.0, 2.0)):
    out = []
    for s in strides:
        h, w = canvas[0], canvas[1]
        for _ in range(int(math.log2(s))):
            h, w = -(-h // 2), -(-w // 2)
        base = []
        for r in ratios:
            for k in range(per_octave):
                scale = octave * 2 ** (k / per_octave)
                bw, bh = s * scale / math.sqrt(r), s * scale * math.sqrt(r)
                base.append([-bw / 2, -bh / 2, bw / 2, bh / 2])
        for y in range(h):
            for x in range(w):
                for b in base:
                    out.append([b[0] + x * s, b[1] + y * s, b[2] + x * s, b[3] + y * s])
    return np.asarray(out, np.float32)


def np_iou(a, b):
    # float32, in bbox_overlaps' order of operations: ties between anchors (which decide the
    # low-quality matches) are float32 ties on the GPU too.
    a, b = a.astype(np.float32), b.astype(np.float32)
    out = np.zeros((len(a), len(b)), np.float32)
    for j, g in enumerate(b):
        iw = np.clip(np.minimum(a[:, 2], g[2]) - np.maximum(a[:, 0], g[0]), 0, None)
        ih = np.clip(np.minimum(a[:, 3], g[3]) - np.maximum(a[:, 1], g[1]), 0, None)
        inter = iw * ih
        union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
        out[:, j] = inter / np.maximum(union, np.float32(1e-6))
    return out


def np_assign(anchors, gts):
    assigned = -np.ones(len(anchors), int)
    if len(gts) == 0:
        return np.zeros(len(anchors), int)
    ov = np_iou(anchors, gts)
    max_ov, argmax = ov.max(1), ov.argmax(1)
    assigned[(max_ov >= 0) & (max_ov < 0.4)] = 0
    assigned[max_ov >= 0.5] = argmax[max_ov >= 0.5] + 1
    gt_max = ov.max(0)
    for i in range(len(gts)):
        if gt_max[i] >= 0.0:
            # mmdetection: `== gt_max`; ties within assign.TIE_TOL (see max_iou_assign)
            assigned[ov[:, i] >= gt_max[i] * (1 - assign_ops.TIE_TOL)] = i + 1
    return assigned


def np_loss(cls, reg, anchors, gts, labels, k):
    """One GPU: lists of per-image arrays. Returns (loss_cls, loss_bbox)."""
    tot_cls = tot_box = 0.0
    avg = 0.0
    for c, r, g, lab in zip(cls, reg, gts, labels, strict=True):
        a = np_assign(anchors, g)
        pos = a > 0
        avg += max(pos.sum(), 1)
        t = np.zeros((len(anchors), k))
        t[pos, lab[a[pos] - 1]] = 1
        p = 1 / (1 + np.exp(-c))
        pt = (1 - p) * t + p * (1 - t)
        fw = (0.25 * t + 0.75 * (1 - t)) * pt**2
        bce = np.maximum(c, 0) - c * t + np.log1p(np.exp(-np.abs(c)))
        tot_cls += (bce * fw * (a >= 0)[:, None]).sum()
        m = g[a[pos] - 1]
        an = anchors[pos]
        pw, ph = an[:, 2] - an[:, 0], an[:, 3] - an[:, 1]
        px, py = an[:, 0] + pw / 2, an[:, 1] + ph / 2
        gw, gh = m[:, 2] - m[:, 0], m[:, 3] - m[:, 1]
        gx, gy = m[:, 0] + gw / 2, m[:, 1] + gh / 2
        tgt = np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], 1)
        tot_box += np.abs(r[pos] - tgt).sum()
    return tot_cls / avg, tot_box / avg


@pytest.fixture(scope="module")
def retina():
    cfg = config_lib.retinanet(18)
    cfg.width, cfg.neck_channels, cfg.stacked_convs = 0.125, 16, 1
    return detector_lib.build(cfg, 3)


def test_loss_matches_mmdetection_transcription(retina):
    canvas = (64, 96)
    levels = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    rng = np.random.default_rng(0)
    b, k, a = 4, 3, 9
    outputs = {
        "cls_logits": [
            jnp.asarray(rng.normal(size=(b, h, w, a * k)), jnp.float32) for h, w in levels
        ],
        "box_deltas": [
            jnp.asarray(rng.normal(size=(b, h, w, a * 4)), jnp.float32) for h, w in levels
        ],
    }
    per_image = [
        [[4, 6, 40, 30], [50, 10, 90, 60]],
        [[10, 10, 20, 22]],  # small: only low-quality matches
        [],  # no ground truth at all
        [[0, 0, 96, 64], [30, 20, 70, 50], [31, 21, 69, 49]],
    ]
    batch, boxes, labels, valid = crafted_batch(per_image, k)
    _, m = retina.loss(outputs, batch)
    anchors = np_anchors(canvas, (8, 16, 32, 64, 128))
    flat_c = [
        np.concatenate([np.asarray(x[i]).reshape(-1, k) for x in outputs["cls_logits"]])
        for i in range(b)
    ]
    flat_r = [
        np.concatenate([np.asarray(x[i]).reshape(-1, 4) for x in outputs["box_deltas"]])
        for i in range(b)
    ]
    want_cls = want_box = 0.0
    for gpu in range(2):  # 2 images per GPU, gradients averaged over GPUs
        sl = slice(2 * gpu, 2 * gpu + 2)
        c, r = np_loss(
            flat_c[sl],
            flat_r[sl],
            anchors,
            [boxes[i][valid[i]] for i in range(b)][sl],
            [labels[i][valid[i]] for i in range(b)][sl],
            k,
        )
        want_cls += c / 2
        want_box += r / 2
    np.testing.assert_allclose(m["loss_cls"], want_cls, rtol=2e-5)
    np.testing.assert_allclose(m["loss_bbox"], want_box, rtol=2e-5)


@pytest.mark.slow
def test_padding_examples_contribute_nothing(retina):
    levels = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    rng = np.random.default_rng(1)
    outputs = {
        "cls_logits": [jnp.asarray(rng.normal(size=(2, h, w, 27)), jnp.float32) for h, w in levels],
        "box_deltas": [jnp.asarray(rng.normal(size=(2, h, w, 36)), jnp.float32) for h, w in levels],
    }
    batch = {
        "boxes": jnp.array([[[4.0, 6, 40, 30]], [[4.0, 6, 40, 30]]]),
        "labels": jnp.zeros((2, 1), jnp.int32),
        "box_valid": jnp.ones((2, 1), bool),
        "pad_shape": jnp.tile(jnp.array([64, 96]), (2, 1)),
        "image_valid": jnp.array([True, False]),
    }
    total, _ = retina.loss(outputs, batch)
    grads = jax.grad(lambda o: retina.loss(o, batch)[0])(outputs)
    assert all(float(jnp.abs(g[1]).sum()) == 0.0 for g in grads["cls_logits"])
    assert np.isfinite(float(total))


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_close_outputs(retina):
    cfg = retina.cfg.copy_and_resolve_references()
    cfg.dtype = "bfloat16"
    half = detector_lib.build(cfg, 3)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 64, 96, 3)), jnp.float32)
    v = retina.module.init(jax.random.PRNGKey(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(v["params"]))
    full_out, _ = retina.module.apply(v, x)
    half_out, taps = half.module.apply(v, x.astype(jnp.bfloat16))
    assert taps["neck/p3"].dtype == jnp.bfloat16
    for a, b in zip(full_out["cls_logits"], half_out["cls_logits"], strict=True):
        assert b.dtype == jnp.float32  # head outputs are cast back for the losses
        np.testing.assert_allclose(a, b, atol=0.05)
