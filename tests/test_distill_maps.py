"""Pictures of what is distilled: a map over an image by hand, the grid's layout, and the
command `python -m jdistill.visualize` refusing what it cannot draw in one `error:` line.

That training draws every method's maps and the command redraws them byte for byte is
`test_methods_e2e.py`'s (one run per family covers every method)."""

import json

import numpy as np
from helpers.paths import load_config
from PIL import Image
from test_evaluate_command import command, error_lines

from jdistill.evaluate import visualize


def test_a_map_lights_its_cells_and_dims_the_rest():
    image = np.full((20, 20, 3), 200, np.uint8)
    heat = np.zeros((3, 3), np.float32)  # stride 8: 3 cells cover 20 px (ceil)
    heat[1, 2] = 4.0  # the peak: scaled to 1, white at alpha .6 over the dimmed image
    heat[0, 0] = 2.0  # half the peak: colour (255, 127, 0) at alpha .3
    out = visualize.overlay(image, heat, stride=8)
    assert out.shape == (20, 20, 3)
    np.testing.assert_array_equal(out[8, 16], [193, 193, 193])  # .4 * 100 + .6 * 255
    np.testing.assert_array_equal(out[19, 19], [100, 100, 100])  # the last, partial cell
    # .7 * 100 + .3 * (255, 127, 0), truncated
    np.testing.assert_array_equal(out[0, 0], [146, 108, 70])
    # A map that is zero everywhere leaves the dimmed image.
    np.testing.assert_array_equal(visualize.overlay(image, 0 * heat, 8), np.full_like(image, 100))


def test_the_grid_has_a_row_per_map_and_image_and_a_column_per_level(tmp_path):
    images = [np.full((24, 32, 3), 90, np.uint8), np.full((12, 16, 3), 160, np.uint8)]
    maps = {
        "foreground": {"p3": np.ones((2, 4, 4)) * 0.5, "p4": np.ones((2, 2, 2))},
        "channel attention": {"p3": np.array([[1.0, 3.0], [2.0, 2.0]])},  # [N, C]: bars
    }
    path = tmp_path / "maps.png"
    visualize.draw_maps(images, maps, {"p3": 8, "p4": 16}, str(path), title="t", cell=40)
    grid = np.asarray(Image.open(path))
    # title, then 2 maps x 2 images of 40 x 30 tiles (the images' 3:4), 2 levels
    assert grid.shape == (16 + 4 * 30, 2 * 40, 3)
    # The bars tile of the first image: its taller bar (3 of 3) is drawn.
    bars_tile = grid[16 + 2 * 30 : 16 + 3 * 30, :40]
    assert (bars_tile == [255, 165, 0]).all(-1).any()
    # No p4 for the vector: a black tile below its label.
    assert (grid[16 + 2 * 30 + 14 : 16 + 3 * 30, 40:80] == 0).all()
    # Each map is scaled to its own peak, which its label gives: the first image's p3 is drawn
    # at full strength although its values are .5, as its p4 at 1.
    np.testing.assert_array_equal(grid[16 + 20, 20], grid[16 + 20, 60])
    assert visualize.peak_over_image(maps["foreground"]["p3"][0], (24, 32), 8) == 0.5


def test_what_cannot_be_drawn_ends_in_one_error_line(tmp_path):
    no_run = tmp_path / "empty"
    no_run.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(
        json.dumps(load_config("retinanet_r50_coco", "runlocal").to_dict())
    )
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (untrained / "config.json").write_text(
        json.dumps(load_config("frs_retinanet", "runlocal").to_dict())
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases = [
        (no_run, f"{no_run}/config.json does not exist"),
        (broken, f"{broken}/config.json is not valid JSON"),
        (plain, "is not a distillation run with a method that masks or weighs locations"),
        (untrained, f"no checkpoint at {untrained}/checkpoints"),
    ]
    for workdir, message in cases:
        proc = command("jdistill.visualize", f"--workdir={workdir}")
        assert proc.returncode == 1, proc.stderr[-3000:]
        [line] = error_lines(proc)
        assert message in line, line
    assert sorted(p.name for p in untrained.iterdir()) == ["config.json"]  # nothing written
