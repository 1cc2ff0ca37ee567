"""Evaluation of a model on a split: the one code path behind training's evaluations and
`python -m jdistill.evaluate`.

The split runs through the evaluation pipeline (`pipeline.eval_dataset`: every image once, at
the test scale, grouped by canvas, padded batches masked by `image_valid`), the jitted predict
(`experiment.make_predict`) on the mesh, detections gathered from every process; process 0
scores them (COCO or VOC mAP) and writes the eval JSON, the detections JSON and a PNG.
"""

import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jdistill import experiment, multihost, paths
from jdistill.data import datasets, pipeline
from jdistill.evaluate import coco as coco_eval
from jdistill.evaluate import visualize
from jdistill.evaluate import voc as voc_eval

# Prediction sits beside the train step (experiment.py); evaluation's users take it from here.
make_predict = experiment.make_predict

__all__ = ["close_iterator", "evaluate", "make_predict", "subset"]


def evaluate(
    predict_fn,
    variables,
    split,
    config,
    mesh,
    workdir,
    tag,
    step,
    category_ids,
    *,
    eval_dir=None,
):
    """COCO (or VOC, `data.eval_metric='voc'`) mAP of `variables` on `split`.

    Writes <eval_dir>/<tag>step_<N>.json, .detections.json and .png; `eval_dir` defaults to
    `<workdir>/eval`. Returns the dict of metric names -> float (mmdetection's COCO names, or
    `mAP` and `AP50/<class>` for VOC).
    """
    t0 = time.time()
    results = []
    batches = iter(pipeline.eval_dataset(split, config.data, config.eval_batch_size))
    try:
        for local in batches:
            batch = datasets.device_batch(local, mesh)
            dets = multihost_utils.process_allgather(predict_fn(variables, batch), tiled=True)
            results += coco_eval.to_results(
                dets, dets["image_id"], dets["image_valid"], category_ids
            )
    finally:
        close_iterator(batches)  # an error mid-way leaves its reader threads running
    # Every process ran the same padded batches and holds every detection; process 0 alone
    # scores them and writes the files, and the metrics it found are the ones every process
    # returns (they may decide what runs next).
    metrics = {}
    if jax.process_index() == 0:
        if config.data.get("eval_metric", "coco") == "voc":
            metrics, summary = voc_eval.evaluate_split(
                split, results, config.data.get("voc_ap_mode", "11points")
            )
        else:
            metrics, summary = coco_eval.evaluate(
                coco_eval.ground_truth(split),
                results,
                backend=config.get("eval_backend", "pycocotools"),
            )
        eval_dir = eval_dir or f"{workdir}/eval"
        stem = f"{eval_dir}/{tag}step_{step}"
        paths.path(eval_dir).mkdir(parents=True, exist_ok=True)
        paths.write_json(f"{stem}.json", {"step": step, **metrics})
        # COCO results format (original-image xywh, category ids): pycocotools' loadRes reads it
        paths.write_json(f"{stem}.detections.json", results, indent=None)
        _draw(split, results, config.num_vis_images, f"{stem}.png")
        logging.info(
            "%seval at step %d (%d images, %.1fs): %s\n%s",
            tag,
            step,
            len(split),
            time.time() - t0,
            " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
            summary,
        )
    metrics = multihost.broadcast_json(metrics)
    return metrics


def _draw(split, results, n, path):
    """A grid PNG of the detections (COCO results) on the split's first `n` images."""
    n = min(n, len(split))
    if n <= 0:
        return
    images, dets = [], []
    for i in range(n):
        img_id = int(split.image_ids[i])
        mine = [r for r in results if r["image_id"] == img_id]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in mine)])
        label_of = {c: k for k, c in enumerate(split.category_ids)}
        images.append(np.asarray(split.source[i]["image"]))
        dets.append(
            {
                "boxes": boxes.reshape(-1, 4),
                "scores": np.array([r["score"] for r in mine]),
                "labels": np.array([label_of[r["category_id"]] for r in mine], np.int64),
                "valid": np.ones(len(mine), bool),
            }
        )
    visualize.draw_grid(images, dets, split.class_names, path)


def subset(split, n):
    """The first `n` examples of a split (all when n <= 0)."""
    return split.head(n)


def close_iterator(iterator):
    """Stops a grain iterator's reader threads (shuts its thread pool, cancels prefetches)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
