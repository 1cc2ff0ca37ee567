"""A round of bad input through the command lines a new user runs first: the data report
(`jdistill.data.inspect`), `scripts/convert_mmdet_checkpoint.py` and `scripts/export_student.py`.

Each case ends in one line, `error: <cause>` naming the flag, file or config key, and a non-zero
exit, before anything is prepared, read or written (issue: "Every failure names its cause"); a
skipped annotation is a warning naming the file, with a count. Every command here fails within
seconds: nothing is trained and no real checkpoint is read.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.paths import REPO, cli_env
from PIL import Image

INSPECT = ["-m", "jdistill.data.inspect"]
CONVERT = ["scripts/convert_mmdet_checkpoint.py"]
EXPORT = ["scripts/export_student.py"]
RUNLOCAL = "--config=configs/retinanet_r50_coco.py:runlocal"

# Every case runs a command line in a subprocess: the full suite runs them, the quick tier
# (-m "not slow") keeps to in-process tests.
pytestmark = pytest.mark.slow


def run(args, tmp_path, timeout=120):
    """(exit status, stderr lines) of `python <args>` with a data dir of the test's own."""
    out = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=cli_env(TFDS_DATA_DIR=str(tmp_path / "tfds")),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out.returncode, out.stderr.strip().splitlines()


def assert_one_line(code, lines, expected_code, *needles):
    """Exit status `expected_code`, stderr ending in the only `error:` line, holding `needles`,
    and no traceback."""
    shown = "\n".join(lines[-20:])
    assert code == expected_code, shown
    assert lines and lines[-1].startswith("error: "), shown
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, shown
    assert not any("Traceback" in ln for ln in lines), shown


# ------------------------------------------------------- config files and flags (parse_flags)


CONFIG_FILES = {
    "syntax.py": "def get_config(:\n    pass\n",
    "no_get_config.py": "x = 1\n",
    "import_error.py": "def get_config(arg=None):\n    import no_such_module_here\n",
    "returns_none.py": "def get_config(arg=None):\n    return None\n",
}


@pytest.mark.parametrize(
    "config, expected",
    [
        ("configs/no_such.py", "--config=configs/no_such.py: no such file"),
        ("configs", "--config=configs: is a folder, not a config file"),
        ("{tmp}/syntax.py", "not valid Python: line 1: invalid syntax"),
        ("{tmp}/no_get_config.py", "the file defines no get_config(arg) function"),
        ("{tmp}/import_error.py", "line 2: ModuleNotFoundError: No module named"),
        ("{tmp}/returns_none.py", "get_config() returned None"),
        ("configs/retinanet_r50_coco.py:runlocall", "unknown config arg 'runlocall'; known:"),
    ],
)
def test_a_config_the_report_cannot_load_is_one_line(tmp_path, config, expected):
    for name, text in CONFIG_FILES.items():
        (tmp_path / name).write_text(text)
    config = config.format(tmp=tmp_path)
    # an override after a missing file used to raise the deferred load error with a traceback
    code, lines = run([*INSPECT, f"--config={config}", "--config.batch_size=2"], tmp_path)
    assert_one_line(code, lines, 2, expected)
    assert f"--config={config}" in lines[-1]
    assert not (tmp_path / "tfds").exists()  # refused before any data was prepared


@pytest.mark.parametrize(
    "command, args, expected",
    [
        (INSPECT, [], "--config is required"),
        (INSPECT, [RUNLOCAL, "stray"], "unexpected arguments ['stray']"),
        (INSPECT, [RUNLOCAL, "--config.data.rooot=/x"], "the config has no key 'rooot'"),
        (CONVERT, [RUNLOCAL, "--out=o"], "--src is required"),
        (EXPORT, ["--workdir=w", "--out=o.pth", "--step=last"], "flag --step=last: invalid"),
        (EXPORT, ["--workdir=w", "--out=o.pth", "--format=onnx"], "one of <mmdet|orbax>"),
        (EXPORT, ["--workdir=w", "--out=o.pth", "extra"], "unexpected arguments ['extra']"),
    ],
)
def test_a_bad_flag_is_one_line_in_every_script(tmp_path, command, args, expected):
    code, lines = run([*command, *args], tmp_path)
    assert_one_line(code, lines, 2, expected)
    assert len(lines) == 1, lines  # absl's usage text is not printed


# ------------------------------------------------------------------------- the data report


