"""VOC data: the voc_folder builder on a crafted devkit and on the raccoon set, and the official
tfds voc/2007 + voc/2012 builders through `tfds.testing.mock_data`."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers.paths import shared_data
from PIL import Image

from jdistill import config_lib
from jdistill.data import pipeline, sources
from jdistill.data.builders import voc_folder

XML = """<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = """<object><name>{name}</name><difficult>{diff}</difficult><bndbox><xmin>{x1}</xmin>
<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def make_devkit(root, images, test_ids=()):
    """images: {id: (w, h, [(name, difficult, x1, y1, x2, y2)])}; all trainval except test_ids."""
    voc = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (w, h, objs) in images.items():
        Image.new("RGB", (w, h), (90, 120, 30)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        body = "".join(
            OBJ.format(name=n, diff=int(d), x1=a, y1=b, x2=c, y2=e) for n, d, a, b, c, e in objs
        )
        (voc / "Annotations" / f"{image_id}.xml").write_text(XML.format(w=w, h=h, objects=body))
    trainval = [i for i in images if i not in test_ids]
    (voc / "ImageSets/Main/trainval.txt").write_text("\n".join(trainval) + "\n")
    (voc / "ImageSets/Main/test.txt").write_text("\n".join(test_ids) + "\n")
    return root


def voc_cfg(root):
    data = config_lib.voc_data(str(root), years="07")
    data.scales = ((128, 96),)
    data.canvases = ((128, 128),)
    return data


def test_voc_folder_keeps_difficult_and_shifts_to_zero_based(tmp_path):
    root = make_devkit(
        tmp_path / "devkit",
        {
            "a": (60, 40, [("fox", 0, 1, 1, 30, 20), ("owl", 1, 11, 6, 51, 36)]),
            "b": (50, 50, [("owl", 0, 5, 5, 45, 45)]),
            "c": (40, 30, [("fox", 0, 2, 3, 20, 25)]),
        },
        test_ids=("c",),
    )
    data = voc_cfg(root)
    train = sources.load_split(data, "train")
    assert train.class_names == ("fox", "owl")  # not VOC's 20: the sorted names found
    assert len(train) == 2 and len(sources.load_split(data, "validation")) == 1
    ia = list(train.image_ids).index(0)  # image "a": position 0 of VOC2007 trainval
    a = train.objects[ia]
    np.testing.assert_allclose(a["bbox"], [[0, 0, 29, 19], [10, 5, 50, 35]])
    np.testing.assert_array_equal(a["is_difficult"], [False, True])
    np.testing.assert_array_equal(a["label"], [0, 1])
    # Training never sees the difficult box.
    ex = pipeline.process_example(train.source[ia], data_cfg=data, train=False, rng=None)
    assert ex["box_valid"].sum() == 1 and ex["labels"][0] == 0


def test_voc_folder_errors_name_the_file(tmp_path):
    root = make_devkit(tmp_path / "bad", {"a": (20, 20, [("fox", 0, 1, 1, 10, 10)])})
    bad = root / "VOC2007/Annotations/a.xml"
    bad.write_text("<annotation><size>")
    with pytest.raises(voc_folder.VocFolderError, match="a.xml"):
        sources.load_split(voc_cfg(root), "train")


def test_raccoon_voc_prepares_with_its_one_class():
    data = voc_cfg(shared_data("raccoon_voc"))
    train = sources.load_split(data, "train")
    test = sources.load_split(data, "validation")
    assert (len(train), len(test)) == (160, 40)
    assert train.class_names == ("raccoon",)
    assert all(len(o["label"]) >= 1 for o in test.objects)


def _official_example(i):
    h, w = 40 + i, 60
    return {
        "image": np.full((h, w, 3), i, np.uint8),
        "image/filename": f"{i:06d}.jpg",
        "objects": {
            # (ymin, xmin, ymax, xmax) normalised, as tfds' voc
            "bbox": np.asarray([[0.25, 0.5, 0.75, 1.0]], np.float32),
            "label": np.asarray([i % 20]),
            "is_difficult": np.asarray([i == 1]),
            "is_truncated": np.asarray([False]),
            "pose": np.asarray([0]),
        },
        "labels": np.asarray([i % 20]),
        "labels_no_difficult": np.asarray([i % 20]),
    }


def test_official_voc_07_plus_12_through_mock_data():
    def as_data_source(self, split, **kwargs):
        del kwargs
        n = {"voc/2007": 3, "voc/2012": 2}[self.name + "/" + self.builder_config.name]
        return [_official_example(i) for i in range(n)] if split else []

    data = config_lib.voc_data(years="0712")
    data.builder = "tfds_voc"
    data.scales = ((128, 96),)
    data.canvases = ((128, 128),)
    parts = ("voc/2007:train+validation", "voc/2012:train+validation")
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        split = sources.load_split(data, parts)
        ex = split.source[4]  # the 2012 part's second example
    assert len(split) == 5 and split.class_names == voc_folder.VOC_CLASSES
    np.testing.assert_array_equal(split.heights, [40, 41, 42, 40, 41])
    np.testing.assert_allclose(split.objects[1]["bbox"], [[30, 10.25, 60, 30.75]])
    assert split.objects[1]["is_difficult"].tolist() == [True]
    assert ex["image_id"] == 4 and ex["height"] == 41
    out = pipeline.process_example(ex, data_cfg=data, train=False, rng=None)
    assert out["box_valid"].sum() == 0  # its one box is difficult: never trained on


def test_bad_tfds_split_names_the_expected_form():
    data = config_lib.voc_data()
    data.builder = "tfds_voc"
    with pytest.raises(ValueError, match="name:split"):
        sources.load_split(data, "voc2007")
