"""Pictures: detections drawn over images (a grid PNG of a few validation images after each
evaluation, one annotated image per file for `jdistill.predict`), and a distiller's maps over
images, per level (`distill_maps.py`)."""

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


def heat_colour(v):
    """[...] values in [0, 1] -> [..., 3] uint8 of a black-red-yellow-white ramp ('hot')."""
    v = np.clip(np.asarray(v, np.float32), 0.0, 1.0)
    rgb = np.stack([3 * v, 3 * v - 1, 3 * v - 2], axis=-1)
    return (255 * np.clip(rgb, 0.0, 1.0)).astype(np.uint8)


def overlay(image, heat, stride, alpha=0.6):
    """One image with a level's map over it.

    Args:
      image: [h, w, 3] uint8, the resized image without its canvas padding.
      heat: [H, W] float map on the level's grid, covering the canvas from its top-left corner
        at `stride` pixels per cell; scaled to its maximum over the image's cells.
      stride: the level's stride.
      alpha: the map's weight where it is 1 (the image shows through, dimmed, where it is 0).
    Returns:
      [h, w, 3] uint8.
    """
    h, w = image.shape[:2]
    # The cells that cover the image (ceil), as the distillers' pixel masks count them.
    rows, cols = -(-h // stride), -(-w // stride)
    cells = np.asarray(heat, np.float32)[:rows, :cols]
    peak = peak_over_image(heat, (h, w), stride)
    cells = cells / peak if peak > 0 else np.zeros_like(cells)
    big = np.repeat(np.repeat(cells, stride, axis=0), stride, axis=1)[:h, :w]
    a = alpha * big[..., None]
    base = 0.5 * image.astype(np.float32)  # dimmed, so the map reads at a glance
    out = (1 - a) * base + a * heat_colour(big).astype(np.float32)
    return out.astype(np.uint8)


def bars(values, width, height):
    """A [height, width, 3] uint8 tile of a per-channel vector as bars, scaled to its maximum."""
    tile = Image.new("RGB", (width, height), (32, 32, 32))
    d = ImageDraw.Draw(tile)
    v = np.asarray(values, np.float32).reshape(-1)
    peak = np.abs(v).max(initial=0.0) or 1.0
    step = width / max(len(v), 1)
    for i, x in enumerate(v):
        top = height - 14 - (height - 28) * abs(float(x)) / peak
        d.rectangle([i * step, top, max((i + 1) * step - 1, i * step), height - 14], fill="orange")
    d.text((2, height - 12), f"{len(v)} channels", fill="white")
    return np.asarray(tile)


def peak_over_image(heat, image_hw, stride):
    """The largest value of a level's map over the cells that cover the image (what `overlay`
    scales to). heat: [H, W]; image_hw: (h, w) pixels."""
    rows, cols = -(-image_hw[0] // stride), -(-image_hw[1] // stride)
    return float(np.asarray(heat, np.float32)[:rows, :cols].max(initial=0.0))


def draw_maps(images, maps, strides, path, title="", cell=192):
    """One PNG of a distiller's maps: a row per (map, image), a column per level.

    Each map is scaled to its maximum over the image, per level (`overlay`); the tile's label
    gives that maximum, so levels compare by their labels.

    Args:
      images: list of N [h, w, 3] uint8 resized images (their canvas padding cut off).
      maps: {name: {level: [N, H, W] map on the level's grid, or [N, C] per-channel vector}}.
      strides: {level: stride}.
      path: the .png written.
      title: a line above the grid.
      cell: the tiles' width in pixels; their height follows the tallest image's aspect.
    """
    levels = []
    for per_level in maps.values():
        levels += [lvl for lvl in per_level if lvl not in levels]
    aspect = max((im.shape[0] / max(im.shape[1], 1) for im in images), default=1.0)
    size = (cell, max(16, int(np.ceil(cell * aspect))))
    rows = []
    for name, per_level in maps.items():
        for i, image in enumerate(images):
            tiles = []
            for lvl in levels:
                a = per_level.get(lvl)
                if a is None:
                    tile, text = np.zeros((size[1], size[0], 3), np.uint8), lvl
                elif np.ndim(a) == 2:
                    peak = float(np.abs(np.asarray(a[i], np.float32)).max(initial=0.0))
                    tile, text = bars(a[i], *size), f"{lvl} max {peak:.2g}"
                else:
                    peak = peak_over_image(a[i], image.shape[:2], strides[lvl])
                    tile = _fit(overlay(image, a[i], strides[lvl]), size)
                    text = f"{lvl} max {peak:.2g}"
                tiles.append(_label(tile, f"{name} {text}" if i == 0 else text))
            rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0) if rows else np.zeros((size[1], size[0], 3), np.uint8)
    head = Image.new("RGB", (grid.shape[1], 16), "white")
    ImageDraw.Draw(head).text((4, 2), title, fill="black")
    write_png(np.concatenate([np.asarray(head), grid], axis=0), path)


def _fit(image, size):
    """[h, w, 3] -> [size[1], size[0], 3]: scaled to fit, on black."""
    im = Image.fromarray(image)
    im.thumbnail(size)
    tile = Image.new("RGB", size)
    tile.paste(im, (0, 0))
    return np.asarray(tile)


def _label(tile, text):
    im = Image.fromarray(tile)
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, 6 * len(text) + 4, 12], fill="black")
    d.text((2, 0), text, fill="white")
    return np.asarray(im)
