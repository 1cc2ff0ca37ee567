"""The input pipeline: sources (`data/sources.py`) sampled, transformed and batched by grain,
with static shapes.

- `TrainSampler` is mmdetection's GroupSampler made deterministic: per epoch, images are
  grouped by canvas (landscape / portrait), shuffled, cut into global batches (a group's tail is
  filled with random repeats, as mmdetection does), and the batches shuffled. Batch `step` is a
  pure function of (seed, step), so the iterator state is one integer and a resumed run reads the
  same next batch.
- Each host loads only its slice of every global batch (per-host sharding).
- `train_dataset` / `eval_batches` wrap it in grain (`MapDataset` -> threads + prefetch); the
  grain iterator's state goes into the checkpoint.
"""

import contextlib
import functools

import grain
import jax
import numpy as np
from absl import logging

from jdistill.data import sources, transforms


def canvas_of(h, w, data_cfg):
    """The canvas an h x w original image goes to at the largest configured scale."""
    scale = test_scale(data_cfg)
    nh, nw, _ = transforms.rescale_size(h, w, scale)
    canvases = [tuple(c) for c in data_cfg.canvases]
    try:
        return transforms.choose_canvas(nh, nw, canvases)
    except ValueError:  # the config's two keys disagree: name them, not the helper's arguments
        raise ValueError(
            f"data.canvases={canvases}: none holds a {h}x{w} (H x W) image, resized to "
            f"{nh}x{nw} at the largest of data.scales, {scale}; add a canvas of at least "
            f"{nh}x{nw} or lower data.scales"
        ) from None


def test_scale(data_cfg):
    """The evaluation scale: the largest configured one (mmdetection's test img_scale)."""
    return tuple(max(data_cfg.scales, key=min))


def sample_scale(data_cfg, rng):
    """mmdetection `Resize` multi-scale sampling of one training scale (long_max, short_max).

    'value': one of the configured scales, uniformly. 'range': long edge uniform in
    [min long, max long] and short edge uniform in [min short, max short], integers inclusive.
    """
    scales = [tuple(sorted(s, reverse=True)) for s in data_cfg.scales]
    mode = data_cfg.get("multiscale_mode", "value")
    if len(scales) == 1:
        return scales[0]
    if mode == "value":
        return scales[rng.integers(len(scales))]
    if mode == "range":
        longs = [s[0] for s in scales]
        shorts = [s[1] for s in scales]
        return (
            int(rng.integers(min(longs), max(longs) + 1)),
            int(rng.integers(min(shorts), max(shorts) + 1)),
        )
    raise ValueError(f"data.multiscale_mode={mode!r}: use 'value' or 'range'")


def batch_canvas(sizes, data_cfg):
    """The smallest configured canvas holding every (h, w) of a batch of resized images."""
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    return transforms.choose_canvas(h, w, [tuple(c) for c in data_cfg.canvases])


def process_example(ex, *, data_cfg, train, rng, scale=None, canvas=None):
    """Decoded tfds example -> one padded, fixed-shape example (numpy).

    `scale` (long_max, short_max) defaults to the test scale; `canvas` to the one the image
    needs at the largest scale.

    Returns a dict: image [H, W, 3] uint8 canvas; boxes [G, 4] float32 canvas pixels; labels [G]
    int32; box_valid [G] bool; img_shape, pad_shape, orig_shape [2] int32; scale_factor [2]
    float32 (x, y); image_id int32; image_valid bool; dropped_boxes int32.
    """
    image = np.asarray(ex["image"])
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {ex['image_id']}: expected [H, W, 3], got {image.shape}")
    obj = ex["objects"]
    keep = ~np.asarray(obj["is_crowd"], bool)  # crowd boxes are never trained on
    if "is_difficult" in obj:  # nor VOC's difficult ones (the reference drops them)
        keep &= ~np.asarray(obj["is_difficult"], bool)
    boxes = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)[keep]
    labels = np.asarray(obj["label"], np.int64)[keep]
    scale = scale or test_scale(data_cfg)
    canvas = canvas or canvas_of(image.shape[0], image.shape[1], data_cfg)
    orig = image.shape[:2]
    image, boxes, sf = transforms.resize(image, boxes, scale)
    if train and rng.uniform() < data_cfg.flip_ratio:
        image, boxes = transforms.hflip(image, boxes)
    h, w = image.shape[:2]
    boxes, labels, valid, dropped = transforms.pad_boxes(boxes, labels, data_cfg.max_boxes)
    return {
        "image": transforms.pad_to_canvas(image, canvas),
        "boxes": boxes,
        "labels": labels,
        "box_valid": valid,
        "img_shape": np.array([h, w], np.int32),
        "pad_shape": np.minimum(transforms.pad_shape(h, w), canvas).astype(np.int32),
        "orig_shape": np.array(orig, np.int32),
        "scale_factor": sf,
        "image_id": np.int32(ex["image_id"]),  # COCO ids fit; jax runs without x64
        "image_valid": np.bool_(True),
        "dropped_boxes": np.int32(dropped),
    }


