"""Ahead-of-time compiles (`scripts/aot_compile.py`, `jdistill/aot`): the traffic count against
hand-counted bytes, the target names, the abstract batch against the pipeline's, a compile on
this machine's CPU through the same path, and deviceless H100 and TPU compiles where their
plugins are installed (skipped here otherwise, naming the install)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers.paths import REPO, load_config

from jdistill import parallel
from jdistill.aot import report, targets, traffic
from jdistill.data import datasets, pipeline

HLO = """HloModule m, entry_computation_layout={(f32[8,4]{1,0}, bf16[2,3,3,4]{3,2,1,0})->f32[]}

%fused_slice (p0: f32[8,4]) -> f32[2,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  ROOT %s = f32[2,4]{1,0} slice(%p0), slice={[0:2], [0:4]}
}

%fused_add (p0.1: f32[8,4], p1.1: f32[8,4]) -> f32[8,4] {
  %p0.1 = f32[8,4]{1,0} parameter(0)
  %p1.1 = f32[8,4]{1,0} parameter(1)
  ROOT %a = f32[8,4]{1,0} add(%p0.1, %p1.1), metadata={op_name="inner"}
}

%region_add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s.1 = f32[] add(%x, %y)
}

ENTRY %main (a: f32[8,4], b: bf16[2,3,3,4]) -> (f32[8,4], f32[2,4]) {
  %a = f32[8,4]{1,0} parameter(0)
  %b = bf16[2,3,3,4]{3,2,1,0} parameter(1)
  %c = f32[] constant(0)
  %add = f32[8,4]{1,0} fusion(%a, %a), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/add"}
  %sl = f32[2,4]{1,0} fusion(%add), kind=kLoop, calls=%fused_slice
  %t = f32[4,8]{0,1} transpose(%add), dimensions={1,0}
  %ar = f32[8,4]{1,0} all-reduce-start(%add), replica_groups={}, to_apply=%region_add
  %ard = f32[8,4]{1,0} all-reduce-done(%ar)
  %conv = (bf16[2,3,3,4]{3,2,1,0}, u8[0]{0}) custom-call(%b, %b), custom_call_target="__cudnn$conv"
  %gte = bf16[2,3,3,4]{3,2,1,0} get-tuple-element(%conv), index=0
  %bc = f32[4,8]{1,0} bitcast(%add)
  ROOT %tuple = (f32[8,4]{1,0}, f32[2,4]{1,0}) tuple(%ard, %sl)
}
"""


def test_traffic_counts_entry_operands_and_results_by_hand():
    t = traffic.count(HLO)
    # add: 128 out + 2 x 128 in; the slice fusion reads 32 of its 128-byte operand and writes
    # 32; transpose 128 + 128; all-reduce at its start only, 128 + 128; the cuDNN conv
    # (a tuple with an empty scratch buffer) 144 out + 2 x 144 in; parameters, the constant,
    # the get-tuple-element, the bitcast and the tuple move nothing.
    assert t.by_kind == {
        "convolutions": 432,
        "matmuls": 0,
        "fusions": 384 + 64,
        "copies and transposes": 256,
        "collectives": 256,
        "other": 0,
    }
    assert t.total == 1392
    assert t.count["fusions"] == 2 and t.count["collectives"] == 1
    assert t.top[0] == (432, "convolutions", "conv", "")
    assert t.top[1] == (384, "fusions", "add", "jit(f)/add")


TPU_HLO = """HloModule t

