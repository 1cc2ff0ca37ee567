"""Weight files that must not load say why in one line (issue 22): a `.pth` whose unpickling
would run code is refused as such, naming what it would import, in any torch version (not as
"damaged"); a damaged one still reads as damaged; a teacher whose every weight is an integer is
one line naming the file, the count and the dtype, not a line per key.

The CLI tests run the real command lines (`jdistill.main`, `scripts/convert_mmdet_checkpoint.py`),
since what the user meets there (exit status, the last line of stderr) only exists in a separate
process.
"""

import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import REPO, cli_env, load_config

torch = pytest.importorskip("torch", reason="reading .pth files needs the [convert] extra")

from jdistill.convert import mmdet  # noqa: E402
from jdistill.data.builders.synthetic_shapes import CLASS_NAMES  # noqa: E402
from jdistill.models import detector  # noqa: E402

# The distillation config the CLI tests run: its teacher is a RetinaNet R101 (at runlocal width)
# on the synthetic shapes, which need no data set on disk.
CONFIG = "pkd_retinanet"


class _RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_code_pth(path, marker, fmt="zip"):
    """A checkpoint-shaped file whose unpickling runs `touch marker`: saved by torch.save (its
    zip format, or the legacy one), or a raw pickle."""
    obj = {"meta": {"CLASSES": ["a"]}, "state_dict": {"w": _RunsCode(marker)}}
    if fmt == "raw":
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    return str(path)


def run(cmd, timeout=300):
    """Runs a command line from the repository; returns (exit status, stderr lines)."""
    cmd = [sys.executable, *cmd]
    out = subprocess.run(
        cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    return out.returncode, out.stderr.rstrip("\n").splitlines()


def run_teacher(init, workdir, *flags):
    """`jdistill.main` on CONFIG:runlocal with `teacher.init=init`."""
    return run(
        [
            "-m",
            "jdistill.main",
            f"--config=configs/{CONFIG}.py:runlocal",
            f"--workdir={workdir}",
            f"--config.teacher.init={init}",
            *flags,
        ]
    )


@pytest.fixture(scope="module")
def prepared_data():
    """CONFIG's synthetic data, prepared here in the session's TFDS dir (which the CLI
    inherits), so a CLI run's stderr holds no data preparation progress."""
    from jdistill.data import sources

    data = load_config(CONFIG, "runlocal").data
    for split in (data.train_split, data.eval_split):
        sources.load_split(data, split)


def teacher_state_dict():
    """The mmdetection state_dict of CONFIG's runlocal teacher as the converter writes it
    (`to_mmdet`: every weight, float32 zeros, and the int64 `num_batches_tracked` buffers)."""
    cfg = load_config(CONFIG, "runlocal").teacher.model
    det = detector.build(cfg, len(CLASS_NAMES))
    shapes = jax.eval_shape(det.module.init, jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3)))
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    return mmdet.to_mmdet(zeros, cfg.family), zeros


# ---------------------------------------------------------------- case 1: a .pth that runs code


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw"])
def test_a_pth_that_would_run_code_is_refused_by_name(tmp_path, fmt):
    marker = tmp_path / "SOMEFILE"
    path = write_code_pth(tmp_path / f"evil_{fmt}.pth", marker, fmt)
    with pytest.raises(mmdet.ConversionError) as e:
        mmdet.read_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"refusing to load {path}: it would import posix.system, "), msg
    assert "never holds (code or objects, not tensors)" in msg and "\n" not in msg
    assert "damaged" not in msg
    assert not marker.exists()
    if fmt == "zip":  # the file really runs code when loaded without the restriction
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_a_damaged_pth_is_damage_not_a_refusal(tmp_path):
    path = write_code_pth(tmp_path / "evil_zip.pth", tmp_path / "SOMEFILE")
    with open(path, "r+b") as f:  # cut off: no zip directory, so nothing can be inspected
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(mmdet.ConversionError, match="damaged or truncated") as e:
        mmdet.read_checkpoint(path)
    assert str(e.value).startswith(f"cannot read {path}: ")
    # Text starts with 'c', pickle's GLOBAL opcode: read as a pickle it seems to import a name,
    # but it never parses to the end, so it is garbage, not a refusal.
    text = tmp_path / "config.pth"
    text.write_text("config = dict(a=1)\nmodel = 2\n")
    with pytest.raises(mmdet.ConversionError, match="damaged or truncated"):
        mmdet.read_checkpoint(str(text))


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_checkpoint_with_mmdetection_meta_loads(tmp_path, zip_format):
    # What an mmcv checkpoint holds besides float tensors: a meta of plain values (config
    # text, a class tuple, numbers; sets and bytes are imports in protocol 2), int64 counters
    # and bfloat16 weights. None of it may read as code.
    meta = {
        "mmcv_version": "1.7.0",
        "config": "model = dict(type='RetinaNet')\n",
        "CLASSES": ("a", "b"),
        "epoch": 12,
        "hook_msgs": {"last_ckpt": "/w/epoch_12.pth", "best_score": 0.5},
        "seen": {1, 2},
        "raw": b"\x00\x01",
    }
    sd = {
        "backbone.conv1.weight": torch.ones(4, 3, 3, 3),
        "backbone.bn1.num_batches_tracked": torch.tensor(7),
        "neck.w": torch.ones(2, dtype=torch.bfloat16),
    }
    path = str(tmp_path / "ok.pth")
    torch.save({"meta": meta, "state_dict": sd}, path, _use_new_zipfile_serialization=zip_format)
    read, got = mmdet.read_checkpoint(path)
    assert got == meta and sorted(read) == sorted(sd)