def coco_folder(root, n=2, train=None):
    """A COCO folder of `n` 60 x 80 images per split with a box each; `train`, when given,
    replaces the training split's annotation file (a dict is written as JSON, bytes as is)."""
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            pixels = np.random.default_rng(i).integers(0, 255, (60, 80, 3), np.uint8)
            Image.fromarray(pixels).save(root / split / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "height": 60, "width": 80})
            anns.append(
                {"id": 10 + i, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 30, 20]}
            )
        data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
        ann_dir = root / "annotations"
        ann_dir.mkdir(exist_ok=True)
        content = train if split == "train2017" and train is not None else data
        if callable(content):
            content = content(data)
        path = ann_dir / f"instances_{split}.json"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(json.dumps(content))
    return root


def inspect_coco(root, tmp_path, *extra):
    return run(
        [
            *INSPECT,
            RUNLOCAL,
            "--config.data.builder=coco_folder",
            f"--config.data.root={root}",
            f"--out={tmp_path / 'grid.png'}",
            *extra,
        ],
        tmp_path,
    )


def _without_images(d):
    return {**d, "images": [], "annotations": []}


@pytest.mark.parametrize(
    "train, expected",
    [
        (_without_images, "instances_train2017.json lists no images"),
        (lambda d: {**d, "categories": [{"id": 1}]}, "needs an integer 'id' and a 'name'"),
        (lambda d: {**d, "categories": [], "annotations": []}, "lists no categories"),
        ([1, 2], "holds a JSON list, not an object"),
        (b"\xc3\x28 not utf-8", "is not valid JSON"),
    ],
    ids=["no_images", "category_without_name", "no_categories", "a_list", "not_utf8"],
)
def test_a_broken_coco_annotation_file_is_named(tmp_path, train, expected):
    root = coco_folder(tmp_path / "coco", train=train)
    code, lines = inspect_coco(root, tmp_path)
    assert_one_line(code, lines, 1, "instances_train2017.json", expected)


def test_annotations_of_unlisted_images_are_counted_and_named(tmp_path):
    def orphan(d):
        extra = {"id": 99, "image_id": 77, "category_id": 1, "bbox": [1, 1, 5, 5]}
        return {**d, "annotations": [*d["annotations"], extra]}

    root = coco_folder(tmp_path / "coco", train=orphan)
    code, lines = inspect_coco(root, tmp_path)
    assert code == 0, "\n".join(lines[-20:])
    (warning,) = [ln for ln in lines if "whose image is not listed" in ln]
    assert "skipped 1 annotation groups" in warning and "instances_train2017.json" in warning
    assert "image_id 77: 1 annotation(s)" in warning


def voc_tree(root, trainval="000000\n", xml=None):
    """A VOCdevkit tree with VOC2007: one trainval and one test image of class `dog`."""
    voc = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    good = (
        "<annotation><size><width>80</width><height>60</height></size><object><name>dog</name>"
        "<bndbox><xmin>10</xmin><ymin>10</ymin><xmax>50</xmax><ymax>40</ymax></bndbox>"
        "</object></annotation>"
    )
    for name in ("000000", "000001"):
        pixels = np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{name}.jpg")
        (voc / "Annotations" / f"{name}.xml").write_text(good)
    if xml is not None:
        (voc / "Annotations" / "000000.xml").write_text(xml)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text(trainval)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    return root


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("empty_set", "trainval.txt lists no images"),
        ("no_bndbox", "000000.xml: malformed annotation: <object> 1 (dog) has no <bndbox>"),
        ("no_voc2007", "has no VOC2007 folder: data.root is the VOCdevkit folder"),
    ],
)
def test_a_broken_voc_tree_is_named(tmp_path, kind, expected):
    root = tmp_path / "voc"
    if kind == "empty_set":
        voc_tree(root, trainval="")
    elif kind == "no_bndbox":
        voc_tree(root, xml="<annotation><object><name>dog</name></object></annotation>")
    else:
        (root / "VOC2012").mkdir(parents=True)
    code, lines = run(
        [
            *INSPECT,
            "--config=configs/faster_rcnn_r50_voc.py:runlocal",
            f"--config.data.root={root}",
            f"--out={tmp_path / 'grid.png'}",
        ],
        tmp_path,
    )
    assert_one_line(code, lines, 1, expected)


def test_a_root_that_runlocal_would_ignore_is_refused(tmp_path):
    root = coco_folder(tmp_path / "coco")
    code, lines = run([*INSPECT, RUNLOCAL, f"--config.data.root={root}"], tmp_path)
    assert_one_line(
        code, lines, 1, f"data.root='{root}' is set", "--config.data.builder=coco_folder"
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.data.scales=()", "config.data.scales=(): must be one or more pairs"),
        ("--config.data.scale_per=images", "config.data.scale_per='images': use 'batch' or"),
        ("--config.data.canvases=((64,64),)", "data.canvases=[(64, 64)]: none holds a"),
        ("--num_images=-1", "--num_images=-1: must be 0 or more"),
        ("--out={tmp}", "is a folder; name the file to write in it"),
        ("--out={tmp}/no/such/grid.png", "the folder {tmp}/no/such does not exist"),
    ],
)
def test_data_settings_the_report_cannot_use_are_named(tmp_path, override, expected):
    override, expected = (s.format(tmp=tmp_path) for s in (override, expected))
    args = [*INSPECT, RUNLOCAL, override]
    if not override.startswith("--out"):
        args.append(f"--out={tmp_path / 'grid.png'}")
    code, lines = run(args, tmp_path)
    assert_one_line(code, lines, 1, expected)


