"""Real, messy data: images without boxes, damaged JPEGs, bad VOC boxes, misspelt classes,
the official tfds coco/2017, errors that name the record, and the data report."""

import io
import json
import logging
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from helpers.paths import REPO, cli_env, shared_data
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jdistill import config_lib
from jdistill.data import decode, pipeline, sources
from jdistill.data.builders import coco_folder, tfds_coco
from jdistill.evaluate import coco as coco_eval


@pytest.fixture
def caplog_absl(caplog):
    """absl logs through the `absl` logger; let caplog see its warnings."""
    absl_logging.get_absl_logger().propagate = True
    caplog.set_level(logging.INFO)
    return caplog


def _jpeg(rng, h, w):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def messy_coco(root, truncated=True):
    """coco8 copied to `root`, plus in each split: an image without annotations, an image whose
    only box is unusable (w < 1), and (optionally) a truncated JPEG with a box."""
    src = shared_data("coco8")
    shutil.copytree(src, root)
    rng = np.random.default_rng(0)
    for split_dir, base in (("train2017", 9000), ("val2017", 9100)):
        ann_file = root / "annotations" / f"instances_{split_dir}.json"
        data = json.loads(ann_file.read_text())
        extra = [(base + 1, "empty.jpg", _jpeg(rng, 120, 160), [])]
        extra.append((base + 2, "tiny_box.jpg", _jpeg(rng, 100, 90), [[10, 10, 0.5, 20]]))
        if truncated:
            full = _jpeg(rng, 200, 240)
            extra.append(
                (base + 3, "truncated.jpg", full[: len(full) * 2 // 3], [[20, 30, 80, 60]])
            )
        for image_id, name, data_bytes, boxes in extra:
            (root / split_dir / name).write_bytes(data_bytes)
            with Image.open(io.BytesIO(data_bytes)) as im:
                w, h = im.size
            data["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
            for k, b in enumerate(boxes):
                data["annotations"].append(
                    {
                        "id": image_id * 10 + k,
                        "image_id": image_id,
                        "category_id": 1,
                        "bbox": b,
                        "area": b[2] * b[3],
                        "iscrowd": 0,
                    }
                )
        ann_file.write_text(json.dumps(data))
    return root


def coco_cfg(root, **kw):
    data = config_lib.coco_data(str(root))
    data.scales = ((160, 128),)
    data.canvases = ((128, 160), (160, 128), (160, 160))
    data.max_boxes = 16
    data.num_workers = 0
    for k, v in kw.items():
        data[k] = v
    return data


def test_decode_tolerates_or_refuses_truncated_jpeg_and_converts_modes():
    rng = np.random.default_rng(1)
    full = _jpeg(rng, 64, 48)
    image, note = decode.decode(full, name="ok.jpg")
    assert image.shape == (64, 48, 3) and image.dtype == np.uint8 and note == ""
    image, note = decode.decode(full[: len(full) // 2], name="half.jpg")
    assert image.shape == (64, 48, 3) and "half.jpg" in note and "tolerantly" in note
    with pytest.raises(decode.ImageDecodeError, match="half.jpg.*strict_images"):
        decode.decode(full[: len(full) // 2], name="half.jpg", strict=True)
    with pytest.raises(decode.ImageDecodeError, match="zero.jpg.*0 bytes"):
        decode.decode(b"", name="zero.jpg")
    with pytest.raises(decode.ImageDecodeError, match="text.jpg.*not an image"):
        decode.decode(b"<html>not found</html>", name="text.jpg")
    # grayscale and RGBA files become 3-channel colour, as OpenCV's IMREAD_COLOR
    gray = rng.integers(0, 255, (10, 12), np.uint8)
    for im in (Image.fromarray(gray), Image.fromarray(gray).convert("RGBA")):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out, _ = decode.decode(buf.getvalue(), name="g.png")
        np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))


def test_coco_folder_with_empty_images_and_a_truncated_jpeg(tmp_path, caplog_absl):
    root = messy_coco(tmp_path / "coco")
    data = coco_cfg(root)
    train = sources.load_split(data, "train")
    val = sources.load_split(data, "validation")
    assert len(train) == 4 + 3 and len(val) == 4 + 3  # every image kept
    log = caplog_absl.text
    assert "truncated.jpg: damaged image" in log and "decoded tolerantly" in log
    assert "tiny_box.jpg annotation 90020" in log and "w < 1" in log  # skipped, and named
    i = list(val.image_ids).index(9103)
    assert "truncated.jpg" in val.notes[i]
    assert val.source[i]["image"].shape == (200, 240, 3)  # the stored tolerant decode
    # training drops the images without a usable box, once, and says so
    sampler = pipeline.TrainSampler(train, data, 2, seed=0)
    assert sampler.num_images == 4 + 1
    assert "training skips 2 of 7 images without a usable box" in caplog_absl.text
    used = {int(i) for s in range(sampler.steps_per_epoch) for i in sampler.batch(s)[1]}
    coco8 = {
        im["id"]
        for im in json.loads(
            (shared_data("coco8") / "annotations" / "instances_train2017.json").read_text()
        )["images"]
    }
    assert {int(train.image_ids[i]) for i in used} == coco8 | {9003}
    # evaluation keeps every image
    plan = pipeline.eval_batches(val, data, 2)
    assert sorted(
        int(i) for _, idx, real in plan for i, r in zip(idx, real, strict=True) if r
    ) == list(range(len(val)))
    # a strict run refuses the prepared data, naming the file
    with pytest.raises(decode.ImageDecodeError, match="truncated.jpg"):
        sources.load_split(coco_cfg(root, strict_images=True), "train")


def test_strict_preparation_names_the_file(tmp_path):
    root = messy_coco(tmp_path / "coco")
    b = coco_folder.CocoFolder(root=str(root), data_dir=str(tmp_path / "t"), strict_images=True)
    with pytest.raises(Exception, match="truncated.jpg"):
        b.download_and_prepare(file_format="array_record")


def test_coco_map_equals_pycocotools_on_the_raw_json(tmp_path):
    root = messy_coco(tmp_path / "coco")
    val = sources.load_split(coco_cfg(root), "validation")
    ann_file = root / "annotations" / "instances_val2017.json"
    raw = json.loads(ann_file.read_text())
    # detections: every raw box jittered, plus false positives, on every image
    rng = np.random.default_rng(3)
    results = []
    for a in raw["annotations"]:
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.08, 4) * [w, h, w, h]
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [x + j[0], y + j[1], max(w + j[2], 1), max(h + j[3], 1)],
                "score": float(rng.uniform(0.3, 1)),
            }
        )
    for im in raw["images"]:
        results.append(
            {"image_id": im["id"], "category_id": 1, "bbox": [5, 5, 40, 30], "score": 0.2}
        )
    ours, _ = coco_eval.evaluate(coco_eval.ground_truth(val), results)
    gt = COCO(str(ann_file))
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    np.testing.assert_allclose([ours[k] for k in coco_eval.METRIC_NAMES], ev.stats[:6])
    assert 0 < ours["bbox_mAP"] < 1
    # eval_max_images: the raw file restricted to the first images, every field cut alike
    head = val.head(3)
    assert len(head.file_names) == 3 and head.ann_file == val.ann_file
    assert len(coco_eval.ground_truth(head).getImgIds()) == 3


def test_undecodable_images_are_skipped_and_counted(tmp_path, caplog_absl):
    root = messy_coco(tmp_path / "coco", truncated=False)
    ann_file = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    data["images"].append({"id": 777, "file_name": "html.jpg", "width": 10, "height": 10})
    ann_file.write_text(json.dumps(data))
    (root / "train2017" / "html.jpg").write_bytes(b"<html>404</html>")
    train = sources.load_split(coco_cfg(root), "train")
    assert 777 not in train.image_ids and len(train) == 6
    assert "skipped 1 undecodable images" in caplog_absl.text and "html.jpg" in caplog_absl.text


class _Broken:
    """A raw source whose record 1 fails as a damaged file would mid-run."""

    def __init__(self, good):
        self.good = good

    def __len__(self):
        return len(self.good)

    def __getitem__(self, i):
        if i == 1:
            raise OSError("image file is truncated")
        return self.good[i]


def test_input_errors_name_split_record_and_file(tmp_path):
    root = messy_coco(tmp_path / "coco", truncated=False)
    data = coco_cfg(root, num_workers=2)
    train = sources.load_split(data, "train")
    train.source = sources.DecodingSource(
        _Broken(train.source.raw), "train", train.file_names, False
    )
    with pytest.raises(sources.InputError, match=r"split 'train', record 1 \(train2017/"):
        train.source[1]
    # the same error, raised in a grain worker thread, reaches the caller whole
    plan = pipeline.eval_dataset(train, data, 8)
    with pytest.raises(sources.InputError, match=rf"record 1 \({train.file_names[1]}\)"):
        list(plan)


def voc_tree(root, objects_per_image):
    """A VOC2007 tree of small JPEGs: objects_per_image[i] = [(name, (x1, y1, x2, y2))]."""
    rng = np.random.default_rng(2)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / "VOC2007" / d).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:04d}" for i in range(len(objects_per_image))]
    for i, objs in zip(ids, objects_per_image, strict=True):
        (root / "VOC2007" / "JPEGImages" / f"{i}.jpg").write_bytes(_jpeg(rng, 60, 80))
        ann = ET.Element("annotation")
        size = ET.SubElement(ann, "size")
        ET.SubElement(size, "width").text = "80"
        ET.SubElement(size, "height").text = "60"
        for name, box in objs:
            o = ET.SubElement(ann, "object")
            ET.SubElement(o, "name").text = name
            bb = ET.SubElement(o, "bndbox")
            for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
                ET.SubElement(bb, k).text = str(v)
        ET.ElementTree(ann).write(root / "VOC2007" / "Annotations" / f"{i}.xml")
    for s in ("trainval", "test"):
        (root / "VOC2007" / "ImageSets" / "Main" / f"{s}.txt").write_text("\n".join(ids))
    return root