ENTRY %main (p: f32[8,128]) -> f32[2,128] {
  %p = f32[8,128]{1,0:T(8,128)} parameter(0)
  %ss = ((f32[8,128]{1,0:T(8,128)}), f32[2,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%p)
  %sd = f32[2,128]{1,0:T(8,128)S(1)} slice-done(%ss)
  %cs = (f32[8,128]{1,0:T(8,128)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%p)
  %cd = f32[8,128]{1,0:T(8,128)} copy-done(%cs)
  ROOT %m = f32[2,128]{1,0:T(8,128)} fusion(%sd, %cd), kind=kLoop, calls=%f
}
"""


def test_tpu_async_starts_and_on_chip_memory():
    t = traffic.count(TPU_HLO)
    # the slice prefetched into vector memory: its 1 KiB read from HBM only; the copy: 4 KiB
    # read and 4 KiB written (its result repeats the source); the fusion reads the slice from
    # vector memory (0) and the copy from HBM (4 KiB) and writes 1 KiB.
    assert t.by_kind["other"] == 1024
    assert t.by_kind["copies and transposes"] == 8192
    assert t.by_kind["fusions"] == 4096 + 1024
    assert t.total == 1024 + 8192 + 5120


def test_type_bytes():
    assert traffic.type_bytes("bf16[2,3]{1,0}") == 12
    assert traffic.type_bytes("(f32[2]{0}, pred[3]{0}, u8[0]{0})") == 11
    assert traffic.type_bytes("f32[]") == 4
    assert traffic.type_bytes("bf16[8,128]{1,0:T(8,128)(2,1)}") == 2048
    assert traffic.type_bytes("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}") == 0  # on chip
    assert traffic.type_bytes("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}", hbm_only=False) == 2048
    with pytest.raises(ValueError, match="unknown HLO element type"):
        traffic.type_bytes("q7[2]")


def test_targets_parse_and_refuse_in_one_line():
    t = targets.parse("h100:8")
    assert (t.topology, t.num_devices, t.num_hosts) == ("1x1x8", 8, 1)
    t = targets.parse("h100:64")
    assert (t.topology, t.num_devices, t.num_hosts) == ("1x8x8", 64, 8)
    assert targets.parse("a100:2").topology == "1x1x2"
    t = targets.parse("v5e:4x4")
    assert (t.topology, t.num_devices, t.num_hosts) == ("v5e:4x4", 16, 4)
    assert targets.parse("v4:2x2x1").num_devices == 4
    for bad, cause in [
        ("b200:8", "unknown accelerator 'b200'; known: h100, a100, v4, v5e"),
        ("h100:12", "multiple of 8"),
        ("h100", "<chip>:<GPUs>"),
        ("v5e:2y2", "<chip>:<chip grid>"),
    ]:
        with pytest.raises(targets.TargetError, match=cause):
            targets.parse(bad)


def test_a_missing_plugin_names_the_install(monkeypatch):
    monkeypatch.setattr(targets, "plugin_present", lambda chip: False)
    with pytest.raises(targets.TargetError) as e:
        targets.devices(targets.parse("h100:8"))
    assert f'pip install "jax[cuda12]=={jax.__version__}"' in str(e.value)
    with pytest.raises(targets.TargetError, match=r"needs libtpu.*jax\[tpu\]"):
        targets.devices(targets.parse("v5e:2x2"))


def test_the_abstract_batch_is_the_pipelines():
    config = load_config("frs_retinanet", "runlocal")
    rng = np.random.default_rng(0)
    ex = {
        "image": rng.integers(0, 255, (50, 70, 3), dtype=np.uint8),
        "image_id": 7,
        "objects": {
            "bbox": np.array([[1, 2, 30, 40]], np.float32),
            "label": np.array([1]),
            "is_crowd": np.array([False]),
        },
    }
    one = pipeline.process_example(ex, data_cfg=config.data, train=False, rng=rng)
    batch = datasets.device_part(pipeline.stack([one, one]))
    canvas = one["image"].shape[:2]
    mesh = parallel.make_mesh(jax.devices()[:1])
    abstract = datasets.abstract_batch(2, canvas, config.data.max_boxes, mesh)
    assert sorted(abstract) == sorted(datasets.DEVICE_KEYS)
    for k, v in batch.items():
        assert (abstract[k].shape, abstract[k].dtype) == (v.shape, v.dtype), k


@pytest.mark.slow
def test_the_report_of_a_cpu_compile():
    """The same path as a deviceless target, on this machine's CPU: shapes only, no data."""
    config = load_config("frs_retinanet", "runlocal")
    devices = jax.devices()[:1]
    train, predict = report.compile_steps(config, devices, 2, report.num_classes(config))
    for p in (train, predict):
        assert p.memory.total > 0 and p.memory.arguments > 0
        assert p.flops > 0
        assert p.traffic.total == sum(p.traffic.by_kind.values()) > 0
        assert p.traffic.by_kind["convolutions"] > 0
    assert train.traffic.total > predict.traffic.total
    assert train.flops > 2 * predict.flops  # the backward pass and the teacher


def _script(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "aot_compile.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )


def _rows(stdout):
    return {line[:34].strip(): line[36:] for line in stdout.splitlines() if len(line) > 36}


@pytest.mark.parametrize(
    "args, cause",
    [
        (["--target=b200:8"], "error: --target=b200:8: unknown accelerator 'b200'"),
        (
            ["--target=h100:2", "--batch_size=3"],
            "error: --batch_size=3 does not divide over the target's 2 devices",
        ),
        (["--target=h100:2", "--batch_per_device=0"], "error: --batch_per_device=0: must be"),
    ],
)
def test_the_script_refuses_in_one_line(args, cause):
    r = _script("--config=configs/frs_retinanet.py:runlocal", *args)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(cause), r.stderr[-500:]
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("target", ["h100:2", "v5e:2x2"])
def test_deviceless_compile(target):
    chip = targets.parse(target).chip
    if not targets.plugin_present(chip):
        pytest.skip(f"{target} needs its compiler: {targets.install_hint(chip)}")
    r = _script("--config=configs/frs_retinanet.py:runlocal", f"--target={target}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(r.stdout)
    assert rows["devices"] == str(targets.parse(target).num_devices)
    assert rows["batch per device"].startswith("2 ")
    for what in ("train", "predict"):
        assert rows[f"{what} memory/device"].endswith("GiB)")
        gib = float(rows[f"{what} HBM bytes/image"].split()[0])
        assert gib > 0
        assert "-bound" in rows[f"{what} roofline images/s/device"]