# ---------------------------------------------------------------------- convert and export


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--src={tmp}/absent.pth", "--out={tmp}/o"], "--src={tmp}/absent.pth: no such file"),
        (["--src={tmp}", "--out={tmp}/o"], "--src={tmp}: is a folder"),
        (["--src={tmp}/w.pth", "--out={tmp}/w.pth"], "--out={tmp}/w.pth: is a file"),
        (["--src={tmp}/w.pth", "--out={tmp}/full"], "exists and is not empty; refusing"),
        (["--src={tmp}/w.pth", "--out={tmp}/a/b"], "the folder {tmp}/a does not exist"),
        (["--teacher", "--src={tmp}/w.pth", "--out={tmp}/o"], "has no teacher block"),
    ],
)
def test_convert_refuses_bad_paths_before_reading_the_weights(tmp_path, args, expected):
    # w.pth is no checkpoint at all: each case is refused before it is read
    (tmp_path / "w.pth").write_bytes(b"not read")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept").write_text("kept")
    args, expected = [a.format(tmp=tmp_path) for a in args], expected.format(tmp=tmp_path)
    code, lines = run([*CONVERT, RUNLOCAL, *args], tmp_path)
    assert_one_line(code, lines, 1, expected)
    assert (tmp_path / "full" / "kept").read_text() == "kept"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--workdir={tmp}/absent"],
            "no checkpoint at {tmp}/absent/checkpoints: {tmp}/absent does",
        ),
        (["--workdir={tmp}/run", "--step=7"], "{tmp}/run/checkpoints holds steps [2, 4]"),
        (["--workdir={tmp}/run/checkpoints"], "{tmp}/run/checkpoints holds steps [2, 4]"),
        (["--workdir={tmp}/run", "--step=-1"], "--step=-1: a step is 0 or more"),
        (["--workdir={tmp}/run", "--out={tmp}"], "--out={tmp}: is a folder; name the file"),
        (["--workdir={tmp}/run", "--out={tmp}/x/s.pth"], "the folder {tmp}/x does not exist"),
        (["--workdir={tmp}/run", "--out={tmp}/kept.pth"], "exists; refusing to overwrite it"),
    ],
)
def test_export_names_what_is_wrong_before_writing(tmp_path, args, expected):
    # step folders without a checkpoint in them: every case is refused before one is read
    for step in (2, 4):
        (tmp_path / "run" / "checkpoints" / str(step)).mkdir(parents=True)
    (tmp_path / "kept.pth").write_text("kept")
    args = [a.format(tmp=tmp_path) for a in args]
    if not any(a.startswith("--out") for a in args):
        args.append(f"--out={tmp_path / 'student.pth'}")
    code, lines = run([*EXPORT, *args], tmp_path)
    assert_one_line(code, lines, 1, expected.format(tmp=tmp_path))
    assert (tmp_path / "kept.pth").read_text() == "kept"
    assert not (tmp_path / "student.pth").exists()
    assert not list(tmp_path.glob("*.tmp*"))  # no half-written export left behind


def test_annotations_changed_after_preparation_are_not_silently_ignored(tmp_path):
    root = coco_folder(tmp_path / "coco")
    code, lines = inspect_coco(root, tmp_path, "--num_images=0")
    assert code == 0, "\n".join(lines[-20:])
    ann = root / "annotations" / "instances_train2017.json"
    ann.touch()  # the same bytes (a copy, a checkout): still the prepared data set
    assert inspect_coco(root, tmp_path, "--num_images=0")[0] == 0
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [12, 10, 30, 20]  # the user fixes a box
    ann.write_text(json.dumps(data))
    code, lines = inspect_coco(root, tmp_path, "--num_images=0")
    assert_one_line(
        code, lines, 1, "annotations/instances_train2017.json", "changed since the data set"
    )
    prepared = lines[-1].split(" into ")[1].split(": delete")[0]
    assert (tmp_path / "tfds").is_dir() and prepared.startswith(str(tmp_path / "tfds"))
    assert any((tmp_path / "tfds").rglob("*.array_record*"))  # nothing was deleted for you