def test_voc_bad_boxes_skipped_misspelt_class_warned(tmp_path, caplog_absl):
    root = voc_tree(
        tmp_path / "voc",
        [
            [("raccoon", (10, 10, 40, 30)), ("raccoon", (50, 10, 20, 30))],  # 2nd inverted
            [("raccoon", (5, 5, 30, 30)), ("raccoon", (30, 20, 30, 40))],  # 2nd empty (w = 0)
            [("racoon", (1, 1, 20, 20))],  # misspelt, in one file only
            [],  # no object at all
        ],
    )
    data = config_lib.voc_data(str(root), years="07")
    data.num_workers = 0
    split = sources.load_split(data, "train")
    log = caplog_absl.text
    assert "class 'racoon' occurs in one file only" in log and "0002.xml" in log
    assert "skipped 2 VOC boxes" in log and "0000.xml raccoon box [50.0, 10.0, 20.0, 30.0]" in log
    by_file = {f[-8:-4]: i for i, f in enumerate(split.file_names)}  # tfds shuffles records
    assert [len(split.objects[by_file[k]]["label"]) for k in ("0000", "0001", "0002", "0003")] == [
        1,
        1,
        1,
        0,
    ]
    assert "inverted or empty" in split.skipped[by_file["0000"]]
    assert split.skipped[by_file["0002"]] == ""
    assert pipeline.TrainSampler(split, data, 1, seed=0).num_images == 3


