"""mmdetection checkpoint conversion: parity with an independent PyTorch implementation,
exact round trips, strict errors and safe loading."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the converter tests need the [convert] extra")

from torch_reference import Detector, randomize  # noqa: E402

from jdistill import checkpoint, config_lib  # noqa: E402
from jdistill.convert import mmdet, tools  # noqa: E402
from jdistill.models import detector  # noqa: E402

CASES = [
    # (family, torch head kind, depth, style)
    ("retinanet", "retina", 50, "pytorch"),
    ("gfl", "gfl", 18, "pytorch"),
    ("fcos", "fcos", 50, "caffe"),
    ("faster_rcnn", "faster_rcnn", 18, "pytorch"),
]


def build(family, depth, style, num_classes=3):
    cfg = getattr(config_lib, family)(depth)
    cfg.width, cfg.neck_channels, cfg.stacked_convs, cfg.style = 0.125, 32, 2, style
    if family == "faster_rcnn":
        cfg.fc_channels = 32
    return detector.build(cfg, num_classes)


def expected_tree(det, canvas=(64, 96)):
    return jax.eval_shape(det.module.init, jax.random.PRNGKey(0), jnp.zeros((1, *canvas, 3)))


def torch_state(kind, depth, style, num_classes=3, seed=0):
    model = randomize(Detector(kind, depth, 8, style, 32, num_classes, 2), seed)
    return model, {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family,kind,depth,style", CASES)
def test_converted_model_matches_torch(family, kind, depth, style):
    det = build(family, depth, style)
    model, sd = torch_state(kind, depth, style)
    variables = mmdet.to_flax(sd, expected_tree(det), family=family)
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 96)).astype(np.float32)
    with torch.no_grad():
        feats, pyramid, head = model(torch.from_numpy(x))
    outputs, taps = det.module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731

    def close(a, b, what):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-4 * scale, rtol=1e-4, err_msg=what)

    for i, f in enumerate(feats):
        close(taps[f"backbone/c{i + 2}"], nhwc(f), f"c{i + 2}")
    first = 2 if family == "faster_rcnn" else 3
    for i, p in enumerate(pyramid):
        close(taps[f"neck/p{i + first}"], nhwc(p), f"p{i + first}")
    names = [k for k in outputs if k != "neck"]
    for lvl, per_level in enumerate(head):
        for name, t in zip(names, per_level, strict=True):
            close(outputs[name][lvl], nhwc(t), f"{name} level {lvl}")
    if family == "faster_rcnn":
        # The RoI head on the same pooled features: torch flattens (C, H, W), jdistill (H, W, C)
        # and the converter reorders shared_fcs.0 to match.
        pooled = np.random.default_rng(2).normal(size=(5, 32, 7, 7)).astype(np.float32)
        with torch.no_grad():
            t_cls, t_reg = model.roi_head.bbox_head(torch.from_numpy(pooled))
        j_cls, j_reg = det.module.apply(
            variables, jnp.asarray(pooled.transpose(0, 2, 3, 1)), method=lambda m, x: m.bbox_head(x)
        )
        close(j_cls, t_cls.numpy(), "fc_cls")
        close(j_reg, t_reg.numpy(), "fc_reg")


@pytest.mark.parametrize("family,kind,depth,style", CASES)
def test_round_trip_is_exact(family, kind, depth, style):
    det = build(family, depth, style)
    _, sd = torch_state(kind, depth, style)
    back = mmdet.to_mmdet(mmdet.to_flax(sd, expected_tree(det), family=family), family)
    assert list(back) == list(sd) or sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_every_mismatch_is_listed():
    det = build("gfl", 18, "pytorch")
    _, sd = torch_state("gfl", 18, "pytorch")
    sd["bbox_head.gfl_reg.weight_renamed"] = sd.pop("bbox_head.gfl_reg.weight")
    sd["neck.fpn_convs.0.conv.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    with pytest.raises(mmdet.ConversionError) as e:
        mmdet.to_flax(sd, expected_tree(det), family="gfl", what="gfl.pth")
    msg = str(e.value)
    assert "gfl.pth does not match" in msg
    assert "missing key: bbox_head.gfl_reg.weight" in msg
    assert "unexpected key: bbox_head.gfl_reg.weight_renamed" in msg
    assert "shape mismatch: neck.fpn_convs.0.conv.weight: checkpoint (32, 32, 1, 1)" in msg
    # ...unless the config names the keys to skip
    out = mmdet.to_flax(
        sd,
        expected_tree(det),
        family="gfl",
        skip=(r"gfl_reg\.weight", r"fpn_convs\.0\.conv\.weight"),
    )
    assert out["params"]["bbox_head"]["gfl_reg"]["conv"]["kernel"].shape == (3, 3, 32, 68)


def test_class_count_mismatch_is_named():
    det = build("retinanet", 50, "pytorch", num_classes=3)
    _, sd = torch_state("retina", 50, "pytorch", num_classes=80)
    with pytest.raises(mmdet.ConversionError, match="different number of classes"):
        mmdet.to_flax(sd, expected_tree(det), family="retinanet")


def test_legacy_fcos_keys_are_renamed():
    det = build("fcos", 50, "caffe")
    _, sd = torch_state("fcos", 50, "caffe")
    legacy = {k.replace("bbox_head.conv_", "bbox_head.fcos_"): v for k, v in sd.items()}
    a = mmdet.to_flax(sd, expected_tree(det), family="fcos")
    b = mmdet.to_flax(legacy, expected_tree(det), family="fcos")
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_pth_and_safetensors_files(tmp_path):
    _, sd = torch_state("gfl", 18, "pytorch")
    pth = str(tmp_path / "gfl.pth")
    mmdet.write_pth(pth, sd, {"CLASSES": ["a", "b", "c"]})
    read, meta = mmdet.read_checkpoint(pth)
    assert meta["CLASSES"] == ["a", "b", "c"]
    assert sorted(read) == sorted(sd)
    from safetensors.numpy import save_file

    st = str(tmp_path / "gfl.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, st)
    read2, _ = mmdet.read_checkpoint(st)
    for k in sd:
        np.testing.assert_array_equal(read[k], read2[k])


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    _Exploit.marker = str(tmp_path / "pwned")
    path = str(tmp_path / "evil.pth")
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": _Exploit()}}, f)
    with pytest.raises(mmdet.ConversionError, match="refusing to load"):
        mmdet.read_checkpoint(path)
    assert not os.path.exists(_Exploit.marker)
    # the file really is an exploit: a plain unpickler runs its code
    with open(path, "rb") as f:
        pickle.load(f)  # noqa: S301 (on purpose, in a temporary directory)
    assert os.path.exists(_Exploit.marker)


def test_orbax_output_loads_as_a_teacher(tmp_path):
    det = build("retinanet", 50, "pytorch")
    _, sd = torch_state("retina", 50, "pytorch")
    variables = mmdet.to_flax(sd, expected_tree(det), family="retinanet")
    out = str(tmp_path / "teacher")
    mmdet.write_orbax(out, variables, {"class_names": ["a", "b", "c"]})
    loaded, meta = checkpoint.load_model_variables(out)
    assert meta["class_names"] == ["a", "b", "c"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)


@pytest.mark.slow
def test_exported_student_loads_strictly_into_mmdetection_modules(tmp_path):
    det = build("gfl", 18, "pytorch")
    variables = jax.device_get(det.module.init(jax.random.PRNGKey(3), jnp.zeros((1, 64, 96, 3))))
    meta = {"class_names": ["a", "b", "c"], "model": dict(det.cfg.to_dict())}
    mmdet.write_orbax(str(tmp_path / "run" / "checkpoints"), variables, meta)
    out = str(tmp_path / "student.pth")
    tools.export(str(tmp_path / "run"), out, "mmdet")
    obj = torch.load(out, weights_only=True)
    assert obj["meta"]["CLASSES"] == ["a", "b", "c"]
    model = Detector("gfl", 18, 8, "pytorch", 32, 3, 2).eval()
    missing, unexpected = model.load_state_dict(obj["state_dict"], strict=True)
    assert not missing and not unexpected
    assert all(
        k.endswith("num_batches_tracked") is False or v.dtype == torch.int64
        for k, v in obj["state_dict"].items()
    )
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 96)).astype(np.float32)
    with torch.no_grad():
        _, _, head = model(torch.from_numpy(x))
    outputs, _ = det.module.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(
        outputs["cls_logits"][0], head[0][0].numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4
    )
    with pytest.raises(FileExistsError):
        tools.export(str(tmp_path / "run"), out, "mmdet")  # never overwrites


def test_convert_script_and_pth_teacher_init(tmp_path):
    _, sd = torch_state("retina", 50, "pytorch")
    src = str(tmp_path / "retina.pth")
    mmdet.write_pth(src, sd, {"CLASSES": ["a", "b", "c"]})
    cfg = config_lib.retinanet(50)
    cfg.width, cfg.neck_channels, cfg.stacked_convs = 0.125, 32, 2
    variables = tools.convert(cfg, src, str(tmp_path / "orbax"))
    loaded, meta = checkpoint.load_model_variables(str(tmp_path / "orbax"))
    assert meta["class_names"] == ["a", "b", "c"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
    # teacher.init may also name the .pth itself; a class mismatch is refused
    import ml_collections

    from jdistill import experiment

    config = ml_collections.ConfigDict(
        dict(seed=0, teacher=dict(model=cfg.to_dict(), init=src, init_skip=()))
    )
    det = detector.build(cfg, 3)
    direct = experiment.load_teacher(config, det, ("a", "b", "c"), (64, 96))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(direct), variables)
    with pytest.raises(ValueError, match="mismatched teacher"):
        experiment.load_teacher(config, det, ("x", "y", "z"), (64, 96))


@pytest.mark.slow
def test_imagenet_backbone_initialises_the_student_backbone_only(tmp_path):
    model, _ = torch_state("retina", 50, "pytorch")
    backbone = {k: v.numpy() for k, v in model.backbone.state_dict().items()}
    backbone["fc.weight"] = np.zeros((1000, 256), np.float32)  # torchvision's classifier
    backbone["fc.bias"] = np.zeros((1000,), np.float32)
    src = str(tmp_path / "resnet50.pth")
    mmdet.write_pth(src, backbone, {})
    det = build("retinanet", 50, "pytorch")
    fresh = jax.device_get(det.module.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 96, 3))))
    out, _ = mmdet.load_variables(src, fresh, family="retinanet")
    got = out["params"]["backbone"]["layer2_0"]["conv2"]["conv"]["kernel"]
    want = backbone["layer2.0.conv2.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        out["params"]["bbox_head"]["retina_cls"]["conv"]["kernel"],
        fresh["params"]["bbox_head"]["retina_cls"]["conv"]["kernel"],
    )
    with pytest.raises(mmdet.ConversionError, match="only an ImageNet backbone"):
        mmdet.load_variables(src, fresh, family="retinanet", backbone_ok=False)
    # a backbone key that does not fit is still an error
    backbone["layer1.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    mmdet.write_pth(src, backbone, {})
    with pytest.raises(mmdet.ConversionError, match="layer1.0.conv1.weight"):
        mmdet.load_variables(src, fresh, family="retinanet")
