"""The official tfds `voc/2007` and `voc/2012` data sets, in jdistill's example format.

tfds' VOC stores normalised (ymin, xmin, ymax, xmax) boxes (already shifted by -1 pixel),
`is_difficult`, and no image size or numeric id: `convert` gives pixel (x1, y1, x2, y2) boxes,
height/width from the image header, and image_id = the position in the concatenation of parts
(`tfds_official.TfdsSource`). Inverted or empty boxes are dropped, as in `voc_folder`.
"""

import numpy as np

from jdistill.data.builders import tfds_official


def convert(ex, image_id):
    """An official VOC example -> jdistill's example dict (`features.py`)."""
    image = ex["image"]
    height, width = tfds_official.image_size(image)
    obj = ex["objects"]
    bbox = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)  # ymin, xmin, ymax, xmax in [0, 1]
    boxes = np.stack(
        [bbox[:, 1] * width, bbox[:, 0] * height, bbox[:, 3] * width, bbox[:, 2] * height], 1
    ).astype(np.float32)
    n = len(boxes)
    good = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    skipped = "\n".join(f"box {b.tolist()}: inverted or empty" for b in boxes[~good])
    boxes = boxes[good]
    return {
        "image": image,
        "image_id": image_id,
        "height": height,
        "width": width,
        "file_name": tfds_official.text(ex.get("image/filename", f"record {image_id}")),
        "image_note": "",
        "skipped_boxes": skipped,
        "objects": {
            "bbox": boxes,
            "label": np.asarray(obj["label"], np.int64).reshape(n)[good],
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "is_crowd": np.zeros(len(boxes), bool),
            "is_difficult": np.asarray(obj["is_difficult"], bool).reshape(n)[good],
        },
    }