def _coco_official(i, n_obj):
    h, w = 50 + i, 70
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(buf, format="JPEG")
    return {
        "image": buf.getvalue(),
        "image/filename": f"{i:012d}.jpg",
        "image/id": 1000 + i,
        "objects": {
            "id": np.arange(n_obj, dtype=np.int64),
            "area": np.full(n_obj, 210, np.int64),
            # (ymin, xmin, ymax, xmax) normalised; the last box of image 2 is 0.35 px wide
            "bbox": np.asarray(
                [[0.1, 0.2, 0.5, 0.6], [0.2, 0.1, 0.9, 0.105]][:n_obj], np.float32
            ).reshape(n_obj, 4),
            "label": np.asarray([0, 79][:n_obj], np.int64),
            "is_crowd": np.asarray([False, True][:n_obj]),
        },
    }


def test_official_coco_2017_through_mock_data():
    def as_data_source(self, split, **kwargs):
        del self, kwargs
        return [_coco_official(i, n) for i, n in enumerate((1, 0, 2))] if split else []

    data = config_lib.coco_data(builder="tfds_coco")
    data.scales = ((128, 96),)
    data.canvases = ((128, 128),)
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        split = sources.load_split(data, "coco/2017:validation")
        ex = split.source[2]
    assert len(split) == 3 and len(split.class_names) == 80
    np.testing.assert_array_equal(split.image_ids, [1000, 1001, 1002])
    np.testing.assert_array_equal(split.heights, [50, 51, 52])
    np.testing.assert_allclose(split.objects[0]["bbox"], [[14, 5, 42, 25]], rtol=1e-6)
    assert [len(o["label"]) for o in split.objects] == [1, 0, 1]  # 0.35 px box skipped
    assert "w < 1" in split.skipped[2] and split.file_names[1] == "000000000001.jpg"
    assert ex["image"].shape == (52, 70, 3)
    assert split.category_ids[0] == 1 and split.category_ids[79] == 90
    assert split.category_ids == tfds_coco.COCO_IDS
    gt = coco_eval.ground_truth(split)
    assert sorted(gt.getImgIds()) == [1000, 1001, 1002]  # the empty image is evaluated
    assert [a["category_id"] for a in gt.loadAnns(gt.getAnnIds())] == [1, 1]


