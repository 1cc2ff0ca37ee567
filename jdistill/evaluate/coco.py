"""COCO box mAP with pycocotools, reported under mmdetection's names.

For a COCO folder the ground truth is its raw annotation file, as mmdetection's `CocoDataset`
evaluates: every image of the split (those without annotations too) and every annotation, the
ones training skips included. Otherwise it is built from the evaluated split itself
(original-image boxes, `area` and `iscrowd`): the official COCO builder and the synthetic set.
Only the split's images are evaluated (`eval_max_images` takes the first N). Detections arrive
as fixed-size device outputs and are filtered by their `valid` masks here, on the host.
"""

import contextlib
import io
import json

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# mmdetection's `CocoDataset.evaluate` keys, in COCOeval.stats order.
METRIC_NAMES = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")


def ground_truth(split):
    """A pycocotools COCO object for a `pipeline.Split` (its raw annotation file if any)."""
    if getattr(split, "ann_file", None):
        return _raw_ground_truth(split.ann_file, split.image_ids)
    images, anns = [], []
    for i in range(len(split)):
        img_id = int(split.image_ids[i])
        images.append(
            {"id": img_id, "height": int(split.heights[i]), "width": int(split.widths[i])}
        )
        o = split.objects[i]
        for b, lab, area, crowd in zip(
            o["bbox"], o["label"], o["area"], o["is_crowd"], strict=True
        ):
            x1, y1, x2, y2 = (float(v) for v in b)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": split.category_ids[int(lab)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(area),
                    "iscrowd": int(bool(crowd)),
                }
            )
    cats = [
        {"id": c, "name": n} for c, n in zip(split.category_ids, split.class_names, strict=True)
    ]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _raw_ground_truth(ann_file, image_ids):
    """COCO(ann_file) as pycocotools loads it, restricted to `image_ids` when they are fewer
    (`eval_max_images`, or images preparation could not decode)."""
    with open(ann_file) as f:
        data = json.load(f)
    keep = {int(i) for i in image_ids}
    if len(keep) < len(data["images"]):
        data["images"] = [im for im in data["images"] if im["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def to_results(dets, image_ids, image_valid, category_ids):
    """Fixed-size detections of a batch -> COCO result dicts (xywh, original pixels).

    Args:
      dets: numpy dict boxes [B, D, 4], scores [B, D], labels [B, D], valid [B, D].
      image_ids: [B]; image_valid: [B] bool (padding examples are skipped).
      category_ids: label -> COCO category id.
    """
    out = []
    for b in range(len(image_ids)):
        if not image_valid[b]:
            continue
        for box, score, label, ok in zip(
            dets["boxes"][b], dets["scores"][b], dets["labels"][b], dets["valid"][b], strict=True
        ):
            if not ok:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            out.append(
                {
                    "image_id": int(image_ids[b]),
                    "category_id": int(category_ids[int(label)]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return out


def evaluate(gt, results, image_ids=None):
    """COCOeval bbox. -> (dict of METRIC_NAMES -> float, the printed summary).

    `image_ids` restricts the evaluation to those images (default: every image of `gt`).
    A metric is -1 where its area range has no ground truth (COCOeval's convention).
    """
    if not results:
        return {k: 0.0 for k in METRIC_NAMES}, "no detections"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # As mmdetection, -1 stays -1: COCOeval's mark for an area range with no ground truth.
    return {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats[:6], strict=True)}, buf.getvalue()
