"""The official tfds `coco/2017` data set, in jdistill's example format.

tfds' COCO keeps every image, with or without annotations, and every annotation of the JSON
(crowd ones with `is_crowd`), with normalised (ymin, xmin, ymax, xmax) boxes, integer `area`,
and labels 0..79 in the order of COCO's sorted category ids (tfds names them, but keeps no ids).
`convert` gives pixel (x1, y1, x2, y2) boxes, the size from the image header, the COCO image id
(`image/id`), and drops the annotations mmdetection's `CocoDataset` would (`coco_folder`'s
rules), so training sees what mmdetection trains on. Evaluation uses the same boxes: the raw
JSON is not available through tfds, so `area` is tfds' rounded one.
"""

import numpy as np

from jdistill.data.builders import coco_folder, tfds_official

# COCO 2017's 80 category ids, sorted: label k of tfds' coco/2017 is category COCO_IDS[k].
COCO_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip


def convert(ex, index):
    """An official COCO example -> jdistill's example dict (`features.py`)."""
    del index  # COCO examples carry their own image id
    image = ex["image"]
    height, width = tfds_official.image_size(image)
    obj = ex["objects"]
    bbox = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)  # ymin, xmin, ymax, xmax in [0, 1]
    n = len(bbox)
    x1, y1 = bbox[:, 1] * width, bbox[:, 0] * height
    w, h = bbox[:, 3] * width - x1, bbox[:, 2] * height - y1
    area = np.asarray(obj["area"], np.float32).reshape(n)
    xywh = np.stack([x1, y1, w, h], 1)
    reasons = [
        coco_folder.skip_reason(*map(float, b), float(a), height, width)
        for b, a in zip(xywh, area, strict=True)
    ]
    keep = np.asarray([not r for r in reasons], bool).reshape(n)
    skipped = "\n".join(
        f"bbox {b.round(2).tolist()}: {r}" for b, r in zip(xywh, reasons, strict=True) if r
    )
    boxes = np.stack([x1, y1, x1 + w, y1 + h], 1).astype(np.float32)[keep]
    return {
        "image": image,
        "image_id": int(ex["image/id"]),
        "height": height,
        "width": width,
        "file_name": tfds_official.text(ex.get("image/filename", f"image {ex['image/id']}")),
        "image_note": "",
        "skipped_boxes": skipped,
        "objects": {
            "bbox": boxes,
            "label": np.asarray(obj["label"], np.int64).reshape(n)[keep],
            "area": area[keep],
            "is_crowd": np.asarray(obj["is_crowd"], bool).reshape(n)[keep],
        },
    }