def stack(examples):
    """Stacks a list of example dicts into a batch dict of [B, ...] arrays."""
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class TrainSampler:
    """Deterministic group-by-canvas batch sampler (mmdetection GroupSampler semantics).

    Args:
      split: the training `sources.Split`.
      data_cfg: the `data` config block (canvases, scales).
      global_batch: images per step over all hosts.
      seed: sampling seed.
    """

    def __init__(self, split, data_cfg, global_batch, seed):
        self.global_batch = global_batch
        self.seed = seed
        groups = {}
        no_box = small = 0
        for i in range(len(split)):
            h, w = int(split.heights[i]), int(split.widths[i])
            o = split.objects[i]
            # crowd and difficult boxes are never trained on (process_example)
            usable = int((~(o["is_crowd"].astype(bool) | o["is_difficult"].astype(bool))).sum())
            # mmdetection filter_empty_gt and min size 32 (coco.py _filter_imgs)
            no_box += usable == 0
            small += usable > 0 and min(h, w) < 32
            if min(h, w) < 32 or usable == 0:
                continue
            groups.setdefault(canvas_of(h, w, data_cfg), []).append(i)
        if no_box or small:
            logging.info(
                "split %r: training skips %d of %d images without a usable box (as "
                "mmdetection's filter_empty_gt) and %d smaller than 32 px",
                split.name,
                no_box,
                len(split),
                small,
            )
        if not groups:
            raise ValueError(f"split {split.name!r} has no image with a usable box")
        self.groups = {k: np.asarray(v) for k, v in sorted(groups.items())}
        self.num_images = sum(len(v) for v in self.groups.values())
        self.steps_per_epoch = sum(-(-len(v) // global_batch) for v in self.groups.values())

    @functools.lru_cache(maxsize=2)  # noqa: B019 (two epochs live at once near a boundary)
    def _epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for canvas, idx in self.groups.items():
            idx = rng.permutation(idx)
            extra = (-len(idx)) % self.global_batch
            if extra:
                idx = np.concatenate([idx, rng.choice(idx, extra, replace=extra > len(idx))])
            batches += [
                (canvas, idx[i : i + self.global_batch])
                for i in range(0, len(idx), self.global_batch)
            ]
        return [batches[j] for j in rng.permutation(len(batches))]

    def batch(self, step):
        """(canvas, [global_batch] example indices) of global step `step`."""
        return self._epoch(step // self.steps_per_epoch)[step % self.steps_per_epoch]


@contextlib.contextmanager
def _naming(split, i):
    """Re-raises any error reading record `i` as one `InputError` naming the split and file."""
    try:
        yield
    except sources.InputError:
        raise
    except Exception as e:
        raise sources.InputError(f"{split.describe(int(i))}: {sources._one_line(e)}") from e


def host_slice(indices):
    """This host's contiguous share of a global batch of indices."""
    n = jax.process_count()
    if len(indices) % n:
        raise ValueError(f"global batch {len(indices)} does not split over {n} hosts")
    per = len(indices) // n
    return indices[jax.process_index() * per : (jax.process_index() + 1) * per]


def _read_options(data_cfg):
    return grain.ReadOptions(
        num_threads=data_cfg.num_workers, prefetch_buffer_size=data_cfg.prefetch
    )


def train_dataset(split, sampler, data_cfg, *, seed, num_steps):
    """A grain IterDataset yielding this host's part of global batches 0..num_steps-1."""

    def load(step):
        _, idx = sampler.batch(int(step))
        # Scales are drawn for the whole global batch first, from (seed, step) alone so every
        # host agrees; then the batch takes the smallest canvas that holds all its images.
        # mmdetection draws a scale per image; with one shape per global batch that makes
        # nearly every batch need the largest canvas, so by default one scale is drawn per
        # batch (data.scale_per='batch'): each image still sees the same scale distribution.
        rng = np.random.default_rng([seed, int(step)])
        if data_cfg.get("scale_per", "batch") == "batch":
            scales = [sample_scale(data_cfg, rng)] * len(idx)
        else:
            scales = [sample_scale(data_cfg, rng) for _ in idx]
        sizes = [
            transforms.rescale_size(int(split.heights[i]), int(split.widths[i]), sc)[:2]
            for i, sc in zip(idx, scales, strict=True)
        ]
        canvas = batch_canvas(sizes, data_cfg)
        exs = []
        first = host_slice(np.arange(len(idx)))  # positions of this host's examples
        for j, i, sc in zip(first, host_slice(idx), host_slice(scales), strict=True):
            # Keyed by the example's position in the global batch, so its flip is the same
            # whichever process reads it (the 0 keeps the stream single-host runs always had).
            ex_rng = np.random.default_rng([seed, int(step), 0, int(j)])
            with _naming(split, i):
                exs.append(
                    process_example(
                        split.source[int(i)],
                        data_cfg=data_cfg,
                        train=True,
                        rng=ex_rng,
                        scale=sc,
                        canvas=canvas,
                    )
                )
        batch = stack(exs)
        if batch["dropped_boxes"].any():
            logging.warning(
                "step %d: dropped %d boxes past max_boxes", step, batch["dropped_boxes"].sum()
            )
        return batch

    ds = grain.MapDataset.range(num_steps).map(load)
    return ds.to_iter_dataset(_read_options(data_cfg))


def eval_batches(split, data_cfg, global_batch):
    """Index batches for evaluation: every image once, grouped by canvas, no shuffling.

    The last batch of a group is filled with copies marked `image_valid = False`.
    Returns: list of (canvas, [global_batch] indices, [global_batch] bool real-example flags).
    """
    groups = {}
    for i in range(len(split)):
        groups.setdefault(
            canvas_of(int(split.heights[i]), int(split.widths[i]), data_cfg), []
        ).append(i)
    out = []
    for canvas, idx in sorted(groups.items()):
        idx = np.asarray(idx)
        for s in range(0, len(idx), global_batch):
            chunk = idx[s : s + global_batch]
            real = np.ones(global_batch, bool)
            real[len(chunk) :] = False
            chunk = np.concatenate([chunk, np.full(global_batch - len(chunk), chunk[0])])
            out.append((canvas, chunk, real))
    return out


def eval_dataset(split, data_cfg, global_batch):
    """A grain IterDataset over `eval_batches`, this host's part of each batch."""
    plan = eval_batches(split, data_cfg, global_batch)

    def load(k):
        _, idx, real = plan[int(k)]
        exs = []
        for i, r in zip(host_slice(idx), host_slice(real), strict=True):
            with _naming(split, i):
                ex = process_example(split.source[int(i)], data_cfg=data_cfg, train=False, rng=None)
            ex["image_valid"] = np.bool_(r)
            exs.append(ex)
        return stack(exs)

    return grain.MapDataset.range(len(plan)).map(load).to_iter_dataset(_read_options(data_cfg))
