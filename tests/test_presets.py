"""Method presets (`PRESETS` of each `jdistill/distill/` module): every one resolves through
`registry.resolve` to a registered distiller, holds only settings that differ from its
distiller's defaults, and each config's `distill.losses` is exactly the preset it names."""

import types

import ml_collections
import pytest
from helpers.paths import REPO, load_config

from jdistill.distill import plan, registry

# (config, arg, preset, overrides): the preset each config's distill block is built from.
CONFIG_PRESETS = [
    ("crosskd_gfl", None, "crosskd_gfl", {}),
    ("crosskd_pkd_gfl", None, "crosskd_pkd_gfl", {}),
    ("crosskd_retinanet", None, "crosskd_retinanet", {}),
    ("cwd_gfl", None, "cwd_gfl", {}),
    ("cwd_retinanet", None, "cwd_retinanet", {}),
    ("defeat_faster_rcnn_voc", None, "defeat_released", {}),
    ("defeat_faster_rcnn_voc", "paper", "defeat_paper", {}),
    ("defeat_retinanet", None, "defeat_retinanet", {}),
    ("demo", None, "frs_retinanet", dict(frs_feat=dict(weight=0.05), frs_cls=dict(weight=0.05))),
    ("bccd", None, "frs_retinanet", dict(frs_feat=dict(weight=0.05), frs_cls=dict(weight=0.05))),
    ("fgd_gfl", None, "fgd_gfl", {}),
    ("fgd_retinanet", None, "fgd_retinanet", {}),
    ("fgfi_faster_rcnn_voc", None, "fgfi", {}),
    ("frs_faster_rcnn", None, "frs_faster_rcnn", {}),
    ("frs_fcos", None, "frs_fcos", {}),
    ("frs_gfl", None, "frs_gfl", {}),
    ("frs_retinanet", None, "frs_retinanet", {}),
    ("ld_gfl", None, "ld_gfl", {}),
    ("mgd_gfl", None, "mgd_retinanet", {}),  # no GFL recipe is published
    ("mgd_retinanet", None, "mgd_retinanet", {}),
    ("pkd_fcos_to_retinanet", None, "pkd_retinanet", {}),
    ("pkd_gfl", None, "pkd_gfl", {}),
    ("pkd_retinanet", None, "pkd_retinanet", {}),
]


def _resolved(losses):
    return {key: registry.resolve(block).to_dict() for key, block in losses.items()}


@pytest.mark.parametrize("name", sorted(registry.all_presets()))
def test_preset_resolves_to_registered_distillers(name):
    blocks = registry.preset(name)
    assert blocks
    for key, block in blocks.items():
        defaults = {"weight": 1.0, **registry.get(block["fn"]).defaults}
        settings = {k: v for k, v in block.items() if k != "fn"}
        # a typo would otherwise add a setting no distiller reads
        assert set(settings) <= set(defaults), (key, set(settings) - set(defaults))
        # presets hold only what the recipe changes; the rest stays with the distiller
        assert all(v != defaults[k] for k, v in settings.items()), (key, settings)
        cfg = registry.resolve(block)
        assert cfg.to_dict() == {**defaults, **block}


def test_preset_is_a_copy_with_overrides():
    got = registry.preset("frs_gfl", frs_feat=dict(weight=0.2, adapter="conv1x1"))
    assert got["frs_feat"] == {"fn": "frs_feat", "weight": 0.2, "adapter": "conv1x1"}
    assert got["frs_cls"] == {"fn": "frs_cls", "weight": 0.05}
    got["frs_cls"]["weight"] = 9.0
    crosskd_pkd = registry.preset("crosskd_pkd_gfl")
    crosskd_pkd["pkd"]["max_levels"] = 3
    # the table is untouched, also where one preset is built from another's blocks
    assert registry.preset("frs_gfl")["frs_feat"]["weight"] == 0.1
    assert registry.preset("frs_gfl")["frs_cls"]["weight"] == 0.05
    assert registry.preset("pkd_gfl")["pkd"]["max_levels"] == 0


def test_preset_errors_name_what_exists():
    with pytest.raises(KeyError, match=r"unknown distillation preset 'fgd'.*'fgd_gfl'"):
        registry.preset("fgd")
    with pytest.raises(KeyError, match=r"no loss 'frs' to override; it has \['frs_cls'"):
        registry.preset("frs_gfl", frs=dict(weight=1.0))


def test_clashing_names_are_refused():
    a = types.SimpleNamespace(PRESETS={"x": {}}, DISTILLERS={"d": 1})
    b = types.SimpleNamespace(PRESETS={"x": {}})
    with pytest.raises(RuntimeError, match="preset 'x' is registered by both a and b"):
        registry._merge([("a", a), ("b", b)], "PRESETS", "preset")
    assert registry._merge([("a", a), ("b", b)], "DISTILLERS", "distiller") == {"d": 1}


def test_resolve_lays_block_over_defaults():
    cfg = registry.resolve({"fn": "ld", "tau": 4})
    assert cfg.to_dict() == {"fn": "ld", "weight": 0.25, "tau": 4.0, "group_size": 2}
    assert isinstance(cfg.tau, float)  # an int for a float default becomes a float
    assert registry.resolve(ml_collections.ConfigDict({"fn": "ld", "tau": 4.0})) == cfg
    assert registry.resolve({"fn": "frs_cls"}).weight == 1.0  # weight 1 unless a default says
    with pytest.raises(TypeError):
        registry.resolve({"fn": "ld", "tau": "hot"})
    with pytest.raises(KeyError, match="unknown distillation loss 'nope'"):
        registry.resolve({"fn": "nope"})


@pytest.mark.parametrize(("config", "arg", "name", "overrides"), CONFIG_PRESETS)
def test_config_distill_is_its_preset(config, arg, name, overrides):
    cfg = load_config(config, arg)
    want = _resolved(registry.preset(name, **overrides))
    assert cfg.distill.losses.to_dict() == want
    # the trainer's terms resolve the config's blocks to the same settings
    assert {t.key: t.cfg.to_dict() for t in plan.terms(cfg)} == want


def test_every_distill_config_names_a_preset():
    with_distill = {
        path.stem
        for path in (REPO / "configs").glob("*.py")
        if load_config(path.stem).get("distill")
    }
    assert with_distill == {config for config, *_ in CONFIG_PRESETS}
