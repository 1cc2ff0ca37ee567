"""Detections drawn over images: a grid PNG of a few validation images after each evaluation,
and one annotated image per file for `jdistill.predict`."""

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
        im = annotate(img, d, class_names, score_thr)
        im.thumbnail((cell, cell))
        tile = Image.new("RGB", (cell, cell))
        tile.paste(im, (0, 0))
        tiles.append(np.asarray(tile))
    grid = np.concatenate(tiles, axis=1) if tiles else np.zeros((cell, cell, 3), np.uint8)
    write_png(grid, path)


def annotate(image, dets, class_names, score_thr=0.3):
    """One image with its detections drawn: a box, the class name and the score each.

    Args:
      image: [H, W, 3] uint8.
      dets: numpy dict boxes [D, 4] (pixels of `image`), scores [D], labels [D], valid [D].
      class_names: label -> name.
      score_thr: detections below it are not drawn.
    Returns:
      a PIL RGB image of H x W.
    """
    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    for box, s, lab, ok in zip(
        dets["boxes"], dets["scores"], dets["labels"], dets["valid"], strict=True
    ):
        if not ok or s < score_thr:
            continue
        c = PALETTE[int(lab) % len(PALETTE)]
        draw.rectangle([float(v) for v in box], outline=c, width=2)
        draw.text(
            (float(box[0]) + 2, float(box[1]) + 1), f"{class_names[int(lab)]} {s:.2f}", fill=c
        )
    return im


def write_png(image, path):
    """Writes an [H, W, 3] uint8 array (or a PIL image) to `path` as PNG; `path` may be remote."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format="PNG")
    paths.path(path).write_bytes(buf.getvalue())  # the workdir may be remote
