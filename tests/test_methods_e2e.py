"""Every registered distiller trains end to end, found through the registry: a new method is
covered here without editing this file.

One run per student family puts every distiller that accepts the pair (by its declared needs and
its own check) on the same student at once, with auto-balance on: one compile covers them all.
"""

import json
import os

import numpy as np
import pytest
from helpers.paths import load_config

from jdistill import train, visualize
from jdistill.distill import api, plan, registry
from jdistill.models import detector as detector_lib

# Methods that must be among the accepted ones (a method silently refused would go unseen).
EXPECTED = {
    "frs_gfl": {
        *("frs_feat", "frs_cls", "defeat_neck", "defeat_dense_kd"),
        *("pkd", "cwd", "cwd_logits", "mgd", "fgd"),
    },
    "frs_retinanet": {"frs_feat", "frs_cls", "defeat_neck", "defeat_dense_kd", "pkd", "mgd", "fgd"},
}
# Methods of another family's head: their own configs run them (test_e2e, their tests).
EXPECTED["frs_gfl"] |= {"ld", "crosskd"} & set(registry.all_distillers())
EXPECTED["frs_retinanet"] |= {"crosskd"} & set(registry.all_distillers())


def accepted_methods(config):
    """Every registered distiller whose defaults accept this config's student/teacher pair."""
    spec = api.Pair(
        detector_lib.build(config.model, 1).spec, detector_lib.build(config.teacher.model, 1).spec
    )
    names = []
    for name in sorted(registry.all_distillers()):
        config.distill.losses = {name: {"fn": name}}
        if not plan.problems(plan.terms(config), spec):
            names.append(name)
    return names


@pytest.mark.slow
@pytest.mark.parametrize("base", sorted(EXPECTED))
def test_every_applicable_method_trains_together(base, tmp_path):
    config = load_config(base, "runlocal")
    config.unlock()
    names = accepted_methods(config)
    assert EXPECTED[base] <= set(names), sorted(EXPECTED[base] - set(names))
    config.distill.losses = {name: {"fn": name} for name in names}
    config.distill.auto_balance = True  # window: steps 3-4 (warm-up 2, balance_steps 2)
    config.eval_max_images = 2
    config.lock()
    train.check_config(config)
    train.run(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for name in names:
        values = [r[f"distill/{name}"] for r in rows]
        assert np.all(np.isfinite(values)), (name, values)
        assert values[0] == 0.0 and values[2] > 0, (name, values)  # warm-up, then on
        scales = [r[f"distill/{name}/scale"] for r in rows]
        # auto-balance sets each scale once, at the window's last step (log step 4)
        assert scales[:3] == [1.0, 1.0, 1.0] and scales[3] != 1.0, (name, scales)
    assert rows[-1]["student/loss"] > 0
    # Every method that weighs or masks locations drew its maps at the final evaluation, and
    # `python -m jdistill.visualize` draws the same files, byte for byte, from the checkpoint.
    drawn = [n for n in names if registry.get(n).maps is not None]
    assert {"frs_feat", "defeat_neck", "fgd", "mgd"} <= set(drawn)
    written = visualize.draw(str(tmp_path), out=str(tmp_path / "redrawn"))
    assert sorted(os.path.basename(p) for p in written) == sorted(
        f"step_4.maps.{n}.png" for n in drawn
    )
    for name in drawn:
        png = (tmp_path / "eval" / f"step_4.maps.{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png == (tmp_path / "redrawn" / f"step_4.maps.{name}.png").read_bytes(), name