@pytest.mark.slow  # a CLI subprocess: the full suite runs it
def test_the_cli_refuses_a_teacher_that_would_run_code(tmp_path, prepared_data):
    marker = tmp_path / "SOMEFILE"
    path = write_code_pth(tmp_path / "evil_zip.pth", marker)
    rc, lines = run_teacher(path, tmp_path / "run")
    assert rc == 1, lines[-20:]
    assert lines[-1].startswith(f"error: refusing to load {path}: it would import posix.system"), (
        lines[-20:]
    )
    assert "not tensors" in lines[-1]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    assert not marker.exists()


@pytest.mark.slow  # a CLI subprocess: the full suite runs it
def test_the_convert_script_refuses_a_pth_that_would_run_code(tmp_path):
    marker = tmp_path / "SOMEFILE"
    path = write_code_pth(tmp_path / "evil_zip.pth", marker)
    out = tmp_path / "orbax"
    rc, lines = run(
        [
            "scripts/convert_mmdet_checkpoint.py",
            "--config=configs/retinanet_r50_coco.py:runlocal",
            f"--src={path}",
            f"--out={out}",
        ]
    )
    assert rc == 1, lines[-20:]
    assert lines[-1].startswith(f"error: refusing to load {path}: it would import posix.system"), (
        lines[-20:]
    )
    assert not marker.exists() and not out.exists()


# ---------------------------------------------------------------- case 9: an all-integer teacher


@pytest.mark.slow  # a CLI subprocess: the full suite runs it
def test_the_cli_refuses_an_int32_teacher_in_one_line(tmp_path, prepared_data):
    sd, _ = teacher_state_dict()
    weights = sum(np.issubdtype(v.dtype, np.floating) for v in sd.values())
    assert weights > 100  # a real detector's worth of keys, each once a line of the error
    as_int = {k: v.astype(np.int32) if v.dtype == np.float32 else v for k, v in sd.items()}
    path = str(tmp_path / "teacher.pth")
    mmdet.write_pth(path, as_int, {"CLASSES": list(CLASS_NAMES)})
    # Warnings and errors only: the per-key lines this used to print went to the error log,
    # while the config dump and progress lines that --verbosity=-1 hides are the same for any run.
    rc, lines = run_teacher(path, tmp_path / "run", "--verbosity=-1")
    assert rc == 1, lines[-20:]
    assert lines[-1] == (
        f"error: teacher {path}: {weights} of {weights} weight tensors are int32; a detector's "
        f"weights are floating point (is this a quantised or index file?)"
    ), lines[-20:]
    assert len(lines) < 30, "\n".join(lines)


def test_mixed_dtypes_are_grouped_by_dtype(tmp_path):
    sd, zeros = teacher_state_dict()
    convs = [k for k in sd if k.startswith("backbone.layer") and k.endswith("conv2.weight")]
    assert len(convs) > 3
    for k in convs:
        sd[k] = sd[k].astype(np.int32)
    sd["neck.fpn_convs.0.conv.bias"] = sd["neck.fpn_convs.0.conv.bias"].astype(np.int64)
    with pytest.raises(mmdet.ConversionError) as e:
        mmdet.to_flax(sd, zeros, family="retinanet", what="teacher.pth")
    lines = str(e.value).splitlines()
    assert lines[0] == (
        f"teacher.pth does not match the model: {len(convs) + 1} tensors not floating point"
    )
    assert lines[1:] == [
        f"  not floating point: {len(convs)} tensors are int32 where the model has float32, "
        f"e.g. {', '.join(convs[:3])}",
        "  not floating point: neck.fpn_convs.0.conv.bias: checkpoint int64 vs model float32",
    ]