@pytest.mark.slow
def test_data_report_cli(tmp_path):
    root = messy_coco(tmp_path / "coco")
    out = tmp_path / "grid.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jdistill.data.inspect",
            "--config=configs/retinanet_r50_coco.py",
            f"--config.data.root={root}",
            "--config.data.scales=((160,128),)",
            "--config.data.canvases=((128,160),(160,128),(160,160))",
            f"--out={out}",
            "--num_images=4",
        ],
        cwd=REPO,
        env=cli_env(TFDS_DATA_DIR=str(tmp_path / "tfds")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "split 'train': 7 images, 2 without a usable box" in text
    assert "boxes skipped at preparation: 1 {'w < 1 or h < 1': 1}" in text
    assert "tiny_box.jpg annotation 90020" in text
    assert "images decoded tolerantly (damaged files): 1" in text and "truncated.jpg" in text
    assert "canvases (at the test scale):" in text
    assert Image.open(out).size == (4 * 256, 256)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "jdistill.data.inspect",
            "--config=configs/retinanet_r50_coco.py",
            f"--config.data.root={tmp_path / 'nowhere'}",
        ],
        cwd=REPO,
        env=cli_env(TFDS_DATA_DIR=str(tmp_path / "tfds")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "COCO folder not found" in bad.stderr.strip().splitlines()[-1]


def test_faster_coco_eval_backend_equals_pycocotools(tmp_path):
    pytest.importorskip("faster_coco_eval")
    assert coco_eval.check_backend("faster_coco_eval")
    root = messy_coco(tmp_path / "coco")
    val = sources.load_split(coco_cfg(root), "validation")
    gt = coco_eval.ground_truth(val)
    _, results = coco_eval.fixture(num_images=3)
    ids = sorted(gt.getImgIds())
    for r in results:  # the fixture's detections, moved onto this split's images
        r["image_id"] = ids[r["image_id"] % len(ids)]
    want, _ = coco_eval.evaluate(gt, results)
    got, _ = coco_eval.evaluate(gt, results, backend="faster_coco_eval")
    assert got == want
    with pytest.raises(ValueError, match="config.eval_backend='detectron': unknown"):
        coco_eval.evaluate(gt, results, backend="detectron")


def test_a_backend_that_disagrees_is_refused(monkeypatch):
    pytest.importorskip("faster_coco_eval")
    real = coco_eval._run  # noqa: SLF001

    def off_by_a_bit(backend, *args):
        stats, text = real(backend, *args)
        return ([s + 0.01 for s in stats] if backend != "pycocotools" else stats), text

    monkeypatch.setattr(coco_eval, "_run", off_by_a_bit)
    coco_eval.check_backend.cache_clear()
    try:
        with pytest.raises(ValueError, match="refused: on the fixture"):
            coco_eval.check_backend("faster_coco_eval")
    finally:
        coco_eval.check_backend.cache_clear()


@pytest.mark.slow
def test_messy_coco_trains_and_its_map_is_pycocotools_on_the_raw_json(tmp_path, caplog_absl):
    from helpers.paths import load_config

    from jdistill import train

    root = messy_coco(tmp_path / "coco")
    config = load_config("retinanet_r50_coco", "runlocal")
    config.unlock()
    config.data.builder = "coco_folder"  # runlocal chose the synthetic set: no root was given
    config.data.root = str(root)
    config.model.test_score_thr = 0.0  # a 2-step model scores below 0.05: keep its guesses
    config.eval_max_images = 0  # every image of val2017, the empty ones included
    config.schedule.num_steps = 2
    config.lock()
    final = train.run(config, str(tmp_path / "run"))
    assert "truncated.jpg: damaged image" in caplog_absl.text
    assert "training skips 2 of 7 images without a usable box" in caplog_absl.text
    ev = tmp_path / "run" / "eval"
    saved = json.loads((ev / "step_2.json").read_text())
    dets = json.loads((ev / "step_2.detections.json").read_text())
    assert {d["image_id"] for d in dets} <= {
        im["id"]
        for im in json.loads((root / "annotations" / "instances_val2017.json").read_text())[
            "images"
        ]
    }
    gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    assert len(gt.getImgIds()) == 7
    assert dets
    ev_ = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev_.evaluate()
    ev_.accumulate()
    ev_.summarize()
    want = ev_.stats[:6]
    got = [saved[k] for k in coco_eval.METRIC_NAMES]
    np.testing.assert_allclose(got, want)
    assert final["bbox_mAP"] == saved["bbox_mAP"]
