import json

import ml_collections
import numpy as np
import pytest
from helpers.paths import shared_data

from jdistill.data import pipeline, sources
from jdistill.data.builders import coco_folder, synthetic_shapes
from jdistill.evaluate import coco as coco_eval


def data_cfg(**kw):
    base = dict(
        builder="synthetic_shapes",
        root="",
        data_dir="",
        scales=((160, 128),),
        canvases=((128, 160), (160, 128)),
        flip_ratio=0.5,
        max_boxes=8,
        num_workers=2,
        prefetch=2,
        train_split="train",
        eval_split="validation",
    )
    return ml_collections.ConfigDict(base | kw)


def test_synthetic_examples_are_deterministic_and_sane():
    a_img, a_obj = synthetic_shapes.make_example(7, "train")
    b_img, b_obj = synthetic_shapes.make_example(7, "train")
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_obj["bbox"], b_obj["bbox"])
    c_img, _ = synthetic_shapes.make_example(7, "validation")
    assert not np.array_equal(a_img, c_img) or a_img.shape != c_img.shape
    labels = set()
    for i in range(50):
        img, obj = synthetic_shapes.make_example(i, "train")
        h, w = img.shape[:2]
        b = obj["bbox"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        labels |= set(obj["label"].tolist())
    assert labels == set(range(len(synthetic_shapes.CLASS_NAMES)))


@pytest.fixture(scope="module")
def shapes_train():
    return sources.load_split(data_cfg(), "train")


def test_sampler_groups_by_canvas_and_covers_the_epoch(shapes_train):
    cfg = data_cfg()
    s = pipeline.TrainSampler(shapes_train, cfg, 16, seed=3)
    seen = []
    for step in range(s.steps_per_epoch):
        canvas, idx = s.batch(step)
        assert len(idx) == 16
        for i in idx:
            assert (
                pipeline.canvas_of(shapes_train.heights[i], shapes_train.widths[i], cfg) == canvas
            )
        seen += list(idx)
    assert set(seen) == set(range(len(shapes_train)))
    # deterministic in (seed, step); a different epoch is a different order
    s2 = pipeline.TrainSampler(shapes_train, cfg, 16, seed=3)
    np.testing.assert_array_equal(s.batch(5)[1], s2.batch(5)[1])
    assert not np.array_equal(s.batch(5)[1], s.batch(5 + s.steps_per_epoch)[1])


def test_iterator_state_resumes_on_the_same_batch(shapes_train):
    cfg = data_cfg()
    s = pipeline.TrainSampler(shapes_train, cfg, 4, seed=0)
    it = iter(pipeline.train_dataset(shapes_train, s, cfg, seed=0, num_steps=10))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = next(it)
    it2 = iter(pipeline.train_dataset(shapes_train, s, cfg, seed=0, num_steps=10))
    it2.set_state(state)
    got = next(it2)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_processed_example_bookkeeping(shapes_train):
    cfg = data_cfg(flip_ratio=0.0)
    ex = shapes_train.source[0]
    out = pipeline.process_example(ex, data_cfg=cfg, train=True, rng=np.random.default_rng(0))
    h, w = out["img_shape"]
    assert out["image"].shape[:2] in [(128, 160), (160, 128)]
    assert not out["image"][h:].any() and not out["image"][:, w:].any()
    canvas = np.array(out["image"].shape[:2])
    np.testing.assert_array_equal(
        out["pad_shape"], np.minimum(-(-out["img_shape"] // 32) * 32, canvas)
    )
    n = len(ex["objects"]["label"])
    assert out["box_valid"].sum() == n
    sf = np.concatenate([out["scale_factor"], out["scale_factor"]])
    np.testing.assert_allclose(out["boxes"][:n], ex["objects"]["bbox"] * sf, rtol=1e-5)


def test_eval_batches_cover_every_image_once():
    split = sources.load_split(data_cfg(), "validation")
    plan = pipeline.eval_batches(split, data_cfg(), 16)
    real = np.concatenate([idx[r] for _, idx, r in plan])
    assert sorted(real.tolist()) == list(range(len(split)))


def test_coco8_reads_like_mmdetection():
    root = shared_data("coco8")
    cfg = data_cfg(
        builder="coco_folder",
        root=str(root),
        scales=((1333, 800),),
        canvases=((800, 1344), (1344, 800)),
        max_boxes=100,
    )
    split = sources.load_split(cfg, "validation")
    ann = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    assert len(split) == len(ann["images"])
    cat_ids = sorted(c["id"] for c in ann["categories"])
    assert split.category_ids == tuple(cat_ids)
    by_id = {int(i): k for k, i in enumerate(split.image_ids)}
    for a in ann["annotations"]:
        o = split.objects[by_id[a["image_id"]]]
        x, y, w, h = a["bbox"]
        j = np.argmin(np.abs(o["bbox"] - [x, y, x + w, y + h]).sum(1))
        np.testing.assert_allclose(o["bbox"][j], [x, y, x + w, y + h], rtol=1e-6)
        assert o["label"][j] == cat_ids.index(a["category_id"])
    # evaluation of the ground truth itself scores 1.0
    gt = coco_eval.ground_truth(split)
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in ann["annotations"]
    ]
    metrics, _ = coco_eval.evaluate(gt, results)
    assert metrics["bbox_mAP"] == pytest.approx(1.0)
    # and one image read through the pipeline lands on the landscape canvas, boxes scaled
    batch = next(iter(pipeline.eval_dataset(split, cfg, 2)))
    assert batch["image"].shape[1:3] in [(800, 1344), (1344, 800)]
    assert (batch["img_shape"] <= batch["image"].shape[1:3]).all()


def test_coco_folder_errors_name_the_file(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    with pytest.raises(coco_folder.CocoFolderError, match="instances_train2017.json"):
        coco_folder.CocoFolder(
            root=str(tmp_path), splits={"train": "train2017"}, data_dir=str(tmp_path / "tfds")
        )
    bad = tmp_path / "annotations" / "instances_train2017.json"
    bad.write_text("{not json")
    with pytest.raises(coco_folder.CocoFolderError, match="not valid JSON"):
        coco_folder.CocoFolder(
            root=str(tmp_path), splits={"train": "train2017"}, data_dir=str(tmp_path / "tfds")
        )
    bad.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "broken.jpg", "height": 10, "width": 10}],
                "annotations": [],
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    (tmp_path / "train2017" / "broken.jpg").write_bytes(b"this is not a jpeg")
    b = coco_folder.CocoFolder(
        root=str(tmp_path), splits={"train": "train2017"}, data_dir=str(tmp_path / "tfds")
    )
    with pytest.raises(Exception, match="broken.jpg"):
        b.download_and_prepare(file_format="array_record")


def test_annotation_filter_follows_mmdetection():
    anns = [
        {"id": 1, "bbox": [0, 0, 10, 10], "category_id": 5, "area": 100},
        {"id": 2, "bbox": [0, 0, 0.5, 10], "category_id": 5, "area": 5},  # w < 1
        {"id": 3, "bbox": [50, 50, 10, 10], "category_id": 5, "area": 100},  # outside 40x40
        {"id": 4, "bbox": [5, 5, 10, 10], "category_id": 5, "area": 0},  # area <= 0
        {"id": 5, "bbox": [1, 2, 3, 4], "category_id": 7, "area": 12, "iscrowd": 1},
        {"id": 6, "bbox": [float("nan"), 2, 3, 4], "category_id": 7, "area": 12},  # NaN
    ]
    obj, skipped = coco_folder.convert_annotations(anns, 40, 40, {5: 0, 7: 1}, "x.jpg")
    assert [s.split(":")[-1].strip() for s in skipped] == [
        "w < 1 or h < 1",
        "no overlap with the image",
        "area <= 0",
        "non-finite coordinates or area",
    ]
    assert skipped[0].startswith("x.jpg annotation 2 bbox [0.0, 0.0, 0.5, 10.0]")
    np.testing.assert_allclose(obj["bbox"], [[0, 0, 10, 10], [1, 2, 4, 6]])
    np.testing.assert_array_equal(obj["label"], [0, 1])
    np.testing.assert_array_equal(obj["is_crowd"], [False, True])


def test_each_host_reads_its_own_slice(monkeypatch):
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    monkeypatch.setattr(pipeline.jax, "process_index", lambda: 1)
    np.testing.assert_array_equal(pipeline.host_slice(np.arange(8)), [4, 5, 6, 7])
    with pytest.raises(ValueError, match="does not split"):
        pipeline.host_slice(np.arange(7))


def test_two_hosts_read_the_halves_of_the_one_host_batch(shapes_train, monkeypatch):
    """Every example of a global batch is the same bytes whichever process reads it (flips are
    keyed by the position in the global batch), so N processes train on the batch one would."""
    cfg = data_cfg(num_workers=0)
    s = pipeline.TrainSampler(shapes_train, cfg, 4, seed=0)

    def batches(count, index):
        monkeypatch.setattr(pipeline.jax, "process_count", lambda: count)
        monkeypatch.setattr(pipeline.jax, "process_index", lambda: index)
        return list(pipeline.train_dataset(shapes_train, s, cfg, seed=0, num_steps=6))

    whole, first, second = batches(1, 0), batches(2, 0), batches(2, 1)
    for w, a, b in zip(whole, first, second, strict=True):
        for k in w:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), w[k], err_msg=k)
    assert whole[0]["image"].shape[0] == 4 and first[0]["image"].shape[0] == 2


