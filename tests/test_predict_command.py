"""`python -m jdistill.predict` on a folder of mixed files: synthetic photos of several sizes, a
truncated JPEG (decoded tolerantly), a grayscale PNG, and a text file named .jpg (skipped,
named in a warning, counted in the summary)."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_evaluate_command import RUNLOCAL, command, error_lines, random_checkpoint

from jdistill.data import decode
from jdistill.data.builders import synthetic_shapes
from jdistill.evaluate import predict_images, visualize

# (file, height, width) of the files that decode; notes.jpg is text, readme.txt not an image.
IMAGES = [
    ("landscape.jpg", 120, 160),
    ("portrait.jpg", 300, 200),  # taller than the runlocal canvas: resized to fit it
    ("small.jpg", 40, 56),
    ("gray.png", 90, 130),
    ("truncated.jpg", 200, 240),
    ("wide.jpg", 100, 1400),  # its PNG is drawn at most MAX_PNG_SIDE wide
]


def image_folder(folder):
    """Writes IMAGES (a square of colour on a grey ground each), notes.jpg and readme.txt."""
    folder.mkdir()
    for name, h, w in IMAGES:
        pixels = np.full((h, w, 3), 60, np.uint8)
        pixels[h // 4 : h // 2, w // 3 : 2 * w // 3] = (220, 40, 40)
        im = Image.fromarray(pixels)
        if name.endswith(".png"):
            im.convert("L").save(folder / name)
        else:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
            if name.startswith("truncated"):
                data = data[: len(data) * 2 // 3]
            (folder / name).write_bytes(data)
    (folder / "notes.jpg").write_text("not an image, whatever its name says\n")
    (folder / "readme.txt").write_text("not taken: a folder's files are chosen by suffix\n")
    return folder


@pytest.mark.slow
def test_predict_on_a_folder_of_mixed_files(tmp_path):
    ckpt = random_checkpoint(tmp_path / "retina")
    images = image_folder(tmp_path / "photos")
    out = tmp_path / "out"
    # A random head scores about 0.01: --score_thr=0 lowers the network's threshold (0.05) too,
    # so every image has detections to check.
    args = [f"--config={RUNLOCAL}", f"--init={ckpt}", f"--images={images}", f"--out={out}"]
    proc = command("jdistill.predict", *args, "--score_thr=0", "--progress_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The skip line and the tolerant decode are warnings naming the file; readme.txt is no image.
    assert f"skipping {images / 'notes.jpg'}: not an image PIL can read" in proc.stderr
    assert f"{images / 'truncated.jpg'}: damaged image" in proc.stderr
    assert "readme.txt" not in proc.stderr
    assert "predict: 2/6 images" in proc.stderr and "predict: 4/6 images" in proc.stderr
    summary = proc.stdout.splitlines()[-1]
    assert summary.startswith("predicted 6 of 7 files in ")
    assert "skipped 1 file that could not be decoded; 1 decoded tolerantly (damaged)" in summary
    assert summary.endswith(f"wrote {out}/detections.json and 6 PNGs")

    detections = json.loads((out / "detections.json").read_text())
    assert f"{len(detections)} detections with score >= 0;" in summary
    size = {name: (h, w) for name, h, w in IMAGES}
    ids = {}
    for d in detections:
        assert set(d) == {"image_id", "category_id", "bbox", "score", "file_name", "category_name"}
        h, w = size[d["file_name"]]
        assert ids.setdefault(d["file_name"], d["image_id"]) == d["image_id"]  # one id per file
        # COCO results: [x, y, w, h] in the original image's pixels, inside it.
        x, y, bw, bh = d["bbox"]
        assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0
        assert x + bw <= w + 1e-3 and y + bh <= h + 1e-3
        assert 0 <= d["score"] <= 1
        # The checkpoint records the synthetic classes; ids are label + 1 as it has no ids.
        assert d["category_name"] == synthetic_shapes.CLASS_NAMES[d["category_id"] - 1]
    assert sorted(ids) == sorted(size) and len(set(ids.values())) == len(size)
    per_image = [sum(d["file_name"] == n for d in detections) for n in size]
    assert all(0 < n <= 20 for n in per_image)  # runlocal keeps at most 20 per image

    # One PNG per decoded image: the image as training decodes it (at most MAX_PNG_SIDE pixels
    # on the long side), boxes drawn over it in the palette's colours.
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        n.rsplit(".", 1)[0] + ".png" for n in size
    )
    for name, h, w in IMAGES:
        drawn = np.asarray(Image.open(out / (name.rsplit(".", 1)[0] + ".png")))
        original, _ = decode.decode((images / name).read_bytes(), name=name)
        if max(h, w) > predict_images.MAX_PNG_SIDE:
            h, w = (round(s * predict_images.MAX_PNG_SIDE / max(h, w)) for s in (h, w))
            original = np.asarray(Image.fromarray(original).resize((w, h), Image.BILINEAR))
        assert drawn.shape == original.shape == (h, w, 3)
        changed = drawn[(drawn != original).any(axis=-1)]
        assert {tuple(c) for c in changed} & set(visualize.PALETTE), name

    # As training under data.strict_images, the damaged file is refused: skipped, no PNG, no
    # detections (its header parses, so it is refused while the batches are read).
    strict = tmp_path / "strict"
    args[-1] = f"--out={strict}"
    proc = command("jdistill.predict", *args, "--score_thr=0", "--config.data.strict_images=True")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping {images / 'truncated.jpg'}: damaged image" in proc.stderr
    assert "refused because data.strict_images=True" in proc.stderr
    summary = proc.stdout.splitlines()[-1]
    assert summary.startswith("predicted 5 of 7 files in ")
    assert "skipped 2 files that could not be decoded; 0 decoded tolerantly" in summary
    assert summary.endswith("and 5 PNGs") and not (strict / "truncated.png").exists()
    kept = json.loads((strict / "detections.json").read_text())
    assert kept == [d for d in detections if d["file_name"] != "truncated.jpg"]


@pytest.mark.slow
def test_an_image_alone_gets_the_detections_it_gets_in_a_batch(tmp_path):
    # Padded batches are masked per image: one image, predicted with 7 padding copies of
    # itself, gets the boxes it got among four others.
    ckpt = random_checkpoint(tmp_path / "retina")
    images = image_folder(tmp_path / "photos")
    found = {}
    for pattern in ("*", "portrait.*"):
        out = tmp_path / pattern.replace("*", "all")
        args = [f"--config={RUNLOCAL}", f"--init={ckpt}", f"--images={images}/{pattern}"]
        proc = command("jdistill.predict", *args, f"--out={out}", "--score_thr=0")
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[pattern] = [
            (d["category_id"], d["bbox"], d["score"])
            for d in json.loads((out / "detections.json").read_text())
            if d["file_name"] == "portrait.jpg"
        ]
    assert found["*"], "no detections to compare"
    alone, batched = found["portrait.*"], found["*"]
    assert [c for c, _, _ in alone] == [c for c, _, _ in batched]
    np.testing.assert_allclose([b for _, b, _ in alone], [b for _, b, _ in batched], rtol=1e-5)
    np.testing.assert_allclose([s for _, _, s in alone], [s for _, _, s in batched], rtol=1e-5)


@pytest.mark.slow  # a CLI subprocess: the full suite runs it
def test_no_image_matched_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no image here\n")
    for images, message in [
        (tmp_path / "empty", f"--images={tmp_path / 'empty'}: no image files matched"),
        (tmp_path / "empty" / "*.jpg", "no image files matched"),
    ]:
        proc = command(
            "jdistill.predict",
            f"--config={RUNLOCAL}",
            f"--init={tmp_path / 'absent'}",
            f"--images={images}",
            f"--out={tmp_path / 'out'}",
        )
        assert proc.returncode == 1
        [line] = error_lines(proc)
        assert message in line, line


def test_a_folder_takes_image_suffixes_a_glob_every_match(tmp_path):
    images = image_folder(tmp_path / "photos")
    (images / "sub").mkdir()
    (images / "sub" / "deep.JPG").write_bytes((images / "small.jpg").read_bytes())
    names = sorted([*(n for n, _, _ in IMAGES), "notes.jpg"])
    files, base = predict_images.find_images(str(images))
    assert base == str(images) and files == [str(images / n) for n in names]
    files, base = predict_images.find_images(f"{images}/**/*.[jJ][pP][gG]")
    assert base == str(images)
    want = [n for n in names if n.endswith(".jpg")] + ["sub/deep.JPG"]
    assert sorted(files) == sorted(str(images / n) for n in want)
    assert predict_images.find_images(str(images / "gray.png")) == (
        [str(images / "gray.png")],
        str(images),
    )


def test_png_names_are_the_file_names_unless_two_would_collide():
    names = ["a.jpg", "a.png", "b.jpeg", "sub/b.jpg", "sub/c.jpg"]
    got = predict_images.png_names(names)
    assert got == ["a.jpg.png", "a.png.png", "b.png", "sub__b.png", "sub__c.png"]
    assert len(set(got)) == len(got)
