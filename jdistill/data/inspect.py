"""The data report: the first thing to run on your own data.

  python -m jdistill.data.inspect --config=configs/X.py [--config.data.root=...] \
      [--out=report.png] [--num_images=8]

Prepares the configured training and evaluation splits (exactly as training will: images are
decoded once, here) and prints, per split: images, images without a usable box, boxes per class
(crowd and difficult apart), boxes skipped at preparation and why (the first files named),
images decoded tolerantly, the range of image sizes, and the canvases the images land on. It
writes a PNG grid of a few training images with their boxes drawn.
"""

import collections

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jdistill import cli_flags, config_lib, exits, logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", "data_report.png", "The PNG grid of images with their boxes.")
_NUM = flags.DEFINE_integer("num_images", 8, "Images in the PNG grid (0: no grid).")
flags.mark_flags_as_required(["config"])

FIRST = 3  # files named per kind of problem


def split_report(split, data_cfg):
    """Statistics of one `sources.Split`. -> dict (see `format_report` for the fields)."""
    from jdistill.data import pipeline  # noqa: PLC0415 (after flags: heavy imports)

    per_class = collections.Counter()
    crowd = difficult = no_box = 0
    for o in split.objects:
        crowd_m = o["is_crowd"].astype(bool)
        diff_m = o["is_difficult"].astype(bool)
        usable = ~(crowd_m | diff_m)
        per_class.update(split.class_names[int(k)] for k in o["label"][usable])
        crowd += int(crowd_m.sum())
        difficult += int((diff_m & ~crowd_m).sum())
        no_box += not usable.any()
    skipped = [line for s in split.skipped for line in s.splitlines() if line]
    reasons = collections.Counter(line.rsplit(": ", 1)[-1] for line in skipped)
    notes = [n for n in split.notes if n]
    canvases = collections.Counter(
        pipeline.canvas_of(int(h), int(w), data_cfg)
        for h, w in zip(split.heights, split.widths, strict=True)
    )
    return {
        "name": split.name,
        "images": len(split),
        "no_box": no_box,
        "boxes": dict(sorted(per_class.items())),
        "crowd": crowd,
        "difficult": difficult,
        "skipped": len(skipped),
        "skip_reasons": dict(reasons),
        "skipped_first": skipped[:FIRST],
        "tolerant": len(notes),
        "tolerant_first": notes[:FIRST],
        "height": (int(split.heights.min()), int(split.heights.max())) if len(split) else None,
        "width": (int(split.widths.min()), int(split.widths.max())) if len(split) else None,
        "canvases": {f"{c[0]}x{c[1]}": n for c, n in sorted(canvases.items())},
    }


def format_report(r):
    """The printed form of `split_report`'s dict."""
    lines = [
        f"split {r['name']!r}: {r['images']} images, {r['no_box']} without a usable box "
        "(evaluated, not trained on)",
        f"  boxes per class: {r['boxes'] or 'none'}"
        + (f"; crowd {r['crowd']}" if r["crowd"] else "")
        + (f"; difficult {r['difficult']}" if r["difficult"] else ""),
        f"  boxes skipped at preparation: {r['skipped']} {r['skip_reasons'] or ''}".rstrip(),
    ]
    lines += [f"    {s}" for s in r["skipped_first"]]
    lines.append(f"  images decoded tolerantly (damaged files): {r['tolerant']}")
    lines += [f"    {s}" for s in r["tolerant_first"]]
    if r["height"]:
        lines.append(
            f"  image sizes: height {r['height'][0]}-{r['height'][1]}, "
            f"width {r['width'][0]}-{r['width'][1]}"
        )
    lines.append(f"  canvases (at the test scale): {r['canvases']}")
    return "\n".join(lines)


def draw(split, n, path):
    """A PNG grid of the first `n` images of `split` with their ground-truth boxes."""
    from jdistill.evaluate import visualize  # noqa: PLC0415

    n = min(n, len(split))
    images, dets = [], []
    for i in range(n):
        o = split.objects[i]
        images.append(np.asarray(split.source[i]["image"]))
        dets.append(
            {
                "boxes": o["bbox"].reshape(-1, 4),
                "scores": np.ones(len(o["label"])),
                "labels": o["label"],
                "valid": np.ones(len(o["label"]), bool),
            }
        )
    visualize.draw_grid(images, dets, split.class_names, path)


def main(argv):
    """Runs the report and ends the process: 0, or one line `error: <cause>` and 1."""
    del argv  # `cli_flags.parse_flags` refused any positional argument
    exits.run(_report)


def _report():
    logs.setup()  # tfds's progress bars and INFO lines only with --log_all
    from jdistill.data import sources  # noqa: PLC0415

    # The cheap checks first: a bad --out or --num_images is refused before any preparation.
    if _NUM.value < 0:
        raise config_lib.ConfigError(f"--num_images={_NUM.value}: must be 0 or more")
    if _NUM.value:
        config_lib.check_output(_OUT.value, overwrite=True)
    data_cfg = _CONFIG.value.data
    config_lib.check_data(data_cfg)
    train = sources.load_split(data_cfg, data_cfg.train_split)
    splits = [train, sources.load_split(data_cfg, data_cfg.eval_split)]
    print(f"data set: builder {data_cfg.builder!r}, {len(train.class_names)} classes")
    for s in splits:
        print(format_report(split_report(s, data_cfg)))
    if not _NUM.value:
        print("no image grid written (--num_images=0)")
        return
    draw(train, _NUM.value, _OUT.value)
    print(f"wrote {_OUT.value}: {min(_NUM.value, len(train))} training images with their boxes")


if __name__ == "__main__":
    app.run(main, flags_parser=cli_flags.parse_flags)
