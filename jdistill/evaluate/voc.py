"""Pascal VOC box mAP at IoU 0.5, as mmdetection 2.x `eval_map` (`tpfp_default`).

Per class: detections of all images sorted by score; each is a true positive when its best
IoU with the image's gts of that class is >= 0.5 and that gt is not yet taken, a false positive
otherwise, and neither when the gt it matches is difficult (difficult gts never count in the
recall either). AP is VOC07's 11-point interpolation ('11points') or the area under the
precision envelope ('area', VOC2010+). mAP averages the classes that have gts. IoU uses
continuous coordinates (mmdetection >= 2.x `use_legacy_coordinate=False`).
"""

import numpy as np

MODES = ("11points", "area")


def _iou(a, b):
    """[N, 4] x [M, 4] -> [N, M] IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, np.finfo(np.float32).eps)


def tpfp(dets, gts, difficult, iou_thr=0.5):
    """True/false positives of one image and class.

    Args:
      dets: [N, 5] (x1, y1, x2, y2, score); gts: [M, 4]; difficult: [M] bool.
    Returns:
      tp, fp: [N] float arrays in the order of `dets`.
    """
    n = len(dets)
    tp, fp = np.zeros(n), np.zeros(n)
    if len(gts) == 0:
        fp[:] = 1
        return tp, fp
    ious = _iou(dets[:, :4], gts)
    best = ious.argmax(1)
    best_iou = ious.max(1)
    taken = np.zeros(len(gts), bool)
    for i in np.argsort(-dets[:, 4], kind="stable"):
        if best_iou[i] >= iou_thr:
            j = best[i]
            if difficult[j]:
                continue
            if not taken[j]:
                taken[j] = True
                tp[i] = 1
            else:
                fp[i] = 1
        else:
            fp[i] = 1
    return tp, fp


def average_precision(recalls, precisions, mode):
    """AP of one class from its recall/precision curve ('11points' or 'area')."""
    if mode == "11points":
        ap = 0.0
        for t in np.arange(0, 1.1, 0.1):
            above = precisions[recalls >= t]
            ap += above.max() if above.size else 0.0
        return ap / 11
    if mode == "area":
        mrec = np.concatenate([[0.0], recalls, [1.0]])
        mpre = np.concatenate([[0.0], precisions, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        idx = np.where(mrec[1:] != mrec[:-1])[0]
        return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
    raise ValueError(f"VOC AP mode {mode!r}: use one of {MODES}")


def evaluate(gt_objects, detections, class_names, mode="11points", iou_thr=0.5):
    """VOC mAP.

    Args:
      gt_objects: per image, dict bbox [M, 4], label [M], is_difficult [M] (missing: False).
      detections: per image (same order), dict boxes [D, 4], scores [D], labels [D].
      class_names: K names.
      mode: '11points' (VOC07 test, the DeFeat metric) or 'area'.
    Returns:
      {'mAP': float, 'AP50/<class>': float per class with gts, 'num_gts/<class>': int}.
    """
    if mode not in MODES:
        raise ValueError(f"VOC AP mode {mode!r}: use one of {MODES}")
    metrics, aps = {}, []
    for c, name in enumerate(class_names):
        tps, fps, scores, num_gts = [], [], [], 0
        for gt, det in zip(gt_objects, detections, strict=True):
            gsel = np.asarray(gt["label"]) == c
            gboxes = np.asarray(gt["bbox"], np.float64).reshape(-1, 4)[gsel]
            diff = np.asarray(gt.get("is_difficult", np.zeros(len(gsel), bool)), bool)[gsel]
            num_gts += int((~diff).sum())
            dsel = np.asarray(det["labels"]) == c
            d = np.concatenate(
                [
                    np.asarray(det["boxes"], np.float64).reshape(-1, 4)[dsel],
                    np.asarray(det["scores"], np.float64)[dsel][:, None],
                ],
                axis=1,
            )
            tp, fp = tpfp(d, gboxes, diff, iou_thr)
            tps.append(tp)
            fps.append(fp)
            scores.append(d[:, 4])
        metrics[f"num_gts/{name}"] = num_gts
        if num_gts == 0:
            continue
        order = np.argsort(-np.concatenate(scores), kind="stable")
        tp = np.cumsum(np.concatenate(tps)[order])
        fp = np.cumsum(np.concatenate(fps)[order])
        eps = np.finfo(np.float32).eps
        recalls = tp / max(num_gts, eps)
        precisions = tp / np.maximum(tp + fp, eps)
        ap = average_precision(recalls, precisions, mode)
        metrics[f"AP50/{name}"] = float(ap)
        aps.append(ap)
    metrics["mAP"] = float(np.mean(aps)) if aps else 0.0
    return metrics


def evaluate_split(split, results, mode="11points"):
    """VOC mAP of COCO-style results (xywh, category ids) on a `sources.Split`.

    Returns (metrics as `evaluate`, a printable per-class table).
    """
    label_of = {c: k for k, c in enumerate(split.category_ids)}
    per_image = {int(i): ([], [], []) for i in split.image_ids}
    for r in results:
        x, y, w, h = r["bbox"]
        boxes, scores, labels = per_image[int(r["image_id"])]
        boxes.append([x, y, x + w, y + h])
        scores.append(r["score"])
        labels.append(label_of[r["category_id"]])
    dets = [
        {
            "boxes": np.asarray(b, float).reshape(-1, 4),
            "scores": np.asarray(s),
            "labels": np.asarray(lab),
        }
        for b, s, lab in (per_image[int(i)] for i in split.image_ids)
    ]
    metrics = evaluate(split.objects, dets, split.class_names, mode)
    rows = [f"{'class':<16}{'gts':>6}{'AP50':>8}"]
    for name in split.class_names:
        ap = metrics.get(f"AP50/{name}")
        ap_text = f"{ap:8.4f}" if ap is not None else f"{'-':>8}"
        rows.append(f"{name:<16}{metrics[f'num_gts/{name}']:>6}{ap_text}")
    rows.append(f"{'mAP (' + mode + ')':<22}{metrics['mAP']:8.4f}")
    return metrics, "\n".join(rows)