def test_multiscale_range_and_value_sampling():
    rng = np.random.default_rng(0)
    cfg = data_cfg(scales=((1333, 480), (1333, 800)), multiscale_mode="range")
    draws = np.array([pipeline.sample_scale(cfg, rng) for _ in range(6000)])
    assert (draws[:, 0] == 1333).all()
    assert draws[:, 1].min() == 480 and draws[:, 1].max() == 800
    # uniform over the 321 integers: each quarter of the range holds ~1/4 of the draws
    counts = np.histogram(draws[:, 1], bins=[480, 560, 640, 720, 801])[0] / len(draws)
    np.testing.assert_allclose(counts, [80 / 321, 80 / 321, 80 / 321, 81 / 321], atol=0.03)
    cfg = data_cfg(scales=((1333, 640), (1333, 800)), multiscale_mode="value")
    draws = np.array([pipeline.sample_scale(cfg, rng)[1] for _ in range(4000)])
    assert set(draws.tolist()) == {640, 800}
    assert abs((draws == 640).mean() - 0.5) < 0.03
    with pytest.raises(ValueError, match="multiscale_mode"):
        pipeline.sample_scale(data_cfg(scales=((1, 2), (3, 4)), multiscale_mode="ratio"), rng)


def test_multiscale_batches_take_the_smallest_canvas(shapes_train):
    from jdistill.data import transforms

    canvases = ((96, 160), (160, 96), (128, 160), (160, 128))
    cfg = data_cfg(scales=((160, 80), (160, 128)), multiscale_mode="value", canvases=canvases)
    s = pipeline.TrainSampler(shapes_train, cfg, 8, seed=0)
    it = iter(pipeline.train_dataset(shapes_train, s, cfg, seed=0, num_steps=16))
    used_scales, shapes = set(), set()
    for step in range(16):
        b = next(it)
        _, idx = s.batch(step)
        # every image of the batch was resized at one of the two scales, the same for all
        fits = [
            {
                sc
                for sc in cfg.scales
                if tuple(b["img_shape"][j])
                == transforms.rescale_size(
                    int(shapes_train.heights[i]), int(shapes_train.widths[i]), sc
                )[:2]
            }
            for j, i in enumerate(idx)
        ]
        common = set.intersection(*fits)
        assert common, f"step {step}: images resized at different scales"
        used_scales |= common
        # and the batch sits on the smallest canvas that holds it
        want = transforms.choose_canvas(*b["img_shape"].max(0), canvases)
        assert b["image"].shape[1:3] == want
        shapes.add(want)
    assert used_scales == set(cfg.scales)
    assert (96, 160) in shapes or (160, 96) in shapes  # small-scale batches use small canvases
