"""A PNG of detections on a few validation images, for a quick look at what a model sees."""

import io

import numpy as np
from PIL import Image, ImageDraw

from jdistill import paths

PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
]


def draw_grid(images, dets, class_names, path, score_thr=0.3, cell=256):
    """Draws detections over original images and saves one grid PNG.

    Args:
      images: list of [H, W, 3] uint8 original images.
      dets: list of numpy dicts boxes [D, 4] (original pixels), scores [D], labels [D], valid [D].
      class_names: label -> name.
      path: output .png path.
      score_thr: detections below it are not drawn.
      cell: each image is scaled to fit a cell x cell tile.
    """
    tiles = []
    for img, d in zip(images, dets, strict=True):
        im = Image.fromarray(img)
        draw = ImageDraw.Draw(im)
        for box, s, lab, ok in zip(d["boxes"], d["scores"], d["labels"], d["valid"], strict=True):
            if not ok or s < score_thr:
                continue
            c = PALETTE[int(lab) % len(PALETTE)]
            draw.rectangle([float(v) for v in box], outline=c, width=2)
            draw.text(
                (float(box[0]) + 2, float(box[1]) + 1), f"{class_names[int(lab)]} {s:.2f}", fill=c
            )
        im.thumbnail((cell, cell))
        tile = Image.new("RGB", (cell, cell))
        tile.paste(im, (0, 0))
        tiles.append(np.asarray(tile))
    grid = np.concatenate(tiles, axis=1) if tiles else np.zeros((cell, cell, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    paths.path(path).write_bytes(buf.getvalue())  # the workdir may be remote
